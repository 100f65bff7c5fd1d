//! Adam exactly as `torch.optim.Adam` (and AdamW with `decoupled`), for training and fine-tuning.
//!
//! candle-nn's `AdamW` defaults to weight decay 0.01 and only decays decoupled; PyTorch's Adam
//! adds `weight_decay * p` to the gradient. Both are here, with PyTorch's defaults.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Adam's hyperparameters; `Default` is PyTorch's (lr 1e-3, betas 0.9/0.999, eps 1e-8, no decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay the weights directly (AdamW) instead of through the gradient (Adam's L2).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// The optimiser state over a set of variables.
pub struct Adam {
    slots: Vec<Slot>,
    step: i32,
    pub config: AdamConfig,
}

impl Adam {
    pub fn new(vars: Vec<Var>, config: AdamConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    var,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            step: 0,
            config,
        })
    }

    /// One update from `grads`; variables without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_entries(grads, None)
    }

    /// One update in which only some entries of a bank move: every variable has the bank as its
    /// leading dimension and `active` (`B`, ones and zeros) says which entries update. The others
    /// keep their weights and their moments, exactly as if they had left the optimiser.
    pub fn step_active(&mut self, grads: &GradStore, active: &Tensor) -> Result<()> {
        self.step_entries(grads, Some(active))
    }

    fn step_entries(&mut self, grads: &GradStore, active: Option<&Tensor>) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step);
        let bias2 = 1.0 - c.beta2.powi(self.step);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = slot.var.as_tensor().detach();
            let g = if c.weight_decay != 0.0 && !c.decoupled {
                (g + (&p * c.weight_decay)?)?
            } else {
                g.clone()
            };
            let m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let decayed = if c.weight_decay != 0.0 && c.decoupled {
                (&p * (1.0 - c.lr * c.weight_decay))?
            } else {
                p.clone()
            };
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let next = (decayed - (update * c.lr)?)?;
            match active {
                None => {
                    slot.m = m;
                    slot.v = v;
                    slot.var.set(&next)?;
                }
                Some(active) => {
                    let mut dims = vec![1usize; p.rank()];
                    dims[0] = active.dim(0)?;
                    let on = active.to_dtype(p.dtype())?.reshape(dims)?;
                    let keep = |new: &Tensor, old: &Tensor| -> Result<Tensor> {
                        old + new.sub(old)?.broadcast_mul(&on)?
                    };
                    slot.m = keep(&m, &slot.m)?;
                    slot.v = keep(&v, &slot.v)?;
                    slot.var.set(&keep(&next, &p)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's update written out on scalars.
    fn reference(p0: f64, grads: &[f64], c: AdamConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, &g0) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            let g = if c.decoupled {
                g0
            } else {
                g0 + c.weight_decay * p
            };
            if c.decoupled {
                p *= 1.0 - c.lr * c.weight_decay;
            }
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let (mh, vh) = (m / (1.0 - c.beta1.powi(t)), v / (1.0 - c.beta2.powi(t)));
            p -= c.lr * mh / (vh.sqrt() + c.eps);
        }
        p
    }

    #[test]
    fn inactive_entries_keep_weights_and_moments() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[[1.0f64, 2.0], [3.0, 4.0]], &dev)?; // two entries of two weights
        let mut adam = Adam::new(
            vec![var.clone()],
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        let active = Tensor::new(&[1f64, 0.0], &dev)?;
        for _ in 0..3 {
            let grads = var.as_tensor().sqr()?.sum_all()?.backward()?;
            adam.step_active(&grads, &active)?;
        }
        let v = var.as_tensor().to_vec2::<f64>()?;
        assert_eq!(v[1], vec![3.0, 4.0]);
        // Entry 0 moved as it would alone.
        let alone = Var::new(&[[1.0f64, 2.0]], &dev)?;
        let mut solo = Adam::new(
            vec![alone.clone()],
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        for _ in 0..3 {
            let grads = alone.as_tensor().sqr()?.sum_all()?.backward()?;
            solo.step(&grads)?;
        }
        assert_eq!(v[0], alone.as_tensor().to_vec2::<f64>()?[0]);
        Ok(())
    }

    #[test]
    fn matches_pytorchs_update_with_and_without_weight_decay() -> Result<()> {
        for (wd, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
            let config = AdamConfig {
                lr: 0.05,
                weight_decay: wd,
                decoupled,
                ..Default::default()
            };
            let var = Var::new(&[1.5f64], &Device::Cpu)?;
            let frozen = Var::new(&[2.0f64], &Device::Cpu)?;
            let mut adam = Adam::new(vec![var.clone(), frozen.clone()], config)?;
            let mut seen = Vec::new();
            for _ in 0..4 {
                // loss = p^3: gradient 3 p^2, recorded to replay on the reference.
                let p = var.as_tensor();
                let loss = p.powf(3.0)?.sum_all()?;
                let grads = loss.backward()?;
                seen.push(grads.get(p).unwrap().to_vec1::<f64>()?[0]);
                adam.step(&grads)?;
            }
            let got = var.as_tensor().to_vec1::<f64>()?[0];
            let want = reference(1.5, &seen, config);
            assert!(
                (got - want).abs() < 1e-12,
                "wd={wd} decoupled={decoupled}: {got} vs {want}"
            );
            assert_eq!(
                frozen.as_tensor().to_vec1::<f64>()?[0],
                2.0,
                "no gradient, no update"
            );
        }
        Ok(())
    }
}
