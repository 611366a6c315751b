#!/usr/bin/env bash
# Old against new on this machine, in one run: builds the criterion benches
# of revision OLD and of the working tree (or of revision $NEW when set), then runs them alternately
# (old, new, new, old, …) so that drift of a shared or throttled host hits
# both alike, and prints each benchmark's median per side and new/old.
#
#   benches/compare.sh OLD [ROUNDS] [BENCH...]     e.g. benches/compare.sh 9cb4ba3 3 decision encoder
#
# Needs the models (scripts/fetch-model.sh). The encoder bench runs without
# Candle's reference (MAILTRIAGE_BENCH_NO_CANDLE): it is the same code on
# both sides. Builds use $CARGO_TARGET_DIR (default target/), so a second
# run rebuilds only the crate.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: benches/compare.sh OLD [ROUNDS] [BENCH...]}
ROUNDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
BENCHES=${*:-decision encoder}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
W=$(mktemp -d /tmp/mt-compare.XXXXXX)
trap 'cleanup' EXIT

cleanup() {
  git worktree remove --force "$W/old" >/dev/null 2>&1 || true
  git worktree remove --force "$W/new" >/dev/null 2>&1 || true
  rm -rf "$W"
}
# A revision's tree, with this checkout's model folders (models/ is tracked,
# the weights in it are not).
checkout() {
  git worktree add -q --detach "$W/$1" "$2"
  mkdir -p "$W/$1/models"
  for d in "$PWD"/models/*/; do ln -sfn "${d%/}" "$W/$1/models/$(basename "$d")"; done
}
checkout old "$OLD"
NEWDIR=$PWD
if [ -n "${NEW:-}" ]; then checkout new "$NEW"; NEWDIR=$W/new; fi

# Builds the benches of directory $1 and copies them to $W/$2/ (both trees
# build to the same file names); prints "NAME PATH" for each.
build() {
  local args=()
  # Both trees build into one target directory, where cargo judges the
  # crate fresh by its files' times against the last build's, whichever tree
  # that was: touch this tree's sources so that it really builds them.
  find "$1/src" "$1/benches" -name '*.rs' -exec touch {} +
  for b in $BENCHES; do args+=(--bench "$b"); done
  (cd "$1" && CARGO_TARGET_DIR=$TARGET cargo bench --locked --no-run "${args[@]}" --message-format=json 2>/dev/null) |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do
      mkdir -p "$W/$2" && cp "$exe" "$W/$2/$name" && echo "$name $W/$2/$name"
    done
}
build "$W/old" old >"$W/old.list"
build "$NEWDIR" new >"$W/new.list"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
newrev=${NEW:-$(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')}
echo "CPU: $cpu, $(nproc) cores; old $OLD, new $newrev; $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
  # old, new, then new, old: drift within a round hits both sides alike.
  order="old new"; [ $((round % 2)) = 0 ] && order="new old"
  for side in $order; do
    while read -r name exe; do
      # Each side runs in its own tree: the benches read conf/ beside them.
      dir=$NEWDIR; [ "$side" = old ] && dir=$W/old
      (cd "$dir" && MAILTRIAGE_BENCH_NO_CANDLE=1 "$exe" --bench --noplot --discard-baseline \
         --warm-up-time 1 --measurement-time 4 2>>"$W/bench.err" || { cat "$W/bench.err" >&2; exit 1; }) |
        python3 -c '
import re, sys
side, rnd = sys.argv[1], sys.argv[2]
name = None
units = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
for line in sys.stdin:
    m = re.match(r"^(\S+/\S+)", line)
    if m:
        name = m.group(1)
    t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", line)
    if t and name:
        print(side, rnd, name, float(t.group(1)) * units[t.group(2)])' "$side" "$round" >>"$W/times"
    done <"$W/$side.list"
  done
done

python3 - "$W/times" <<'PY'
import statistics, sys
from collections import defaultdict
t = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    side, _, name, secs = line.split()
    t[name][side].append(float(secs))
def fmt(s):
    return next(f"{s / f:.3g} {u}" for f, u in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")) if s >= f or u == "ns")
print(f"{'benchmark':48} {'old (median)':>14} {'new (median)':>14} {'new/old':>8}  spread old | new")
for name in sorted(t):
    o, n = t[name]["old"], t[name]["new"]
    if not o or not n:
        print(f"{name:48} only on one side")
        continue
    mo, mn = statistics.median(o), statistics.median(n)
    spread = lambda v: f"{(max(v) - min(v)) / statistics.median(v) * 100:.1f}%"
    print(f"{name:48} {fmt(mo):>14} {fmt(mn):>14} {mn / mo:8.3f}  {spread(o)} | {spread(n)}")
PY
