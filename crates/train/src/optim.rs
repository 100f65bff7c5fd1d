//! Adam exactly as `torch.optim.Adam` (and AdamW with `decoupled`), for training and fine-tuning.
//!
//! candle-nn's `AdamW` defaults to weight decay 0.01 and only decays decoupled; PyTorch's Adam
//! adds `weight_decay * p` to the gradient. Both are here, with PyTorch's defaults.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;
use vulnmap_ops::cpu_kernels::Float;

/// Adam's hyperparameters; `Default` is PyTorch's (lr 1e-3, betas 0.9/0.999, eps 1e-8, no decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay rate of the running mean of the gradient, in [0, 1) (default 0.9).
    pub beta1: f64,
    /// Decay rate of the running mean of the squared gradient, in [0, 1) (default 0.999).
    pub beta2: f64,
    /// Added to the denominator `sqrt(v_hat)` for numerical stability (default 1e-8).
    pub eps: f64,
    /// Weight decay factor (default 0: none); how it applies depends on `decoupled`.
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
    moments: Moments,
}

/// Adam's running means of the gradient (`m`) and of its square (`v`).
enum Moments {
    /// On the CPU: plain vectors, updated in place together with the weights in one pass.
    Host(HostMoments),
    /// Elsewhere: tensors, updated by tensor ops.
    Tensors { m: Tensor, v: Tensor },
}

/// Empty until the first step that keeps them (zero before it): a single update, the local
/// attack's usual case, never allocates them.
enum HostMoments {
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
}

/// The optimiser state over a set of variables.
pub struct Adam {
    slots: Vec<Slot>,
    step: i32,
    /// Set by the last step, after which the moments are gone.
    finished: bool,
    /// The hyperparameters, read at every step: changing `lr` between steps is how schedules work.
    pub config: AdamConfig,
}

impl Adam {
    /// Adam over `vars` with zero moments; on the CPU, f32 and f64 weights are updated in place.
    pub fn new(vars: Vec<Var>, config: AdamConfig) -> Result<Self> {
        Self::build(vars, config, true)
    }

    fn build(vars: Vec<Var>, config: AdamConfig, fused: bool) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let t = var.as_tensor();
                let moments = match t.dtype() {
                    DType::F32 if fused && t.device().is_cpu() => {
                        Moments::Host(HostMoments::F32(Vec::new(), Vec::new()))
                    }
                    DType::F64 if fused && t.device().is_cpu() => {
                        Moments::Host(HostMoments::F64(Vec::new(), Vec::new()))
                    }
                    _ => Moments::Tensors {
                        m: t.zeros_like()?,
                        v: t.zeros_like()?,
                    },
                };
                Ok(Slot { var, moments })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            step: 0,
            finished: false,
            config,
        })
    }

    /// One update from `grads`; variables without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_entries(grads, None, true)
    }

    /// One update in which only some entries of a bank move: every variable has the bank as its
    /// leading dimension and `active` (`B`, ones and zeros) says which entries update. The others
    /// keep their weights and their moments, exactly as if they had left the optimiser.
    pub fn step_active(&mut self, grads: &GradStore, active: &Tensor) -> Result<()> {
        self.step_entries(grads, Some(active), true)
    }

    /// The last update, as [`Adam::step_active`], without storing the moments: their memory is
    /// freed, and on the CPU only the weights are written. Any later step is an error.
    pub fn last_step_active(&mut self, grads: &GradStore, active: &Tensor) -> Result<()> {
        let stepped = self.step_entries(grads, Some(active), false);
        // Finished even when the step failed partway: the moments no longer match the weights.
        self.finished = true;
        self.slots.clear();
        stepped
    }

    fn step_entries(
        &mut self,
        grads: &GradStore,
        active: Option<&Tensor>,
        keep_moments: bool,
    ) -> Result<()> {
        if self.finished {
            candle_core::bail!("adam: a step after the last step");
        }
        self.step += 1;
        let update = Update {
            config: self.config,
            bias1: 1.0 - self.config.beta1.powi(self.step),
            bias2: 1.0 - self.config.beta2.powi(self.step),
        };
        let entries: Option<Vec<bool>> = match active {
            Some(a)
                if self
                    .slots
                    .iter()
                    .any(|s| matches!(s.moments, Moments::Host(_))) =>
            {
                Some(
                    a.to_dtype(DType::F64)?
                        .to_vec1::<f64>()?
                        .into_iter()
                        .map(|x| x != 0.0)
                        .collect(),
                )
            }
            _ => None,
        };
        for slot in &mut self.slots {
            // No weights, nothing to move (candle refuses in-place ops on empty tensors).
            if slot.var.elem_count() == 0 {
                continue;
            }
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            match &mut slot.moments {
                Moments::Host(moments) => {
                    let p = slot.var.as_tensor();
                    if g.shape() != p.shape() {
                        candle_core::bail!("gradient {:?} for weights {:?}", g.dims(), p.dims());
                    }
                    let op = HostStep {
                        update,
                        moments: Mutex::new(moments),
                        entries: entries.as_deref(),
                        keep_moments,
                    };
                    p.inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Tensors { m, v } => {
                    update.with_tensors(&slot.var, g, m, v, active)?;
                }
            }
        }
        Ok(())
    }
}

