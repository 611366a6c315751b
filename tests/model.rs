//! The embedded model: golden vectors, training and evaluation through the
//! CLI, head files, review threshold. Needs models/all-MiniLM-L6-v2
//! (scripts/fetch-model.sh, run by scripts/test.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mailtriage::model::encoder::{Encoder, TextEncoder};
use mailtriage::model::head::Head;
use mailtriage::model::int8::Isa;
use mailtriage::settings::Precision;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    let d = root().join("models/all-MiniLM-L6-v2");
    assert!(d.join("model.safetensors").exists(), "{} is missing: run scripts/fetch-model.sh", d.display());
    d
}

fn e5_dir() -> PathBuf {
    let d = root().join("models/multilingual-e5-small");
    assert!(
        d.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-multilingual-model.sh",
        d.display()
    );
    d
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn mailtriage(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailtriage")).arg("--config").arg(config).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Trains a head on the shipped fixture; `extra` are more `train` arguments.
fn train_fixture(cfg: &Path, label: &str, out: &Path, extra: &[&str]) -> Output {
    let data = fixture("tickets-train.jsonl");
    let mut args = vec!["train", "--data", data.to_str().unwrap(), "--label", label, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = mailtriage(cfg, &args);
    ok(&output);
    output
}

/// A config using the local model directory, with the given extra TOML.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("mailtriage.toml");
    let text = format!(
        r#"
[model]
path = "{model}"
max_tokens = 128
workers = 1
{extra}

[[departments]]
name = "billing"
mailbox = "billing@test.example"
action = "reroute"
description = "Invoices, payments, refunds, subscriptions"

[[departments]]
name = "support"
mailbox = "support@test.example"
action = "reroute"
description = "Technical problems, outages, errors, bugs"

[[departments]]
name = "hr"
mailbox = "hr@test.example"
action = "reroute"
description = "Job applications, payslips, holidays, employment"
"#,
        model = model_dir().display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn encoder_matches_golden_vectors() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("../shared/data/minilm_golden/golden.json")).unwrap(),
    )
    .unwrap();
    let enc = Encoder::load(&model_dir(), 256, &candle_core::Device::Cpu, Precision::F32).unwrap();
    let items = golden["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    let mut worst = 0f32;
    for item in items {
        let text = item["text"].as_str().unwrap();
        let want_ids: Vec<u32> =
            item["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(enc.token_ids(text).unwrap(), want_ids, "token ids of {text:?}");
        let want: Vec<f32> = item["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = enc.embed(text).unwrap();
        assert_eq!(got.len(), 384);
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < 1e-4, "largest component difference {worst}");

    // A text far longer than the token budget is cut before tokenising; the
    // ids must still be exactly those of the full text, truncated.
    let long = items.iter().find(|i| i["n_tokens"] == 256).expect("a 256-token item");
    let text = long["text"].as_str().unwrap().repeat(5);
    assert!(text.chars().count() > 256 * 24, "the test must exercise the cut");
    let want: Vec<u32> = long["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(enc.token_ids(&text).unwrap(), want);
}

/// Real mail texts: support tickets (German and English) and 20news posts.
fn real_texts(tickets: usize, news: usize) -> Vec<String> {
    let shared = root().join("../shared/data");
    let text = |v: &Value| {
        mailtriage::model::model_text(v["subject"].as_str().unwrap_or(""), v["body"].as_str().unwrap_or(""))
    };
    let mut out: Vec<String> = std::fs::read_to_string(shared.join("support_tickets/train.jsonl"))
        .unwrap()
        .lines()
        .step_by(37)
        .take(tickets)
        .map(|l| text(&serde_json::from_str(l).unwrap()))
        .collect();
    let gz = Command::new("gzip").arg("-dc").arg(shared.join("20news_bydate/train.jsonl.gz")).output().unwrap();
    assert!(gz.status.success());
    out.extend(
        String::from_utf8_lossy(&gz.stdout)
            .lines()
            .step_by(53)
            .take(news)
            .map(|l| text(&serde_json::from_str(l).unwrap())),
    );
    out
}

/// The 8-bit encoder keeps embeddings within cosine 0.99 of f32 on real
/// mail (the kernels are exact, so this holds on every CPU alike).
#[test]
fn int8_encoder_stays_within_cosine_0_99_of_f32_on_real_mail() {
    let f32 = Encoder::load(&model_dir(), 128, &candle_core::Device::Cpu, Precision::F32).unwrap();
    let int8 = Encoder::load(&model_dir(), 128, &candle_core::Device::Cpu, Precision::Int8).unwrap();
    assert_eq!((f32.precision(), int8.precision()), (Precision::F32, Precision::Int8));
    let (wf, wi) = (f32.weight_bytes().unwrap(), int8.weight_bytes().unwrap());
    assert!(wi * 3 < wf, "int8 weights {wi} B vs f32 {wf} B");
    let texts = real_texts(60, 40);
    let cosines: Vec<f32> = texts
        .iter()
        .map(|t| {
            let (a, b) = (f32.embed(t).unwrap(), int8.embed(t).unwrap());
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        })
        .collect();
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let min = cosines.iter().copied().fold(f32::INFINITY, f32::min);
    eprintln!(
        "int8 vs f32 on {} texts ({}): cosine mean {mean:.5}, min {min:.5}; weights {wi} B vs {wf} B",
        texts.len(),
        Isa::detect().name()
    );
    assert!(min >= 0.99, "cosine mean {mean}, min {min}");
}

#[test]
fn train_save_load_predicts_identically_and_eval_reports_figures() {
    model_dir();
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("heads/department.safetensors");
    let cfg = config(dir.path(), "");
    let h = head.to_str().unwrap();
    let test = fixture("tickets-test.jsonl");
    let out = train_fixture(&cfg, "department", &head, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dev split") && stderr.contains("wrote"), "{stderr}");

    // The saved head, loaded back, gives exactly the predictions of the CLI's eval.
    let loaded = Head::load(&head).unwrap();
    assert_eq!(loaded.meta.labels, vec!["billing", "hr", "support"]);
    assert_eq!(loaded.meta.encoder.as_deref(), Some("sentence-transformers/all-MiniLM-L6-v2"));
    assert_eq!(loaded.meta.label_field, "department");
    assert!(loaded.meta.temperature > 0.0);
    let again = Head::load(&head).unwrap();
    let enc = Encoder::load(&model_dir(), 128, &candle_core::Device::Cpu, Precision::Auto).unwrap();
    for line in std::fs::read_to_string(&test).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let text = mailtriage::model::model_text(v["subject"].as_str().unwrap(), v["body"].as_str().unwrap());
        let e = enc.embed(&text).unwrap();
        assert_eq!(loaded.predict(Some(&e), &loaded.lexical(&text)), again.predict(Some(&e), &again.lexical(&text)));
    }

    let out = mailtriage(
        &cfg,
        &[
            "eval",
            "--data",
            test.to_str().unwrap(),
            "--label",
            "department",
            "--head",
            h,
            "--json",
            "--slice",
            "language",
        ],
    );
    let v: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(v["n"], 15);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc >= 14.0 / 15.0, "accuracy {acc} on an easy fixture: {v}");
    assert!(v["macro_f1"].as_f64().unwrap() >= 0.9);
    assert!(v["ece"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        v["slices"]["language"]["de"]["n"].as_u64().unwrap() + v["slices"]["language"]["en"]["n"].as_u64().unwrap(),
        15
    );
    assert_eq!(v["per_class"].as_array().unwrap().len(), 3);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 3);

    // The text report names the classes and the slices.
    let out = mailtriage(
        &cfg,
        &["eval", "--data", test.to_str().unwrap(), "--label", "department", "--head", h, "--slice", "language"],
    );
    let text = ok(&out);
    assert!(text.contains("macro-F1") && text.contains("billing") && text.contains("by language:"), "{text}");
    assert!(text.contains("risk-coverage") && text.contains("at 90 % accuracy:"), "{text}");
}

#[test]
fn lexical_only_eval_figures_are_exact_on_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("priority.safetensors");
    let cfg = config(dir.path(), "");
    let h = head.to_str().unwrap();
    train_fixture(&cfg, "priority", &head, &["--no-embeddings", "--bits", "16"]);
    let test = fixture("tickets-test.jsonl");
    let out =
        mailtriage(&cfg, &["eval", "--data", test.to_str().unwrap(), "--label", "priority", "--head", h, "--json"]);
    let v: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    // Priority in the fixture follows the department for hr (low) and billing
    // (medium); support tickets share one body and are high or medium at
    // random, so only about half of those ten can be right.
    assert_eq!(v["n"], 15);
    let correct: u64 = (0..3).map(|k| v["confusion"][k][k].as_u64().unwrap()).sum();
    assert_eq!(v["accuracy"].as_f64().unwrap(), correct as f64 / 15.0);
    let low = v["labels"].as_array().unwrap().iter().position(|l| l == "low").unwrap();
    assert_eq!(v["per_class"][low]["recall"], 1.0, "every hr ticket is low: {v}");
    assert!(correct >= 9, "well above the majority class (6 of 15): {v}");
    assert!(Head::load(&head).unwrap().meta.encoder.is_none());
}

#[test]
fn classify_uses_the_model_and_sends_unsure_mail_to_review() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("department.safetensors");
    // No cascade: this test is about the full head's confidence.
    train_fixture(&config(dir.path(), ""), "department", &head, &["--cascade-tolerance", "-1"]);
    assert!(Head::load(&head).unwrap().meta.cascade.is_none());
    let msg = dir.path().join("m.eml");
    std::fs::write(&msg, "From: a@x.example\r\nTo: user@test.example\r\nSubject: Rechnung 4711 ist falsch\r\n\r\nBitte Betrag korrigieren.\r\n").unwrap();

    let cfg = config(dir.path(), &format!("department_head = \"{}\"", head.display()));
    let v: Value = serde_json::from_str(ok(&mailtriage(&cfg, &["classify", msg.to_str().unwrap()])).trim()).unwrap();
    assert_eq!(v["decision"]["source"], "model:sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(v["decision"]["department"], "billing");
    assert_eq!(v["decision"]["action"], "reroute");

    // --explain: the runner-up and the message's own strongest words; with
    // reason_header the same goes into X-Triage-Reason (and never into the
    // decision record, which the audit trail is made from).
    let v: Value =
        serde_json::from_str(ok(&mailtriage(&cfg, &["classify", "--explain", msg.to_str().unwrap()])).trim()).unwrap();
    let runner_up = v["explain"]["runner_up"]["label"].as_str().unwrap();
    assert!(["hr", "support"].contains(&runner_up), "{v}");
    let p = v["explain"]["runner_up"]["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p < v["decision"]["confidence"].as_f64().unwrap(), "{v}");
    let terms: Vec<&str> =
        v["explain"]["terms"].as_array().unwrap().iter().map(|t| t["term"].as_str().unwrap()).collect();
    assert!(!terms.is_empty() && terms.len() <= 3, "{v}");
    let lower = "Rechnung 4711 ist falsch Bitte Betrag korrigieren".to_lowercase();
    assert!(terms.iter().all(|t| lower.contains(t)), "{terms:?}");
    assert!(v["decision"].get("classes").is_none(), "{v}");
    let with_reason =
        config(dir.path(), &format!("department_head = \"{}\"\n\n[policy]\nreason_header = true", head.display()));
    let v: Value =
        serde_json::from_str(ok(&mailtriage(&with_reason, &["classify", msg.to_str().unwrap()])).trim()).unwrap();
    let reason =
        v["plan"].as_array().unwrap().iter().find(|c| c["name"] == "X-Triage-Reason").unwrap_or_else(|| panic!("{v}"))
            ["value"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(reason.starts_with(&format!("runner-up {runner_up} ")) && reason.contains(terms[0]), "{reason}");

    // The threshold is strict: just above this message's confidence sends it to review, just below does not.
    let confidence = v["decision"]["confidence"].as_f64().unwrap();
    assert!(confidence > 0.34 && confidence < 1.0, "{v}");
    let with_review = |threshold: f64| {
        let cfg = config(
            dir.path(),
            &format!(
                "department_head = \"{}\"\n\n[policy]\nreview_below = {threshold}\nreview_mailbox = \"triage@test.example\"",
                head.display()
            ),
        );
        serde_json::from_str::<Value>(ok(&mailtriage(&cfg, &["classify", msg.to_str().unwrap()])).trim()).unwrap()
    };
    let v = with_review((confidence + 1.0) / 2.0);
    assert_eq!(v["decision"]["action"], "review");
    assert_eq!(v["decision"]["department"], "billing");
    assert!(
        v["plan"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["op"] == "add_recipient" && c["address"] == "triage@test.example"),
        "{v}"
    );
    assert!(v["plan"].as_array().unwrap().iter().any(|c| c["op"] == "add_header" && c["value"] == "review"), "{v}");
    let v = with_review(confidence * 0.9);
    assert_eq!(v["decision"]["action"], "reroute");

    // A target accuracy: the head's dev-split curve gives the threshold; an
    // explicit review_below still wins.
    let curve = Head::load(&head).unwrap().meta.risk_coverage;
    assert!(!curve.is_empty() && curve[0].coverage == 1.0, "{curve:?}");
    // Just above the best accuracy of any threshold at or below this message's
    // confidence: the chosen threshold must lie above it, so it goes to review.
    let best_below = curve.iter().filter(|p| p.threshold as f64 <= confidence).map(|p| p.accuracy).fold(0.0, f64::max);
    let mut targets = vec![0.5, 1.0];
    if best_below < 0.999 {
        targets.push(((best_below + 0.0005) * 10_000.0).ceil() / 10_000.0);
    }
    for target in targets {
        let point = mailtriage::learn::train::eval::threshold_for(&curve, target);
        let cfg = config(
            dir.path(),
            &format!(
                "department_head = \"{}\"\n\n[policy]\ntarget_accuracy = {target}\nreview_mailbox = \"triage@test.example\"",
                head.display()
            ),
        );
        let v: Value =
            serde_json::from_str(ok(&mailtriage(&cfg, &["classify", msg.to_str().unwrap()])).trim()).unwrap();
        let review = point.is_none_or(|p| (confidence as f32) < p.threshold);
        assert_eq!(v["decision"]["action"], if review { "review" } else { "reroute" }, "{target} {point:?} {v}");
    }

    // Cold start (no head): the department descriptions decide.
    let cfg = config(dir.path(), "");
    let v: Value = serde_json::from_str(ok(&mailtriage(&cfg, &["classify", msg.to_str().unwrap()])).trim()).unwrap();
    assert_eq!(v["decision"]["source"], "model:sentence-transformers/all-MiniLM-L6-v2");
}

#[test]
fn corrupt_or_mismatched_model_files_are_named_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("department.safetensors");
    std::fs::write(&head, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage").unwrap();
    let cfg = config(dir.path(), &format!("department_head = \"{}\"", head.display()));
    let out = mailtriage(&cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("department.safetensors"), "{err}");

    // Missing model directory file.
    let empty = dir.path().join("empty-model");
    std::fs::create_dir_all(&empty).unwrap();
    let p = dir.path().join("m.toml");
    std::fs::write(&p, format!("[model]\npath = \"{}\"\n", empty.display())).unwrap();
    let out = mailtriage(&p, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json is missing"));

    // Head labels no department claims.
    train_fixture(&cfg, "language", &head, &["--no-embeddings", "--bits", "12"]);
    let out = mailtriage(&cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"de\"") && err.contains("labels"), "{err}");
}

#[test]
fn the_cascade_decides_lexically_when_sure_and_under_overload() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("department.safetensors");
    let out = train_fixture(&config(dir.path(), ""), "department", &head, &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("of the dev split reaches the encoder (lexical margin below"), "{said}");
    assert!(said.contains("encoder flips"), "train prints the flip table: {said}");
    let trained = Head::load(&head).unwrap();
    let cascade = trained.meta.cascade.clone().expect("a head trained with embeddings has a cascade");
    assert!(trained.lexical_only.is_some());
    assert!(cascade.dev["skipped_share"].as_f64().is_some(), "{:?}", cascade.dev);

    let msg = dir.path().join("m.eml");
    std::fs::write(
        &msg,
        "From: a@x.example\r\nTo: user@test.example\r\nSubject: Rechnung 4711 ist falsch\r\n\r\nBitte Betrag korrigieren.\r\n",
    )
    .unwrap();
    // The margin gate; a head from before it (no margin) by its confidence threshold.
    let source_with_gate = |margin: Option<f32>, threshold: f32| {
        let mut h = trained.clone();
        let c = h.meta.cascade.as_mut().unwrap();
        (c.margin, c.threshold) = (margin, threshold);
        h.save(&head).unwrap();
        let cfg = config(dir.path(), &format!("department_head = \"{}\"", head.display()));
        let v: Value =
            serde_json::from_str(ok(&mailtriage(&cfg, &["classify", msg.to_str().unwrap()])).trim()).unwrap();
        assert_eq!(v["decision"]["department"], "billing", "{v}");
        v["decision"]["source"].as_str().unwrap().to_string()
    };
    assert_eq!(source_with_gate(Some(0.0), 1.01), "model:sentence-transformers/all-MiniLM-L6-v2/lexical");
    assert_eq!(source_with_gate(Some(1.01), 0.0), "model:sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(source_with_gate(None, 0.0), "model:sentence-transformers/all-MiniLM-L6-v2/lexical");
    assert_eq!(source_with_gate(None, 1.01), "model:sentence-transformers/all-MiniLM-L6-v2");

    // Overload: the encoder cannot answer within the deadline, so the lexical
    // head decides instead of nobody (the cascade threshold is now "never").
    let cfg = mailtriage::settings::Config::from_toml(
        &format!(
            "[model]\npath = \"{}\"\nmax_tokens = 256\nworkers = 1\ndeadline = \"1ms\"\ndepartment_head = \"{}\"\n\
             [[departments]]\nname = \"billing\"\n[[departments]]\nname = \"support\"\n[[departments]]\nname = \"hr\"\n",
            model_dir().display(),
            head.display()
        ),
        "overload",
    )
    .unwrap();
    let triage = std::sync::Arc::new(mailtriage::pipeline::Triage::new(&cfg).unwrap());
    let long = "Bitte korrigieren Sie den Betrag auf der Rechnung. ".repeat(40);
    let input = mailtriage::pipeline::MessageInput {
        envelope: mailtriage::message::envelope::Envelope {
            mail_from: "a@x.example".into(),
            rcpts: vec!["user@test.example".into()],
            ..Default::default()
        },
        raw: format!("Subject: Rechnung 4711 ist falsch\r\n\r\n{long}\r\n").into_bytes(),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plan = rt.block_on(mailtriage::pipeline::Filter::filter(&triage, input)).unwrap();
    let source = plan.changes.iter().find_map(|c| match c {
        mailtriage::act::Change::AddHeader { name, value } if name == "X-Triage-Source" => Some(value.clone()),
        _ => None,
    });
    assert_eq!(source.as_deref(), Some("model:sentence-transformers/all-MiniLM-L6-v2/lexical"));
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// multilingual-e5-small end to end: the XLM-R tokenizer's ids on German and
/// French, our forward pass against vectors computed once from the same
/// (dequantised) weights, int8 beside f32, and a head trained and evaluated
/// with the `query: ` prefix the model card asks for.
#[test]
fn multilingual_e5_matches_its_golden_vectors_and_trains_a_head() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/e5_small_q4.json")).unwrap()).unwrap();
    let f32 = Encoder::load(&e5_dir(), 512, &candle_core::Device::Cpu, Precision::F32).unwrap();
    let int8 = Encoder::load(&e5_dir(), 512, &candle_core::Device::Cpu, Precision::Int8).unwrap();
    assert_eq!(f32.dim(), 384);
    for item in golden["tokenization_only"].as_array().unwrap() {
        assert_eq!(f32.token_ids(item["text"].as_str().unwrap()).unwrap(), ids_of(&item["ids"]), "{item}");
    }
    let (mut worst, mut worst_cos) = (0f32, 1f32);
    for item in golden["texts"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        assert!(text.starts_with("query: "));
        assert_eq!(f32.token_ids(text).unwrap(), ids_of(&item["ids"]), "{text}");
        // The prefix setting gives the same input as writing it by hand.
        let prefixed = Encoder::load(&e5_dir(), 512, &candle_core::Device::Cpu, Precision::F32)
            .unwrap()
            .with_input_prefix("query: ");
        assert_eq!(prefixed.token_ids(&text["query: ".len()..]).unwrap(), ids_of(&item["ids"]));
        let want: Vec<f32> = item["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = f32.embed(text).unwrap();
        worst = got.iter().zip(&want).fold(worst, |w, (a, b)| w.max((a - b).abs()));
        let q = int8.embed(text).unwrap();
        worst_cos = worst_cos.min(q.iter().zip(&got).map(|(a, b)| a * b).sum());
    }
    assert!(worst < 1e-4, "largest component difference {worst}");
    assert!(worst_cos >= 0.99, "int8 vs f32 cosine {worst_cos}");
    // int8 keeps the 250k-row word table in 8 bits: well under 300 MB in all.
    let (wf, wi) = (f32.weight_bytes().unwrap(), int8.weight_bytes().unwrap());
    eprintln!("e5 weights: f32 {wf} B, int8 {wi} B; int8 vs f32 cosine ≥ {worst_cos:.5}");
    assert!(wi < 150 << 20 && wf > 400 << 20, "{wi} {wf}");

    // A tiny train/eval with the prefix recorded in the head and checked at load.
    let dir = tempfile::tempdir().unwrap();
    let minilm = config(dir.path(), "");
    let text = std::fs::read_to_string(&minilm).unwrap().replacen(
        &format!("path = \"{}\"", model_dir().display()),
        &format!(
            "id = \"intfloat/multilingual-e5-small\"\npath = \"{}\"\ninput_prefix = \"query: \"",
            e5_dir().display()
        ),
        1,
    );
    let cfg = dir.path().join("e5.toml");
    std::fs::write(&cfg, &text).unwrap();
    let head = dir.path().join("department.safetensors");
    train_fixture(&cfg, "department", &head, &[]);
    let meta = Head::load(&head).unwrap().meta;
    assert_eq!(meta.encoder.as_deref(), Some("intfloat/multilingual-e5-small"));
    assert_eq!((meta.input_prefix.as_deref(), meta.embedding_dim), (Some("query: "), 384));
    let test = fixture("tickets-test.jsonl");
    let out = mailtriage(
        &cfg,
        &[
            "eval",
            "--data",
            test.to_str().unwrap(),
            "--label",
            "department",
            "--head",
            head.to_str().unwrap(),
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(v["n"], 15);
    assert!(v["accuracy"].as_f64().unwrap() >= 0.8, "{v}");

    let no_prefix = dir.path().join("e5-no-prefix.toml");
    std::fs::write(
        &no_prefix,
        text.replacen("input_prefix = \"query: \"", "", 1).replacen(
            "workers = 1",
            &format!("workers = 1\ndepartment_head = \"{}\"", head.display()),
            1,
        ),
    )
    .unwrap();
    let out = mailtriage(&no_prefix, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input_prefix") && err.contains("department.safetensors"), "{err}");
}

/// Our compact Unigram model (src/model/unigram.rs) segments exactly as the
/// `tokenizers` crate's own: the same ids on every support ticket (English,
/// German, Spanish, Portuguese, French) and on 20news posts.
#[test]
fn compact_unigram_gives_the_crates_ids_on_real_mail() {
    let enc = Encoder::load(&e5_dir(), 512, &candle_core::Device::Cpu, Precision::Int8).unwrap();
    let mut reference = tokenizers::Tokenizer::from_file(e5_dir().join("tokenizer.json")).unwrap();
    reference.with_truncation(Some(tokenizers::TruncationParams { max_length: 512, ..Default::default() })).unwrap();
    let shared = root().join("../shared/data");
    let mut texts: Vec<String> = std::fs::read_to_string(shared.join("support_tickets/train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{}\n{}", v["subject"].as_str().unwrap_or(""), v["body"].as_str().unwrap_or(""))
        })
        .collect();
    texts.extend(real_texts(0, 400));
    texts.push("query: Grüße aus Köln — l’œuvre, ça coûte 12 €; 東京 🙂 \u{0}\u{7f} x".into());
    let mut checked = 0;
    for t in &texts {
        let t: String = t.chars().take(12_000).collect();
        let want = reference.encode(t.as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(enc.token_ids(&t).unwrap(), want, "{t:?}");
        checked += 1;
    }
    assert!(checked > 4_300, "{checked}");
}

/// Several head labels may name one department (`labels`): the department
/// is chosen by, and reports, the sum of its labels' probabilities, and the
/// runner-up is another department, never a label of the same one.
#[test]
fn a_department_of_several_labels_reports_their_summed_probability() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("department.safetensors");
    train_fixture(&config(dir.path(), ""), "department", &head, &["--cascade-tolerance", "-1"]);
    let msg = dir.path().join("m.eml");
    std::fs::write(&msg, "From: a@x.example\r\nTo: user@test.example\r\nSubject: Rechnung 4711 ist falsch\r\n\r\nBitte Betrag korrigieren.\r\n").unwrap();
    let classify = |cfg: &Path| -> Value {
        serde_json::from_str(ok(&mailtriage(cfg, &["classify", "--explain", msg.to_str().unwrap()])).trim()).unwrap()
    };
    let per_label = classify(&config(dir.path(), &format!("department_head = \"{}\"", head.display())));
    let merged_cfg = dir.path().join("merged.toml");
    std::fs::write(
        &merged_cfg,
        format!(
            "[model]\npath = \"{model}\"\nmax_tokens = 128\nworkers = 1\ndepartment_head = \"{head}\"\n\n\
             [[departments]]\nname = \"office\"\nlabels = [\"billing\", \"support\"]\n\
             description = \"Invoices and technical problems\"\n\n\
             [[departments]]\nname = \"people\"\nlabels = [\"hr\"]\ndescription = \"Employment\"\n",
            model = model_dir().display(),
            head = head.display()
        ),
    )
    .unwrap();
    let merged = classify(&merged_cfg);
    assert_eq!(merged["decision"]["department"], "office", "{merged}");
    let (conf, label_conf) =
        (merged["decision"]["confidence"].as_f64().unwrap(), per_label["decision"]["confidence"].as_f64().unwrap());
    assert!(conf > label_conf + 1e-4, "office ({conf}) holds more than its best label ({label_conf}): {merged}");
    // Two departments: the runner-up is the other one and the two add up to 1.
    assert_eq!(merged["explain"]["runner_up"]["label"], "people", "{merged}");
    let runner_up = merged["explain"]["runner_up"]["probability"].as_f64().unwrap();
    assert!((conf + runner_up - 1.0).abs() < 1e-3, "{conf} + {runner_up}: {merged}");
}
