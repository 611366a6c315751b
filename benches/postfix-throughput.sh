#!/usr/bin/env bash
# Postfix throughput with the model deciding every message (issue 4), on this
# machine, in one run: Postfix alone, Postfix + rspamd as milter, Postfix +
# mailtriage as milter, on the same realistic mail. Prints one line of figures.
#
#   benches/postfix-throughput.sh [-n MESSAGES] [-c CONCURRENCY] [-m minilm|e5]
#
# -m e5 runs multilingual-e5-small (scripts/fetch-multilingual-model.sh)
# instead of all-MiniLM-L6-v2, heads trained on it.
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
N=2000 C=6 MODEL=minilm
while getopts "n:c:m:" o; do case $o in n) N=$OPTARG;; c) C=$OPTARG;; m) MODEL=$OPTARG;; *) exit 2;; esac; done
case $MODEL in
  minilm) MODEL_TOML="path = \"$PWD/models/all-MiniLM-L6-v2\"" ;;
  e5) MODEL_TOML="path = \"$PWD/models/multilingual-e5-small\"
id = \"intfloat/multilingual-e5-small\"
input_prefix = \"query: \"" ;;
  *) echo "-m: minilm or e5, not $MODEL" >&2; exit 2 ;;
esac
B=../shared/bench
W=$(mktemp -d /tmp/mt-throughput.XXXXXX)
trap 'kill $DAEMON 2>/dev/null || true; rm -rf "$W"' EXIT
DAEMON=

cargo build --release -q
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

MT=./target/release/mailtriage
cat > "$W/train.toml" <<TOML
[model]
$MODEL_TOML
TOML
for label in queue priority; do
  $MT --config "$W/train.toml" train --data "$W/tickets-train.jsonl" --label $label --out "$W/$label.safetensors" \
    --embedding-cache "$W/embeddings.cache" 2>/dev/null
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
$B/mailstack.sh run --eml-dir "$W/eml" -n "$N" -c "$C" --milter-port 11332 --header X-Triage-Department >"$W/mt.txt" 2>&1
M=$(curl -s localhost:19898/metrics)
metric() { { echo "$M" | grep -E "^$1" || true; } | awk '{s+=$2} END {print s+0}'; }
total=$(metric 'mailtriage_decision_seconds_count')
le250=$(metric 'mailtriage_decision_seconds_bucket\{le="0.25"\}')
failed=$(metric 'mailtriage_decisions_failed_total')
lexical=$(metric 'mailtriage_model_decisions_total\{path="lexical"\}')
overload=$(metric 'mailtriage_model_decisions_total\{path="overload"\}')
tagged=$(grep -oP 'with X-Triage-Department : \K[0-9]+' "$W/mt.txt")
rss=$(grep VmHWM /proc/$DAEMON/status | awk '{print $2/1024}')
echo "mailtriage $(rate "$W/mt.txt") msg/s | postfix alone $(rate "$W/none.txt") | postfix+rspamd $RSPAMD |" \
     "tagged $tagged/$N | decisions <=250ms $le250/$total | failed open $failed | lexical (no encoder) $lexical |" \
     "overload $overload | peak RSS ${rss} MB | c=$C | $MODEL"