/// One step's constants.
#[derive(Clone, Copy)]
struct Update {
    config: AdamConfig,
    bias1: f64,
    bias2: f64,
}

impl Update {
    /// The step on one weight with gradient `g`: new `(p, m, v)`. The arithmetic is the tensor
    /// path's, operation for operation in `T` (candle's `t * x` is `t * T(x) + 0`, `t / x` is
    /// `t * T(1 / x)`), so both paths, and training, give the same bits.
    #[inline]
    fn scalar<T: Float>(&self, p: T, g: T, m: T, v: T) -> (T, T, T) {
        let c = &self.config;
        let of = T::of;
        let g = if c.weight_decay != 0.0 && !c.decoupled {
            g + p * of(c.weight_decay)
        } else {
            g
        };
        let m = m * of(c.beta1) + g * of(1.0 - c.beta1);
        let v = v * of(c.beta2) + (g * g) * of(1.0 - c.beta2);
        let m_hat = m * of(1.0 / self.bias1);
        let v_hat = v * of(1.0 / self.bias2);
        let decayed = if c.weight_decay != 0.0 && c.decoupled {
            p * of(1.0 - c.lr * c.weight_decay)
        } else {
            p
        };
        let update = m_hat / (v_hat.sqrt() + of(c.eps));
        (decayed - update * of(c.lr), m, v)
    }

