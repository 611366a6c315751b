#!/usr/bin/env python3
"""The import graph of src/ (unit tests excluded): which module file uses
which, from `crate::…`, `super::…` and `self::…` paths. Fails on an import
circle and on a break of the layering rules below (../shared/DESIGN.md).

usage: scripts/import-graph.py [--edges]   (exit 1 on a circle or a break)
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# (importer, what it must not import): the data flows one way, front door →
# scope → extract → decide → act → record; the ground (domain, access,
# redact) imports nothing of the crate's layers.
RULES = [
    ("model", "record"), ("model", "decide"), ("model", "pipeline"), ("model", "milter"),
    ("model", "smtp"), ("model", "frontdoor"), ("model", "daemon"), ("model", "learn"),
    ("scope", "act"), ("scope", "decide"), ("settings", "record"), ("settings", "daemon"),
    ("decide", "learn"), ("decide", "record"), ("decide", "milter"), ("decide", "smtp"),
    ("milter", "model"), ("milter", "decide"), ("smtp", "model"), ("smtp", "decide"),
    ("frontdoor", "model"), ("frontdoor", "decide"), ("message", "decide"), ("message", "model"),
    # The engine and the front doors never know feedback; learning flows
    # filter -> store -> train, and what they share (correction) knows none.
    ("pipeline", "learn"), ("frontdoor", "learn"), ("milter", "learn"), ("smtp", "learn"),
    ("learn::store", "learn::filter"), ("learn::store", "learn::train"), ("learn::train", "learn::filter"),
    ("learn::correction", "learn::filter"), ("learn::correction", "learn::store"),
    ("learn::correction", "learn::train"),
]
GROUND = {"domain", "access", "redact"}


def modules():
    found = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, "::")
            if rel.endswith("::mod"):
                rel = rel[: -len("::mod")]
            if rel not in ("lib", "main"):
                found[rel] = os.path.join(dirpath, name)
    return found


def edges(found):
    mods = set(found)
    out = {m: set() for m in mods}
    for m, path in found.items():
        text = open(path, encoding="utf-8").read()
        cut = text.find("#[cfg(test)]\nmod tests")
        text = text if cut < 0 else text[:cut]
        text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        refs = set(re.findall(r"\bcrate::([a-z_][a-z0-9_:]*)", text))
        for base, prefix in ((parent, "super"), (m, "self")):
            for r in re.findall(rf"\b{prefix}::([a-z_][a-z0-9_:]*)", text):
                refs.add(f"{base}::{r}" if base else r)
            for group in re.findall(rf"use {prefix}::\{{([^;]*)\}};", text, re.S):
                for part in re.split(r"[,\s{}]+", group):
                    if part and part[0].islower():
                        refs.add(f"{base}::{part}" if base else part)
        # `use crate::a::{b, c::d}`: each item under its path.
        for path, group in re.findall(r"use crate::((?:[a-z_][a-z0-9_]*::)*)\{([^;]*)\};", text, re.S):
            refs.update(path + p for p in re.split(r"[,\s{}]+", group) if p)
        for r in refs:
            parts = r.split("::")
            for k in range(len(parts), 0, -1):
                cand = "::".join(parts[:k])
                if cand in mods:
                    if cand != m and not m.startswith(cand + "::"):
                        out[m].add(cand)
                    break
    return out


def circles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def under(m, layer):
    return m == layer or m.startswith(layer + "::")


def main():
    graph = edges(modules())
    if "--edges" in sys.argv:
        for m in sorted(graph):
            print(m, "->", ", ".join(sorted(graph[m])))
    bad = [f"import circle: {' <-> '.join(c)}" for c in circles(graph)]
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if any(under(m, a) and under(d, b) for a, b in RULES):
                bad.append(f"layering: {m} imports {d}")
            if m.split("::")[0] in GROUND and d.split("::")[0] not in GROUND:
                bad.append(f"layering: {m} is at the ground but imports {d}")
    print("\n".join(bad) if bad else f"{len(graph)} modules, no import circle, layering holds")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
