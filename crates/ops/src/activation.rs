//! Element-wise activations as single ops with an analytic backward: GELU (erf form), SiLU,
//! hard sigmoid and hard swish.
//!
//! Built from candle's tensor ops, GELU keeps five intermediate tensors for the backward pass and
//! its gradient takes as many more passes, each allocating; here the forward is one parallel pass,
//! the backward another, and only the input is kept. Other devices get the same value from
//! tensor ops ([`Activation::by_tensor_ops`]).

use crate::cpu_kernels::{widest_simd, Float, SameShape, SameShapeKernel};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `x Φ(x) = x (1 + erf(x / √2)) / 2`, PyTorch's default GELU.
    Gelu,
    /// `x σ(x)` (swish).
    Silu,
    /// `clamp(alpha x + beta, 0, 1)`.
    HardSigmoid {
        /// Slope (ONNX's default 0.2; PyTorch's `hardsigmoid` 1/6).
        alpha: f64,
        /// Offset (0.5 in both).
        beta: f64,
    },
    /// `x clamp(x / 6 + 1/2, 0, 1)`.
    HardSwish,
}

impl Activation {
    /// The activation of `x`: one op with its own backward on the CPU (f32, f64), tensor ops
    /// elsewhere.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            x.contiguous()?.apply_op1(SameShape(self))
        } else {
            self.by_tensor_ops(x)
        }
    }

    /// The same value from candle's tensor ops, on any device.
    pub fn by_tensor_ops(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::Silu => x.mul(&candle_nn::ops::sigmoid(x)?),
            Activation::HardSigmoid { alpha, beta } => x.affine(alpha, beta)?.clamp(0f32, 1f32),
            Activation::HardSwish => x.mul(&x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?),
        }
    }

    #[inline(always)]
    fn value<T: Float>(self, x: T) -> T {
        let zero = T::default();
        let half = T::of(0.5);
        let hard = |x: T, alpha: T, beta: T| {
            let y = alpha * x + beta;
            if y < zero {
                zero
            } else if y > T::ONE {
                T::ONE
            } else {
                y
            }
        };
        match self {
            Activation::Gelu => x * x.normal_cdf_and_density().0,
            Activation::Silu => x / (T::ONE + (zero - x).exp()),
            Activation::HardSigmoid { alpha, beta } => hard(x, T::of(alpha), T::of(beta)),
            Activation::HardSwish => x * hard(x, T::of(1.0 / 6.0), half),
        }
    }

    /// The derivative at `x` (at the kinks of the hard ones: 0 outside the open interval, as
    /// PyTorch's backward).
    #[inline(always)]
    fn derivative<T: Float>(self, x: T) -> T {
        let zero = T::default();
        let half = T::of(0.5);
        match self {
            Activation::Gelu => {
                let (cdf, density) = x.normal_cdf_and_density();
                cdf + x * density
            }
            Activation::Silu => {
                let s = T::ONE / (T::ONE + (zero - x).exp());
                s * (T::ONE + x * (T::ONE - s))
            }
            Activation::HardSigmoid { alpha, beta } => {
                let y = T::of(alpha) * x + T::of(beta);
                if y > zero && y < T::ONE {
                    T::of(alpha)
                } else {
                    zero
                }
            }
            Activation::HardSwish => {
                // PyTorch: 0 below -3, 1 above 3, x / 3 + 1/2 between (inclusive of both ends).
                if x < T::of(-3.0) {
                    zero
                } else if x > T::of(3.0) {
                    T::ONE
                } else {
                    x / T::of(3.0) + half
                }
            }
        }
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// Appends `f(x)` for every element of `x` to `out`, each chunk compiled for the widest SIMD
/// level. The new elements are written once, not zeroed first: for a cheap `f` the zeroing is a
/// third of the pass.
fn map_onto<T: Float>(x: &[T], out: &mut Vec<T>, f: impl Fn(T) -> T + Sync) {
    let start = out.len();
    out.reserve(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            widest_simd(
                #[inline(always)]
                || {
                    for (o, &x) in o.iter_mut().zip(x) {
                        o.write(f(x));
                    }
                },
            )
        });
    // SAFETY: the loop above wrote the `x.len()` elements after the first `start`.
    unsafe { out.set_len(start + x.len()) };
}

