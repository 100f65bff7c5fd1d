//! ConvNeXt's block after its depthwise convolution, on `N x C x H x W`: LayerNorm over the
//! channels, a feed-forward block and a constant per-channel scale, as one op.
//!
//! Exported from PyTorch it is `Transpose -> LayerNorm -> Linear -> GELU -> Linear -> Transpose
//! -> Mul`: a transposed copy each way in both passes, and candle's graph keeps every
//! intermediate with a zeroed gradient for each. Here the matrix products read and write the
//! channels-first layout through their strides, the scale is folded into the second layer, and
//! the backward pass keeps only the pre-activation and each pixel's mean and 1 / deviation.

use crate::activation::Activation;
use crate::cpu_kernels::{constant_values, slice, Float};
use crate::feed_forward::{feed_forward, Linear};
use crate::linear::Matrix;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

/// LayerNorm over the channels with a constant scale and shift (`C` values each).
#[derive(Debug, Clone, Copy)]
pub struct ChannelNorm<'a> {
    /// The scale.
    pub weight: &'a Tensor,
    /// The shift.
    pub bias: Option<&'a Tensor>,
    /// Added to the variance (PyTorch's default 1e-6 in ConvNeXt).
    pub eps: f64,
}

/// `scale * FF(LayerNorm_C(x))` for `x` of shape `N x C x H x W`, where `FF` is
/// [`feed_forward`] applied at every pixel; the output is `N x M x H x W` for a second layer of
/// `M` outputs, `scale` is `M` values.
///
/// One op on the CPU (f32, f64) when every parameter is a constant; otherwise (trained
/// parameters, other devices) the transposes, [`crate::layer_norm::layer_norm`],
/// [`feed_forward`] and a broadcast multiply, which give the same value.
pub fn normalized_feed_forward(
    x: &Tensor,
    norm: ChannelNorm,
    first: Linear,
    activation: Activation,
    second: Linear,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let m = second.weight.dims().get(1).copied().unwrap_or(0);
    let constant = |t: Option<&Tensor>, len: usize| {
        t.is_none_or(|t| !t.track_op() && t.elem_count() == len && t.dtype() == x.dtype())
    };
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.elem_count() > 0
        && constant(Some(norm.weight), c)
        && constant(norm.bias, c)
        && constant(scale, m)
        && [first.weight, second.weight].iter().all(|w| {
            !w.track_op() && w.rank() == 2 && w.elem_count() > 0 && w.dtype() == x.dtype()
        })
        && first.weight.dim(0)? == c
        && first.weight.dim(1)? == second.weight.dim(0)?
        && constant(first.bias, first.weight.dim(1)?)
        && constant(second.bias, m);
    if !fast {
        let rows = x.permute((0, 2, 3, 1))?;
        let rows = crate::layer_norm::layer_norm(&rows, norm.weight, norm.bias, norm.eps)?;
        let y = feed_forward(&rows, first, activation, second)?.permute((0, 3, 1, 2))?;
        return match scale {
            Some(s) => y.broadcast_mul(&s.reshape((m, 1, 1))?),
            None => Ok(y),
        };
    }
    let hidden = first.weight.dim(1)?;
    let scale_values = scale.map(|s| constant_values(s, m, WHAT)).transpose()?;
    // The scale folded into the second layer: `(h W2 + b2) s = h (W2 s) + b2 s`.
    let second_weight = match scale {
        Some(s) => second.weight.broadcast_mul(&s.reshape((1, m))?)?,
        None => second.weight.contiguous()?,
    };
    let second_bias = second
        .bias
        .map(|b| -> Result<Vec<f64>> {
            let mut b = constant_values(b, m, WHAT)?;
            if let Some(s) = &scale_values {
                b.iter_mut().zip(s).for_each(|(b, s)| *b *= s);
            }
            Ok(b)
        })
        .transpose()?;
    let op = NormalizedFeedForward {
        norm: crate::layer_norm::ChannelNormKernel::of(norm.weight, norm.bias, norm.eps, c)?,
        first_weight: first.weight.contiguous()?,
        first_bias: first
            .bias
            .map(|b| constant_values(b, hidden, WHAT))
            .transpose()?,
        activation,
        second_weight,
        second_bias,
        saved: Mutex::new(None),
        keep: x.track_op(),
    };
    x.contiguous()?.apply_op1(op)
}

