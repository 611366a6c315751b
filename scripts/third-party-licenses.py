#!/usr/bin/env python3
"""Writes the licence notices of every crate linked into the mailtriage binary.

From `cargo metadata` (the locked dependency graph of the normal, non-dev,
non-build dependencies of the `mailtriage` package on this platform): per
crate its name, version, SPDX licence expression and the licence texts it
ships (LICENSE*, COPYING*, NOTICE* files from its source in the cargo
registry). Fails if a crate has no licence expression or one outside the
list the project accepts (no GPL linked into the product).

usage: scripts/third-party-licenses.py > THIRD-PARTY-LICENSES
"""
import json
import os
import re
import subprocess
import sys

# Licences compatible with shipping the binary under Apache-2.0.
ACCEPTED = {
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Zlib", "Unicode-3.0", "Unicode-DFS-2016",
    "CC0-1.0", "MPL-2.0", "BSL-1.0", "Unlicense", "0BSD", "CDLA-Permissive-2.0", "Apache-2.0 WITH LLVM-exception",
    "OpenSSL",
}


def acceptable(expr):
    """An SPDX expression is acceptable if some OR-branch has only accepted terms."""
    for branch in re.split(r"\s+OR\s+|/", expr.replace("(", "").replace(")", "")):
        terms = [t.strip() for t in re.split(r"\s+AND\s+", branch) if t.strip()]
        if terms and all(t in ACCEPTED for t in terms):
            return True
    return False


def main():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--filter-platform",
         subprocess.check_output(["rustc", "-vV"], text=True).split("host: ")[1].split()[0]]))
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == "mailtriage")
    seen, todo = set(), [root]
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            if any(k["kind"] in (None, "normal") for k in dep["dep_kinds"]) and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    crates = sorted((packages[i] for i in seen), key=lambda p: (p["name"], p["version"]))
    bad = [f'{p["name"]} {p["version"]}: {p.get("license")}' for p in crates
           if not p.get("license") or not acceptable(p["license"])]
    if bad:
        sys.exit("licences not accepted for shipping:\n  " + "\n  ".join(bad))
    out = sys.stdout
    out.write("Third-party software linked into mailtriage\n")
    out.write("==========================================\n\n")
    out.write(f"{len(crates)} crates, with their licence expressions and the licence texts they ship.\n\n")
    for p in crates:
        out.write(f'{p["name"]} {p["version"]}: {p["license"]}\n')
    for p in crates:
        src = os.path.dirname(p["manifest_path"])
        texts = sorted(f for f in os.listdir(src) if re.match(r"(?i)^(licen[cs]e|copying|notice)", f)
                       and os.path.isfile(os.path.join(src, f)))
        out.write(f'\n\n---- {p["name"]} {p["version"]} ({p["license"]}) ----\n')
        if not texts:
            out.write("(no licence file in the crate; see the SPDX expression above)\n")
        for f in texts:
            with open(os.path.join(src, f), encoding="utf-8", errors="replace") as fh:
                out.write(f"\n[{f}]\n{fh.read()}")


if __name__ == "__main__":
    main()
