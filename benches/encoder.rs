//! Encoder throughput on one core: one sequence per pass, as the daemon runs
//! it: our forward pass in f32 and in int8, and Candle's BertModel (f32) for
//! comparison.
//!
//! `cargo bench --bench encoder` (needs models/all-MiniLM-L6-v2: scripts/fetch-model.sh;
//! `MAILTRIAGE_BENCH_MODEL=DIR` for another model folder, e.g. multilingual-e5-small).
//! Report emb/s = 1 / time per iteration, and effective GOP/s with the matmul
//! operations of all-MiniLM-L6-v2 (issue 4): 2.87 G at 128 tokens, 6.04 G at 256.
//! Run with RAYON_NUM_THREADS=1 taskset -c 1 for per-core figures (what each
//! daemon worker gets), right after ../shared/bench/ort/run.sh for ONNX Runtime's.
//! `MAILTRIAGE_BENCH_NO_CANDLE=1` skips Candle's model; `MAILTRIAGE_BENCH_RANDOM_LAYERS=12`
//! times random weights of multilingual-e5-small's transformer shape.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailtriage::model::encoder::{Encoder, TextEncoder};
use mailtriage::model::int8::Isa;
use mailtriage::settings::Precision;

fn text_of(tokens: usize, enc: &Encoder) -> Vec<u32> {
    // Realistic support-mail prose, repeated until the token budget is full.
    let para = "Hello team, since this morning our invoices page returns an error when customers try to \
                pay by card. The payment provider shows the transactions as declined, but the money is \
                reserved on the card. Could you please check the integration and tell us when it is fixed? ";
    let ids = enc.token_ids(&para.repeat(tokens / 40 + 2)).unwrap();
    assert_eq!(ids.len(), enc.max_tokens().min(tokens));
    ids
}

/// A model folder with random weights of a BERT shape (speed does not depend on
/// the values), the tokenizer and config of `like`: `MAILTRIAGE_BENCH_RANDOM_LAYERS=12`
/// times a 12-layer encoder of MiniLM's widths, i.e. multilingual-e5-small's
/// transformer (its 250k-row word table costs one row read per token).
fn random_model(like: &Path, layers: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(like.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(like.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = layers.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let (h, i, v, p) = (384usize, 1536usize, 30522usize, 512usize);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![v, h]),
        ("embeddings.position_embeddings.weight".into(), vec![p, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..layers {
        let n = |s: &str| format!("encoder.layer.{l}.{s}");
        for part in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            shapes.push((n(&format!("{part}.weight")), vec![h, h]));
            shapes.push((n(&format!("{part}.bias")), vec![h]));
        }
        shapes.push((n("intermediate.dense.weight"), vec![i, h]));
        shapes.push((n("intermediate.dense.bias"), vec![i]));
        shapes.push((n("output.dense.weight"), vec![h, i]));
        shapes.push((n("output.dense.bias"), vec![h]));
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((n(&format!("{ln}.weight")), vec![h]));
            shapes.push((n(&format!("{ln}.bias")), vec![h]));
        }
    }
    let (mut header, mut data, mut seed) = (serde_json::Map::new(), Vec::new(), 1u64);
    for (name, shape) in shapes {
        let start = data.len();
        let count: usize = shape.iter().product();
        let layer_norm_gain = name.ends_with("LayerNorm.weight");
        for _ in 0..count {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let v = if layer_norm_gain { 1.0 + 0.1 * r } else { 0.05 * r };
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(name, serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
    dir
}

fn bench(c: &mut Criterion) {
    let real = std::env::var_os("MAILTRIAGE_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    let random = std::env::var("MAILTRIAGE_BENCH_RANDOM_LAYERS").ok().map(|l| random_model(&real, l.parse().unwrap()));
    let dir = random.as_ref().map_or(real.clone(), |d| d.path().to_path_buf());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
        .unwrap_or_default();
    eprintln!("{cpu}; integer kernels: {}; model {}", Isa::detect().name(), dir.display());
    let skip_reference = std::env::var_os("MAILTRIAGE_BENCH_NO_CANDLE").is_some();
    let mut g = c.benchmark_group("encoder");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for tokens in [128usize, 256] {
        for precision in [Precision::F32, Precision::Int8] {
            let enc =
                Encoder::load(&dir, tokens, &candle_core::Device::Cpu, precision).expect("run scripts/fetch-model.sh");
            let ids = text_of(tokens, &enc);
            g.bench_function(format!("embed_{precision}_{tokens}_tokens"), |b| b.iter(|| enc.embed_ids(&ids).unwrap()));
        }
        if !skip_reference {
            let reference = Encoder::load_reference(&dir, tokens, &candle_core::Device::Cpu).unwrap();
            let ids = text_of(tokens, &reference);
            g.bench_function(format!("candle_reference_{tokens}_tokens"), |b| {
                b.iter(|| reference.embed_ids(&ids).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
