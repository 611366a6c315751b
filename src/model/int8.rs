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
//! k·255·127 < 2³¹ for k < 66,000). Without VNNI, AVX2's `vpmaddubsw` +
//! `vpmaddwd` do the same in three instructions, exactly only with 7-bit
//! weights (±63), which layers quantised for AVX2 get (MiniLM on 100 real
//! texts: cosine to f32 mean 0.9975, min 0.9940, vs 0.9990 / 0.9975 with
//! 8 bits). For one quantisation every kernel, the portable one included,
//! gives bit-identical results; the quantisation itself depends on the CPU's
//! kernel family (8-bit weights with VNNI, 7-bit on AVX2).

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
    /// AVX2 `vpmaddubsw` + `vpmaddwd`: no dot-product instruction, three
    /// instructions per 32 multiply-accumulates, and 7-bit weights (see
    /// [`QLinear::new_for`]).
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

    /// Whether the CPU has an integer dot-product instruction (`vpdpbusd`).
    pub fn has_dot_product(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::AvxVnni)
    }

    /// Whether 8-bit inference is faster than f32 here, not merely smaller:
    /// with a dot-product instruction, and on AVX2 too (its kernel measured
    /// 1.65–1.7× our f32 encoder on Zen 3); the portable loop is slower.
    pub fn int8_is_faster(self) -> bool {
        !matches!(self, Isa::Portable)
    }

    /// The largest weight code the kernel can take exactly. `vpmaddubsw`
    /// adds two u8·i8 products into a saturating i16: 2·255·127 would
    /// overflow, 2·255·63 = 32,130 does not. So on AVX2 weights get 7 bits
    /// (per-channel scales keep that cheap) and activations keep all 8.
    fn weight_max(self) -> i32 {
        match self {
            Isa::Avx2 => 63,
            _ => 127,
        }
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
    /// Largest weight code used (127, or 63 for the AVX2 kernel).
    wmax: i32,
}

/// A thread's quantised activations, reused from one call to the next.
#[derive(Default)]
pub struct QScratch {
    a: Vec<u8>,
    zero: Vec<i32>,
    scale: Vec<f32>,
}

impl QLinear {
    /// Quantises a PyTorch `Linear` for this CPU's kernel: `w` is
    /// `[n (out) × k (in)]`, row-major.
    pub fn new(w: &[f32], n: usize, k: usize, bias: &[f32]) -> QLinear {
        Self::new_for(w, n, k, bias, Isa::detect())
    }

