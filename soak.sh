#!/usr/bin/env bash
# soak.sh [SECONDS]: stamps at a steady rate for an hour (or SECONDS) while the daemon is
# killed and restarted, the remote token's server is killed and brought back, the
# configuration is reloaded and the state disk fills up, on a schedule; then prints the
# figures (tests/soak.rs says what it checks). Not part of ./test.sh. Run it as root on a
# machine where ./test.sh has run once (it needs the same packages and the demo token).
# SOAK_RATE (stamps a second, default 40) and SOAK_FAULT_EVERY_SECONDS (default 60) change
# the pace. The figures also go to target/soak-DATE.txt.
set -euo pipefail
cd "$(dirname "$0")"
export SOAK_SECONDS="${1:-${SOAK_SECONDS:-3600}}"
out="target/soak-$(date -u +%Y%m%dT%H%M%SZ).txt"
mkdir -p target
# Release binaries (cargo builds them for the test): the figures are the daemon's, not a debug build's.
cargo test --release --test soak -- --ignored --nocapture --test-threads 1 2>&1 | tee "$out"
echo "soak.sh: figures in $out"
