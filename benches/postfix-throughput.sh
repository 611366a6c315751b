#!/usr/bin/env bash
# Postfix throughput with the model deciding every message (issue 4), on this
# machine, in one run: Postfix alone, Postfix + rspamd as milter, Postfix +
# mailtriage as milter, on the same realistic mail. Prints one line of figures.
#
#   benches/postfix-throughput.sh [-n MESSAGES] [-c CONCURRENCY] [-m minilm|e5|lexical] [-p]
#
# -m e5 runs multilingual-e5-small (scripts/fetch-multilingual-model.sh)
# instead of all-MiniLM-L6-v2, heads trained on it; -m lexical trains
# lexical-only heads (`train --no-embeddings`: no encoder at all), the
# ceiling the cascade approaches. -p records a CPU
# profile of the daemon during the saturated run (perf, DWARF call graphs)
# and prints where its CPU went by stage (benches/profile-stages.py).
#
# Three loads through the same Postfix: saturated (-c sessions as fast as
# they go) for Postfix alone, with rspamd, and with mailtriage; then
# mailtriage again at 70 % of its saturated rate (an open-loop paced sender),
# where the decision latency that matters is measured. Decision p99 is
# read from the daemon's histogram (interpolated inside its bucket).
#
# Needs root (Postfix), ../shared/bench/mailstack.sh and ../shared/data, the
# model files (scripts/fetch-model.sh), and rspamd for the comparison (it is
# skipped, and said so, when rspamd is not installed).
#
# The mail: 1000 support tickets and 1000 20 Newsgroups posts, turned into
# .eml, from our dev splits (int(ticket id, 16) % 5 == 1; sha1(20news id) % 5
# == 1). The heads are trained on the rest of the tickets, so no message
# below was seen in training.
set -euo pipefail
cd "$(dirname "$0")/.."
N=2000 C=6 MODEL=minilm PROFILE=0
while getopts "n:c:m:p" o; do case $o in n) N=$OPTARG;; c) C=$OPTARG;; m) MODEL=$OPTARG;; p) PROFILE=1;; *) exit 2;; esac; done
case $MODEL in
  minilm|lexical) MODEL_TOML="path = \"$PWD/models/all-MiniLM-L6-v2\"" ;;
  e5) MODEL_TOML="path = \"$PWD/models/multilingual-e5-small\"
id = \"intfloat/multilingual-e5-small\"
input_prefix = \"query: \"" ;;
  *) echo "-m: minilm, e5 or lexical, not $MODEL" >&2; exit 2 ;;
esac
B=../shared/bench
W=$(mktemp -d /tmp/mt-throughput.XXXXXX)
trap 'kill $DAEMON 2>/dev/null || true; [ -n "$STACK" ] && $B/mailstack.sh down --workdir "$STACK" >/dev/null 2>&1; rm -rf "$W"' EXIT
DAEMON= STACK=

# MAILTRIAGE_BIN: measure that binary (another revision's build) instead.
if [ -n "${MAILTRIAGE_BIN:-}" ]; then
  MT=$MAILTRIAGE_BIN
else
  cargo build --release -q
  MT=${CARGO_TARGET_DIR:-target}/release/mailtriage
fi
if [ "$MODEL" = e5 ]; then bash scripts/fetch-multilingual-model.sh >/dev/null; else bash scripts/fetch-model.sh >/dev/null; fi

python3 - "$W" <<'PY'
import gzip, hashlib, json, random, sys, email.utils
w = sys.argv[1]
tickets = [json.loads(l) for l in open('../shared/data/support_tickets/train.jsonl')]
dev = lambda t: int(t['id'], 16) % 5 == 1
with open(f'{w}/tickets-train.jsonl', 'w') as f:
    for t in tickets:
        if not dev(t):
            f.write(json.dumps(t) + '\n')
news = [json.loads(l) for l in gzip.open('../shared/data/20news_bydate/train.jsonl.gz', 'rt')]
def text(r):
    return r.get('subject', ''), r.get('body', r.get('text', ''))
