//! BatchNorm with PyTorch's two modes: running statistics (eval) and batch statistics (train).

use crate::per_channel::{channel_add, channel_mul, channel_sub, channel_sum};
use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// PyTorch's default running-statistics momentum.
pub const MOMENTUM: f64 = 0.1;

/// `nn.BatchNorm2d`: tensors `weight`, `bias`, `running_mean`, `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    /// Vars so that train mode can update them in place (shared with a `VarMap` when trained).
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Loads or initialises a BatchNorm over `channels` with epsilon `eps` (PyTorch: 1e-5).
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum: MOMENTUM,
        })
    }

    /// Normalises `x` (`N x C x H x W`). In train mode it uses the batch's statistics, lets
    /// gradients flow through them, and updates the running statistics with momentum 0.1
    /// (unbiased variance), exactly as PyTorch.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let (scale, shift) = self.eval_affine()?;
            return x.broadcast_mul(&scale)?.broadcast_add(&shift);
        }
        let (n, c, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        if count < 2.0 {
            candle_core::bail!(
                "train-mode BatchNorm needs more than one value per channel, got input {:?}",
                x.dims()
            );
        }
        // candle's `mean_keepdim` and broadcast ops, by the same arithmetic (see `per_channel`).
        let mean = (channel_sum(x)? * (1.0 / count))?;
        let centred = channel_sub(x, &mean)?;
        let var = (channel_sum(&centred.sqr()?)? * (1.0 / count))?;
        let m = self.momentum;
        let new_mean = ((self.running_mean.as_tensor().detach() * (1.0 - m))?
            + (mean.detach().reshape(c)? * m)?)?;
        let new_var = ((self.running_var.as_tensor().detach() * (1.0 - m))?
            + (var.detach().reshape(c)? * (m * count / (count - 1.0)))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let shape = (1, c, 1, 1);
        let y = channel_mul(&centred, &inv_std)?;
        let y = channel_mul(&y, &self.weight.reshape(shape)?)?;
        channel_add(&y, &self.bias.reshape(shape)?)
    }

    /// Eval mode as one affine map `y = x * scale + shift`, both `1 x C x 1 x 1`.
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let c = self.weight.dim(0)?;
        let inv_std = (self.running_var.as_tensor().detach() + self.eps)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * inv_std)?;
        let shift = (&self.bias - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale.reshape((1, c, 1, 1))?, shift.reshape((1, c, 1, 1))?))
    }

    /// Whether the scale and shift are trained (Vars) rather than constants.
    pub fn is_trainable(&self) -> bool {
        self.weight.track_op() || self.bias.track_op()
    }

    /// The running mean and variance, as they are now.
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        (
            self.running_mean.as_tensor().detach(),
            self.running_var.as_tensor().detach(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use std::collections::HashMap;

    #[test]
    fn train_mode_normalises_by_batch_and_updates_running_stats_like_pytorch() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let (n, c, h, w) = (3, 2, 2, 2);
        let x = Tensor::randn(1f64, 2.0, (n, c, h, w), &dev)?;
        let tensors: HashMap<String, Tensor> = [
            ("weight", Tensor::new(&[1.5f64, 0.5], &dev)?),
            ("bias", Tensor::new(&[0.1f64, -0.2], &dev)?),
            ("running_mean", Tensor::new(&[0.3f64, -0.1], &dev)?),
            ("running_var", Tensor::new(&[2.0f64, 0.5], &dev)?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bn = BatchNorm::new(c, 1e-5, VarBuilder::from_tensors(tensors, DType::F64, &dev))?;
        bn.forward_t(&x, true)?;
        let y = bn.forward_t(&x, false)?; // eval with the *updated* statistics
        let values: Vec<Vec<f64>> = (0..c)
            .map(|ch| {
                x.narrow(1, ch, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect();
        let (rm, rv) = bn.running_stats();
        let (rm, rv) = (rm.to_vec1::<f64>()?, rv.to_vec1::<f64>()?);
        for ch in 0..c {
            let v = &values[ch];
            let k = v.len() as f64;
            let mean = v.iter().sum::<f64>() / k;
            let unbiased = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (k - 1.0);
            let (m0, v0) = ([0.3, -0.1][ch], [2.0, 0.5][ch]);
            assert!((rm[ch] - (0.9 * m0 + 0.1 * mean)).abs() < 1e-12);
            assert!((rv[ch] - (0.9 * v0 + 0.1 * unbiased)).abs() < 1e-12);
            // Eval mode now uses those statistics.
            let yc = y.narrow(1, ch, 1)?.flatten_all()?.to_vec1::<f64>()?;
            let (g, b) = ([1.5, 0.5][ch], [0.1, -0.2][ch]);
            for (a, out) in v.iter().zip(&yc) {
                let want = (a - rm[ch]) / (rv[ch] + 1e-5).sqrt() * g + b;
                assert!((out - want).abs() < 1e-12);
            }
        }
        // Train mode itself normalises with the batch's biased variance.
        let y = bn.forward_t(&x, true)?;
        for ch in 0..c {
            let v = &values[ch];
            let k = v.len() as f64;
            let mean = v.iter().sum::<f64>() / k;
            let biased = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / k;
            let yc = y.narrow(1, ch, 1)?.flatten_all()?.to_vec1::<f64>()?;
            let (g, b) = ([1.5, 0.5][ch], [0.1, -0.2][ch]);
            for (a, out) in v.iter().zip(&yc) {
                let want = (a - mean) / (biased + 1e-5).sqrt() * g + b;
                assert!((out - want).abs() < 1e-9);
            }
        }
        Ok(())
    }
}