/// The op on `x`; its weights are constants it holds, and it keeps what its backward pass
/// needs from its forward pass (freed with the graph that holds the op).
struct NormalizedFeedForward {
    norm: crate::layer_norm::ChannelNormKernel,
    first_weight: Tensor,
    first_bias: Option<Vec<f64>>,
    activation: Activation,
    second_weight: Tensor,
    second_bias: Option<Vec<f64>>,
    saved: Mutex<Option<Saved>>,
    /// Whether a backward pass can follow (the input is tracked): else nothing is kept.
    keep: bool,
}

/// The forward pass's pre-activation (`N H W x hidden`) and each pixel's mean and
/// 1 / deviation over the channels (`N H W` each).
struct Saved {
    pre_activation: CpuStorage,
    mean: CpuStorage,
    inv_std: CpuStorage,
}

const WHAT: &str = "normalised feed-forward block";

/// The `C x P` image `i` of `N x C x P` values.
fn image<T>(values: &[T], i: usize, size: usize) -> &[T] {
    &values[i * size..(i + 1) * size]
}

/// `f` of the two weights' matrices (their CPU storages read-locked meanwhile).
fn with_weights<T: Float, R>(
    first: &Tensor,
    second: &Tensor,
    f: impl FnOnce(Matrix<T>, Matrix<T>) -> Result<R>,
) -> Result<R> {
    let (first, first_layout) = first.storage_and_layout();
    let (second, second_layout) = second.storage_and_layout();
    match (&*first, &*second) {
        (Storage::Cpu(a), Storage::Cpu(b)) => f(
            Matrix::of(a, first_layout, WHAT)?,
            Matrix::of(b, second_layout, WHAT)?,
        ),
        _ => candle_core::bail!("{WHAT}: its weights are on another device than the CPU"),
    }
}

