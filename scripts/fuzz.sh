#!/usr/bin/env sh
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each (default 300).
# Needs the nightly toolchain; installs cargo-fuzz from crates.io when it is missing.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# A crash leaves its input in fuzz/artifacts/<target>/: turn it into a regression test beside
# the code it broke (see docs/reliability.md) before fixing.
set -eu
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-300}"
[ $# -gt 0 ] && shift
TARGETS="${*:-wire_frame wire_payload event_body proxy_adapter event_log}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz
fi
# Seeds for the structured targets: a valid payload made by the project's own encoder.
cargo run -q -p keytrail-tests --bin keytrail-fuzz-seeds -- fuzz/seeds
cargo run -q -p keytrail-collector --example event_log_seed -- fuzz/seeds/event_log/two-blocks
for t in $TARGETS; do
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  echo "fuzzing $t for ${SECONDS_EACH}s"
  (cd fuzz && cargo +nightly fuzz run -j1 "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1)
done
