//! Instance normalisation with a scale and shift per plane: each plane (image, channel) of
//! `N x C x H x W` normalised over its own pixels, `(x - mean) / sqrt(var + eps)` with the biased
//! variance, then `* gamma + beta`, both `N x C`. This is train-mode BatchNorm on a batch of one
//! image when every image of the batch is a network of its own (the attacks' banked generators).
//!
//! One op with the analytic backward, `dx = gamma / sigma * (dy - mean(dy) - x_hat mean(dy x_hat))`:
//! as candle's broadcast ops, the normalisation kept five intermediate tensors and its backward
//! summed them with strided reductions, half of a 128-pixel generator's backward pass. Other
//! devices and dtypes get candle's ops.

use crate::cpu_kernels::{slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` (`N x C x H x W`) normalised per plane, then scaled by `gamma` and shifted by `beta`
/// (`N x C`, one value per plane). Differentiable in all three.
pub fn instance_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims() != [n, c] || t.dtype() != x.dtype() {
            candle_core::bail!(
                "instance norm: {name} of shape {:?} ({:?}) for input {:?} ({:?}), expected [{n}, {c}]",
                t.dims(),
                t.dtype(),
                x.dims(),
                x.dtype()
            );
        }
    }
    if eps.is_nan() || eps <= 0.0 {
        candle_core::bail!("instance norm: eps must be positive, got {eps}");
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && h * w > 0 {
        return x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            InstanceNorm { eps },
        );
    }
    let mean = x.mean_keepdim((2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((2, 3))?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((n, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((n, c, 1, 1))?)
}

#[derive(Debug, Clone, Copy)]
struct InstanceNorm {
    eps: f64,
}

/// A plane's mean and `1 / sqrt(var + eps)`, summed in f64.
fn moments<T: Float>(plane: &[T], eps: f64) -> (f64, f64) {
    let count = plane.len() as f64;
    let mean = plane.iter().map(|&v| v.widen()).sum::<f64>() / count;
    let var = plane
        .iter()
        .map(|&v| (v.widen() - mean).powi(2))
        .sum::<f64>()
        / count;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Pixels per plane of a contiguous `N x C x H x W` layout.
fn plane_len(l: &Layout) -> usize {
    let d = l.dims();
    d[2] * d[3]
}

impl CustomOp3 for InstanceNorm {
    fn name(&self) -> &'static str {
        "vulnmap-instance-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            eps: f64,
            (xs, xl): (&CpuStorage, &Layout),
            (gs, gl): (&CpuStorage, &Layout),
            (bs, bl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let x = slice::<T>(xs, xl, "instance norm")?;
            let gamma = slice::<T>(gs, gl, "instance norm")?;
            let beta = slice::<T>(bs, bl, "instance norm")?;
            let len = plane_len(xl);
            let mut out = vec![T::default(); x.len()];
            out.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .enumerate()
                .for_each(|(p, (out, x))| {
                    let (mean, inv_std) = moments(x, eps);
                    let scale = gamma[p].widen() * inv_std;
                    let shift = beta[p].widen() - mean * scale;
                    let (scale, shift) = (T::of(scale), T::of(shift));
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = v * scale + shift;
                    }
                });
            Ok(T::storage(out))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(self.eps, (xs, xl), (gs, gl), (bs, bl))?,
            DType::F64 => run::<f64>(self.eps, (xs, xl), (gs, gl), (bs, bl))?,
            other => candle_core::bail!("instance norm: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, _, _) = x.dims4()?;
        let grad = grad.contiguous()?;
        let x = x.detach();
        // Per plane: sum(dy) (beta's gradient) and sum(dy x_hat) (gamma's).
        let sums = grad.apply_op2_no_bwd(&x, &PlaneSums { eps: self.eps })?;
        let grad_beta = sums.narrow(2, 0, 1)?.reshape((n, c))?;
        let grad_gamma = sums.narrow(2, 1, 1)?.reshape((n, c))?;
        let grad_x = grad.apply_op3_no_bwd(
            &x,
            &Tensor::cat(&[&gamma.detach().unsqueeze(2)?, &sums], 2)?,
            &InputGradient { eps: self.eps },
        )?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

/// `N x C x 2`: each plane's `sum(dy)` and `sum(dy x_hat)`, from `dy` and `x`.
struct PlaneSums {
    eps: f64,
}

impl CustomOp2 for PlaneSums {
    fn name(&self) -> &'static str {
        "vulnmap-instance-norm-sums"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            eps: f64,
            (gs, gl): (&CpuStorage, &Layout),
            (xs, xl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let dy = slice::<T>(gs, gl, "instance norm backward")?;
            let x = slice::<T>(xs, xl, "instance norm backward")?;
            let len = plane_len(xl);
            let sums: Vec<T> = dy
                .par_chunks(len)
                .zip(x.par_chunks(len))
                .flat_map_iter(|(dy, x)| {
                    let (mean, inv_std) = moments(x, eps);
                    let (mut s, mut sx) = (0.0, 0.0);
                    for (&d, &v) in dy.iter().zip(x) {
                        s += d.widen();
                        sx += d.widen() * (v.widen() - mean) * inv_std;
                    }
                    [T::of(s), T::of(sx)]
                })
                .collect();
            Ok(T::storage(sums))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(self.eps, (gs, gl), (xs, xl))?,
            DType::F64 => run::<f64>(self.eps, (gs, gl), (xs, xl))?,
            other => candle_core::bail!("instance norm backward: f32 or f64, not {other:?}"),
        };
        let d = xl.dims();
        Ok((out, Shape::from((d[0], d[1], 2))))
    }
}

/// `dx` from `dy`, `x` and, per plane, `[gamma, sum(dy), sum(dy x_hat)]` (`N x C x 3`).
struct InputGradient {
    eps: f64,
}

impl CustomOp3 for InputGradient {
    fn name(&self) -> &'static str {
        "vulnmap-instance-norm-input-gradient"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            eps: f64,
            (gs, gl): (&CpuStorage, &Layout),
            (xs, xl): (&CpuStorage, &Layout),
            (ps, pl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let dy = slice::<T>(gs, gl, "instance norm backward")?;
            let x = slice::<T>(xs, xl, "instance norm backward")?;
            let per_plane = slice::<T>(ps, pl, "instance norm backward")?;
            let len = plane_len(xl);
            let count = len as f64;
            let mut dx = vec![T::default(); x.len()];
            dx.par_chunks_mut(len)
                .zip(dy.par_chunks(len).zip(x.par_chunks(len)))
                .enumerate()
                .for_each(|(p, (dx, (dy, x)))| {
                    let (mean, inv_std) = moments(x, eps);
                    let [gamma, sum, sum_x_hat] = [0, 1, 2].map(|i| per_plane[3 * p + i].widen());
                    let scale = gamma * inv_std;
                    let (mean_dy, mean_dy_x_hat) = (sum / count, sum_x_hat / count);
                    for ((o, &d), &v) in dx.iter_mut().zip(dy).zip(x) {
                        let x_hat = (v.widen() - mean) * inv_std;
                        *o = T::of(scale * (d.widen() - mean_dy - x_hat * mean_dy_x_hat));
                    }
                });
            Ok(T::storage(dx))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(self.eps, (gs, gl), (xs, xl), (ps, pl))?,
            DType::F64 => run::<f64>(self.eps, (gs, gl), (xs, xl), (ps, pl))?,
            other => candle_core::bail!("instance norm backward: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same normalisation by candle's broadcast ops.
    fn by_candle(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let mean = x.mean_keepdim((2, 3))?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((2, 3))?;
        centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(&gamma.reshape((n, c, 1, 1))?)?
            .broadcast_add(&beta.reshape((n, c, 1, 1))?)
    }

    #[test]
    fn values_and_all_three_gradients_match_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, c, h, w) in &[(2, 3, 5, 4), (3, 2, 1, 7), (1, 4, 8, 8)] {
            let x = Var::from_tensor(&Tensor::randn(0.5f64, 2.0, (n, c, h, w), &dev)?)?;
            let gamma = Var::from_tensor(&Tensor::randn(1f64, 0.3, (n, c), &dev)?)?;
            let beta = Var::from_tensor(&Tensor::randn(0f64, 0.3, (n, c), &dev)?)?;
            let probe = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev)?;
            let ours = instance_norm(&x, &gamma, &beta, 1e-5)?;
            let theirs = by_candle(&x, &gamma, &beta, 1e-5)?;
            let d = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-10, "{n}x{c}x{h}x{w}: values differ by {d}");
            let ours = (ours * &probe)?.sum_all()?.backward()?;
            let theirs = (theirs * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
                let d = (ours.get(v).unwrap() - theirs.get(v).unwrap())?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(
                    d < 1e-9,
                    "{n}x{c}x{h}x{w}: {name}'s gradient differs by {d}"
                );
            }
        }
        // f32 against the f64 reference.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev)?;
        let gamma = Tensor::ones((2, 3), DType::F32, &dev)?;
        let beta = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let d = (instance_norm(&x, &gamma, &beta, 1e-5)?.to_dtype(DType::F64)?
            - by_candle(
                &x.to_dtype(DType::F64)?,
                &gamma.to_dtype(DType::F64)?,
                &beta.to_dtype(DType::F64)?,
                1e-5,
            )?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
        assert!(d < 1e-5, "f32 differs by {d}");
        Ok(())
    }

    #[test]
    fn mismatched_scales_and_bad_eps_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
        let ok = Tensor::ones((2, 3), DType::F32, &dev)?;
        let short = Tensor::ones((3,), DType::F32, &dev)?;
        let err = instance_norm(&x, &short, &ok, 1e-5).unwrap_err();
        assert!(err.to_string().contains("gamma of shape [3]"), "{err}");
        assert!(instance_norm(&x, &ok, &ok, 0.0).is_err());
        assert!(instance_norm(&x, &ok, &ok.to_dtype(DType::F64)?, 1e-5).is_err());
        Ok(())
    }
}