news_dev = [r for r in news if int(hashlib.sha1(r['id'].encode()).hexdigest(), 16) % 5 == 1]
random.seed(7)
mix = random.sample([t for t in tickets if dev(t)], 1000) + random.sample(news_dev, 1000)
random.shuffle(mix)
import os
os.makedirs(f'{w}/eml')
for i, r in enumerate(mix):
    subject, body = text(r)
    subject = subject.replace('\n', ' ')[:200]
    with open(f'{w}/eml/{i:05d}.eml', 'w', encoding='utf-8') as f:
        f.write(f"From: Customer {i} <customer{i}@client.example>\nTo: helpdesk@test.example\nSubject: {subject}\n"
                f"Message-ID: <{i}@client.example>\nDate: {email.utils.formatdate()}\nMIME-Version: 1.0\n"
                f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{body}\n")
PY

cat > "$W/train.toml" <<TOML
[model]
$MODEL_TOML
TOML
for label in queue priority; do
  $MT --config "$W/train.toml" train --data "$W/tickets-train.jsonl" --label $label --out "$W/$label.safetensors" \
    --embedding-cache "$W/embeddings.cache" $([ "$MODEL" = lexical ] && echo --no-embeddings) 2>/dev/null
done
python3 - "$W" "$MODEL_TOML" <<'PY'
import json, re, struct, sys
w, model = sys.argv[1], sys.argv[2]
raw = open(f'{w}/queue.safetensors', 'rb').read()
n = struct.unpack('<Q', raw[:8])[0]
labels = json.loads(json.loads(raw[8:8 + n])['__metadata__']['meta'])['labels']
deps = ''.join(f'[[departments]]\nname = "{re.sub("[^a-z0-9]+", "-", l.lower()).strip("-")}"\nlabels = ["{l}"]\n\n' for l in labels)
open(f'{w}/daemon.toml', 'w').write(f'''[server]
milter = "inet:127.0.0.1:11332"
mode = "enforce"
[logging]
level = "warn"
[metrics]
listen = "127.0.0.1:19898"
[model]
{model}
department_head = "{w}/queue.safetensors"
priority_head = "{w}/priority.safetensors"
{deps}''')
PY

rate() { grep -oP 'throughput\s+: \K[0-9.]+' "$1"; }
$B/mailstack.sh run --eml-dir "$W/eml" -n "$N" -c "$C" >"$W/none.txt" 2>&1
RSPAMD=skipped
if command -v rspamd >/dev/null; then
  $B/mailstack.sh run --eml-dir "$W/eml" -n "$N" -c "$C" --peer rspamd --milter-port 11334 >"$W/rspamd.txt" 2>&1
  RSPAMD=$(rate "$W/rspamd.txt")
fi
$MT --config "$W/daemon.toml" serve >"$W/daemon.log" 2>&1 & DAEMON=$!
for _ in $(seq 100); do curl -sf localhost:19898/readyz >/dev/null && break; sleep 0.2; done
if [ "$PROFILE" = 1 ]; then
  perf record -q -F 250 --call-graph dwarf,16384 -p $DAEMON -o "$W/perf.data" 2>/dev/null & PERF=$!
fi
$B/mailstack.sh run --eml-dir "$W/eml" -n "$N" -c "$C" --milter-port 11332 --header X-Triage-Department >"$W/mt.txt" 2>&1
if [ "$PROFILE" = 1 ]; then
  kill -INT $PERF; wait $PERF || true
  perf script -i "$W/perf.data" 2>/dev/null | python3 benches/profile-stages.py >"$W/profile.txt"
fi
curl -s localhost:19898/metrics >"$W/saturated.prom"

rss=$(grep VmHWM /proc/$DAEMON/status | awk '{print $2/1024}')

# 70 % of the saturated rate, paced: the same mail, sent open-loop, to a
# fresh daemon (its embedding cache would otherwise know every message).
kill $DAEMON; wait $DAEMON 2>/dev/null || true
$MT --config "$W/daemon.toml" serve >>"$W/daemon.log" 2>&1 & DAEMON=$!
for _ in $(seq 100); do curl -sf localhost:19898/readyz >/dev/null && break; sleep 0.2; done
SAT=$(rate "$W/mt.txt")
PACE=$(awk -v r="$SAT" 'BEGIN { printf "%.1f", r * 0.7 }')
STACK=$($B/mailstack.sh up --milter-port 11332 2>/dev/null | sed -n 's/^WORKDIR=//p')
python3 benches/paced-send.py --port 10025 --rate "$PACE" "$W/eml" >"$W/paced.txt"
for _ in $(seq 300); do
  [ -z "$(find "$STACK" -path '*/spool/*' \( -path '*/incoming/*' -o -path '*/active/*' -o -path '*/maildrop/*' \) -type f 2>/dev/null | head -1)" ] && break
  sleep 0.2
done
$B/mailstack.sh down --workdir "$STACK" >/dev/null 2>&1; STACK=
curl -s localhost:19898/metrics >"$W/paced.prom"
rss=$(grep VmHWM /proc/$DAEMON/status | awk -v a="$rss" '{print ($2/1024 > a) ? $2/1024 : a}')

python3 - "$W" "$N" "$C" "$MODEL" "$rss" "$RSPAMD" "$(rate "$W/none.txt")" "$SAT" <<'PY'
import re, sys
w, n, c, model, rss, rspamd, alone, sat = sys.argv[1:]
def prom(path):
    out = {}
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        key, value = line.rsplit(' ', 1)
        out[key] = out.get(key, 0.0) + float(value)
    return out
def total(p, prefix):
    return sum(v for k, v in p.items() if k.startswith(prefix))
def buckets(p):
    b = {}
    for k, v in p.items():
        m = re.match(r'mailtriage_decision_seconds_bucket\{.*le="([^"]+)"', k)
        if m:
            le = float('inf') if m.group(1) == '+Inf' else float(m.group(1))
            b[le] = b.get(le, 0.0) + v
    return sorted(b.items())
def p99(bs):
    count = bs[-1][1] if bs else 0
    if not count:
        return float('nan')
    want, prev_le, prev_n = 0.99 * count, 0.0, 0.0
    for le, k in bs:
        if k >= want:
            if le == float('inf'):
                return prev_le
            return prev_le + (le - prev_le) * (want - prev_n) / max(k - prev_n, 1e-9)
        prev_le, prev_n = le, k
    return float('nan')
s, a = prom(f'{w}/saturated.prom'), prom(f'{w}/paced.prom')
bs = buckets(s)
pa = buckets(a)
paced = open(f'{w}/paced.txt').read().strip()
tagged = re.search(r'with X-Triage-Department : (\d+)', open(f'{w}/mt.txt').read())
lexical = total(s, 'mailtriage_model_decisions_total{path="lexical"')
encoder = total(s, 'mailtriage_model_decisions_total{path="encoder"')
failed = total(s, 'mailtriage_decisions_failed_total') + total(a, 'mailtriage_decisions_failed_total')
ratio = lambda x, y: f'{float(x) / float(y):.2f}' if y not in ('skipped', '0', '') else '-'
print(f'mailtriage {sat} msg/s | postfix alone {alone} (ratio {ratio(sat, alone)}) | postfix+rspamd {rspamd} '
      f'(ratio {ratio(sat, rspamd)}) | decision p99 {p99(bs) * 1000:.0f} ms saturated, {p99(pa) * 1000:.0f} ms at '
      f'70 % ({paced}, {pa[-1][1] if pa else 0:.0f} decided) | failed open {failed:.0f} | tagged {tagged.group(1) if tagged else "?"}/{n} | '
      f'encoder share {encoder / max(encoder + lexical, 1):.3f} | peak RSS {float(rss):.0f} MB | c={c} | {model}')
PY
if [ "$PROFILE" = 1 ]; then cat "$W/profile.txt"; fi
