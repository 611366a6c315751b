#!/usr/bin/env python3
"""The cascade on dev folds: trains a head per fold (3 folds by sha1(id) mod 3,
each trained on the other two) and evaluates it on its fold, printing the
share of messages that reach the encoder and accuracy / macro-F1 with the
cascade and with the encoder on every message.

usage: benches/cascade-folds.py --bin target/release/mailtriage [--label queue]
         [--model models/all-MiniLM-L6-v2] [--max-tokens 128] [--tolerance 0.003] [--data FILE.jsonl]
         [-- TRAIN_ARGS...]
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--label", default="queue")
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--tolerance", default=None)
    ap.add_argument("--max-tokens", type=int, default=None, help="[model] max_tokens (the encoder's input length)")
    ap.add_argument("--data", default="../shared/data/support_tickets/train.jsonl")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.data, encoding="utf-8")]
    fold = lambda r: int(hashlib.sha1(r["id"].encode()).hexdigest(), 16) % a.folds
    w = tempfile.mkdtemp(prefix="mt-folds.")
    model = os.path.abspath(a.model)
    cfg = os.path.join(w, "c.toml")
    prefix = 'id = "intfloat/multilingual-e5-small"\ninput_prefix = "query: "\n' if "e5" in model else ""
    if a.max_tokens is not None:
        prefix += f"max_tokens = {a.max_tokens}\n"
    open(cfg, "w").write(f'[model]\npath = "{model}"\n{prefix}')
    cache = os.path.join(w, "emb.cache")
    results = []
    for k in range(a.folds):
        train, dev = os.path.join(w, f"train{k}.jsonl"), os.path.join(w, f"dev{k}.jsonl")
        with open(train, "w") as t, open(dev, "w") as d:
            for r in rows:
                (d if fold(r) == k else t).write(json.dumps(r) + "\n")
        head = os.path.join(w, f"head{k}.safetensors")
        extra = list(a.extra) + (["--cascade-tolerance", a.tolerance] if a.tolerance is not None else [])
        subprocess.run([a.bin, "--config", cfg, "train", "--data", train, "--label", a.label, "--out", head,
                        "--embedding-cache", cache, *extra], check=True, stderr=subprocess.DEVNULL)
        out = subprocess.run([a.bin, "--config", cfg, "eval", "--data", dev, "--label", a.label, "--head", head,
                              "--embedding-cache", cache, "--json"], check=True, capture_output=True, text=True)
        v = json.loads(out.stdout)
        c = v.get("cascade") or {}
        full = c.get("without_cascade", {})
        r = {"fold": k, "encoder_share": 1 - c.get("skipped_share", 0.0), "accuracy": v["accuracy"],
             "macro_f1": v["macro_f1"], "full_accuracy": full.get("accuracy", v["accuracy"]),
             "full_macro_f1": full.get("macro_f1", v["macro_f1"])}
        results.append(r)
        print(json.dumps(r))
    mean = {k: sum(r[k] for r in results) / len(results) for k in results[0] if k != "fold"}
    print(f"mean over {a.folds} folds ({a.label}, {os.path.basename(model)}, max_tokens {a.max_tokens or 'default'}, "
          f"tolerance {a.tolerance or 'default'}): "
          f"encoder share {mean['encoder_share']:.3f}; accuracy {mean['accuracy']:.4f} with the cascade, "
          f"{mean['full_accuracy']:.4f} with the encoder on every message ({(mean['accuracy'] - mean['full_accuracy']) * 100:+.2f} pt); "
          f"macro-F1 {mean['macro_f1']:.4f} / {mean['full_macro_f1']:.4f} ({(mean['macro_f1'] - mean['full_macro_f1']) * 100:+.2f} pt)")


if __name__ == "__main__":
    main()
