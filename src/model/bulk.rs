//! Embedding many texts at once (training, evaluation): one thread per core,
//! each running single-sequence passes, with an optional on-disk cache so
//! that retraining on the same mail does not embed it again.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::encoder::TextEncoder;
use super::ModelError;

const MAGIC: &[u8; 8] = b"MTEMB01\n";
/// Cached embeddings are appended in batches of this many.
const CACHE_FLUSH_EVERY: usize = 256;

/// Embeddings of `texts`, in order. `progress(done)` is called as they finish.
pub fn embed_all(
    encoder: &dyn TextEncoder,
    texts: &[String],
    threads: usize,
    cache: Option<&Path>,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<f32>>, ModelError> {
    let key = |t: &str| cache_key(encoder.id(), encoder.max_tokens(), t);
    let mut known = match cache {
        Some(p) => read_cache(p)?,
        None => HashMap::new(),
    };
    let mut out: Vec<Option<Vec<f32>>> = texts.iter().map(|t| known.remove(&key(t))).collect();
    let todo: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
    let done = AtomicUsize::new(texts.len() - todo.len());
    progress(done.load(Ordering::Relaxed));
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(todo.len()));
    let failed: Mutex<Option<ModelError>> = Mutex::new(None);
    // Results written to the cache so far: an interrupted run keeps its work.
    let flushed = Mutex::new(0usize);
    let flush = |all: bool| -> Result<(), ModelError> {
        let Some(p) = cache else { return Ok(()) };
        let mut upto = flushed.lock().unwrap();
        let batch: Vec<(u64, Vec<f32>)> = {
            let r = results.lock().unwrap();
            if !all && r.len() - *upto < CACHE_FLUSH_EVERY {
                return Ok(());
            }
            let b = r[*upto..].iter().map(|(i, v): &(usize, Vec<f32>)| (key(&texts[*i]), v.clone())).collect();
            *upto = r.len();
            b
        };
        append_cache(p, batch.iter().map(|(k, v)| (*k, v.as_slice())))
    };
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = todo.get(n) else { break };
                if failed.lock().unwrap().is_some() {
                    break;
                }
                match encoder.embed(&texts[i]).and_then(|v| {
                    results.lock().unwrap().push((i, v));
                    flush(false)
                }) {
                    Ok(()) => {}
                    Err(e) => {
                        *failed.lock().unwrap() = Some(e);
                        break;
                    }
                }
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            });
        }
    });
    flush(true)?;
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let fresh = results.into_inner().unwrap();
    for (i, v) in fresh {
        out[i] = Some(v);
    }
    Ok(out.into_iter().map(|v| v.expect("every text embedded")).collect())
}

fn cache_key(encoder_id: &str, max_tokens: usize, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in encoder_id.bytes().chain(max_tokens.to_le_bytes()).chain(text.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cache_err(p: &Path, reason: String) -> ModelError {
    ModelError::BadFile { path: p.to_owned(), reason: format!("embedding cache: {reason}") }
}

fn read_cache(p: &Path) -> Result<HashMap<u64, Vec<f32>>, ModelError> {
    let mut data = Vec::new();
    match std::fs::File::open(p) {
        Ok(mut f) => f.read_to_end(&mut data).map_err(|e| cache_err(p, e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(cache_err(p, e.to_string())),
    };
    if !data.starts_with(MAGIC) {
        return Err(cache_err(p, "not an embedding cache file".into()));
    }
    let mut map = HashMap::new();
    let mut rest = &data[MAGIC.len()..];
    // A record cut short by a crash is ignored, not fatal.
    while rest.len() >= 12 {
        let key = u64::from_le_bytes(rest[..8].try_into().unwrap());
        let dim = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
        let Some(body) = rest.get(12..12 + dim * 4) else { break };
        map.insert(key, body.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect());
        rest = &rest[12 + dim * 4..];
    }
    Ok(map)
}

fn append_cache<'a>(p: &Path, items: impl Iterator<Item = (u64, &'a [f32])>) -> Result<(), ModelError> {
    let new = !p.exists();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .and_then(|f| crate::access::inherit_owner(p).map(|()| f))
        .map_err(|e| cache_err(p, crate::access::describe(p, &e, true)))?;
    let mut w = BufWriter::new(f);
    let write = || -> std::io::Result<()> {
        if new {
            w.write_all(MAGIC)?;
        }
        for (k, v) in items {
            w.write_all(&k.to_le_bytes())?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        w.flush()
    };
    write().map_err(|e| cache_err(p, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.bin");
        append_cache(&p, [(1u64, &[1.0f32, 2.0][..]), (2, &[3.0, 4.0][..])].into_iter()).unwrap();
        append_cache(&p, [(3u64, &[5.0f32][..])].into_iter()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[9, 9, 9]); // torn write
        std::fs::write(&p, bytes).unwrap();
        let m = read_cache(&p).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[&2], vec![3.0, 4.0]);
        std::fs::write(&p, b"nonsense").unwrap();
        assert!(read_cache(&p).is_err());
    }
}
