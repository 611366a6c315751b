//! A BERT forward pass written for inference on one CPU core.
//!
//! Candle's generic `BertModel` spends more time around its matrix
//! multiplies than in them on this work: a tensor allocated per operation,
//! copies to make views contiguous, the attention as batched 4-D matmuls over
//! padded shapes. Here one sequence goes through the model with:
//! - the weights packed once at load ([`F32Linear`]), Q, K and V fused into
//!   one matrix (one multiply instead of three);
//! - every product single-threaded on row-major slices (each inference
//!   worker owns a core); attention's products are direct `gemm` calls with
//!   the heads addressed by strides into the fused QKV buffer, never copied;
//! - bias, residual, LayerNorm, GELU and softmax as plain loops over those
//!   buffers, which are reused from one message to the next (one set per
//!   thread), so a forward pass allocates nothing.
//!
//! No padding and no mask: one sequence per pass. In f32, numbers match
//! Candle's model (and the sentence-transformers reference) within 1e-4 per
//! component (tests/model.rs checks the golden vectors). In int8 the four
//! linear layers of each block run on [`QLinear`] (8-bit); attention
//! scores, softmax, LayerNorm and GELU stay in f32.

use std::cell::RefCell;

use gemm::Parallelism;

use super::f32linear::F32Linear;
use super::int8::{QLinear, QScratch, QTable};
use super::weights::WeightsFile;

/// A linear layer's weights: f32 (packed once at load), or 8-bit.
enum Linear {
    F32(F32Linear),
    Int8(QLinear),
}

impl Linear {
    /// From PyTorch's `[out × in]` layout.
    fn new(w: &[f32], out: usize, inp: usize, b: Vec<f32>, int8: bool) -> Linear {
        if int8 {
            Linear::Int8(QLinear::new(w, out, inp, &b))
        } else {
            Linear::F32(F32Linear::new(w, out, inp, b))
        }
    }

    /// `y[m×out] = x[m×in] · W + b` (the layer knows its widths).
    fn apply(&self, x: &[f32], m: usize, y: &mut [f32], q: &mut QScratch) {
        match self {
            Linear::F32(l) => l.forward(x, m, y),
            Linear::Int8(l) => l.forward(x, m, y, q),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Linear::F32(l) => l.bytes(),
            Linear::Int8(l) => l.bytes(),
        }
    }
}

/// The word-embedding table: f32, or 8 bits per value with a scale per row.
enum Table {
    F32(Vec<f32>),
    Int8(QTable),
}

/// The weights of one transformer layer.
struct Layer {
    /// Q, K and V fused into one `hidden → 3·hidden` product.
    qkv: Linear,
    out: Linear,
    ln1_g: Vec<f32>,
    ln1_b: Vec<f32>,
    up: Linear,
    down: Linear,
    ln2_g: Vec<f32>,
    ln2_b: Vec<f32>,
}

pub struct CpuBert {
    hidden: usize,
    heads: usize,
    intermediate: usize,
    eps: f32,
    vocab: usize,
    max_positions: usize,
    word: Table,
    position: Vec<f32>,
    /// Token type 0 (single-segment input).
    token_type: Vec<f32>,
    emb_ln_g: Vec<f32>,
    emb_ln_b: Vec<f32>,
    layers: Vec<Layer>,
}

/// Buffers of one thread's forward passes, grown to the longest sequence seen.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    scores: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    up: Vec<f32>,
    q: QScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The shape a BERT checkpoint must have, from its config.json.
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub eps: f64,
}

/// Rows of the word-embedding table read per slice while loading.
const TABLE_CHUNK_ROWS: usize = 4096;

