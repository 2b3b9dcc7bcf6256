#!/usr/bin/env bash
# The test command: installs what the tests need beyond Rust (scripts/test-deps.sh), then runs
# every unit and end-to-end test of the workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/test-deps.sh
cargo test -j2 --workspace "$@"
