//! What the hand-written CPU kernels share: the float types they handle, and typed, contiguous
//! views of candle's storages, so each kernel is written once, generic over the float type.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// A float type the CPU kernels handle (f32 and f64).
pub trait Float:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    /// The multiplicative identity.
    const ONE: Self;
    /// `x` rounded to this type.
    fn of(x: f64) -> Self;
    /// This value as an f64 (exact).
    fn widen(self) -> f64;
    /// The square root.
    fn sqrt(self) -> Self;
    /// `e^self`.
    fn exp(self) -> Self;
    /// The standard normal distribution's CDF Φ and density φ at `self` (GELU's value and
    /// derivative), Φ to within 3e-7 absolute.
    fn normal_cdf_and_density(self) -> (Self, Self);
    /// The storage's elements, if it holds this type.
    fn elements(storage: &CpuStorage) -> Option<&[Self]>;
    /// A storage holding `values`.
    fn storage(values: Vec<Self>) -> CpuStorage;
}

// The small methods are `#[inline(always)]`: other crates' loops call them per element (Adam's
// update in vulnmap-train), and as calls they kept those loops scalar.
impl Float for f32 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn normal_cdf_and_density(self) -> (Self, Self) {
        normal_cdf_and_density_f32(self)
    }
    fn elements(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Float for f64 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline]
    fn exp(self) -> Self {
        libm::exp(self)
    }
    #[inline]
    fn normal_cdf_and_density(self) -> (Self, Self) {
        use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
        let cdf = 0.5 * (1.0 + libm::erf(self * FRAC_1_SQRT_2));
        let density = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * libm::exp(-0.5 * self * self);
        (cdf, density)
    }
    fn elements(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
}

/// `e^x` in f32 without branches or calls, so that loops over it vectorise (libm's `expf` is
/// scalar): `2^n e^r` with `n = round(x / ln 2)` and Cephes' polynomial for `e^r`; relative error
/// below 2e-7 (test). Inputs are clamped to [-87.3, 88]: below, about 1e-38 instead of a denormal
/// or 0; above, e^88 instead of up to 3.4e38 or infinity.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from its exponent bits; n is in [-126, 127] after the clamp. Adding 2^23 puts the
    // integer n + 127 in the low mantissa bits, and the shift moves it into the exponent: unlike
    // `n as i32` (saturating, so one scalar conversion per lane), this vectorises.
    const INTEGER_BITS: f32 = 8_388_608.0;
    let biased = (n + (127.0 + INTEGER_BITS)).to_bits();
    let scale = f32::from_bits(biased << 23);
    e_r * scale
}

/// The error function in f32 without branches or calls, so that loops over it vectorise (libm's
/// `erff` is scalar): Abramowitz and Stegun's 7.1.26, `1 - t P(t) e^(-x^2)` with
/// `t = 1 / (1 + p |x|)`, the sign restored; absolute error below 6e-7 (test), relative error
/// large only where erf is near 0, which GELU's `1 + erf` does not see.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    (1.0 - erfc_from_exp(a, exp_f32(-a * a))).copysign(x)
}

/// `1 - erf(a)` for `a >= 0`, given `e^(-a^2)`: 7.1.26's `t P(t) e^(-a^2)`.
#[inline(always)]
fn erfc_from_exp(a: f32, exp_minus_square: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let t = 1.0 / (1.0 + P * a);
    t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4])))) * exp_minus_square
}

/// The standard normal CDF `Φ(x) = (1 + erf(x / √2)) / 2` and density
/// `φ(x) = e^(-x^2 / 2) / √(2π)`, as [`erf_f32`] but with one exponential for both: erf's
/// `e^(-a^2)` at `a = |x| / √2` is the density's `e^(-x^2 / 2)`.
#[inline(always)]
pub fn normal_cdf_and_density_f32(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let gaussian = exp_f32(-0.5 * x * x);
    let erf =
        (1.0 - erfc_from_exp(x.abs() * std::f32::consts::FRAC_1_SQRT_2, gaussian)).copysign(x);
    (0.5 * (1.0 + erf), FRAC_1_SQRT_2PI * gaussian)
}

/// The `T` elements of a contiguous tensor, or an error naming the op (`what`) that needed them
/// so: a tensor of another dtype than the kernel's `T`, or a strided one.
pub fn slice<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match T::elements(storage) {
        Some(data) => contiguous(data, layout, what),
        None => candle_core::bail!(
            "{what}: f32 or f64 tensors of one dtype, got {:?}",
            storage.dtype()
        ),
    }
}

/// A constant parameter's values in f64, as the kernels hold biases, scales and shifts, or an
/// error naming the op (`what`) when it does not hold `len` of them.
pub(crate) fn constant_values(t: &Tensor, len: usize, what: &str) -> Result<Vec<f64>> {
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if values.len() != len {
        candle_core::bail!(
            "{what}: a parameter of {} values, expected {len}",
            values.len()
        );
    }
    Ok(values)
}

