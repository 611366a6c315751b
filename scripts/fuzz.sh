#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted bytes, with AFL++
# through afl.rs (cargo-afl builds its runtime for the stable toolchain; no
# nightly needed). Targets: src/fuzz/. Harness: fuzz/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default 3600 s, all targets)
#
# Per target, prints executions, time, exec/s, edges covered, crashes and
# hangs (an input over 1 s is a hang), and the peak resident memory of the
# target process; exits non-zero if any target crashed or hung. Findings
# stay in target/fuzz/<target>/out/default/{crashes,hangs}: copy each into
# fuzz/regressions/<target>/ once fixed (the test suite replays them).
# Set FUZZ_JOBS=2 to fuzz two targets at once (one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3600}
shift || true
targets=("$@")
(( ${#targets[@]} )) || targets=(mime intake config head milter smtp)
corpus=../shared/data/spamassassin_mime
[[ -d $corpus ]] || { echo "fuzz.sh: $corpus (the seed corpus) must sit beside this checkout" >&2; exit 1; }

export PATH=$HOME/.cargo/bin:$PATH
if ! cargo afl --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-afl (builds the AFL++ runtime, ~2 min)" >&2
  cargo install --locked cargo-afl --version 0.18.2
fi
# The harness shares the product's dependency versions.
cp Cargo.lock fuzz/Cargo.lock
(cd fuzz && cargo afl build --release --bins --quiet)
bin=fuzz/target/release

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
one() {
  local t=$1 dir=target/fuzz/$1
  rm -rf "$dir"; mkdir -p "$dir"
  "$bin/fuzz-seeds" "$t" "$corpus" "$dir/in" 48 >/dev/null
  # -t 1000: an input running over a second is a hang. -m 1024: over 1 GiB is a crash.
  # The target's resident memory is sampled beside it (AFL's own stats hold only its own).
  cargo afl fuzz -i "$dir/in" -o "$dir/out" -V "$secs" -t 1000 -m 1024 -- "$bin/fuzz-target" "$t" \
    >"$dir/afl.log" 2>&1 &
  local pid=$! peak=0
  while kill -0 "$pid" 2>/dev/null; do
    # Only the target processes (named fuzz-target, this target's argument): not afl-fuzz itself.
    for p in $(pgrep -x fuzz-target || true); do
      [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") == *" $t " ]] || continue
      local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
      (( ${rss:-0} > peak )) && peak=$rss
    done
    sleep 2
  done
  wait "$pid" || true
  echo "$peak" >"$dir/peak_rss_kb"
}

report() {
  local t=$1 s=target/fuzz/$1/out/default/fuzzer_stats
  if [[ ! -f $s ]]; then echo "$t: AFL did not start, see target/fuzz/$t/afl.log"; return 1; fi
  local v; v() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$s"; }
  printf '%-7s %12s execs %6ss %8s/s  edges %6s/%-6s (%s)  crashes %s  hangs %s  peak RSS %s MB\n' \
    "$t" "$(v execs_done)" "$(v run_time)" "$(v execs_per_sec)" "$(v edges_found)" "$(v total_edges)" \
    "$(v bitmap_cvg)" "$(v saved_crashes)" "$(v saved_hangs)" "$(( $(cat target/fuzz/$t/peak_rss_kb 2>/dev/null || echo 0) / 1024 ))"
  [[ $(v saved_crashes) == 0 && $(v saved_hangs) == 0 ]]
}

jobs=${FUZZ_JOBS:-1}
for t in "${targets[@]}"; do
  one "$t" &
  while (( $(jobs -rp | wc -l) >= jobs )); do wait -n || true; done
done
wait
status=0
for t in "${targets[@]}"; do report "$t" || status=1; done
exit $status