    /// Quantises for the given kernel's weight range (±127, or ±63 on AVX2).
    pub fn new_for(w: &[f32], n: usize, k: usize, bias: &[f32], isa: Isa) -> QLinear {
        assert!(w.len() == n * k && bias.len() == n);
        let wmax = isa.weight_max();
        let qmax = wmax as f32;
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
            let s = if max > 0.0 { max / qmax } else { 1.0 };
            scale[c] = s;
            let (p, col) = (c / PANEL, c % PANEL);
            for (kk, &v) in row.iter().enumerate() {
                let q = (v / s).round().clamp(-qmax, qmax) as i8;
                colsum[c] += q as i32;
                packed[p * kp * PANEL + (kk / 4) * GROUP + col * 4 + kk % 4] = q;
            }
        }
        QLinear { k, n, kp, packed, scale, colsum, bias: padded_bias, wmax }
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
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= m * k && y.len() >= m * n && isa.supported());
        let kernel = Kernel::pick(isa, self.wmax);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni512 {
            // SAFETY: the AVX-512 VNNI kernel implies AVX-512F and AVX2
            // (checked by `isa.supported()` above).
            return unsafe { self.run_avx512(kernel, x, m, y, s) };
        }
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable {
            // SAFETY: every kernel but the portable one implies AVX2 (checked
            // by `isa.supported()` above).
            return unsafe { self.run_avx2(kernel, x, m, y, s) };
        }
        self.run(kernel, x, m, y, s)
    }

    /// [`Self::run`] compiled for AVX2: the quantisation and the f32
    /// epilogue vectorise 8 wide (and `round` is an instruction, not a libm
    /// call); same operations in the same order, so the same results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, kernel: Kernel, x: &[f32], m: usize, y: &mut [f32], s: &mut QScratch) {
        self.run(kernel, x, m, y, s)
    }

    /// [`Self::run`] compiled for AVX-512: the f32 epilogue after each
    /// tile vectorises 16 wide; the same operations, so the same results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn run_avx512(&self, kernel: Kernel, x: &[f32], m: usize, y: &mut [f32], s: &mut QScratch) {
        self.run(kernel, x, m, y, s)
    }

    #[inline(always)]
    fn run(&self, kernel: Kernel, x: &[f32], m: usize, y: &mut [f32], s: &mut QScratch) {
        let (k, kp, n) = (self.k, self.kp, self.n);
        quantize_rows(&x[..m * k], m, k, kp, s, kernel != Kernel::Portable);
        let groups = kp / 4;
        let mut acc = [[0i32; PANEL]; MAX_ROWS];
        for (p, panel) in self.packed.chunks_exact(kp * PANEL).enumerate() {
            let col0 = p * PANEL;
            let cols = PANEL.min(n - col0);
            let mut r0 = 0;
            while r0 < m {
                let rows = kernel.rows().min(m - r0);
                let a = &s.a[r0 * kp..(r0 + rows) * kp];
                tile(kernel, a, kp, rows, panel, groups, &mut acc);
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

/// The loop that multiplies one tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Vnni512,
    Vnni256,
    /// `vpmaddubsw` + `vpmaddwd` (weights within ±63 only).
    Maddubs,
    /// The portable loop compiled for AVX2: full-range weights on an AVX2
    /// CPU (a layer quantised for a VNNI kernel), exact but slower.
    Avx2Loop,
    Portable,
}

impl Kernel {
    fn pick(isa: Isa, wmax: i32) -> Kernel {
        match isa {
            Isa::Avx512Vnni => Kernel::Vnni512,
            Isa::AvxVnni => Kernel::Vnni256,
            Isa::Avx2 if wmax <= Isa::Avx2.weight_max() => Kernel::Maddubs,
            Isa::Avx2 => Kernel::Avx2Loop,
            Isa::Portable => Kernel::Portable,
        }
    }

    /// Rows of one tile: as many as the kernel keeps accumulators for in registers.
    fn rows(self) -> usize {
        match self {
            Kernel::Vnni512 => 6,
            Kernel::Vnni256 | Kernel::Maddubs => 4,
            Kernel::Avx2Loop | Kernel::Portable => MAX_ROWS,
        }
    }
}

/// Each row to u8 with its own scale and zero point; k padded with zeros
/// (their weights are zero too, and the column sums leave them out).
#[inline(always)]
fn quantize_rows(x: &[f32], m: usize, k: usize, kp: usize, s: &mut QScratch, avx2: bool) {
    s.a.clear();
    s.a.resize(m * kp, 0);
    s.zero.clear();
    s.scale.clear();
    for (r, row) in x.chunks_exact(k).enumerate() {
        let out = &mut s.a[r * kp..r * kp + k];
        #[cfg(target_arch = "x86_64")]
        let (lo, hi) = if avx2 {
            // SAFETY: the caller checked that the CPU has AVX2.
            unsafe { x86::range_with_zero_avx2(row) }
        } else {
            range_with_zero(row)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (lo, hi) = range_with_zero(row);
        // The range always holds 0, so the zero point is a whole code in 0..=255.
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let inv = 1.0 / scale;
        let zero = (-lo * inv).round_ties_even().clamp(0.0, 255.0);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: as above.
            unsafe { x86::quantize_row_avx2(row, out, inv, zero) }
        } else {
            quantize_row(row, out, inv, zero)
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_row(row, out, inv, zero);
        s.zero.push(zero as i32);
        s.scale.push(scale);
    }
}

/// The smallest and largest value of a row, widened to include 0 (NaNs
/// ignored).
fn range_with_zero(row: &[f32]) -> (f32, f32) {
    row.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }))
}

/// `q = v·inv + zero` rounded half to even (what `cvtps2dq` does), saturated
/// to 0..=255.
#[inline(always)]
fn quantize_row(row: &[f32], out: &mut [u8], inv: f32, zero: f32) {
    for (q, &v) in out.iter_mut().zip(row) {
        *q = (v * inv + zero).round_ties_even().clamp(0.0, 255.0) as u8;
    }
}

