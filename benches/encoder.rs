//! Encoder throughput on one core: one sequence per pass, as the daemon runs
//! it, with our forward pass and with Candle's BertModel for comparison.
//!
//! `cargo bench --bench encoder` (needs models/all-MiniLM-L6-v2: scripts/fetch-model.sh).
//! Report emb/s = 1 / time per iteration, and achieved GFLOP/s with the matmul
//! FLOPs of all-MiniLM-L6-v2 (issue 4): 2.87 G at 128 tokens, 6.04 G at 256.
//! Run with RAYON_NUM_THREADS=1 for per-core figures (what each daemon worker gets).

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailtriage::model::encoder::Encoder;

fn text_of(tokens: usize, enc: &Encoder) -> Vec<u32> {
    // Realistic support-mail prose, repeated until the token budget is full.
    let para = "Hello team, since this morning our invoices page returns an error when customers try to \
                pay by card. The payment provider shows the transactions as declined, but the money is \
                reserved on the card. Could you please check the integration and tell us when it is fixed? ";
    let ids = enc.token_ids(&para.repeat(tokens / 40 + 2)).unwrap();
    assert_eq!(ids.len(), enc.max_tokens().min(tokens));
    ids
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let mut g = c.benchmark_group("encoder");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for tokens in [128usize, 256] {
        // The daemon's forward pass (CpuBert), and Candle's BertModel as the reference.
        let enc = Encoder::load(&dir, tokens, &candle_core::Device::Cpu).expect("run scripts/fetch-model.sh");
        let ids = text_of(tokens, &enc);
        g.bench_function(format!("embed_{tokens}_tokens"), |b| b.iter(|| enc.embed_ids(&ids).unwrap()));
        let reference = Encoder::load_reference(&dir, tokens, &candle_core::Device::Cpu).unwrap();
        g.bench_function(format!("candle_reference_{tokens}_tokens"), |b| {
            b.iter(|| reference.embed_ids(&ids).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
