//! f32 linear layers with the weights packed once at load.
//!
//! `gemm` packs its right-hand matrix into cache-sized panels on every call;
//! for the encoder that matrix is a weight that never changes, and the copy
//! was 13.6 % of the f32 forward pass (perf, MiniLM, 128 tokens, AVX2 Zen 3).
//! Here the weights are laid out once as `[panel of 16 columns][k][16]` and an
//! AVX2+FMA kernel reads the activations in place: 6 rows × 16 columns in 12
//! ymm accumulators, per step of k two panel loads, six broadcasts, twelve FMAs.
//!
//! Used where the CPU has AVX2 and FMA but not AVX-512: there `gemm`'s
//! 16-lane kernels are twice as wide (on cores with two 512-bit FMA ports)
//! and are kept; elsewhere `gemm` on the transposed matrix, as before.

/// Columns per packed panel: two 8-lane vectors.
const NR: usize = 16;
/// Rows per tile (12 accumulators + 2 panel vectors + 1 broadcast = 15 ymm).
const MR: usize = 6;

/// `y[m×n] = x[m×k] · Wᵀ + b`, f32.
pub struct F32Linear {
    k: usize,
    n: usize,
    form: Form,
}

enum Form {
    /// `[panel][k][16]`, the last panel padded with zero columns.
    Packed { w: Vec<f32>, b: Vec<f32> },
    /// `[k × n]` (transposed once) for `gemm`.
    Gemm { w: Vec<f32>, b: Vec<f32> },
}