/// `acc[r][c] = Σ_k a[r][k] · panel[k][c]` for `rows` rows and one panel.
fn tile(
    kernel: Kernel,
    a: &[u8],
    kp: usize,
    rows: usize,
    panel: &[i8],
    groups: usize,
    acc: &mut [[i32; PANEL]; MAX_ROWS],
) {
    debug_assert!(a.len() >= rows * kp && panel.len() >= groups * GROUP && rows <= kernel.rows());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found these features; the pointers cover
        // rows·kp bytes of `a` and groups·256 bytes of `panel` (asserted above
        // and by construction in `forward`).
        Kernel::Vnni512 => unsafe { x86::tile_avx512(a.as_ptr(), kp, rows, panel.as_ptr(), groups, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-VNNI.
        Kernel::Vnni256 => unsafe { x86::tile_avx_vnni(a.as_ptr(), kp, rows, panel.as_ptr(), groups, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2; pointers as above.
        Kernel::Maddubs => unsafe { x86::tile_maddubs(a.as_ptr(), kp, rows, panel.as_ptr(), groups, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2.
        Kernel::Avx2Loop => unsafe { x86::tile_avx2(a, kp, rows, panel, groups, acc) },
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
    use super::{quantize_row, range_with_zero, tile_portable, GROUP, MAX_ROWS, PANEL};
    use std::arch::x86_64::*;

    /// [`range_with_zero`] eight lanes at a time. `min(v, acc)` returns
    /// `acc` when `v` is NaN, as the portable comparison does.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn range_with_zero_avx2(row: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
        }
        let (mut l8, mut h8) = ([0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(l8.as_mut_ptr(), lo);
        _mm256_storeu_ps(h8.as_mut_ptr(), hi);
        let (l, h) = range_with_zero(rest);
        let (l2, _) = range_with_zero(&l8);
        let (_, h2) = range_with_zero(&h8);
        (l.min(l2), h.max(h2))
    }

    /// [`quantize_row`] 32 values at a time: `cvtps2dq` rounds half to even
    /// (the default MXCSR mode, which Rust never changes); the two signed
    /// saturating packs clamp to 0..=255 as the portable `clamp` does.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row_avx2(row: &[f32], out: &mut [u8], inv: f32, zero: f32) {
        let (vi, vz) = (_mm256_set1_ps(inv), _mm256_set1_ps(zero));
        // packs/packus work within 128-bit halves: dwords come out as
        // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let whole = row.len().min(out.len()) / 32 * 32;
        let p = row.as_ptr();
        for i in (0..whole).step_by(32) {
            let q =
                |j: usize| _mm256_cvtps_epi32(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(p.add(i + 8 * j)), vi), vz));
            let ab = _mm256_packs_epi32(q(0), q(1));
            let cd = _mm256_packs_epi32(q(2), q(3));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, bytes);
        }
        quantize_row(&row[whole..], &mut out[whole..], inv, zero)
    }

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

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_maddubs(
        a: *const u8,
        kp: usize,
        rows: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        match rows {
            4 => tile_mb::<4>(a, kp, b, groups, acc),
            3 => tile_mb::<3>(a, kp, b, groups, acc),
            2 => tile_mb::<2>(a, kp, b, groups, acc),
            _ => tile_mb::<1>(a, kp, b, groups, acc),
        }
    }

    /// `tile256` without `vpdpbusd`: `vpmaddubsw` sums each column's two
    /// u8·i8 products into an i16 (exact for weights within ±63),
    /// `vpmaddwd` by ones sums those pairs into the column's i32 lane, one add
    /// accumulates. Same packing as the VNNI kernels: a 32-bit lane holds one
    /// column's four k-values.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_mb<const R: usize>(
        a: *const u8,
        kp: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        let ones = _mm256_set1_epi16(1);
        // Row pointers hoisted and k unrolled by two groups: one counter,
        // no per-row address arithmetic in the loop.
        let rows: [*const i32; R] = std::array::from_fn(|r| a.add(r * kp) as *const i32);
        for q in 0..4 {
            let mut c = [[_mm256_setzero_si256(); 2]; R];
            let step = |c: &mut [[__m256i; 2]; R], g: usize| {
                let bp = b.add(g * GROUP + q * 64);
                let b0 = _mm256_loadu_si256(bp as *const __m256i);
                let b1 = _mm256_loadu_si256(bp.add(32) as *const __m256i);
                for (row, cr) in rows.iter().zip(c.iter_mut()) {
                    let av = _mm256_set1_epi32(row.add(g).read_unaligned());
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    cr[0] = _mm256_add_epi32(cr[0], p0);
                    cr[1] = _mm256_add_epi32(cr[1], p1);
                }
            };
            let mut g = 0;
            while g + 2 <= groups {
                step(&mut c, g);
                step(&mut c, g + 1);
                g += 2;
            }
            if g < groups {
                step(&mut c, g);
            }
            for (cr, out) in c.iter().zip(acc.iter_mut()) {
                _mm256_storeu_si256(out[q * 16..].as_mut_ptr() as *mut __m256i, cr[0]);
                _mm256_storeu_si256(out[q * 16 + 8..].as_mut_ptr() as *mut __m256i, cr[1]);
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
pub(crate) mod tests {
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

    /// The reference product `y = x·wᵀ + b` (`x` is m×k, `w` is n×k), also
    /// used by the f32 kernel's tests.
    pub(crate) fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: &[f32]) -> Vec<f32> {
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
            // Full-range weights (VNNI) and the AVX2 kernel's 7-bit ones.
            for built_for in [Isa::Avx512Vnni, Isa::Avx2] {
                let q = QLinear::new_for(&w, n, k, &b, built_for);
                let mut s = QScratch::default();
                let mut want = vec![0.0; m * n];
                q.forward_with(&x, m, &mut want, &mut s, Isa::Portable);
                for isa in isas.into_iter().filter(|i| i.supported()) {
                    let mut got = vec![0.0; m * n];
                    q.forward_with(&x, m, &mut got, &mut s, isa);
                    assert_eq!(got, want, "{isa:?} on {m}×{k}·{k}×{n}, weights for {built_for:?}");
                }
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
