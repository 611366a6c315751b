//! Integer linear layers for the encoder: 8-bit weights and activations,
//! 32-bit accumulation, on the CPU's integer dot-product units.
//!
//! - Weights are quantised once at load, **per output channel** (symmetric,
//!   ±127, one f32 scale per column): per-tensor scales cost MiniLM's
//!   embeddings 0.92 cosine in ONNX Runtime, per-channel keeps 0.99.
//! - Activations are quantised per row (one token's vector), **asymmetric**
//!   (u8 with a zero point): GELU outputs are nearly all positive, and an
//!   asymmetric range spends no code on values that never occur.
//! - `y = sx·sw·(Σ qx·qw − z·Σ qw) + b`: the column sums of the quantised
//!   weights are kept, so the zero point costs one multiply per output.
//!
//! `vpdpbusd` (AVX-512 VNNI, or its 256-bit AVX-VNNI form) multiplies four
//! u8×i8 pairs and adds them to an i32 lane in one instruction, four times the
//! multiply-accumulates of an f32 FMA. The sum is exact (no saturation: at most
//! k·255·127 < 2³¹ for k < 66,000), so every kernel here, the portable one
//! included, gives bit-identical results: a head trained on one machine sees
//! the same embeddings on another.

use std::sync::OnceLock;

/// Output columns per packed panel: four 16-lane vectors.
const PANEL: usize = 64;
/// Bytes of one 4-deep group of a panel: 64 columns × 4 values of k.
const GROUP: usize = PANEL * 4;
/// Rows per tile: the largest kernel's (6 × 4 accumulators of 16 lanes).
const MAX_ROWS: usize = 6;

/// The instruction set the integer kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 VNNI: 512-bit `vpdpbusd`.
    Avx512Vnni,
    /// AVX-VNNI: 256-bit `vpdpbusd` (Alder Lake and later cores without AVX-512).
    AvxVnni,
    /// Plain Rust the compiler vectorises with AVX2 (exact, but no faster than f32).
    Avx2,
    Portable,
}