/// The elements of a contiguous tensor's storage, or an error naming the op (`what`) that
/// needed them contiguous.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} needs contiguous tensors"),
    }
}

/// A CPU kernel of the same shape in and out (element-wise, or over rows of the last axis) whose
/// backward reads the gradient and one saved tensor: its input or its output. [`SameShape`]
/// makes it a candle op; nothing else is kept for the backward pass.
pub(crate) trait SameShapeKernel: Send + Sync {
    /// The op's name in candle's graph and in errors.
    const NAME: &'static str;
    /// Whether the backward reads the output (softmax) rather than the input.
    const BACKWARD_READS_OUTPUT: bool;
    /// The output for `x`.
    fn forward<T: Float>(&self, x: &[T]) -> Vec<T>;
    /// The input's gradient from the output's and the saved tensor.
    fn backward<T: Float>(&self, grad: &[T], saved: &[T]) -> Vec<T>;
}

/// `kernel` as a candle op on a contiguous CPU tensor.
pub(crate) struct SameShape<K>(pub K);

impl<K: SameShapeKernel> candle_core::CustomOp1 for SameShape<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let out = match x.dtype() {
            candle_core::DType::F32 => f32::storage(self.0.forward(slice::<f32>(x, l, K::NAME)?)),
            candle_core::DType::F64 => f64::storage(self.0.forward(slice::<f64>(x, l, K::NAME)?)),
            other => candle_core::bail!("{}: f32 or f64, not {other:?}", K::NAME),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        output: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        let saved = if K::BACKWARD_READS_OUTPUT { output } else { x };
        Ok(Some(same_shape_backward(&self.0, grad, saved)?))
    }
}

/// `kernel`'s backward on tensors: the input's gradient from the output's (`grad`) and the saved
/// tensor, outside candle's graph.
pub(crate) fn same_shape_backward<K: SameShapeKernel>(
    kernel: &K,
    grad: &candle_core::Tensor,
    saved: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    grad.contiguous()?
        .apply_op2_no_bwd(&saved.detach(), &SameShapeBackward(kernel))
}

/// `(grad, saved) -> the input's gradient`.
struct SameShapeBackward<'a, K>(&'a K);

impl<K: SameShapeKernel> candle_core::CustomOp2 for SameShapeBackward<'_, K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let what = K::NAME;
        if gl.shape() != sl.shape() {
            candle_core::bail!(
                "{what} backward: gradient {:?} for {:?}",
                gl.dims(),
                sl.dims()
            );
        }
        let out = match g.dtype() {
            candle_core::DType::F32 => {
                f32::storage(self.0.backward(slice(g, gl, what)?, slice(s, sl, what)?))
            }
            candle_core::DType::F64 => {
                f64::storage(self.0.backward(slice(g, gl, what)?, slice(s, sl, what)?))
            }
            other => candle_core::bail!("{what} backward: f32 or f64, not {other:?}"),
        };
        Ok((out, gl.shape().clone()))
    }
}

/// `f()` compiled for AVX-512 or AVX2 + FMA when the CPU has them. The crate is compiled for the
/// x86-64 baseline (SSE2) so that one binary runs everywhere; gemm dispatches by itself, and the
/// hand-written loops get the same through this. `f` must be a closure marked
/// `#[inline(always)]`: only inlined into the wider function is it compiled for its features, and
/// LLVM left large loop nests out of line (compiled for SSE2) without the mark.
#[inline(always)]
pub(crate) fn widest_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (and so AVX2 and FMA), checked just above.
            return unsafe { x86::avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { x86::avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fast_exp_is_within_2e_7_of_exp() {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let exact = (x as f64).exp();
            let relative = ((super::exp_f32(x) as f64 - exact) / exact).abs();
            worst = worst.max(relative);
        }
        assert!(worst < 2e-7, "relative error {worst}");
    }

    #[test]
    fn the_fast_erf_is_within_6e_7_of_erf() {
        let mut worst = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-4;
            let error = (super::erf_f32(x) as f64 - libm::erf(x as f64)).abs();
            worst = worst.max(error);
        }
        assert!(worst < 6e-7, "absolute error {worst}");
        assert_eq!(super::erf_f32(-20.0), -1.0);
    }

    #[test]
    fn the_normal_cdf_and_density_are_within_3e_7_of_libms() {
        let (mut worst_cdf, mut worst_density) = (0f64, 0f64);
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4;
            let (cdf, density) = super::normal_cdf_and_density_f32(x);
            let x = x as f64;
            let exact_cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let exact_density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            worst_cdf = worst_cdf.max((cdf as f64 - exact_cdf).abs());
            worst_density = worst_density.max((density as f64 - exact_density).abs());
        }
        assert!(worst_cdf < 3e-7, "cdf absolute error {worst_cdf}");
        assert!(
            worst_density < 1e-7,
            "density absolute error {worst_density}"
        );
    }
}
