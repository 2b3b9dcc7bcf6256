#!/usr/bin/env bash
# Checks the collector's TLS endpoint with testssl.sh (Debian package `testssl.sh`, installed
# here when missing; run as root or with sudo). Starts a release collector with mTLS on a
# throw-away PKI and a free loopback port, runs testssl's protocol, cipher, server-default,
# preference and vulnerability checks, and writes the report to
# target/security/testssl-<commit>.txt. docs/security.md records the result.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v testssl >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends testssl.sh
fi
cargo build -j2 --release -p keytrail-collector
work=$(mktemp -d /tmp/kt-testssl.XXXX)
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
./target/release/keytrail-collector certs --out "$work/pki" --agent agent-a >/dev/null
cat > "$work/collector.toml" <<TOML
data_dir = "$work/data"
[receive]
listen = "127.0.0.1:0"
cert = "$work/pki/collector.crt"
key = "$work/pki/collector.key"
client_ca = "$work/pki/ca.crt"
[api]
listen = "127.0.0.1:0"
TOML
./target/release/keytrail-collector --log-format json serve --config "$work/collector.toml" 2>"$work/log" &
pid=$!
addr=""
for _ in $(seq 1 100); do
  addr=$(grep -o '"receive":"[^"]*"' "$work/log" | head -1 | cut -d'"' -f4 || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "the collector did not start:"; cat "$work/log"; exit 1; }
mkdir -p target/security
out="target/security/testssl-$(git rev-parse --short HEAD).txt"
testssl --quiet --color 0 --warnings batch -p -e -S -U -P "$addr" | tee "$out"
echo "report: $out"
