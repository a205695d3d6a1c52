#!/usr/bin/env bash
# `make fuzz`: runs each libFuzzer target for SECONDS, one after another, each
# starting from its seed corpus, the crashes found so far and what earlier runs
# of this build found (BUILD/fuzz-corpus/<target>, not committed).
# A new crash lands in fuzz/crashes/<target>/: fix it and commit the file, and
# `make test` replays it from then on.
#   usage: fuzz/run.sh BUILD_DIR SECONDS TARGET...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$1"; seconds="$2"; shift 2
targets=("$@")

status=0
for target in "${targets[@]}"; do
  work="$build/fuzz-corpus/$target"
  crashes="$here/crashes/$target"
  mkdir -p "$work" "$crashes"
  log="$build/fuzz-$target.log"
  echo "fuzz: $target for ${seconds}s (log: $log)"
  # -rss_limit_mb / -malloc_limit_mb: an input that makes a parser take 2 GB is a finding.
  # -timeout: one input taking 10 s is a finding too.
  if nice -n "${FUZZ_NICE:-10}" "$build/fuzz/fuzz_$target" "$work" "$here/corpus/$target" "$crashes" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -artifact_prefix="$crashes/" -print_final_stats=1 >"$log" 2>&1; then
    result=clean
  else
    result="FOUND A CRASH (see $log and $crashes)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz: $target: $runs executions, $result"
done
exit $status
