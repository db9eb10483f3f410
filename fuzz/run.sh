#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] [TARGET...]: builds the fuzz targets with cargo-fuzz and runs each for
# SECONDS (default 30), after replaying every input under fuzz/regressions/TARGET (each a
# crash once found; they must all pass). Each run starts from the committed corpus in
# fuzz/corpus/TARGET and writes what it finds to fuzz/target/corpus/TARGET, so the repository
# is not changed. A finding is saved under fuzz/artifacts/TARGET and fails this script.
# cargo-fuzz needs a nightly compiler's flags; RUSTC_BOOTSTRAP=1 lets the stable one take them.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
export RUSTC_BOOTSTRAP=1
# The version this was last run with; a newer one may want a newer compiler.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
cargo fuzz build
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(ls fuzz_targets | sed "s/\.rs$//")
for t in "${targets[@]}"; do
  if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
    echo "fuzz: $t: replaying $(ls "regressions/$t" | wc -l) regression inputs"
    cargo fuzz run "$t" "regressions/$t" -- -runs=0
  fi
  mkdir -p "target/corpus/$t"
  echo "fuzz: $t: ${seconds} s"
  log="target/$t.log"
  if ! cargo fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 80 "$log" >&2
    echo "fuzz: $t found a failure; the input is under fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^#[0-9]+.DONE|^Done' "$log" || true
done
echo "fuzz: no findings"
