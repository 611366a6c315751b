#!/usr/bin/env python3
"""Where the daemon's CPU went, by stage: reads `perf script` output (call
graphs) on stdin, gives each sample to the first frame, from the leaf up,
that belongs to a stage, and prints each stage's share, then the hottest
leaf functions.

usage: perf script -i perf.data | benches/profile-stages.py
"""
import collections
import re
import sys

# First match wins, walking from the sampled instruction towards main.
STAGES = [
    ("allocator (malloc/free)", r"\b(malloc|free|realloc|calloc|cfree|_int_malloc|_int_free|_int_realloc|malloc_consolidate|tcache)"),
    ("encoder: forward pass", r"model::(cpu_bert|int8|f32linear)|candle|gemm|matmul"),
    ("encoder: tokenising", r"model::(unigram|wordpiece|text|encoder::Tok)|tokenizers::"),
    ("encoder: queue and batching", r"model::(batcher|cache)"),
    ("lexical features and heads", r"model::(lexical|head|prototypes)"),
    ("rules", r"decide::rules|regex_automata|regex::"),
    ("MIME parsing and text extraction", r"message::(extract|html|language|headers)|mail_parser|whatlang|encoding_rs|charset"),
    ("scope", r"mailtriage::scope::"),
    ("plan (headers and recipients)", r"mailtriage::act::"),
    ("audit trail", r"record::(audit|pseudonym)|serde_json"),
    ("metrics", r"\bmetrics(_exporter_prometheus|_util)?::|record::(metrics|recorder)"),
    ("logging", r"\btracing(_subscriber|_core)?::"),
    ("milter protocol", r"mailtriage::milter::"),
    ("decision engine and policy", r"mailtriage::(decide|pipeline|frontdoor)::"),
    ("memcpy/memmove/memset", r"__mem(cpy|move|set)|\bmem(cpy|move|set|cmp)"),
    ("async runtime (tokio)", r"\btokio::|mio::"),
    ("kernel (syscalls, network, scheduling)", r"\[kernel|^\s*(entry_SYSCALL|__x64_sys|do_syscall|tcp_|ip_|sock_|__sys_|schedule)"),
]
COMPILED = [(name, re.compile(rx)) for name, rx in STAGES]


def samples(lines):
    frames = []
    for line in lines:
        if not line.strip():
            if frames:
                yield frames
            frames = []
        elif line.startswith(("\t", " ")):
            frames.append(line.strip())
        else:
            frames = []
    if frames:
        yield frames


def main():
    stages, leaves, n = collections.Counter(), collections.Counter(), 0
    for frames in samples(sys.stdin):
        n += 1
        # "addr symbol+off (dso)": keep symbol and dso.
        parts = [f.split(" ", 1)[1] if " " in f else f for f in frames]
        leaves[re.sub(r"\+0x[0-9a-f]+", "", parts[0])[:100]] += 1
        stage = next((name for p in parts for name, rx in COMPILED if rx.search(p)), "other")
        stages[stage] += 1
    if not n:
        print("no samples (is perf allowed here? kernel.perf_event_paranoid)")
        return
    print(f"CPU profile of the daemon: {n} samples")
    for name, k in stages.most_common():
        print(f"  {100 * k / n:5.1f} %  {name}")
    print("hottest functions (self):")
    for name, k in leaves.most_common(15):
        print(f"  {100 * k / n:5.1f} %  {name}")


if __name__ == "__main__":
    main()