/// `g *= f(x)` for every element, as [`map_onto`].
fn scale_in_place<T: Float>(g: &mut [T], x: &[T], f: impl Fn(T) -> T + Sync) {
    g.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| {
            widest_simd(
                #[inline(always)]
                || {
                    for (g, &x) in g.iter_mut().zip(x) {
                        *g = *g * f(x);
                    }
                },
            )
        });
}

impl Activation {
    /// Appends the activation of each element of `x` to `out` (a buffer reused across calls).
    pub(crate) fn forward_onto<T: Float>(self, x: &[T], out: &mut Vec<T>) {
        // One loop per activation, so that the loop body is that activation's arithmetic alone.
        match self {
            Activation::Gelu => map_onto(x, out, |v| Activation::Gelu.value(v)),
            Activation::Silu => map_onto(x, out, |v| Activation::Silu.value(v)),
            a @ Activation::HardSigmoid { .. } => map_onto(x, out, move |v| a.value(v)),
            Activation::HardSwish => map_onto(x, out, |v| Activation::HardSwish.value(v)),
        }
    }

    /// The input's gradient from the output's, `grad * f'(x)`, written over `grad`.
    pub(crate) fn backward_in_place<T: Float>(self, grad: &mut [T], x: &[T]) {
        // One loop per activation, so that the loop body is that activation's arithmetic alone.
        match self {
            Activation::Gelu => scale_in_place(grad, x, |v| Activation::Gelu.derivative(v)),
            Activation::Silu => scale_in_place(grad, x, |v| Activation::Silu.derivative(v)),
            a @ Activation::HardSigmoid { .. } => scale_in_place(grad, x, move |v| a.derivative(v)),
            Activation::HardSwish => {
                scale_in_place(grad, x, |v| Activation::HardSwish.derivative(v))
            }
        }
    }
}

impl SameShapeKernel for Activation {
    const NAME: &'static str = "vulnmap-activation";
    const BACKWARD_READS_OUTPUT: bool = false;

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let mut out = Vec::new();
        self.forward_onto(x, &mut out);
        out
    }

    fn backward<T: Float>(&self, grad: &[T], x: &[T]) -> Vec<T> {
        let mut out = grad.to_vec();
        self.backward_in_place(&mut out, x);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    const ALL: [Activation; 5] = [
        Activation::Gelu,
        Activation::Silu,
        Activation::HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
        Activation::HardSigmoid {
            alpha: 1.0 / 6.0,
            beta: 0.5,
        },
        Activation::HardSwish,
    ];

    #[test]
    fn each_activation_equals_its_tensor_ops_with_the_same_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(11, "activation test");
        // Spread over the hard activations' kinks (-3, 3, -2.5, 2.5) and beyond.
        let x = (vulnmap_data::random::randn(&mut rng, (3, 5, 17, 13), &dev)? * 4.0)?
            .to_dtype(DType::F64)?;
        let x = Var::from_tensor(&x)?;
        let probe = vulnmap_data::random::randn(&mut rng, x.shape(), &dev)?.to_dtype(DType::F64)?;
        for a in ALL {
            let ours = a.apply(x.as_tensor())?;
            let theirs = a.by_tensor_ops(x.as_tensor())?;
            assert!(max_diff(&ours, &theirs) < 1e-12, "{a:?} value");
            let g1 = (&ours * &probe)?.sum_all()?.backward()?;
            let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
            let (Some(g1), Some(g2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                panic!("{a:?}: no input gradient");
            };
            // candle's GELU backward rounds 1/sqrt(2 pi) to 0.398942 (ours is checked against
            // finite differences below).
            let tolerance = if a == Activation::Gelu { 1e-5 } else { 1e-10 };
            let d = max_diff(g1, g2);
            assert!(d < tolerance, "{a:?} gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn gelu_and_silu_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(12, "activation gradcheck");
        let x = (vulnmap_data::random::randn(&mut rng, (2, 3, 4, 5), &dev)? * 3.0)?
            .to_dtype(DType::F64)?;
        for a in [Activation::Gelu, Activation::Silu] {
            vulnmap_testkit::gradcheck::finite_difference_check(&x, |x| a.apply(x), 1e-6, 1e-7)?;
        }
        Ok(())
    }
}