    /// The same step by tensor ops (any device).
    fn with_tensors(
        &self,
        var: &Var,
        g: &Tensor,
        m_old: &mut Tensor,
        v_old: &mut Tensor,
        active: Option<&Tensor>,
    ) -> Result<()> {
        let c = self.config;
        let p = var.as_tensor().detach();
        let g = if c.weight_decay != 0.0 && !c.decoupled {
            (g + (&p * c.weight_decay)?)?
        } else {
            g.clone()
        };
        let m = ((&*m_old * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((&*v_old * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let m_hat = (&m / self.bias1)?;
        let v_hat = (&v / self.bias2)?;
        let decayed = if c.weight_decay != 0.0 && c.decoupled {
            (&p * (1.0 - c.lr * c.weight_decay))?
        } else {
            p.clone()
        };
        let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
        let next = (decayed - (update * c.lr)?)?;
        match active {
            None => {
                *m_old = m;
                *v_old = v;
                var.set(&next)
            }
            Some(active) => {
                let mut dims = vec![1usize; p.rank()];
                dims[0] = active.dim(0)?;
                let on = active.to_dtype(p.dtype())?.reshape(dims)?;
                let keep = |new: &Tensor, old: &Tensor| -> Result<Tensor> {
                    old + new.sub(old)?.broadcast_mul(&on)?
                };
                *m_old = keep(&m, m_old)?;
                *v_old = keep(&v, v_old)?;
                var.set(&keep(&next, &p)?)
            }
        }
    }
}

/// Adam on the CPU: weights, `m` and `v` updated in place in one parallel pass.
struct HostStep<'a> {
    update: Update,
    moments: Mutex<&'a mut HostMoments>,
    /// Per bank entry (the leading dimension), whether it moves.
    entries: Option<&'a [bool]>,
    /// Whether `m` and `v` are written back (not on the last step).
    keep_moments: bool,
}

impl HostStep<'_> {
    fn run<T: Float>(&self, p: &mut [T], g: &[T], m: &mut Vec<T>, v: &mut Vec<T>) -> Result<()> {
        let n = p.len();
        let stored = !m.is_empty();
        if g.len() != n || (stored && (m.len() != n || v.len() != n)) {
            candle_core::bail!(
                "adam: {n} weights, {} gradients, {} moments",
                g.len(),
                m.len()
            );
        }
        let per_entry = match self.entries {
            Some(e) if !e.is_empty() && n.is_multiple_of(e.len()) => n / e.len(),
            Some(e) => {
                candle_core::bail!("adam: {n} weights do not split into {} entries", e.len())
            }
            None => n.max(1),
        };
        let moves = |entry: usize| self.entries.is_none_or(|e| e[entry]);
        const CHUNK: usize = 1 << 14;
        if !self.keep_moments {
            // Only the weights are written; moments not yet stored are zero.
            let zero = T::default();
            p.par_chunks_mut(per_entry)
                .zip(g.par_chunks(per_entry))
                .enumerate()
                .filter(|&(entry, _)| moves(entry))
                .for_each(|(entry, (p, g))| {
                    let at = entry * per_entry..(entry + 1) * per_entry;
                    let (m, v) = (m.get(at.clone()), v.get(at));
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .enumerate()
                        .for_each(|(c, (p, g))| match (m, v) {
                            (Some(m), Some(v)) => {
                                let at = c * CHUNK..c * CHUNK + p.len();
                                let (m, v) = (&m[at.clone()], &v[at]);
                                for (((p, &g), &m), &v) in p.iter_mut().zip(g).zip(m).zip(v) {
                                    *p = self.update.scalar(*p, g, m, v).0;
                                }
                            }
                            _ => {
                                for (p, &g) in p.iter_mut().zip(g) {
                                    *p = self.update.scalar(*p, g, zero, zero).0;
                                }
                            }
                        });
                });
            return Ok(());
        }
        if !stored {
            m.resize(n, T::default());
            v.resize(n, T::default());
        }
        p.par_chunks_mut(per_entry)
            .zip(m.par_chunks_mut(per_entry))
            .zip(v.par_chunks_mut(per_entry))
            .zip(g.par_chunks(per_entry))
            .enumerate()
            .filter(|&(entry, _)| moves(entry))
            .for_each(|(_, (((p, m), v), g))| {
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(((p, m), v), g)| {
                        for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                            (*p, *m, *v) = self.update.scalar(*p, g, *m, *v);
                        }
                    });
            });
        Ok(())
    }
}

