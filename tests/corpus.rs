//! Every message of the SpamAssassin MIME corpus (../shared/data/spamassassin_mime)
//! goes through `mailtriage classify` without an error, and text really comes
//! out of the hard cases: HTML-only, base64, quoted-printable, 8-bit, RFC 2047.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/spamassassin_mime");
    assert!(
        dir.join("index.jsonl").exists(),
        "corpus not found at {} (CI keeps shared/ beside the clone)",
        dir.display()
    );
    dir
}

/// Rules only: this is about MIME robustness, not the model (tests/model.rs).
fn rules_config() -> PathBuf {
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mailtriage.toml")).unwrap();
    let start = shipped.find("[model]").expect("shipped config has a [model] section");
    let end = shipped[start + 1..].find("\n[").map_or(shipped.len(), |i| start + 1 + i);
    let path = std::env::temp_dir().join(format!("mailtriage-corpus-{}.toml", std::process::id()));
    std::fs::write(&path, format!("{}{}", &shipped[..start], &shipped[end..])).unwrap();
    path
}

#[test]
fn whole_spamassassin_corpus_classifies_and_yields_text() {
    let dir = corpus_dir();
    let index: Vec<Value> = std::fs::read_to_string(dir.join("index.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(index.len(), 1048);
    let files: Vec<PathBuf> = index.iter().map(|e| dir.join(e["eml"].as_str().unwrap())).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(rules_config())
        // Much of the corpus is list mail: decide it too (tagged only), so every file yields a decision.
        .env("MAILTRIAGE__SCOPE__SKIP_AUTO", "false")
        .arg("classify")
        .args(&files)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "classify failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let results: HashMap<String, Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["file"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(results.len(), 1048, "one JSON object per file");

    let mut checked: HashMap<&str, usize> = HashMap::new();
    let mut empty = Vec::new();
    for (entry, file) in index.iter().zip(&files) {
        let r = &results[&file.display().to_string()];
        assert!(r.get("error").is_none(), "{}: {}", file.display(), r["error"]);
        assert!(r["decision"]["department"].is_string(), "{}: no decision", file.display());
        assert_eq!(r["extracted"]["unparsed"], false, "{}: MIME parsing failed", file.display());
        let features: Vec<&str> = entry["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let has_text_part =
            entry["content_types"].as_array().unwrap().iter().any(|c| c.as_str().unwrap().starts_with("text/"));
        for f in [
            "html_only",
            "cte:base64",
            "cte:quoted-printable",
            "cte:8bit",
            "rfc2047_header",
            "raw_8bit_bytes",
            "charset:other",
        ] {
            if features.contains(&f) && has_text_part {
                *checked.entry(f).or_default() += 1;
                if r["extracted"]["text_chars"].as_u64().unwrap() == 0 {
                    empty.push(format!("{} ({f})", file.display()));
                }
            }
        }
    }
    // Every category is represented, so the assertion below means something.
    for f in ["html_only", "cte:base64", "cte:quoted-printable", "cte:8bit", "rfc2047_header"] {
        assert!(checked.get(f).copied().unwrap_or(0) >= 20, "too few {f} messages checked: {checked:?}");
    }
    empty.sort();
    empty.dedup();
    // Checked by hand: these contain no text at all.
    let no_text = [
        "spam-1__00329.af4af411fb1268d1461b29fa2d2145a3.eml", // HTML that is a single <iframe>
        "spam-2__01306.d37be8871ac501758c6854fbef9cbdd2.eml", // empty text/plain + octet-stream attachment
    ];
    empty.retain(|e| !no_text.iter().any(|n| e.contains(n)));
    assert!(empty.is_empty(), "no text extracted from {} messages with text parts:\n{}", empty.len(), empty.join("\n"));
}

#[test]
fn unreadable_file_is_reported_per_file_and_others_still_classified() {
    let dir = corpus_dir();
    let good = dir.join("ham").read_dir().unwrap().next().unwrap().unwrap().path();
    let out = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(rules_config())
        .args(["classify", "/nonexistent/message.eml"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["error"].as_str().unwrap().contains("cannot read"));
    assert!(lines[1]["decision"].is_object());
}

/// The fuzz smoke: every fuzz target (src/fuzz/; `scripts/fuzz.sh` runs
/// them for hours under AFL++) on its seeds from the corpus, on every input
/// that once broke it (fuzz/regressions/<target>/), and on a few thousand
/// deterministic mutations of the seeds. A panic fails with the input saved
/// for `fuzz-target <name> < file`; so does an input that takes over 10 s
/// (a hang, not a speed goal).
#[cfg(feature = "fuzzing")]
#[test]
fn fuzz_targets_survive_their_seeds_regressions_and_mutations() {
    let corpus = corpus_dir();
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut report = Vec::new();
    for target in mailtriage::fuzz::TARGETS {
        let seeds = mailtriage::fuzz::seeds(target, &corpus, 24);
        assert!(!seeds.is_empty(), "{target}: no seeds");
        let mut inputs: Vec<Vec<u8>> = seeds.clone();
        if let Ok(rd) = std::fs::read_dir(regressions.join(target)) {
            inputs.extend(rd.flatten().map(|e| std::fs::read(e.path()).unwrap()));
        }
        let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ target.len() as u64;
        for seed in &seeds {
            for _ in 0..60 {
                inputs.push(mutate(seed, &seeds, &mut rng));
            }
        }
        let started = std::time::Instant::now();
        let mut slowest = std::time::Duration::ZERO;
        for input in &inputs {
            let t = std::time::Instant::now();
            let ok = std::panic::catch_unwind(|| mailtriage::fuzz::run(target, input));
            let took = t.elapsed();
            if ok.is_err() || took > std::time::Duration::from_secs(10) {
                let path = std::env::temp_dir().join(format!("mailtriage-fuzz-{target}-failure"));
                std::fs::write(&path, input).unwrap();
                panic!(
                    "fuzz target {target} {} on the input saved at {}",
                    if ok.is_err() { "panicked" } else { "hung" },
                    path.display()
                );
            }
            slowest = slowest.max(took);
        }
        report.push(format!("{target}: {} inputs in {:.1?} (slowest {slowest:.1?})", inputs.len(), started.elapsed()));
    }
    eprintln!("{}", report.join("\n"));
}

/// Without the `fuzzing` feature the fuzz entry points are not built: say
/// so rather than pass in silence.
#[cfg(not(feature = "fuzzing"))]
#[test]
fn fuzz_targets_survive_their_seeds_regressions_and_mutations() {
    panic!("the fuzz replay needs `--features fuzzing` (scripts/test.sh passes it)");
}

/// One AFL-like mutation: flip, set to an interesting value, insert, delete,
/// duplicate a block, truncate, or splice in part of another seed.
#[cfg(feature = "fuzzing")]
fn mutate(seed: &[u8], others: &[Vec<u8>], rng: &mut u64) -> Vec<u8> {
    let mut next = move || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut out = seed.to_vec();
    for _ in 0..1 + next() % 4 {
        let at = if out.is_empty() { 0 } else { (next() as usize) % out.len() };
        match next() % 7 {
            0 if !out.is_empty() => out[at] ^= 1 << (next() % 8),
            1 if !out.is_empty() => {
                out[at] = [0, 0xFF, 0x7F, 0x80, b'\n', b'\r', b':', b'.', b'<', b'='][next() as usize % 10]
            }
            2 => out.insert(at, next() as u8),
            3 if !out.is_empty() => {
                let n = (next() as usize % 64).min(out.len() - at);
                out.drain(at..at + n);
            }
            4 if !out.is_empty() => {
                let n = (next() as usize % 256).min(out.len() - at);
                let block = out[at..at + n].to_vec();
                out.splice(at..at, block);
            }
            5 => out.truncate(at),
            _ => {
                let other = &others[next() as usize % others.len()];
                if !other.is_empty() {
                    let from = next() as usize % other.len();
                    let n = (next() as usize % 512).min(other.len() - from);
                    out.splice(at..at, other[from..from + n].iter().copied());
                }
            }
        }
    }
    out
}
