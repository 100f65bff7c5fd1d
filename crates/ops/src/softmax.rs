//! Softmax over the last axis as one op whose backward reads only its output
//! (`dx = y (g - sum(g y))` per row), the attention weights of every vision transformer.
//!
//! candle-nn's `softmax_last_dim` has no backward, and from tensor ops a softmax keeps four
//! intermediate tensors of the attention matrix's size.

use crate::cpu_kernels::{widest_simd, Float, SameShape, SameShapeKernel};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Softmax over the last axis of `x`: one op on the CPU (f32, f64), tensor ops elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let inner = x.dim(candle_core::D::Minus1)?;
        x.contiguous()?.apply_op1(SameShape(Softmax { inner }))
    } else {
        by_tensor_ops(x)
    }
}

/// The gradient of softmax's input from its output `y` and the output's gradient `grad` (both
/// contiguous, on the CPU), outside any graph.
pub(crate) fn softmax_last_dim_backward(grad: &Tensor, y: &Tensor) -> Result<Tensor> {
    let op = SameShape(Softmax {
        inner: y.dim(candle_core::D::Minus1)?,
    });
    // The op's backward reads its output only: `y` stands for the input too.
    match candle_core::CustomOp1::bwd(&op, y, y, grad)? {
        Some(g) => Ok(g),
        None => candle_core::bail!("softmax has an input gradient"),
    }
}

/// The same value from candle's tensor ops, on any device.
pub fn by_tensor_ops(x: &Tensor) -> Result<Tensor> {
    let last = candle_core::D::Minus1;
    // Subtracting the (constant) maximum changes no gradient and keeps exp finite.
    let exp = x.broadcast_sub(&x.max_keepdim(last)?.detach())?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(last)?)
}

/// The softmax of each row of `inner` values of `x`, outside any graph.
pub(crate) fn softmax_rows<T: Float>(x: &[T], inner: usize) -> Vec<T> {
    Softmax { inner }.forward(x)
}

/// The gradient of each row's softmax input from its output `y` and the output's gradient `g`,
/// outside any graph.
pub(crate) fn softmax_rows_backward<T: Float>(g: &[T], y: &[T], inner: usize) -> Vec<T> {
    Softmax { inner }.backward(g, y)
}

struct Softmax {
    inner: usize,
}

impl SameShapeKernel for Softmax {
    const NAME: &'static str = "vulnmap-softmax";
    const BACKWARD_READS_OUTPUT: bool = true;

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(self.inner.max(1))
            .zip(x.par_chunks(self.inner.max(1)))
            .for_each(|(o, row)| {
                widest_simd(
                    #[inline(always)]
                    || {
                        // Three passes without a loop-carried sum in the exponentials' pass,
                        // so that it vectorises.
                        let max = max_of(row);
                        for (o, &v) in o.iter_mut().zip(row) {
                            *o = (v - max).exp();
                        }
                        let inv = T::of(1.0 / dot_widened(o, None));
                        o.iter_mut().for_each(|o| *o = *o * inv);
                    },
                )
            });
        out
    }

    fn backward<T: Float>(&self, g: &[T], y: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); y.len()];
        out.par_chunks_mut(self.inner.max(1))
            .zip(
                g.par_chunks(self.inner.max(1))
                    .zip(y.par_chunks(self.inner.max(1))),
            )
            .for_each(|(o, (g, y))| {
                widest_simd(
                    #[inline(always)]
                    || {
                        let dot = T::of(dot_widened(g, Some(y)));
                        for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                            *o = y * (g - dot);
                        }
                    },
                )
            });
        out
    }
}

/// Lanes of the row reductions: independent accumulators, so the loops vectorise (a single
/// float accumulator is a chain the compiler may not reorder).
const LANES: usize = 8;

/// The largest value of `row` (NaNs skipped), negative infinity for an empty row.
#[inline(always)]
fn max_of<T: Float>(row: &[T]) -> T {
    let mut lanes = [T::of(f64::NEG_INFINITY); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            if v > *m {
                *m = v;
            }
        }
    }
    let mut max = T::of(f64::NEG_INFINITY);
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > max {
            max = v;
        }
    }
    max
}

/// `sum(a b)` (or `sum(a)` without `b`) in f64, in `LANES` interleaved partial sums.
#[inline(always)]
fn dot_widened<T: Float>(a: &[T], b: Option<&[T]>) -> f64 {
    let mut lanes = [0.0; LANES];
    let mut chunks = a.chunks_exact(LANES);
    match b {
        Some(b) => {
            let mut b_chunks = b.chunks_exact(LANES);
            for (chunk, b_chunk) in (&mut chunks).zip(&mut b_chunks) {
                for ((s, &a), &b) in lanes.iter_mut().zip(chunk).zip(b_chunk) {
                    *s += a.widen() * b.widen();
                }
            }
            let rest = chunks.remainder().iter().zip(b_chunks.remainder());
            lanes.iter().sum::<f64>() + rest.map(|(a, b)| a.widen() * b.widen()).sum::<f64>()
        }
        None => {
            for chunk in &mut chunks {
                for (s, &a) in lanes.iter_mut().zip(chunk) {
                    *s += a.widen();
                }
            }
            lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|a| a.widen()).sum::<f64>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    #[test]
    fn equals_tensor_ops_with_the_same_gradient_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(14, "softmax test");
        let x = vulnmap_data::random::randn(&mut rng, (2, 3, 7, 11), &dev)?
            .affine(4.0, 0.0)?
            .to_dtype(DType::F64)?;
        let x = Var::from_tensor(&x)?;
        let probe = vulnmap_data::random::randn(&mut rng, x.shape(), &dev)?.to_dtype(DType::F64)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let theirs = by_tensor_ops(x.as_tensor())?;
        assert!(max_diff(&ours, &theirs) < 1e-14, "value");
        let g1 = (&ours * &probe)?.sum_all()?.backward()?;
        let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
        let (Some(g1), Some(g2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
            panic!("no input gradient");
        };
        assert!(max_diff(g1, g2) < 1e-12, "gradient");
        let x = vulnmap_data::random::randn(&mut rng, (4, 6), &dev)?.to_dtype(DType::F64)?;
        vulnmap_testkit::gradcheck::finite_difference_check(&x, softmax_last_dim, 1e-6, 1e-8)?;
        Ok(())
    }
}