impl CpuBert {
    /// Reads the weights tensor by tensor (`bert.` prefix or none), in f32
    /// or quantised to 8 bits as each one arrives (no full f32 copy first).
    pub fn load(file: &WeightsFile, shape: &Shape, int8: bool) -> Result<CpuBert, String> {
        let prefix = if file.contains("embeddings.word_embeddings.weight") { "" } else { "bert." };
        let name = |s: &str| format!("{prefix}{s}");
        let get = |s: &str, dims: &[usize]| file.read(&name(s), dims);
        let (h, i) = (shape.hidden, shape.intermediate);
        if shape.heads == 0 || h % shape.heads != 0 {
            return Err(format!("hidden size {h} is not a multiple of {} heads", shape.heads));
        }
        let dim0 = |s: &str| {
            file.dims(&name(s))
                .and_then(|d| d.first().copied())
                .ok_or_else(|| format!("tensor `{}` is missing", name(s)))
        };
        let vocab = dim0("embeddings.word_embeddings.weight")?;
        let max_positions = dim0("embeddings.position_embeddings.weight")?;
        let types = dim0("embeddings.token_type_embeddings.weight")?;
        let token_types = get("embeddings.token_type_embeddings.weight", &[types, h])?;
        let word = if int8 {
            let mut t = QTable::with_capacity(vocab, h);
            file.read_rows(&name("embeddings.word_embeddings.weight"), &[vocab, h], TABLE_CHUNK_ROWS, |rows| {
                t.push_rows(rows)
            })?;
            Table::Int8(t)
        } else {
            Table::F32(get("embeddings.word_embeddings.weight", &[vocab, h])?)
        };
        let mut layers = Vec::with_capacity(shape.layers);
        for l in 0..shape.layers {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            let mut fused = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                fused.extend(get(&p(&format!("attention.self.{part}.weight")), &[h, h])?);
                qkv_b.extend(get(&p(&format!("attention.self.{part}.bias")), &[h])?);
            }
            layers.push(Layer {
                qkv: Linear::new(&fused, 3 * h, h, qkv_b, int8),
                out: Linear::new(
                    &get(&p("attention.output.dense.weight"), &[h, h])?,
                    h,
                    h,
                    get(&p("attention.output.dense.bias"), &[h])?,
                    int8,
                ),
                ln1_g: get(&p("attention.output.LayerNorm.weight"), &[h])?,
                ln1_b: get(&p("attention.output.LayerNorm.bias"), &[h])?,
                up: Linear::new(
                    &get(&p("intermediate.dense.weight"), &[i, h])?,
                    i,
                    h,
                    get(&p("intermediate.dense.bias"), &[i])?,
                    int8,
                ),
                down: Linear::new(
                    &get(&p("output.dense.weight"), &[h, i])?,
                    h,
                    i,
                    get(&p("output.dense.bias"), &[h])?,
                    int8,
                ),
                ln2_g: get(&p("output.LayerNorm.weight"), &[h])?,
                ln2_b: get(&p("output.LayerNorm.bias"), &[h])?,
            });
        }
        Ok(CpuBert {
            hidden: h,
            heads: shape.heads,
            intermediate: i,
            eps: shape.eps as f32,
            vocab,
            max_positions,
            word,
            position: get("embeddings.position_embeddings.weight", &[max_positions, h])?,
            token_type: token_types[..h].to_vec(),
            emb_ln_g: get("embeddings.LayerNorm.weight", &[h])?,
            emb_ln_b: get("embeddings.LayerNorm.bias", &[h])?,
            layers,
        })
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let word = match &self.word {
            Table::F32(w) => 4 * w.len(),
            Table::Int8(t) => t.bytes(),
        };
        let small = 4 * (self.position.len() + self.token_type.len() + 2 * self.hidden);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.out.bytes() + l.up.bytes() + l.down.bytes() + 16 * self.hidden)
            .sum();
        word + small + layers
    }

    /// Mean-pooled, L2-normalised embedding of one token sequence.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        let n = ids.len();
        if n == 0 || n > self.max_positions {
            return Err(format!("{n} tokens: must be between 1 and {}", self.max_positions));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(format!("token id {bad} is outside the vocabulary of {}", self.vocab));
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            Ok(self.forward(&mut s, ids))
        })
    }

    fn forward(&self, s: &mut Scratch, ids: &[u32]) -> Vec<f32> {
        let (n, h, i) = (ids.len(), self.hidden, self.intermediate);
        let d = h / self.heads;
        resize(&mut s.x, n * h);
        resize(&mut s.qkv, n * 3 * h);
        resize(&mut s.scores, n * n);
        resize(&mut s.ctx, n * h);
        resize(&mut s.tmp, n * h);
        resize(&mut s.up, n * i);
        // Exactly this sequence's size: the buffers may be longer from an earlier one.
        let Scratch { x, qkv, scores, ctx, tmp, up, q: qs } = s;
        let (x, qkv, scores) = (&mut x[..n * h], &mut qkv[..n * 3 * h], &mut scores[..n * n]);
        let (ctx, tmp, up) = (&mut ctx[..n * h], &mut tmp[..n * h], &mut up[..n * i]);

        for (t, &id) in ids.iter().enumerate() {
            let row = &mut x[t * h..(t + 1) * h];
            let p = &self.position[t * h..][..h];
            for j in 0..h {
                row[j] = p[j] + self.token_type[j];
            }
            match &self.word {
                Table::F32(w) => add_assign(row, &w[id as usize * h..][..h]),
                Table::Int8(w) => w.add_row(id as usize, row),
            }
        }
        add_layer_norm(x, &[], h, &self.emb_ln_g, &self.emb_ln_b, self.eps);

        let scale = 1.0 / (d as f32).sqrt();
        for l in &self.layers {
            l.qkv.apply(x, n, qkv, qs);
            for head in 0..self.heads {
                let q = qkv[head * d..].as_ptr();
                let k = qkv[h + head * d..].as_ptr();
                let v = qkv[2 * h + head * d..].as_ptr();
                let stride = 3 * h as isize;
                // SAFETY: every pointer/stride pair addresses only elements inside
                // its buffer: rows t < n of width `stride`, columns < d from the
                // head's offset (head·d + d ≤ h within each of the Q, K, V thirds),
                // and `scores`/`ctx` hold n·n and n·h elements.
                unsafe {
                    // scores[n×n] = scale · Q_h · K_hᵀ
                    gemm::gemm(
                        n,
                        n,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        q,
                        1,
                        stride,
                        k,
                        stride,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                softmax_rows(scores, n);
                // SAFETY: as above; ctx row t, columns head·d .. head·d + d.
                unsafe {
                    // ctx_h[n×d] = P · V_h
                    gemm::gemm(
                        n,
                        d,
                        n,
                        ctx[head * d..].as_mut_ptr(),
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        v,
                        1,
                        stride,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
            l.out.apply(ctx, n, tmp, qs);
            add_layer_norm(x, tmp, h, &l.ln1_g, &l.ln1_b, self.eps);
            l.up.apply(x, n, up, qs);
            gelu_all(up);
            l.down.apply(up, n, tmp, qs);
            add_layer_norm(x, tmp, h, &l.ln2_g, &l.ln2_b, self.eps);
        }

        // Mean over the tokens (no padding: all of them count), then unit length.
        let mut pooled = vec![0.0f32; h];
        for row in x.chunks_exact(h) {
            for (p, v) in pooled.iter_mut().zip(row) {
                *p += v;
            }
        }
        pooled.iter_mut().for_each(|v| *v /= n as f32);
        let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        pooled.iter_mut().for_each(|v| *v /= norm);
        pooled
    }
}

fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The widest vectors this CPU has, for the f32 loops around the matrix
/// products (softmax, GELU, LayerNorm). Every width runs the same
/// operations in the same order (reductions over eight fixed lanes, no
/// fused multiply-add), so all give the same floats, bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Width {
    Avx512,
    Avx2,
    Portable,
}

impl Width {
    fn detect() -> Width {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Width::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Width::Avx2;
            }
        }
        Width::Portable
    }

    /// The widths this CPU can run (for the tests that compare them).
    #[cfg(test)]
    fn available() -> Vec<Width> {
        let best = Width::detect();
        [Width::Avx512, Width::Avx2, Width::Portable].into_iter().filter(|w| *w as u8 >= best as u8).collect()
    }
}

/// Runs `$body` (a call to an `#[inline(always)]` loop) compiled for the
/// given width: each arm is a function with that target feature, so the
/// loop inside vectorises to its registers.
macro_rules! at_width {
    ($width:expr, |$($arg:ident: $ty:ty),*| $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn avx512($($arg: $ty),*) { $body }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2($($arg: $ty),*) { $body }
        match $width {
            // SAFETY: `Width::detect` (or `available`) found the feature on this CPU.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { avx512($($arg),*) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { avx2($($arg),*) },
            _ => $body,
        }
    }};
}

