//! `x * scale[c] + shift[c]` over the channels of an `N x C x ...` tensor, optionally followed by
//! ReLU, as one op whose backward reads only its output: an inference BatchNorm that cannot be
//! folded into a convolution (DenseNet's BatchNorm -> ReLU -> Conv).
//!
//! From candle's broadcast ops the same is three ops, and each backward also computes the
//! constant's gradient (`grad * x`, a zeroed accumulator and an add, all of the activation's size)
//! that nobody reads.

use crate::cpu_kernels::{widest_simd, Float, SameShape, SameShapeKernel};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// `x * scale[c] + shift[c]` for channel `c` (axis 1), then ReLU if `relu`. One op on the CPU
/// (f32, f64), tensor ops elsewhere.
pub fn channel_affine(x: &Tensor, scale: &[f64], shift: &[f64], relu: bool) -> Result<Tensor> {
    let channels = x.dim(1)?;
    if scale.len() != channels || shift.len() != channels {
        candle_core::bail!(
            "channel affine: {} scales and {} shifts for {channels} channels",
            scale.len(),
            shift.len()
        );
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let plane = x.dims()[2..].iter().product();
        let kernel = ChannelAffine {
            scale: scale.to_vec(),
            shift: shift.to_vec(),
            relu,
            plane,
        };
        return x.contiguous()?.apply_op1(SameShape(kernel));
    }
    by_tensor_ops(x, scale, shift, relu)
}

/// The same value from candle's tensor ops, on any device.
pub fn by_tensor_ops(x: &Tensor, scale: &[f64], shift: &[f64], relu: bool) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = scale.len();
    let per_channel = |v: &[f64]| -> Result<Tensor> {
        Tensor::from_slice(v, v.len(), x.device())?
            .to_dtype(x.dtype())?
            .reshape(shape.clone())
    };
    let y = x
        .broadcast_mul(&per_channel(scale)?)?
        .broadcast_add(&per_channel(shift)?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

struct ChannelAffine {
    scale: Vec<f64>,
    shift: Vec<f64>,
    relu: bool,
    /// Elements per channel of one image (the product of the dimensions after the channels').
    plane: usize,
}

impl SameShapeKernel for ChannelAffine {
    const NAME: &'static str = "vulnmap-channel-affine";
    // With ReLU, the output says where the gradient passes; without, nothing is read.
    const BACKWARD_READS_OUTPUT: bool = true;

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        let channels = self.scale.len();
        out.par_chunks_mut(self.plane.max(1))
            .zip(x.par_chunks(self.plane.max(1)))
            .enumerate()
            .for_each(|(i, (o, x))| {
                let (s, b) = (
                    T::of(self.scale[i % channels]),
                    T::of(self.shift[i % channels]),
                );
                widest_simd(
                    #[inline(always)]
                    || {
                        if self.relu {
                            for (o, &v) in o.iter_mut().zip(x) {
                                let y = v * s + b;
                                *o = if y > T::default() { y } else { T::default() };
                            }
                        } else {
                            for (o, &v) in o.iter_mut().zip(x) {
                                *o = v * s + b;
                            }
                        }
                    },
                )
            });
        out
    }

    fn backward<T: Float>(&self, grad: &[T], y: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); grad.len()];
        let channels = self.scale.len();
        out.par_chunks_mut(self.plane.max(1))
            .zip(grad.par_chunks(self.plane.max(1)))
            .zip(y.par_chunks(self.plane.max(1)))
            .enumerate()
            .for_each(|(i, ((o, g), y))| {
                let s = T::of(self.scale[i % channels]);
                widest_simd(
                    #[inline(always)]
                    || {
                        if self.relu {
                            for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                                *o = if y > T::default() {
                                    g * s
                                } else {
                                    T::default()
                                };
                            }
                        } else {
                            for (o, &g) in o.iter_mut().zip(g) {
                                *o = g * s;
                            }
                        }
                    },
                )
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    /// Value and input gradient against the same from candle's tensor ops, with and without
    /// ReLU, on 4-D and 2-D inputs, f32 and f64.
    #[test]
    fn matches_tensor_ops_and_their_gradient() -> Result<()> {
        let device = Device::Cpu;
        let scale = [0.5, -2.0, 1.5];
        let shift = [0.1, 0.3, -0.2];
        for dtype in [DType::F32, DType::F64] {
            for dims in [vec![2, 3, 4, 5], vec![4, 3]] {
                let x =
                    Var::from_tensor(&Tensor::randn(0f32, 1., dims, &device)?.to_dtype(dtype)?)?;
                let probe = Tensor::randn(0f32, 1., x.shape(), &device)?.to_dtype(dtype)?;
                for relu in [false, true] {
                    let ours = channel_affine(x.as_tensor(), &scale, &shift, relu)?;
                    let theirs = by_tensor_ops(x.as_tensor(), &scale, &shift, relu)?;
                    assert!(max_diff(&ours, &theirs) < 1e-6);
                    let g_ours = (ours * &probe)?.sum_all()?.backward()?;
                    let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
                    let (a, b) = (
                        g_ours.get(x.as_tensor()).expect("a gradient"),
                        g_theirs.get(x.as_tensor()).expect("a gradient"),
                    );
                    assert!(max_diff(a, b) < 1e-6, "relu {relu}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_scale_per_channel_is_required() {
        let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).expect("zeros");
        let err = channel_affine(&x, &[1.0, 2.0], &[0.0, 0.0], false).expect_err("2 for 3");
        assert!(err.to_string().contains("3 channels"), "{err}");
    }
}
