//! The whole decision for a realistic multipart message: MIME extraction,
//! rules, policy and plan; then the same with the model deciding (the
//! shipped config's cold start: the encoder runs for every message); the
//! scope check alone.
//! `cargo bench --bench decision` (the model part needs scripts/fetch-model.sh).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailtriage::message::envelope::Envelope;
use mailtriage::pipeline::Triage;
use mailtriage::settings::Config;

const MESSAGE: &str = concat!(
    "From: Shop <billing@shop.example>\r\nTo: user@corp.example\r\nSubject: Your invoice 2024-17\r\n",
    "Message-ID: <1@shop.example>\r\nMIME-Version: 1.0\r\nX-Triage-Department: spoofed\r\n",
    "Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n",
    "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
    "Dear customer,=0D=0Aplease find your invoice attached. Amount due: 120 EUR.\r\n",
    "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n",
    "<html><body><p>Dear customer,</p><p>please find your <b>invoice</b> attached.</p></body></html>\r\n",
    "--b--\r\n"
);

fn bench(c: &mut Criterion) {
    let shipped = Config::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mailtriage.toml")).unwrap();
    let mut cfg = shipped.clone();
    cfg.model = None;
    let triage = Triage::new(&cfg).unwrap();
    let env = Envelope {
        mail_from: "billing@shop.example".into(),
        rcpts: vec!["user@corp.example".into()],
        ..Default::default()
    };
    let names = vec!["X-Triage-Department".to_string()];
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rules_only_multipart", |b| b.iter(|| triage.decide(&env, MESSAGE.as_bytes(), &names).unwrap()));
    // No rule matches this one, so the model decides.
    let unruled = MESSAGE.replace("Your invoice 2024-17", "Question about my account");
    // No embedding cache: every iteration is the same text, and the point
    // is what the encoder costs (a cache hit costs what the rules do).
    let mut uncached = shipped.clone();
    if let Some(m) = &mut uncached.model {
        m.cache_entries = 0;
    }
    let with_model = Triage::new(&uncached).expect("run scripts/fetch-model.sh");
    g.bench_function("model_cold_start_multipart", |b| {
        b.iter(|| with_model.decide(&env, unruled.as_bytes(), &names).unwrap())
    });
    g.finish();

    // The scope stage alone (before any parse): recipients, client facts and
    // the header scan for automatic mail, on the reactor for every message.
    let scope_cfg = Config::from_toml(
        "[scope]\nrecipients = [\"info@corp.example\", \"@support.corp.example\"]\nskip_networks = [\"10.0.0.0/8\"]\n\
         trusted_relays = [\"192.0.2.1\"]\n",
        "bench",
    )
    .unwrap();
    let scope = mailtriage::scope::Scope::from(&scope_cfg.scope);
    let mut g = c.benchmark_group("scope");
    g.throughput(Throughput::Elements(1));
    let to_info = Envelope { rcpts: vec!["ceo@corp.example".into(), "info@corp.example".into()], ..env.clone() };
    g.bench_function("check_multipart", |b| b.iter(|| scope.check(&to_info, &names, MESSAGE.as_bytes())));
    g.finish();

    // The lexical features one head computes per message (hashed word and
    // character n-grams), on a 5 KB body.
    let cfg = mailtriage::model::lexical::LexicalConfig::default();
    let idf = vec![1.0f32; cfg.dim()];
    let body = "Dear support, since the update last night our invoices page fails with error 500 when \
                customers pay by card; the provider shows the payment as declined. "
        .repeat(30);
    let mut g = c.benchmark_group("lexical");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("features_5kb", |b| b.iter(|| mailtriage::model::lexical::features(&body, &cfg, &idf)));
    // The same length of text that does not repeat one sentence: 64 words
    // in a fixed xorshift order, so thousands of distinct word pairs and
    // triples, as mail has, where the sentence above makes a few dozen.
    let vocab: Vec<&str> = "the invoice payment card customer account order delivery refund error page update server \
        login password network printer office contract price offer meeting schedule report issue \
        ticket urgent please thanks regards since last night week month provider bank transfer \
        declined failed works again when after before about with from your our their this that which \
        would could should Rechnung Zahlung Kunde Lieferung Fehler bitte danke"
        .split_whitespace()
        .collect();
    let mut x = 0x2545_f491u32;
    let mut varied = String::new();
    while varied.len() < body.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        varied.push_str(vocab[x as usize % vocab.len()]);
        varied.push(if x.is_multiple_of(11) { '.' } else { ' ' });
    }
    g.bench_function("features_5kb_varied", |b| b.iter(|| mailtriage::model::lexical::features(&varied, &cfg, &idf)));
    g.finish();

    // What keeping a decision for corrections by Message-ID adds to it: the
    // pseudonym, then memory only (SQLite mode) or memory plus the queue to
    // the PostgreSQL writer (shared mode). The writer's inserts run on their
    // own thread and connection; here its server is absent, so it drops
    // batches: the decision's side of it costs the same either way.
    use mailtriage::learn::correction::MessageFeatures;
    use mailtriage::learn::filter::recent::{Bounds, RecentDecisions, SharedWindow};
    use mailtriage::learn::store::Store;
    let features = MessageFeatures {
        terms: mailtriage::model::lexical::TermCounts::of(&body[..2000], 18),
        language: "en",
        embedding: Some(("sentence-transformers/all-MiniLM-L6-v2".into(), vec![0.01; 384])),
    };
    let pseudonyms = mailtriage::record::pseudonym::Pseudonyms::keyed(vec![7; 32]);
    let memory = RecentDecisions::new(256 << 20);
    let store = std::sync::Arc::new(Store::open_later("postgres://bench@127.0.0.1:1/none").unwrap());
    let bounds = Bounds { max_age: std::time::Duration::from_secs(3600), max_rows: 1_000_000 };
    let writer = store.second_connection().unwrap();
    let shared = RecentDecisions::shared(256 << 20, SharedWindow::start(store, writer, bounds).unwrap());
    // Criterion reports the typical call; the tail is what a decision feels.
    for (name, window) in [("memory", &memory), ("memory_and_postgresql_queue", &shared)] {
        let mut times: Vec<f64> = (0..100_000)
            .map(|n| {
                let t = std::time::Instant::now();
                window.remember(&pseudonyms.message_id(&format!("<tail-{n}@shop.example>")), features.clone());
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        eprintln!("recent_window/{name}: p50 {:.2} µs, p99 {:.2} µs, max {:.0} µs", at(0.5), at(0.99), at(1.0));
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let mut g = c.benchmark_group("recent_window");
    g.throughput(Throughput::Elements(1));
    for (name, window) in [("memory", &memory), ("memory_and_postgresql_queue", &shared)] {
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                window.remember(&pseudonyms.message_id(&format!("<{n}@shop.example>")), features.clone())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