impl NormalizedFeedForward {
    fn run<T: Float>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims;
        let p = h * w;
        with_weights(&self.first_weight, &self.second_weight, |w1, w2| {
            self.run_with(x, (n, c, p), &w1, &w2)
        })
        .map(|(out, m)| (out, Shape::from((n, m, h, w))))
    }

    fn run_with<T: Float>(
        &self,
        x: &[T],
        (n, c, p): (usize, usize, usize),
        w1: &Matrix<T>,
        w2: &Matrix<T>,
    ) -> Result<(CpuStorage, usize)> {
        let (hidden, m) = (w1.cols, w2.cols);
        let mut y = vec![T::default(); x.len()];
        let mut mean = vec![T::default(); n * p];
        let mut inv_std = vec![T::default(); n * p];
        y.par_chunks_mut(c * p)
            .zip(mean.par_chunks_mut(p).zip(inv_std.par_chunks_mut(p)))
            .enumerate()
            .for_each(|(i, (y, (mean, inv)))| {
                self.norm.normalise(image(x, i, c * p), p, y, mean, inv)
            });
        let bias_rows = |out: &mut [T], bias: &Option<Vec<f64>>, width: usize| {
            if let Some(b) = bias {
                let b: Vec<T> = b.iter().map(|&v| T::of(v)).collect();
                out.chunks_mut(width)
                    .for_each(|row| row.copy_from_slice(&b));
            }
        };
        // Pixels as rows: image i's `P x C` view of its channels-first values.
        let mut pre = vec![T::default(); n * p * hidden];
        bias_rows(&mut pre, &self.first_bias, hidden);
        for (i, pre) in pre.chunks_mut(p * hidden).enumerate() {
            Matrix::new(image(&y, i, c * p), (p, c), (1, p))?.product_into(
                w1,
                pre,
                (hidden, 1),
                self.first_bias.is_some(),
            )?;
        }
        drop(y);
        // Written channels first: output (pixel, channel) of image i at `channel * P + pixel`.
        let mut out = vec![T::default(); n * m * p];
        if let Some(b) = &self.second_bias {
            for (k, plane) in out.chunks_mut(p).enumerate() {
                plane.fill(T::of(b[k % m]));
            }
        }
        // One image's activations at a time, in one buffer: still in cache for the product.
        let mut activated = Vec::with_capacity(p * hidden);
        for (i, out) in out.chunks_mut(m * p).enumerate() {
            activated.clear();
            self.activation
                .forward_onto(image(&pre, i, p * hidden), &mut activated);
            Matrix::new(&activated, (p, hidden), (hidden, 1))?.product_into(
                w2,
                out,
                (1, p),
                self.second_bias.is_some(),
            )?;
        }
        // Kept for a backward pass, or freed now.
        let pre = self.keep.then_some(pre);
        if let Some(pre) = pre {
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))? =
                Some(Saved {
                    pre_activation: T::storage(pre),
                    mean: T::storage(mean),
                    inv_std: T::storage(inv_std),
                });
        }
        Ok((T::storage(out), m))
    }

    /// The input's gradient from the output's (`g`, `N x M x P`), for input `x`.
    fn backward<T: Float>(
        &self,
        g: &[T],
        x: &[T],
        dims: (usize, usize, usize, usize),
        saved: &Saved,
    ) -> Result<Vec<T>> {
        with_weights(&self.first_weight, &self.second_weight, |w1, w2| {
            self.backward_with(g, x, dims, saved, &w1, &w2)
        })
    }

    fn backward_with<T: Float>(
        &self,
        g: &[T],
        x: &[T],
        dims: (usize, usize, usize, usize),
        saved: &Saved,
        w1: &Matrix<T>,
        w2: &Matrix<T>,
    ) -> Result<Vec<T>> {
        let (n, c, h, w) = dims;
        let p = h * w;
        let (hidden, m) = (w1.cols, w2.cols);
        fn elements<T: Float>(s: &CpuStorage) -> Result<&[T]> {
            T::elements(s).ok_or_else(|| candle_core::Error::Msg(format!("{WHAT}: dtypes differ")))
        }
        let (pre, mean, inv_std) = (
            elements::<T>(&saved.pre_activation)?,
            elements::<T>(&saved.mean)?,
            elements::<T>(&saved.inv_std)?,
        );
        if g.len() != n * m * p || pre.len() != n * p * hidden || x.len() != n * c * p {
            candle_core::bail!(
                "{WHAT} backward: a gradient of {} values for {dims:?}",
                g.len()
            );
        }
        // The normalised values' gradient, channels first, then the input's in its place.
        let mut grad = vec![T::default(); n * c * p];
        let mut hidden_grad = vec![T::default(); p * hidden];
        for (i, grad) in grad.chunks_mut(c * p).enumerate() {
            Matrix::new(image(g, i, m * p), (p, m), (1, p))?.product_into(
                &w2.t(),
                &mut hidden_grad,
                (hidden, 1),
                false,
            )?;
            self.activation
                .backward_in_place(&mut hidden_grad, image(pre, i, p * hidden));
            Matrix::new(&hidden_grad, (p, hidden), (hidden, 1))?.product_into(
                &w1.t(),
                grad,
                (1, p),
                false,
            )?;
        }
        grad.par_chunks_mut(c * p)
            .enumerate()
            .for_each(|(i, grad)| {
                let (mean, inv) = (image(mean, i, p), image(inv_std, i, p));
                self.norm.backward(grad, image(x, i, c * p), p, mean, inv);
            });
        Ok(grad)
    }
}

impl CustomOp1 for NormalizedFeedForward {
    fn name(&self) -> &'static str {
        "vulnmap-normalized-feed-forward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        match x.dtype() {
            DType::F32 => self.run(slice::<f32>(x, l, WHAT)?, dims),
            DType::F64 => self.run(slice::<f64>(x, l, WHAT)?, dims),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        }
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = grad
            .contiguous()?
            .apply_op2_no_bwd(x, &InputGradient(self))?;
        Ok(Some(dx))
    }
}

/// `(grad, x) -> the input's gradient`, from what the forward pass kept.
struct InputGradient<'a>(&'a NormalizedFeedForward);