/// `x += y` (where `y` is not empty), then LayerNorm of each row of `x`:
/// the residual connection and the norm after it, one row at a time.
fn add_layer_norm(x: &mut [f32], y: &[f32], width: usize, g: &[f32], b: &[f32], eps: f32) {
    add_layer_norm_at(Width::detect(), x, y, width, g, b, eps)
}

fn add_layer_norm_at(w: Width, x: &mut [f32], y: &[f32], width: usize, g: &[f32], b: &[f32], eps: f32) {
    at_width!(w, |x: &mut [f32], y: &[f32], width: usize, g: &[f32], b: &[f32], eps: f32| {
        add_layer_norm_loop(x, y, width, g, b, eps)
    })
}

#[inline(always)]
fn add_layer_norm_loop(x: &mut [f32], y: &[f32], width: usize, g: &[f32], b: &[f32], eps: f32) {
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        if let Some(add) = y.get(r * width..(r + 1) * width) {
            row.iter_mut().zip(add).for_each(|(v, a)| *v += a);
        }
        let mean = lanes_reduce(row, 0.0, |a, b| a + b) / width as f32;
        let var = lanes_fold(row, 0.0, |a, v| a + (v - mean) * (v - mean), |a, b| a + b) / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(g).zip(b) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Softmax of each row of an `n × n` matrix, in place.
fn softmax_rows(s: &mut [f32], n: usize) {
    softmax_rows_at(Width::detect(), s, n)
}

fn softmax_rows_at(w: Width, s: &mut [f32], n: usize) {
    at_width!(w, |s: &mut [f32], n: usize| softmax_rows_portable(s, n))
}

/// Written so it vectorises: separate passes, eight partial sums.
#[inline(always)]
fn softmax_rows_portable(s: &mut [f32], n: usize) {
    for row in s[..n * n].chunks_exact_mut(n) {
        let max = lanes_reduce(row, f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
        let inv = 1.0 / lanes_reduce(row, 0.0, |a, b| a + b);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// A reduction over eight interleaved lanes (a plain fold over floats cannot
/// be reordered, so it would not vectorise).
#[inline(always)]
fn lanes_reduce(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    lanes_fold(v, init, f, f)
}

/// Folds `step` over eight interleaved lanes and the remainder, then joins
/// the lanes with `join` (for a reduction, the two are the same).
#[inline(always)]
fn lanes_fold(
    v: &[f32],
    init: f32,
    step: impl Fn(f32, f32) -> f32 + Copy,
    join: impl Fn(f32, f32) -> f32 + Copy,
) -> f32 {
    let mut acc = [init; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = step(acc[k], c[k]);
        }
    }
    let mut r = rest.iter().fold(init, |a, &b| step(a, b));
    for a in acc {
        r = join(r, a);
    }
    r
}

/// GELU over a buffer, in place.
fn gelu_all(v: &mut [f32]) {
    gelu_all_at(Width::detect(), v)
}

fn gelu_all_at(w: Width, v: &mut [f32]) {
    at_width!(w, |v: &mut [f32]| v.iter_mut().for_each(|x| *x = gelu(*x)))
}

/// BERT's exact GELU, `x · Φ(x)`, with a rational erf.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf for f32 as a ratio of odd and even polynomials on [-4, 4] (beyond,
/// erf is ±1 in f32): branch-free, so loops over it vectorise. Max error
/// about 1e-7 (tested against libm below).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// e^x for x ≤ 0 (softmax after subtracting the row max): 2^k · e^r with
/// |r| ≤ ln2/2 and a degree-6 polynomial for e^r; branch-free.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest by adding and removing 1.5·2^23 (no rounding
    // instruction needed, so this vectorises on any x86-64).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let k = shifted - MAGIC;
    // k as an integer from the low mantissa bits (an `as i32` cast would be
    // a saturating scalar conversion and stop the loop vectorising).
    let ki = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    // ln 2 in two parts (Cody–Waite), so k·ln2 loses no bits for large k.
    let r = (x - k * 0.693_359_4) - k * -2.121_944_4e-4;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((ki + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vector_width_gives_the_same_floats() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 20_000) as f32 / 1000.0 - 10.0
        };
        let (n, h) = (37, 100); // neither a multiple of 8 nor of 16
        let scores: Vec<f32> = (0..n * n).map(|_| next()).collect();
        let (x, y): (Vec<f32>, Vec<f32>) = (0..n * h).map(|_| (next(), next())).unzip();
        let (g, b): (Vec<f32>, Vec<f32>) = (0..h).map(|_| (next(), next())).unzip();
        let run = |w: Width| {
            let mut s = scores.clone();
            softmax_rows_at(w, &mut s, n);
            let mut v = x.clone();
            gelu_all_at(w, &mut v);
            let (mut with, mut alone) = (x.clone(), x.clone());
            add_layer_norm_at(w, &mut with, &y, h, &g, &b, 1e-12);
            add_layer_norm_at(w, &mut alone, &[], h, &g, &b, 1e-12);
            [s, v, with, alone].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let widths = Width::available();
        assert_eq!(widths.last(), Some(&Width::Portable));
        let reference = run(Width::Portable);
        for w in widths {
            assert!(run(w) == reference, "{w:?} differs from the portable loops");
        }
        // And the loops compute what they say: rows of the softmax sum to 1,
        // and with g = 1, b = 0 every normalised row has mean 0.
        let mut s = scores.clone();
        softmax_rows(&mut s, n);
        assert!(s.chunks(n).all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
        let mut v = x.clone();
        add_layer_norm(&mut v, &[], h, &vec![1.0; h], &vec![0.0; h], 1e-12);
        assert!(v.chunks(h).all(|r| r.iter().sum::<f32>().abs() < 1e-3));
    }

    #[test]
    fn erf_and_exp_are_accurate() {
        let mut worst_erf = 0.0f32;
        let mut worst_exp = 0.0f32;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            worst_erf = worst_erf.max((erf(x) - libm::erff(x)).abs());
            let xe = x * 10.0;
            if xe <= 0.0 {
                let want = (xe as f64).exp() as f32;
                worst_exp = worst_exp.max((fast_exp(xe) - want).abs() / want.max(f32::MIN_POSITIVE));
            }
        }
        assert!(worst_erf < 1e-6, "erf off by {worst_erf}");
        assert!(worst_exp < 1e-6, "exp off by {worst_exp} (relative)");
    }
}