impl Isa {
    /// Detected once per process.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                {
                    return Isa::Avx512Vnni;
                }
                if std::arch::is_x86_feature_detected!("avxvnni") && std::arch::is_x86_feature_detected!("avx2") {
                    return Isa::AvxVnni;
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run the kernel (every level below the detected one can).
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => Isa::detect() == Isa::Avx512Vnni,
                Isa::AvxVnni => has!("avxvnni") && has!("avx2"),
                Isa::Avx2 => has!("avx2"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Whether the CPU has an integer dot-product instruction, which is what
    /// makes 8-bit inference faster than f32 (not merely smaller).
    pub fn has_dot_product(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::AvxVnni)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// `y[m×n] = x[m×k] · Wᵀ + b` with W quantised to 8 bits per output channel.
pub struct QLinear {
    k: usize,
    n: usize,
    /// k rounded up to a multiple of 4 (the depth of one `vpdpbusd`).
    kp: usize,
    /// `[panel][k/4][64 columns][4]`: for each 4-deep step of k, the 64
    /// columns' four weights lie side by side, as one 512-bit register holds them.
    packed: Vec<i8>,
    /// Per column (padded to whole panels; 0 in the padding).
    scale: Vec<f32>,
    colsum: Vec<i32>,
    bias: Vec<f32>,
}

/// A thread's quantised activations, reused from one call to the next.
#[derive(Default)]
pub struct QScratch {
    a: Vec<u8>,
    zero: Vec<i32>,
    scale: Vec<f32>,
}

impl QLinear {
    /// Quantises a PyTorch `Linear`: `w` is `[n (out) × k (in)]`, row-major.
    pub fn new(w: &[f32], n: usize, k: usize, bias: &[f32]) -> QLinear {
        assert!(w.len() == n * k && bias.len() == n);
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(PANEL);
        let np = panels * PANEL;
        let mut packed = vec![0i8; panels * kp * PANEL];
        let mut scale = vec![0.0f32; np];
        let mut colsum = vec![0i32; np];
        let mut padded_bias = vec![0.0f32; np];
        padded_bias[..n].copy_from_slice(bias);
        for c in 0..n {
            let row = &w[c * k..(c + 1) * k];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            scale[c] = s;
            let (p, col) = (c / PANEL, c % PANEL);
            for (kk, &v) in row.iter().enumerate() {
                let q = (v / s).round().clamp(-127.0, 127.0) as i8;
                colsum[c] += q as i32;
                packed[p * kp * PANEL + (kk / 4) * GROUP + col * 4 + kk % 4] = q;
            }
        }
        QLinear { k, n, kp, packed, scale, colsum, bias: padded_bias }
    }

    /// Bytes of weights held (for memory figures).
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scale.len() + self.colsum.len() + self.bias.len())
    }

    /// `y[..m·n] = x[..m·k] · Wᵀ + b` with the best kernel of this CPU.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], s: &mut QScratch) {
        self.forward_with(x, m, y, s, Isa::detect())
    }

    fn forward_with(&self, x: &[f32], m: usize, y: &mut [f32], s: &mut QScratch, isa: Isa) {
        let (k, kp, n) = (self.k, self.kp, self.n);
        assert!(x.len() >= m * k && y.len() >= m * n && isa.supported());
        quantize_rows(&x[..m * k], m, k, kp, s);
        let groups = kp / 4;
        let mut acc = [[0i32; PANEL]; MAX_ROWS];
        for (p, panel) in self.packed.chunks_exact(kp * PANEL).enumerate() {
            let col0 = p * PANEL;
            let cols = PANEL.min(n - col0);
            let mut r0 = 0;
            while r0 < m {
                let rows = tile_rows(isa).min(m - r0);
                let a = &s.a[r0 * kp..(r0 + rows) * kp];
                tile(isa, a, kp, rows, panel, groups, &mut acc);
                for (r, acc_row) in acc[..rows].iter().enumerate() {
                    let (z, sx) = (s.zero[r0 + r], s.scale[r0 + r]);
                    let out = &mut y[(r0 + r) * n + col0..][..cols];
                    let (sw, cs, b) = (
                        &self.scale[col0..col0 + cols],
                        &self.colsum[col0..col0 + cols],
                        &self.bias[col0..col0 + cols],
                    );
                    for c in 0..cols {
                        out[c] = (acc_row[c] - z * cs[c]) as f32 * (sx * sw[c]) + b[c];
                    }
                }
                r0 += rows;
            }
        }
    }
}

/// Rows of one tile: as many as the kernel keeps accumulators for in registers.
fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512Vnni => 6,
        Isa::AvxVnni => 4,
        Isa::Avx2 | Isa::Portable => MAX_ROWS,
    }
}

/// Each row to u8 with its own scale and zero point; k padded with zeros
/// (their weights are zero too, and the column sums leave them out).
fn quantize_rows(x: &[f32], m: usize, k: usize, kp: usize, s: &mut QScratch) {
    s.a.clear();
    s.a.resize(m * kp, 0);
    s.zero.clear();
    s.scale.clear();
    for (r, row) in x.chunks_exact(k).enumerate() {
        // The range always holds 0, so the zero point is a whole code in 0..=255.
        let (lo, hi) = row.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let inv = 1.0 / scale;
        let zero = (-lo * inv).round().clamp(0.0, 255.0);
        for (q, &v) in s.a[r * kp..r * kp + k].iter_mut().zip(row) {
            *q = (v * inv + zero).round().clamp(0.0, 255.0) as u8;
        }
        s.zero.push(zero as i32);
        s.scale.push(scale);
    }
}

