#!/usr/bin/env bash
# Fuzz the parsers of outside input (fuzz/, its own workspace) with libFuzzer on the
# STABLE toolchain: the sanitizer-coverage flags `cargo fuzz --sanitizer none` passes,
# given by hand, for the target triple only (so build scripts and proc macros are built
# without them). Not run in CI.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (default: all targets, 120 s each)
#
# Each target reads its committed seeds from fuzz/corpus/<target> and writes what it
# finds to $FUZZ_WORK/corpus/<target> (default fuzz/target/work, not committed); a
# crash is saved under $FUZZ_WORK/artifacts/<target>/ and ends the run with status 1.
# FUZZ_MERGE=1 merges the finds, minimized, back into fuzz/corpus/<target>.
# CARGO_TARGET_DIR defaults to fuzz/target. Extra libFuzzer flags: FUZZ_ARGS.
# At the end: executions, exec/s, coverage (edges), features and corpus per target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
fuzz_dir=$(pwd)

target_arg=${1:-all}
seconds=${2:-120}
triple=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$fuzz_dir/target}
work=${FUZZ_WORK:-$fuzz_dir/target/work}

all_targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^vzk-fuzz$')
if [ "$target_arg" = all ]; then
  targets=$all_targets
elif grep -qx "$target_arg" <<<"$all_targets"; then
  targets=$target_arg
else
  echo "unknown target $target_arg; targets: $(echo $all_targets)" >&2
  exit 2
fi

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares ${RUSTFLAGS:-}"
echo "== building $(echo $targets) (release, debug assertions, stable $(rustc --version | cut -d' ' -f2))"
bins=()
for t in $targets; do bins+=(--bin "$t"); done
cargo build --locked --release --target "$triple" "${bins[@]}"

summary=()
status=0
for t in $targets; do
  bin=$CARGO_TARGET_DIR/$triple/release/$t
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t" "corpus/$t"
  log=$work/$t.log
  echo "== $t: ${seconds}s (log $log)"
  rc=0
  "$bin" "$work/corpus/$t" "corpus/$t" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/" \
    ${FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
  last=$(grep -E '^#[0-9]+' "$log" | tail -n1)
  execs=$(sed -n 's/^stat::number_of_executed_units: //p' "$log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: //p' "$log" | tail -n1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="CRASH (exit $rc): $(ls "$work/artifacts/$t" | head -n3 | tr '\n' ' ')"
    grep -m3 -E 'panicked|ERROR: libFuzzer' "$log" || true
    status=1
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
    "$bin" -merge=1 "corpus/$t" "$work/corpus/$t" >"$work/$t.merge.log" 2>&1
  fi
  summary+=("$(printf '%-16s %6ss %12s %9s %7s %7s %10s  %s' "$t" "$seconds" "${execs:-?}" \
    "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
done

echo
printf '%-16s %7s %12s %9s %7s %7s %10s  %s\n' target time executions exec/s cov ft corpus result
printf '%s\n' "${summary[@]}"
exit "$status"
