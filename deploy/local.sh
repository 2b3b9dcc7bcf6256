#!/usr/bin/env bash
# Starts a working local keytrail deployment on embedded defaults: a collector, an agent beside
# it, and a stream of sample license events; prints where to look. Ctrl-C stops everything.
#
#   ./deploy/local.sh            # builds (release), then runs in the foreground
#   KT_RUN_DIR=/tmp/kt ./deploy/local.sh   # keep state somewhere else (default: .run/)
#
# Ports: 7443 (agents -> collector, mTLS), 7444 (analyst API), 7070 (agent local API).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${KT_RUN_DIR:-.run}
for p in 7443 7444 7070; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
    echo "local.sh: port $p is already in use (another keytrail running?)" >&2; exit 1
  fi
done
echo "== building (release; the first build takes a few minutes on 2 cores)"
cargo build --release -j2 -q -p keytrail-agent -p keytrail-collector -p keytrail-tests --bins
B=target/release
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
[ -f "$RUN/pki/ca.crt" ] || "$B/keytrail-collector" certs --out "$RUN/pki" --agent local-agent >/dev/null
[ -s "$RUN/fingerprint.secret" ] || (umask 077; { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; } >"$RUN/fingerprint.secret")
cat >"$RUN/collector.toml" <<TOML
data_dir = "$RUN/collector"
[receive]
listen = "127.0.0.1:7443"
cert = "$RUN/pki/collector.crt"
key = "$RUN/pki/collector.key"
client_ca = "$RUN/pki/ca.crt"
[api]
listen = "127.0.0.1:7444"
[plans.free]
price_monthly = 0.0
seats = 1
[plans.pro]
price_monthly = 49.0
seats = 10
[plans.enterprise]
price_monthly = 499.0
seats = 100
TOML
cat >"$RUN/agent.toml" <<TOML
agent_id = "local-agent"
[context]
product = "demo-app"
region = "local"
deployment = "on_prem"
[ingest]
listen = "127.0.0.1:7070"
[buffer]
dir = "$RUN/agent"
max_bytes = "256MiB"
[ship]
collector = "https://localhost:7443"
ca = "$RUN/pki/ca.crt"
cert = "$RUN/pki/local-agent.crt"
key = "$RUN/pki/local-agent.key"
[privacy]
fingerprint_secret_file = "$RUN/fingerprint.secret"
TOML
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; echo; echo "stopped; state kept in $RUN"; }
trap stop EXIT INT TERM
wait_http() { for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "local.sh: $1 did not come up; see $RUN/*.log" >&2; exit 1; }
"$B/keytrail-collector" serve --config "$RUN/collector.toml" 2>"$RUN/collector.log" & PIDS+=($!)
wait_http http://127.0.0.1:7444/healthz
"$B/keytrail-agent" run --config "$RUN/agent.toml" 2>"$RUN/agent.log" & PIDS+=($!)
wait_http http://127.0.0.1:7070/readyz
"$B/keytrail-traffic" --agent http://127.0.0.1:7070 --rate 200 --licenses 300 2>"$RUN/traffic.log" & PIDS+=($!)
cat <<TXT

keytrail is running: collector + agent (mTLS between them) + 200 sample license events/s.

  Collector stats     curl -s http://127.0.0.1:7444/v1/stats
  Latest events       curl -s 'http://127.0.0.1:7444/v1/events?limit=5'
  One license         curl -s 'http://127.0.0.1:7444/v1/events?license=license-00001&limit=5'
  Agent status        curl -s http://127.0.0.1:7070/v1/status
  Agent readiness     curl -s http://127.0.0.1:7070/readyz
  Prometheus          curl -s http://127.0.0.1:7070/metrics   (and :7444/metrics)
  Post your own       curl -s -H 'Content-Type: application/json' -d '{"type":"license.validated","license_key":"MY-KEY"}' http://127.0.0.1:7070/v1/events
  Logs and state      $RUN/

Ctrl-C stops everything.
TXT
while sleep 5; do
  printf '\r%s  stored: %s' "$(date +%T)" "$(curl -fsS http://127.0.0.1:7444/v1/stats 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["events_stored"], "events,", d["duplicates_dropped"], "duplicates dropped")' 2>/dev/null || echo '?')"
done