impl InplaceOp2 for HostStep<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-adam"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (pl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("adam: weights and gradients must be contiguous");
        };
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        match (p, g, &mut **moments) {
            (CpuStorage::F32(p), CpuStorage::F32(g), HostMoments::F32(m, v)) => {
                self.run(&mut p[p0..p1], &g[g0..g1], m, v)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g), HostMoments::F64(m, v)) => {
                self.run(&mut p[p0..p1], &g[g0..g1], m, v)
            }
            _ => candle_core::bail!("adam: weights, gradients and moments of one float dtype"),
        }
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
    fn the_in_place_cpu_step_equals_the_tensor_step() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(9, "adam paths");
        let settings = [(0.0, false), (0.1, false), (0.1, true)];
        let cases = settings
            .into_iter()
            .flat_map(|s| [(s, DType::F64), (s, DType::F32)]);
        for ((wd, decoupled), dtype) in cases {
            let config = AdamConfig {
                lr: 0.05,
                weight_decay: wd,
                decoupled,
                ..Default::default()
            };
            // Three bank entries of 5 x 7 weights; entry 1 stops after two steps.
            let start = vulnmap_data::random::randn(&mut rng, (3, 5, 7), &dev)?.to_dtype(dtype)?;
            let (a, b) = (Var::from_tensor(&start)?, Var::from_tensor(&start)?);
            let mut fused = Adam::build(vec![a.clone()], config, true)?;
            let mut plain = Adam::build(vec![b.clone()], config, false)?;
            assert!(matches!(fused.slots[0].moments, Moments::Host(_)));
            assert!(matches!(plain.slots[0].moments, Moments::Tensors { .. }));
            let step =
                |fused: &mut Adam, plain: &mut Adam, active: Option<&Tensor>| -> Result<()> {
                    for (var, adam) in [(&a, fused), (&b, plain)] {
                        let grads = var.as_tensor().powf(3.0)?.sin()?.sum_all()?.backward()?;
                        match active {
                            Some(active) => adam.step_active(&grads, active)?,
                            None => adam.step(&grads)?,
                        }
                    }
                    Ok(())
                };
            let differ = || -> Result<f64> {
                (a.as_tensor() - b.as_tensor())?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()
            };
            // Plain steps (training): the same bits.
            for _ in 0..3 {
                step(&mut fused, &mut plain, None)?;
            }
            assert_eq!(
                differ()?,
                0.0,
                "wd={wd} decoupled={decoupled} {dtype:?}: paths differ"
            );
            // Banked steps: the tensor path blends by the mask, so rounding may differ.
            for k in 0..5 {
                let active = Tensor::new(&[1f64, (k < 2) as u8 as f64, 1.0], &dev)?;
                step(&mut fused, &mut plain, Some(&active))?;
            }
            let d = differ()?;
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(
                d < tolerance,
                "wd={wd} decoupled={decoupled} {dtype:?}: paths differ by {d}"
            );
            let moved = (a.as_tensor() - &start)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert!(moved > 0.1, "the weights moved ({moved})");
        }
        Ok(())
    }

    #[test]
    fn a_bank_of_empty_weights_steps_as_a_no_op() -> Result<()> {
        let dev = Device::Cpu;
        let empty = Var::from_tensor(&Tensor::zeros((2, 0), DType::F32, &dev)?)?;
        let used = Var::new(&[[1f32], [2.0]], &dev)?;
        let loss = (empty.as_tensor().sum_all()? + used.as_tensor().sum_all()?)?;
        let grads = loss.backward()?;
        let active = Tensor::new(&[1f32, 1.0], &dev)?;
        let mut adam = Adam::new(vec![empty.clone(), used.clone()], AdamConfig::default())?;
        adam.step_active(&grads, &active)?;
        adam.last_step_active(&grads, &active)?;
        assert_eq!(empty.as_tensor().dims(), &[2, 0]);
        assert!(
            used.as_tensor().to_vec2::<f32>()?[0][0] < 1.0,
            "the other weights moved"
        );
        Ok(())
    }

    #[test]
    fn the_last_step_moves_the_weights_as_a_kept_step_and_ends_the_optimiser() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let start =
                Tensor::new(&[[1.0f64, -2.0], [3.0, 0.5], [-1.5, 2.5]], &dev)?.to_dtype(dtype)?;
            let active = Tensor::new(&[1f64, 0.0, 1.0], &dev)?;
            // Steps before the last one, none, and one: the last step reads stored moments,
            // zero moments, and moments of one earlier step.
            for earlier in [0, 1, 3] {
                for fused in [true, false] {
                    let (a, b) = (Var::from_tensor(&start)?, Var::from_tensor(&start)?);
                    let config = AdamConfig {
                        lr: 0.1,
                        ..Default::default()
                    };
                    let mut kept = Adam::build(vec![a.clone()], config, fused)?;
                    let mut last = Adam::build(vec![b.clone()], config, fused)?;
                    for k in 0..=earlier {
                        for (var, adam) in [(&a, &mut kept), (&b, &mut last)] {
                            let grads = var.as_tensor().powf(3.0)?.sin()?.sum_all()?.backward()?;
                            if k == earlier && std::ptr::eq(var, &b) {
                                adam.last_step_active(&grads, &active)?;
                            } else {
                                adam.step_active(&grads, &active)?;
                            }
                        }
                    }
                    let (a, b) = (
                        a.as_tensor().to_dtype(DType::F64)?,
                        b.as_tensor().to_dtype(DType::F64)?,
                    );
                    assert_eq!(
                        a.to_vec2::<f64>()?,
                        b.to_vec2::<f64>()?,
                        "{dtype:?} {earlier} {fused}"
                    );
                    assert_eq!(b.to_vec2::<f64>()?[1], vec![3.0, 0.5], "entry 1 stays");
                    let grads = b.sum_all()?.backward()?;
                    assert!(last.step(&grads).is_err(), "no step after the last");
                }
            }
        }
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