/// `acc[r][c] = Σ_k a[r][k] · panel[k][c]` for `rows` rows and one panel.
fn tile(isa: Isa, a: &[u8], kp: usize, rows: usize, panel: &[i8], groups: usize, acc: &mut [[i32; PANEL]; MAX_ROWS]) {
    debug_assert!(a.len() >= rows * kp && panel.len() >= groups * GROUP && rows <= tile_rows(isa));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found these features; the pointers cover
        // rows·kp bytes of `a` and groups·256 bytes of `panel` (asserted above
        // and by construction in `forward`).
        Isa::Avx512Vnni => unsafe { x86::tile_avx512(a.as_ptr(), kp, rows, panel.as_ptr(), groups, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-VNNI.
        Isa::AvxVnni => unsafe { x86::tile_avx_vnni(a.as_ptr(), kp, rows, panel.as_ptr(), groups, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2.
        Isa::Avx2 => unsafe { x86::tile_avx2(a, kp, rows, panel, groups, acc) },
        _ => tile_portable(a, kp, rows, panel, groups, acc),
    }
}

/// The reference every kernel must match exactly.
#[inline(always)]
fn tile_portable(a: &[u8], kp: usize, rows: usize, panel: &[i8], groups: usize, acc: &mut [[i32; PANEL]; MAX_ROWS]) {
    for (r, out) in acc[..rows].iter_mut().enumerate() {
        out.fill(0);
        let arow = &a[r * kp..(r + 1) * kp];
        for (a4, g) in arow.chunks_exact(4).zip(panel.chunks_exact(GROUP)).take(groups) {
            for (o, w) in out.iter_mut().zip(g.chunks_exact(4)) {
                *o += a4[0] as i32 * w[0] as i32
                    + a4[1] as i32 * w[1] as i32
                    + a4[2] as i32 * w[2] as i32
                    + a4[3] as i32 * w[3] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{tile_portable, GROUP, MAX_ROWS, PANEL};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(
        a: &[u8],
        kp: usize,
        rows: usize,
        panel: &[i8],
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        tile_portable(a, kp, rows, panel, groups, acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_avx512(
        a: *const u8,
        kp: usize,
        rows: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        match rows {
            6 => tile512::<6>(a, kp, b, groups, acc),
            5 => tile512::<5>(a, kp, b, groups, acc),
            4 => tile512::<4>(a, kp, b, groups, acc),
            3 => tile512::<3>(a, kp, b, groups, acc),
            2 => tile512::<2>(a, kp, b, groups, acc),
            _ => tile512::<1>(a, kp, b, groups, acc),
        }
    }

    /// R rows × 64 columns in 4R zmm accumulators; per 4-deep step of k, four
    /// loads of the panel and one broadcast of each row's four u8s.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile512<const R: usize>(
        a: *const u8,
        kp: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        let mut c = [[_mm512_setzero_si512(); 4]; R];
        for g in 0..groups {
            let bp = b.add(g * GROUP);
            let b0 = _mm512_loadu_si512(bp as *const _);
            let b1 = _mm512_loadu_si512(bp.add(64) as *const _);
            let b2 = _mm512_loadu_si512(bp.add(128) as *const _);
            let b3 = _mm512_loadu_si512(bp.add(192) as *const _);
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((a.add(r * kp + g * 4) as *const i32).read_unaligned());
                cr[0] = _mm512_dpbusd_epi32(cr[0], av, b0);
                cr[1] = _mm512_dpbusd_epi32(cr[1], av, b1);
                cr[2] = _mm512_dpbusd_epi32(cr[2], av, b2);
                cr[3] = _mm512_dpbusd_epi32(cr[3], av, b3);
            }
        }
        for (cr, out) in c.iter().zip(acc.iter_mut()) {
            for (j, v) in cr.iter().enumerate() {
                _mm512_storeu_si512(out[j * 16..].as_mut_ptr() as *mut _, *v);
            }
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn tile_avx_vnni(
        a: *const u8,
        kp: usize,
        rows: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        match rows {
            4 => tile256::<4>(a, kp, b, groups, acc),
            3 => tile256::<3>(a, kp, b, groups, acc),
            2 => tile256::<2>(a, kp, b, groups, acc),
            _ => tile256::<1>(a, kp, b, groups, acc),
        }
    }

    /// With 16 ymm registers: R rows × 16 columns at a time (2R accumulators),
    /// four passes over the panel's quarters (the rows' bytes stay in L1).
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn tile256<const R: usize>(
        a: *const u8,
        kp: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        for q in 0..4 {
            let mut c = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..groups {
                let bp = b.add(g * GROUP + q * 64);
                let b0 = _mm256_loadu_si256(bp as *const __m256i);
                let b1 = _mm256_loadu_si256(bp.add(32) as *const __m256i);
                for (r, cr) in c.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32((a.add(r * kp + g * 4) as *const i32).read_unaligned());
                    cr[0] = _mm256_dpbusd_avx_epi32(cr[0], av, b0);
                    cr[1] = _mm256_dpbusd_avx_epi32(cr[1], av, b1);
                }
            }
            for (cr, out) in c.iter().zip(acc.iter_mut()) {
                _mm256_storeu_si256(out[q * 16..].as_mut_ptr() as *mut __m256i, cr[0]);
                _mm256_storeu_si256(out[q * 16 + 8..].as_mut_ptr() as *mut __m256i, cr[1]);
            }
        }
    }
}

/// A table of rows (word embeddings) in 8 bits with one scale per row: a
/// quarter of f32's memory (multilingual-e5-small's 250k × 384 table: 96 MB
/// instead of 384 MB), and only one row is read per token.
pub struct QTable {
    width: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl QTable {
    pub fn with_capacity(rows: usize, width: usize) -> QTable {
        QTable { width, q: Vec::with_capacity(rows * width), scale: Vec::with_capacity(rows) }
    }

    /// Appends rows (a whole number of `width`-wide rows).
    pub fn push_rows(&mut self, rows: &[f32]) {
        for row in rows.chunks_exact(self.width) {
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            self.q.extend(row.iter().map(|v| (v / s).round().clamp(-127.0, 127.0) as i8));
            self.scale.push(s);
        }
    }

    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    /// `out += row[i]`.
    pub fn add_row(&self, i: usize, out: &mut [f32]) {
        let s = self.scale[i];
        for (o, &q) in out.iter_mut().zip(&self.q[i * self.width..(i + 1) * self.width]) {
            *o += q as f32 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = b[c] + (0..k).map(|j| x[r * k + j] * w[c * k + j]).sum::<f32>();
            }
        }
        y
    }

    /// Every kernel this CPU has gives the portable kernel's integers, on
    /// shapes with row, column and depth remainders.
    #[test]
    fn kernels_agree_exactly_with_the_portable_one() {
        let isas = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2];
        for (m, k, n) in [(1, 4, 64), (7, 37, 70), (13, 384, 128), (6, 1536, 64), (5, 9, 1)] {
            let (x, w, b) = (noise(m * k, 1), noise(n * k, 2), noise(n, 3));
            let q = QLinear::new(&w, n, k, &b);
            let mut s = QScratch::default();
            let mut want = vec![0.0; m * n];
            q.forward_with(&x, m, &mut want, &mut s, Isa::Portable);
            for isa in isas.into_iter().filter(|i| i.supported()) {
                let mut got = vec![0.0; m * n];
                q.forward_with(&x, m, &mut got, &mut s, isa);
                assert_eq!(got, want, "{isa:?} on {m}×{k}·{k}×{n}");
            }
        }
    }

    /// 8-bit products stay close to f32 ones: relative error of the output
    /// well under 1 % on random data of BERT's widths.
    #[test]
    fn quantised_product_is_close_to_f32() {
        let (m, k, n) = (16, 384, 192);
        let (x, w, b) = (noise(m * k, 4), noise(n * k, 5), vec![0.0; n]);
        let q = QLinear::new(&w, n, k, &b);
        let mut y = vec![0.0; m * n];
        q.forward(&x, m, &mut y, &mut QScratch::default());
        let want = naive(&x, m, k, &w, n, &b);
        let err: f32 = y.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let norm: f32 = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(err / norm < 0.01, "relative error {}", err / norm);
    }

    #[test]
    fn table_rows_round_trip_within_half_a_step() {
        let rows = noise(3 * 8, 6);
        let mut t = QTable::with_capacity(3, 8);
        t.push_rows(&rows);
        for i in 0..3 {
            let mut out = vec![0.0; 8];
            t.add_row(i, &mut out);
            let max = rows[i * 8..(i + 1) * 8].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (o, v) in out.iter().zip(&rows[i * 8..]) {
                assert!((o - v).abs() <= max / 254.0 + 1e-6);
            }
        }
    }
}
