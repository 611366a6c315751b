//! MIME extraction (parse, decode, HTML → text) over the 1,048 real messages
//! of ../shared/data/spamassassin_mime, in messages per second.
//! `cargo bench --bench extraction`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailtriage::message::extract::{extract, ExtractLimits};

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/spamassassin_mime");
    let mut messages = Vec::new();
    for sub in ["ham", "spam"] {
        let Ok(rd) = std::fs::read_dir(dir.join(sub)) else { continue };
        for e in rd.flatten() {
            messages.push(std::fs::read(e.path()).unwrap());
        }
    }
    assert!(!messages.is_empty(), "no corpus at {} (it must sit beside the checkout)", dir.display());
    let limits = ExtractLimits::from(&mailtriage::settings::LimitsConfig::default());
    let mut g = c.benchmark_group("extraction");
    g.throughput(Throughput::Elements(messages.len() as u64));
    g.sample_size(20);
    g.bench_function(format!("spamassassin_corpus_{}_messages", messages.len()), |b| {
        b.iter(|| messages.iter().map(|m| extract(m, limits).text.len()).sum::<usize>())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
