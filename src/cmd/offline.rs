//! The offline subcommands: classify, train, eval, replay, model fetch.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mailtriage::learn::store::heads;
use mailtriage::learn::train::dataset::{self, Record};
use mailtriage::learn::train::eval::{self, Metrics, Outcome};
use mailtriage::learn::train::{self, Example, Provenance, TrainOptions};
use mailtriage::message::envelope::{Client, Envelope};
use mailtriage::message::extract::ExtractLimits;
use mailtriage::model::encoder::{Encoder, TextEncoder};
use mailtriage::model::head::Head;
use mailtriage::model::lexical::LexicalConfig;
use mailtriage::model::{bulk, encoder_text, fetch};
use mailtriage::pipeline::Triage;
use mailtriage::settings::{Config, ModelConfig};

use crate::cli::{DataArgs, EvalArgs, TrainArgs};

/// A progress bar on a terminal; a line every tenth of the way otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    label: String,
    last_decile: std::sync::atomic::AtomicUsize,
}

impl Progress {
    fn new(label: &str, total: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_message(label.to_string());
            b
        });
        Progress { bar, total, label: label.into(), last_decile: Default::default() }
    }

    fn set(&self, done: usize) {
        match &self.bar {
            Some(b) => b.set_position(done as u64),
            None => {
                let decile = done * 10 / self.total.max(1);
                if self.last_decile.fetch_max(decile, std::sync::atomic::Ordering::Relaxed) < decile {
                    eprintln!("{}: {done}/{}", self.label, self.total);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn model_config(cfg: &Config) -> ModelConfig {
    cfg.model.clone().unwrap_or_default()
}

fn load_encoder(m: &ModelConfig) -> Result<Encoder> {
    let dir = fetch::resolve(m.path.as_deref(), &m.id)?;
    Ok(Encoder::load(&dir, m.max_tokens, &mailtriage::model::device(m.device)?, m.precision)?
        .with_input_prefix(&m.input_prefix)
        .with_id(&m.id))
}

fn read_data(cfg: &Config, args: &DataArgs, need_label: bool) -> Result<Vec<Record>> {
    let limits = ExtractLimits::from(&cfg.limits);
    let records = match (&args.data, &args.maildir) {
        (Some(p), _) => dataset::read_jsonl(p, need_label.then_some(args.label.as_str()), limits)?,
        (None, Some(d)) => dataset::read_maildir(d, limits)?,
        (None, None) => bail!("give --data FILE.jsonl or --maildir DIR"),
    };
    Ok(records)
}

/// Embeds model texts as the daemon does: through [`encoder_text`].
fn embed(encoder: &dyn TextEncoder, texts: &[String], args: &DataArgs) -> Result<Vec<Vec<f32>>> {
    let texts: Vec<String> = texts.iter().map(|t| encoder_text(t)).collect();
    let texts = texts.as_slice();
    let threads = args.threads();
    let progress = Progress::new("embedding", texts.len());
    let started = Instant::now();
    let out = bulk::embed_all(encoder, texts, threads, args.embedding_cache.as_deref(), &|d| progress.set(d))?;
    progress.finish();
    eprintln!("embedded {} texts in {:.1} s ({threads} threads)", texts.len(), started.elapsed().as_secs_f64());
    Ok(out)
}

pub fn train(cfg: &Config, args: &TrainArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let records = read_data(cfg, &args.data, true)?;
    let opts = TrainOptions {
        loss: args.loss,
        max_iterations: args.max_iterations as usize,
        l2: args.l2.unwrap_or(args.loss.default_l2()),
        dev_fraction: args.dev_fraction,
        balanced: !args.unbalanced,
        prior_shift: args.prior_shift,
        threads: args.data.threads(),
        embedding_weight: args.embedding_weight,
        lexical: LexicalConfig {
            bits: args.bits,
            char_weight: args.char_weight,
            word_ngrams: args.word_ngrams,
            ..Default::default()
        },
        refit: !args.no_refit,
        search: args.search,
        cascade_tolerance: args.cascade_tolerance,
        ..Default::default()
    };
    let examples: Vec<Example> =
        records.iter().map(|r| Example::new(&r.text, r.label.clone().expect("labeled"), &opts.lexical)).collect();
    eprintln!("{} labeled messages read", examples.len());
    let m = model_config(cfg);
    let (embeddings, precision) = if args.no_embeddings {
        (None, None)
    } else {
        let encoder = load_encoder(&m)?;
        let texts: Vec<String> = records.iter().map(|r| r.text.clone()).collect();
        (Some(embed(&encoder, &texts, &args.data)?), Some(encoder.precision()))
    };
    let label_field = if args.data.maildir.is_some() { "department".to_string() } else { args.data.label.clone() };
    let provenance = Provenance {
        label_field,
        encoder: Some(m.id.clone()),
        max_tokens: m.max_tokens,
        precision,
        input_prefix: Some(m.input_prefix.clone()),
    };
    let fit_started = Instant::now();
    let cascade_fits =
        if embeddings.is_some() && opts.cascade_tolerance >= 0.0 { 1 + usize::from(opts.refit) } else { 0 };
    let fits = opts.candidates(embeddings.is_some()).len() + usize::from(opts.refit) + cascade_fits;
    let fitted = Progress::new("fits", fits);
    let mut done = 0;
    let (head, report) = train::train(&examples, embeddings.as_deref(), provenance, &opts, |stage, _, _| {
        if stage == "fit" {
            done += 1;
            fitted.set(done);
        }
    })?;
    fitted.finish();
    head.save(&args.out)?;
    for (settings, score) in &report.search {
        eprintln!("  candidate {settings}: dev score {score:.4}");
    }
    let d = &report.dev;
    eprintln!(
        "dev split ({} messages): accuracy {:.4}, macro-F1 {:.4}, ECE {:.4}, temperature {:.3}",
        d.n, d.accuracy, d.macro_f1, d.ece, report.temperature
    );
    if let Some(c) = &report.cascade {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        let d = &c.dev;
        eprintln!(
            "cascade: {:.1} % of the dev split reaches the encoder (lexical margin below {}); skipping it costs \
             {:+.2} points of accuracy ({:.4} against {:.4} with the encoder on every message), {:+.2} of macro-F1, \
             {:+.2} expected",
            f(&d["encoder_share"]) * 100.0,
            c.margin.map_or("∞ (the encoder always runs)".into(), |m| format!("{m:.3}")),
            (f(&d["full"]["accuracy"]) - f(&d["cascade"]["accuracy"])) * 100.0,
            f(&d["cascade"]["accuracy"]),
            f(&d["full"]["accuracy"]),
            (f(&d["full"]["macro_f1"]) - f(&d["cascade"]["macro_f1"])) * 100.0,
            f(&d["expected_accuracy_loss"]) * 100.0,
        );
        eprintln!("  lexical margin from   share   encoder flips   right   wrong   expected gain");
        for row in d["flips"].as_array().into_iter().flatten() {
            eprintln!(
                "  {:>17.3}   {:>5.1} %   {:>11.1} %   {:>4.1} %  {:>4.1} %   {:>+11.2} pt",
                f(&row["margin_from"]),
                f(&row["share"]) * 100.0,
                f(&row["flips"]) * 100.0,
                f(&row["right_flips"]) * 100.0,
                f(&row["wrong_flips"]) * 100.0,
                f(&row["expected_gain"]) * 100.0,
            );
        }
    }
    eprintln!(
        "wrote {} ({} labels, version {}); fitting {:.1} s, total {:.1} s",
        args.out.display(),
        head.meta.labels.len(),
        head.meta.version,
        fit_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The configured head trained on `label`, or the one given.
fn head_for(cfg: &Config, args: &EvalArgs) -> Result<(PathBuf, Head)> {
    if let Some(p) = &args.head {
        return Ok((p.clone(), Head::load(p)?));
    }
    let m = cfg.model.as_ref().context("no --head given and no [model] section in the config")?;
    for p in [&m.department_head, &m.priority_head].into_iter().flatten() {
        let h = Head::load(p)?;
        if h.meta.label_field == args.data.label
            || (args.data.maildir.is_some() && Some(p) == m.department_head.as_ref())
        {
            return Ok((p.clone(), h));
        }
    }
    bail!("no configured head was trained on `{}`; pass --head", args.data.label)
}

pub fn eval(cfg: &Config, args: &EvalArgs) -> Result<ExitCode> {
    let (path, head) = head_for(cfg, args)?;
    let records = read_data(cfg, &args.data, true)?;
    let started = Instant::now();
    let embeddings = if head.uses_embedding() {
        let mut m = model_config(cfg);
        m.max_tokens = head.meta.max_tokens;
        let encoder = load_encoder(&m)?;
        if head.meta.encoder.as_deref() != Some(m.id.as_str()) {
            bail!("{} was trained on {:?} embeddings, but [model] id is `{}`", path.display(), head.meta.encoder, m.id);
        }
        if let Err(why) = mailtriage::model::check_input_prefix(&head, &m.input_prefix) {
            bail!("{}: {why}", path.display());
        }
        let texts: Vec<String> = records.iter().map(|r| r.text.clone()).collect();
        Some(embed(&encoder, &texts, &args.data)?)
    } else {
        None
    };
    // As the daemon decides: the cascade's lexical head where it is sure,
    // the full head elsewhere. Both are measured, and the share skipped.
    let mut lexical_decided = 0usize;
    let mut full_outcomes = Vec::with_capacity(records.len());
    let outcomes: Vec<Outcome> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let lex = head.lexical(&r.text);
            let truth = r.label.as_ref().and_then(|l| head.meta.labels.iter().position(|x| x == l));
            let full = head.predict(embeddings.as_ref().map(|e| e[i].as_slice()), &lex);
            full_outcomes.push(Outcome { truth, predicted: full.index, confidence: full.confidence });
            let p = match head.predict_lexical(&lex) {
                Some((p, true)) => {
                    lexical_decided += 1;
                    p
                }
                _ => full,
            };
            Outcome { truth, predicted: p.index, confidence: p.confidence }
        })
        .collect();
    let overall = eval::compute(&head.meta.labels, &outcomes);
    let cascade = head.meta.cascade.as_ref().map(|c| {
        let without = eval::compute(&head.meta.labels, &full_outcomes);
        let skipped = lexical_decided as f64 / records.len().max(1) as f64;
        serde_json::json!({
            "gate": if c.margin.is_some() { "margin" } else { "confidence" },
            "margin": c.margin,
            "threshold": c.threshold,
            "skipped_share": skipped,
            "encoder_share": 1.0 - skipped,
            "accuracy_cost": without.accuracy - overall.accuracy,
            "macro_f1_cost": without.macro_f1 - overall.macro_f1,
            "without_cascade": {"accuracy": without.accuracy, "macro_f1": without.macro_f1, "ece": without.ece},
        })
    });
    let mut slices: BTreeMap<String, BTreeMap<String, Metrics>> = BTreeMap::new();
    for field in &args.slice {
        let mut groups: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
        for (r, o) in records.iter().zip(&outcomes) {
            let v = match r.fields.get(field) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "(none)".into(),
            };
            groups.entry(v).or_default().push(*o);
        }
        slices.insert(
            field.clone(),
            groups.into_iter().map(|(v, os)| (v, eval::compute(&head.meta.labels, &os))).collect(),
        );
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&overall)?;
        v["slices"] = serde_json::to_value(&slices)?;
        v["head"] = path.display().to_string().into();
        v["head_version"] = head.meta.version.clone().into();
        v["seconds"] = secs.into();
        if let Some(c) = &cascade {
            v["cascade"] = c.clone();
        }
        println!("{v}");
    } else {
        println!("head {} (version {}, label `{}`)\n", path.display(), head.meta.version, head.meta.label_field);
        print!("{}", overall.render());
        if let Some(c) = &cascade {
            let gate = match c["margin"].as_f64() {
                Some(m) => format!("lexical margin ≥ {m:.3}"),
                None => format!("confidence ≥ {}", c["threshold"]),
            };
            println!(
                "\ncascade: {:.1} % of messages reach the encoder ({:.1} % decided by the lexical head alone, {gate}); \
                 skipping it costs {:+.2} points of accuracy and {:+.2} of macro-F1 (with the encoder on every \
                 message: accuracy={:.4} macro-F1={:.4})",
                c["encoder_share"].as_f64().unwrap_or(0.0) * 100.0,
                c["skipped_share"].as_f64().unwrap_or(0.0) * 100.0,
                c["accuracy_cost"].as_f64().unwrap_or(0.0) * 100.0,
                c["macro_f1_cost"].as_f64().unwrap_or(0.0) * 100.0,
                c["without_cascade"]["accuracy"].as_f64().unwrap_or(0.0),
                c["without_cascade"]["macro_f1"].as_f64().unwrap_or(0.0),
            );
        }
        for (field, groups) in &slices {
            println!("\nby {field}:");
            for (value, m) in groups {
                println!(
                    "  {value:<16} n={:<6} accuracy={:.4} macro-F1={:.4} ECE={:.4}",
                    m.n, m.accuracy, m.macro_f1, m.ece
                );
            }
        }
        eprintln!("\nevaluated {} messages in {secs:.1} s", overall.n);
    }
    Ok(ExitCode::SUCCESS)
}

/// One JSON line per file: envelope, decision, plan, extraction summary.
pub fn classify(
    cfg: &Config,
    mail_from: Option<&str>,
    rcpts: &[String],
    client: &Client,
    explain: bool,
    files: &[PathBuf],
) -> Result<ExitCode> {
    heads::refresh(cfg);
    let triage = Triage::new(&heads::current(cfg))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    for file in files {
        let line = match std::fs::read(file) {
            Ok(raw) => match decide_json(&triage, &raw, mail_from, rcpts, client, explain) {
                Ok(mut v) => {
                    v["file"] = file.display().to_string().into();
                    v
                }
                Err(e) => {
                    failed += 1;
                    serde_json::json!({ "file": file.display().to_string(), "error": e.to_string() })
                }
            },
            Err(e) => {
                failed += 1;
                serde_json::json!({ "file": file.display().to_string(), "error": format!("cannot read: {e}") })
            }
        };
        writeln!(out, "{line}").context("writing to stdout")?;
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Stands in for a sender nobody named: not empty, so the message is not
/// taken for a bounce (`MAIL FROM:<>`); `.invalid` (RFC 2606), so no rule
/// on a real domain matches it. Printed as `null`.
const UNKNOWN_SENDER: &str = "unknown-sender@sender.invalid";

/// The envelope sender `classify` assumes: `--mail-from` as given (`""` or
/// `<>` is the null sender), else the Return-Path a delivered message
/// carries (`<>` there is a real bounce), else the From address; `None`
/// when the message says nothing.
fn assumed_sender(given: Option<&str>, features: &mailtriage::message::extract::Features) -> Option<String> {
    use mailtriage::message::envelope::strip_brackets;
    if let Some(s) = given {
        return Some(strip_brackets(s));
    }
    if let Some(rp) = features.header_values("Return-Path").next() {
        return Some(strip_brackets(rp));
    }
    features.from.first().cloned()
}

/// Decides one message file; the envelope not given is taken from the
/// headers (Return-Path or From for the sender, To and Cc for the recipients).
fn decide_json(
    triage: &Triage,
    raw: &[u8],
    mail_from: Option<&str>,
    rcpts: &[String],
    client: &Client,
    explain: bool,
) -> Result<serde_json::Value> {
    let features = triage.extract(raw);
    let sender = assumed_sender(mail_from, &features);
    let envelope = Envelope {
        mail_from: sender.clone().unwrap_or_else(|| UNKNOWN_SENDER.to_string()),
        rcpts: if rcpts.is_empty() {
            features.to.iter().chain(&features.cc).cloned().collect()
        } else {
            rcpts.to_vec()
        },
        queue_id: None,
        client: client.clone(),
    };
    let header_names: Vec<String> = features.headers.iter().map(|(n, _)| n.clone()).collect();
    let o = triage.decide_extracted(&envelope, features, &header_names)?;
    // Rules run only for mail in scope: a scope skip tried none.
    let scope_skip = o.skipped.as_ref().filter(|s| !matches!(s, mailtriage::scope::Skip::Rule(_)));
    let rules = (explain && scope_skip.is_none()).then(|| triage.rule_trace(&envelope, &o.features));
    let explanation = if explain { o.decision.as_ref().and_then(|d| triage.explain(&o.features, d)) } else { None };
    let mut v = serde_json::json!({
        "envelope": envelope,
        "decision": o.decision,
        "skipped": o.skipped.as_ref().map(ToString::to_string),
        "plan": o.plan.changes,
        "extracted": {
            "bytes_read": o.features.bytes_read,
            "text_chars": o.features.text.chars().count(),
            "headers": o.features.headers.len(),
            "attachments": o.features.attachments,
            "truncated": o.features.truncated,
            "unparsed": o.features.unparsed,
        },
    });
    if sender.is_none() {
        v["envelope"]["mail_from"] = serde_json::Value::Null;
    }
    if explain {
        v["explain"] = serde_json::json!({
            "rules": match (&rules, scope_skip) {
                (Some(trace), _) => serde_json::json!(trace),
                (None, Some(skip)) => format!("not tried: out of scope ({skip})").into(),
                (None, None) => serde_json::Value::Null,
            },
        });
    }
    if let Some(e) = explanation {
        v["explain"]["runner_up"] =
            e.runner_up.map(|(label, p)| serde_json::json!({"label": label, "probability": p})).into();
        v["explain"]["terms"] =
            e.terms.iter().map(|(t, w)| serde_json::json!({"term": t, "weight": w})).collect::<Vec<_>>().into();
    }
    Ok(v)
}

/// What the daemon would do with each message of a Maildir tree.
pub fn replay(cfg: &Config, dir: &Path) -> Result<ExitCode> {
    heads::refresh(cfg);
    let triage = Triage::new(&heads::current(cfg))?;
    let records = dataset::read_maildir(dir, ExtractLimits::from(&cfg.limits))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut by_department: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        let raw = r.raw.as_deref().unwrap_or_default();
        let mut v = decide_json(&triage, raw, None, &[], &Client::default(), false)?;
        v["file"] = r.origin.clone().into();
        v["folder"] = r.label.clone().into();
        let department = match v["decision"]["department"].as_str() {
            Some(d) => d.to_string(),
            None => format!("(skipped: {})", v["skipped"].as_str().unwrap_or("?")),
        };
        *by_department.entry(department).or_default() += 1;
        writeln!(out, "{v}")?;
    }
    eprintln!("{} messages: {by_department:?}", records.len());
    Ok(ExitCode::SUCCESS)
}

pub fn model_fetch(cfg: &Config) -> Result<ExitCode> {
    let m = model_config(cfg);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dir = rt.block_on(fetch::fetch(&m.id))?;
    Encoder::load(&dir, m.max_tokens, &candle_core::Device::Cpu, m.precision)
        .with_context(|| format!("checking {}", dir.display()))?;
    println!("{}: {}", m.id, dir.display());
    Ok(ExitCode::SUCCESS)
}
