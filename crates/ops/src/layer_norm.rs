//! Layer normalisation with constant scale and shift over the last axis, or over the channels of
//! an `N x C x H x W` tensor (ConvNeXt's `LayerNorm2d`, exported as transposes around a
//! last-axis one), as one op whose backward keeps only the input (the statistics are recomputed).
//!
//! From candle's tensor ops (candle-nn's `layer_norm` op has no backward) it keeps seven
//! intermediate tensors and its gradient allocates as many again; ConvNeXt and ViT normalise
//! every block.

use crate::cpu_kernels::{constant_values, widest_simd, Float, SameShape, SameShapeKernel};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis of `x`, with `weight` and
/// `bias` (that axis' length) constants; the population variance, as PyTorch's.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    match LayerNorm::constant(x, weight, bias, eps)? {
        Some(op) => x.contiguous()?.apply_op1(SameShape(op)),
        None => by_tensor_ops(x, weight, bias, eps),
    }
}

/// The same value from candle's tensor ops, on any device and with trainable scale and shift.
pub fn by_tensor_ops(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let last = candle_core::D::Minus1;
    let centred = x.broadcast_sub(&x.mean_keepdim(last)?)?;
    let inv_std = (centred.sqr()?.mean_keepdim(last)? + eps)?
        .sqrt()?
        .recip()?;
    let y = centred.broadcast_mul(&inv_std)?.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The CPU kernel over rows of `inner` values.
pub(crate) struct LayerNorm {
    inner: usize,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    eps: f64,
}

impl LayerNorm {
    /// The kernel for `x`'s last axis when `x` is an f32 or f64 CPU tensor and `weight` and
    /// `bias` are constants (no gradient); `None` when candle's ops must run instead.
    pub(crate) fn constant(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Option<Self>> {
        let inner = x.dim(candle_core::D::Minus1)?;
        let tracked = weight.track_op() || bias.is_some_and(|b| b.track_op());
        let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if !cpu || tracked {
            return Ok(None);
        }
        let values = |t: &Tensor| constant_values(t, inner, "layer norm over the last axis");
        Ok(Some(LayerNorm {
            inner,
            weight: values(weight)?,
            bias: bias.map(values).transpose()?,
            eps,
        }))
    }

    /// A row's mean and 1 / standard deviation.
    fn stats<T: Float>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().map(|v| v.widen()).sum::<f64>() / n;
        let var = row.iter().map(|v| (v.widen() - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl SameShapeKernel for LayerNorm {
    const NAME: &'static str = "vulnmap-layer-norm";
    const BACKWARD_READS_OUTPUT: bool = false;

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(self.inner)
            .zip(x.par_chunks(self.inner))
            .for_each(|(o, row)| {
                let (mean, inv_std) = self.stats(row);
                for (k, (o, v)) in o.iter_mut().zip(row).enumerate() {
                    let shift = self.bias.as_ref().map_or(0.0, |b| b[k]);
                    *o = T::of((v.widen() - mean) * inv_std * self.weight[k] + shift);
                }
            });
        out
    }

    /// `dx = inv_std (g w - mean(g w) - x_hat mean(g w x_hat))` per row.
    fn backward<T: Float>(&self, g: &[T], x: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        let n = self.inner as f64;
        out.par_chunks_mut(self.inner)
            .zip(g.par_chunks(self.inner).zip(x.par_chunks(self.inner)))
            .for_each(|(o, (g, row))| {
                let (mean, inv_std) = self.stats(row);
                let (mut sum_g, mut sum_gx) = (0.0, 0.0);
                for (k, (g, v)) in g.iter().zip(row).enumerate() {
                    let gw = g.widen() * self.weight[k];
                    sum_g += gw;
                    sum_gx += gw * (v.widen() - mean) * inv_std;
                }
                let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                for (k, (o, (g, v))) in o.iter_mut().zip(g.iter().zip(row)).enumerate() {
                    let x_hat = (v.widen() - mean) * inv_std;
                    let gw = g.widen() * self.weight[k];
                    *o = T::of(inv_std * (gw - mean_g - x_hat * mean_gx));
                }
            });
        out
    }
}

/// `layer_norm` over the channels of `x` (`N x C x H x W`): each pixel's `C` values normalised,
/// `weight` and `bias` of `C` values; the same as transposing to channels-last, [`layer_norm`],
/// and back, without the two copies.
pub fn layer_norm_channels(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let tracked = weight.track_op() || bias.is_some_and(|b| b.track_op());
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !cpu || tracked || x.elem_count() == 0 {
        let rows = x.permute((0, 2, 3, 1))?;
        return layer_norm(&rows, weight, bias, eps)?.permute((0, 3, 1, 2));
    }
    let op = ChannelLayerNorm {
        norm: ChannelNormKernel::of(weight, bias, eps, c)?,
        pixels: h * w,
    };
    x.contiguous()?.apply_op1(SameShape(op))
}

/// LayerNorm over the channels of `C x P` images: the constant scale and shift, and `eps`.
pub(crate) struct ChannelNormKernel {
    weight: Vec<f64>,
    bias: Vec<f64>,
    eps: f64,
}

impl ChannelNormKernel {
    /// The parameters of a LayerNorm over `c` channels, or an error if they have other sizes.
    pub(crate) fn of(weight: &Tensor, bias: Option<&Tensor>, eps: f64, c: usize) -> Result<Self> {
        let values = |t: &Tensor| constant_values(t, c, "layer norm over the channels");
        Ok(Self {
            weight: values(weight)?,
            bias: match bias {
                Some(b) => values(b)?,
                None => vec![0.0; c],
            },
            eps,
        })
    }

    /// Each pixel's mean and 1 / deviation over the channels of image `a` (`C x P`): two passes,
    /// each over rows of `P` pixels, so that they vectorise.
    pub(crate) fn stats<T: Float>(&self, a: &[T], p: usize, mean: &mut [T], inv: &mut [T]) {
        let n = T::of(self.weight.len() as f64);
        let eps = T::of(self.eps);
        widest_simd(
            #[inline(always)]
            || {
                mean.fill(T::default());
                for row in a.chunks_exact(p) {
                    mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v);
                }
                mean.iter_mut().for_each(|m| *m = *m / n);
                inv.fill(T::default());
                for row in a.chunks_exact(p) {
                    for ((s, &v), &m) in inv.iter_mut().zip(row).zip(mean.iter()) {
                        *s += (v - m) * (v - m);
                    }
                }
                inv.iter_mut()
                    .for_each(|s| *s = T::ONE / (*s / n + eps).sqrt());
            },
        )
    }

    /// Image `a` (`C x P`) normalised into `y`, with each pixel's statistics.
    pub(crate) fn normalise<T: Float>(
        &self,
        a: &[T],
        p: usize,
        y: &mut [T],
        mean: &mut [T],
        inv: &mut [T],
    ) {
        self.stats(a, p, mean, inv);
        widest_simd(
            #[inline(always)]
            || {
                for (k, (out, row)) in y.chunks_exact_mut(p).zip(a.chunks_exact(p)).enumerate() {
                    let (w, b) = (T::of(self.weight[k]), T::of(self.bias[k]));
                    for (((o, &v), &m), &s) in
                        out.iter_mut().zip(row).zip(mean.iter()).zip(inv.iter())
                    {
                        *o = (v - m) * s * w + b;
                    }
                }
            },
        )
    }

    /// The input's gradient from the output's, written over `g`:
    /// `inv_std (g w - mean_C(g w) - x_hat mean_C(g w x_hat))` at every pixel.
    pub(crate) fn backward<T: Float>(&self, g: &mut [T], a: &[T], p: usize, mean: &[T], inv: &[T]) {
        let n = T::of(self.weight.len() as f64);
        widest_simd(
            #[inline(always)]
            || {
                let mut sum_g = vec![T::default(); p];
                let mut sum_gx = vec![T::default(); p];
                for (k, (g, row)) in g.chunks_exact_mut(p).zip(a.chunks_exact(p)).enumerate() {
                    let w = T::of(self.weight[k]);
                    for ((((g, &v), &m), &s), (sg, sgx)) in g
                        .iter_mut()
                        .zip(row)
                        .zip(mean)
                        .zip(inv)
                        .zip(sum_g.iter_mut().zip(sum_gx.iter_mut()))
                    {
                        *g = *g * w;
                        *sg += *g;
                        *sgx += *g * (v - m) * s;
                    }
                }
                for (g, row) in g.chunks_exact_mut(p).zip(a.chunks_exact(p)) {
                    for (((((g, &v), &m), &s), &sg), &sgx) in g
                        .iter_mut()
                        .zip(row)
                        .zip(mean)
                        .zip(inv)
                        .zip(&sum_g)
                        .zip(&sum_gx)
                    {
                        let x_hat = (v - m) * s;
                        *g = s * (*g - sg / n - x_hat * (sgx / n));
                    }
                }
            },
        )
    }
}

/// [`layer_norm_channels`]'s kernel: images of `C x pixels`, in parallel.
struct ChannelLayerNorm {
    norm: ChannelNormKernel,
    pixels: usize,
}

impl SameShapeKernel for ChannelLayerNorm {
    const NAME: &'static str = "vulnmap-layer-norm-channels";
    const BACKWARD_READS_OUTPUT: bool = false;

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let (c, p) = (self.norm.weight.len(), self.pixels);
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(c * p)
            .zip(x.par_chunks(c * p))
            .for_each(|(y, a)| {
                let (mut mean, mut inv) = (vec![T::default(); p], vec![T::default(); p]);
                self.norm.normalise(a, p, y, &mut mean, &mut inv);
            });
        out
    }

    fn backward<T: Float>(&self, g: &[T], x: &[T]) -> Vec<T> {
        let (c, p) = (self.norm.weight.len(), self.pixels);
        let mut out = g.to_vec();
        out.par_chunks_mut(c * p)
            .zip(x.par_chunks(c * p))
            .for_each(|(g, a)| {
                let (mut mean, mut inv) = (vec![T::default(); p], vec![T::default(); p]);
                self.norm.stats(a, p, &mut mean, &mut inv);
                self.norm.backward(g, a, p, &mean, &inv);
            });
        out
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
        let mut rng = vulnmap_data::random::rng(13, "layer norm test");
        let randn = |rng: &mut _, shape: &[usize]| -> Result<Tensor> {
            vulnmap_data::random::randn(rng, shape, &dev)?.to_dtype(DType::F64)
        };
        let x = Var::from_tensor(&randn(&mut rng, &[2, 5, 7, 12])?.affine(3.0, 1.5)?)?;
        let weight = randn(&mut rng, &[12])?;
        let bias = randn(&mut rng, &[12])?;
        let probe = randn(&mut rng, &[2, 5, 7, 12])?;
        for bias in [None, Some(&bias)] {
            let ours = layer_norm(x.as_tensor(), &weight, bias, 1e-5)?;
            let theirs = by_tensor_ops(x.as_tensor(), &weight, bias, 1e-5)?;
            assert!(max_diff(&ours, &theirs) < 1e-12, "value");
            let g1 = (&ours * &probe)?.sum_all()?.backward()?;
            let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
            let (Some(g1), Some(g2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                panic!("no input gradient");
            };
            assert!(max_diff(g1, g2) < 1e-10, "gradient");
        }
        // Over the channels: against the transposed last-axis layer norm.
        let x = Var::from_tensor(&randn(&mut rng, &[2, 12, 5, 3])?.affine(2.0, -1.0)?)?;
        let probe = randn(&mut rng, &[2, 12, 5, 3])?;
        for bias in [None, Some(&bias)] {
            let ours = layer_norm_channels(x.as_tensor(), &weight, bias, 1e-6)?;
            let rows = x.as_tensor().permute((0, 2, 3, 1))?;
            let theirs = by_tensor_ops(&rows, &weight, bias, 1e-6)?.permute((0, 3, 1, 2))?;
            assert!(max_diff(&ours, &theirs) < 1e-12, "value over the channels");
            let g1 = (&ours * &probe)?.sum_all()?.backward()?;
            let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
            let (Some(g1), Some(g2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                panic!("no input gradient over the channels");
            };
            assert!(max_diff(g1, g2) < 1e-10, "gradient over the channels");
        }
        let x = randn(&mut rng, &[2, 4, 2, 3])?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| {
                layer_norm_channels(
                    x,
                    &weight.narrow(0, 0, 4)?,
                    Some(&bias.narrow(0, 0, 4)?),
                    1e-5,
                )
            },
            1e-6,
            1e-7,
        )?;
        let x = randn(&mut rng, &[3, 9])?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| layer_norm(x, &weight.narrow(0, 0, 9)?, None, 1e-5),
            1e-6,
            1e-7,
        )?;
        Ok(())
    }
}