/// Whether the packed kernel runs here (and is the faster choice).
fn packed_kernel_fits() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && !has!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl F32Linear {
    /// From PyTorch's `[n (out) × k (in)]` layout.
    pub fn new(w: &[f32], n: usize, k: usize, b: Vec<f32>) -> F32Linear {
        Self::new_with(w, n, k, b, packed_kernel_fits())
    }

    fn new_with(w: &[f32], n: usize, k: usize, b: Vec<f32>, packed: bool) -> F32Linear {
        assert!(w.len() == n * k && b.len() == n);
        let form = if packed {
            let panels = n.div_ceil(NR);
            let mut p = vec![0.0f32; panels * k * NR];
            for (c, row) in w.chunks_exact(k).enumerate() {
                let base = (c / NR) * k * NR + c % NR;
                for (kk, &v) in row.iter().enumerate() {
                    p[base + kk * NR] = v;
                }
            }
            Form::Packed { w: p, b }
        } else {
            Form::Gemm { w: transpose(w, n, k), b }
        };
        F32Linear { k, n, form }
    }

    pub fn bytes(&self) -> usize {
        match &self.form {
            Form::Packed { w, b } | Form::Gemm { w, b } => 4 * (w.len() + b.len()),
        }
    }

    /// `y[..m·n] = x[..m·k] · Wᵀ + b`, single-threaded.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= m * k && y.len() >= m * n);
        match &self.form {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Packed` is only built where `packed_kernel_fits` found
            // AVX2 and FMA (or by the tests, which check the same first); the
            // assertion above bounds x and y, and the packing bounds w.
            Form::Packed { w, b } => unsafe { x86::forward(x, m, k, n, w, b, y) },
            #[cfg(not(target_arch = "x86_64"))]
            Form::Packed { .. } => unreachable!("the packed form is built on x86-64 only"),
            Form::Gemm { w, b } => gemm_linear(x, m, k, w, n, b, y),
        }
    }
}

/// `[rows × cols]` → `[cols × rows]`.
pub(super) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// `y[m×n] = x[m×k] · w[k×n] + b`, row-major, single-threaded `gemm`.
fn gemm_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: &[f32], y: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() == k * n && b.len() == n && y.len() >= m * n);
    for row in y[..m * n].chunks_exact_mut(n) {
        row.copy_from_slice(b);
    }
    // SAFETY: the assertion above bounds every element the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Panels outer (one panel, k·64 bytes, stays in L2 while every row tile
    /// passes over it), tiles of up to six rows inner.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], b: &[f32], y: &mut [f32]) {
        debug_assert!(w.len() == n.div_ceil(NR) * k * NR);
        let mut out = [[0.0f32; NR]; MR];
        for (p, panel) in w.chunks_exact(k * NR).enumerate() {
            let col0 = p * NR;
            let cols = NR.min(n - col0);
            let mut r0 = 0;
            while r0 < m {
                let rows = MR.min(m - r0);
                let a = x.as_ptr().add(r0 * k);
                match rows {
                    6 => tile::<6>(a, k, panel.as_ptr(), &mut out),
                    5 => tile::<5>(a, k, panel.as_ptr(), &mut out),
                    4 => tile::<4>(a, k, panel.as_ptr(), &mut out),
                    3 => tile::<3>(a, k, panel.as_ptr(), &mut out),
                    2 => tile::<2>(a, k, panel.as_ptr(), &mut out),
                    _ => tile::<1>(a, k, panel.as_ptr(), &mut out),
                }
                for (r, o) in out[..rows].iter().enumerate() {
                    let dst = &mut y[(r0 + r) * n + col0..][..cols];
                    for ((d, v), bias) in dst.iter_mut().zip(o).zip(&b[col0..col0 + cols]) {
                        *d = v + bias;
                    }
                }
                r0 += rows;
            }
        }
    }

    /// `out[r][..16] = Σ_k a[r·k + kk] · panel[kk][..16]` for R rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(a: *const f32, k: usize, panel: *const f32, out: &mut [[f32; NR]; MR]) {
        let mut c = [[_mm256_setzero_ps(); 2]; R];
        // Row pointers hoisted, k unrolled by four: the loop is FMAs and
        // loads, with one counter.
        let rows: [*const f32; R] = std::array::from_fn(|r| a.add(r * k));
        let step = |c: &mut [[__m256; 2]; R], kk: usize| {
            let b0 = _mm256_loadu_ps(panel.add(kk * NR));
            let b1 = _mm256_loadu_ps(panel.add(kk * NR + 8));
            for (row, cr) in rows.iter().zip(c.iter_mut()) {
                let av = _mm256_broadcast_ss(&*row.add(kk));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
        };
        let k4 = k / 4 * 4;
        let mut kk = 0;
        while kk < k4 {
            step(&mut c, kk);
            step(&mut c, kk + 1);
            step(&mut c, kk + 2);
            step(&mut c, kk + 3);
            kk += 4;
        }
        while kk < k {
            step(&mut c, kk);
            kk += 1;
        }
        for (cr, o) in c.iter().zip(out.iter_mut()) {
            _mm256_storeu_ps(o.as_mut_ptr(), cr[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), cr[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::int8::tests::naive;

    /// Both forms, on shapes with row and column remainders, match a naive
    /// product (to rounding: the sums run in another order).
    #[test]
    fn both_forms_agree_with_a_naive_product() {
        #[cfg(target_arch = "x86_64")]
        let packed_here = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let packed_here = false;
        for (m, k, n) in [(3, 5, 4), (1, 1, 1), (7, 37, 70), (13, 384, 48), (6, 64, 16)] {
            let x: Vec<f32> = (0..m * k).map(|v| ((v * 7919) % 101) as f32 * 0.01 - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|v| ((v * 104729) % 97) as f32 * 0.01 - 0.48).collect();
            let b: Vec<f32> = (0..n).map(|v| v as f32 * 0.1 - 1.0).collect();
            let want = naive(&x, m, k, &w, n, &b);
            for packed in [false, true].into_iter().filter(|&p| !p || packed_here) {
                let l = F32Linear::new_with(&w, n, k, b.clone(), packed);
                let mut y = vec![f32::NAN; m * n];
                l.forward(&x, m, &mut y);
                for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "packed={packed} {m}×{k}·{k}×{n} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