impl CustomOp2 for InputGradient<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-normalized-feed-forward-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let saved = self
            .0
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("{WHAT}: backward before forward");
        };
        let dims = xl.shape().dims4()?;
        let out = match g.dtype() {
            DType::F32 => f32::storage(self.0.backward(
                slice(g, gl, WHAT)?,
                slice(x, xl, WHAT)?,
                dims,
                saved,
            )?),
            DType::F64 => f64::storage(self.0.backward(
                slice(g, gl, WHAT)?,
                slice(x, xl, WHAT)?,
                dims,
                saved,
            )?),
            other => candle_core::bail!("{WHAT} backward: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = vulnmap_data::random::rng(seed, "normalized feed-forward test");
        vulnmap_data::random::randn(&mut rng, shape, &Device::Cpu)?.to_dtype(DType::F64)
    }

    /// Value and input gradient equal to the exported graph's ops (transposes, LayerNorm over
    /// the last axis, the feed-forward block, a broadcast scale; f64), with and without the
    /// optional parts, an odd image size and another output width; a second backward pass over
    /// the same graph gives the same gradient.
    #[test]
    fn equals_the_transposed_ops_in_value_and_input_gradient() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[2, 6, 5, 3], 1)? * 3.0)?)?;
        let (nw, nb) = (randn(&[6], 2)?, randn(&[6], 3)?);
        let (w1, b1) = (randn(&[6, 10], 4)?, randn(&[10], 5)?);
        for (m, with_options) in [(6, true), (4, false), (6, false)] {
            let (w2, b2, s) = (randn(&[10, m], 6)?, randn(&[m], 7)?, randn(&[m], 8)?);
            let norm = ChannelNorm {
                weight: &nw,
                bias: with_options.then_some(&nb),
                eps: 1e-6,
            };
            let first = Linear {
                weight: &w1,
                bias: with_options.then_some(&b1),
            };
            let second = Linear {
                weight: &w2,
                bias: Some(&b2),
            };
            let scale = with_options.then_some(&s);
            let ours = normalized_feed_forward(
                x.as_tensor(),
                norm,
                first,
                Activation::Gelu,
                second,
                scale,
            )?;
            let rows = x.as_tensor().permute((0, 2, 3, 1))?;
            let rows = crate::layer_norm::by_tensor_ops(&rows, norm.weight, norm.bias, 1e-6)?;
            let mut theirs =
                feed_forward(&rows, first, Activation::Gelu, second)?.permute((0, 3, 1, 2))?;
            if let Some(s) = scale {
                theirs = theirs.broadcast_mul(&s.reshape((m, 1, 1))?)?;
            }
            assert_eq!(ours.dims(), &[2, m, 5, 3]);
            assert!(max_diff(&ours, &theirs) < 1e-10, "value, {m} outputs");
            let probe = randn(&[2, m, 5, 3], 9)?;
            let loss = (&ours * &probe)?.sum_all()?;
            let (g_ours, g_again) = (loss.backward()?, loss.backward()?);
            let g_theirs = (&theirs * &probe)?.sum_all()?.backward()?;
            let get = |g: &candle_core::backprop::GradStore| {
                g.get(x.as_tensor()).cloned().expect("an input gradient")
            };
            let d = max_diff(&get(&g_ours), &get(&g_theirs));
            assert!(d < 1e-10, "gradient differs by {d}, {m} outputs");
            assert_eq!(max_diff(&get(&g_ours), &get(&g_again)), 0.0);
        }
        Ok(())
    }

    #[test]
    fn its_gradient_matches_finite_differences() -> Result<()> {
        let (nw, nb) = (randn(&[3], 10)?, randn(&[3], 11)?);
        let (w1, b1) = (randn(&[3, 5], 12)?, randn(&[5], 13)?);
        let (w2, b2, s) = (randn(&[5, 3], 14)?, randn(&[3], 15)?, randn(&[3], 16)?);
        let x = randn(&[2, 3, 2, 3], 17)?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| {
                normalized_feed_forward(
                    x,
                    ChannelNorm {
                        weight: &nw,
                        bias: Some(&nb),
                        eps: 1e-6,
                    },
                    Linear {
                        weight: &w1,
                        bias: Some(&b1),
                    },
                    Activation::Gelu,
                    Linear {
                        weight: &w2,
                        bias: Some(&b2),
                    },
                    Some(&s),
                )
            },
            1e-6,
            1e-7,
        )?;
        Ok(())
    }
}
