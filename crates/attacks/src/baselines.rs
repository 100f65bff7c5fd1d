//! Classic gradient attacks as baselines, reporting iterations to flip the same way as the
//! generator attacks: FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018), under an L-inf
//! or L2 budget, untargeted or targeted, optionally confined by a mask (as ART's `mask`).

use crate::engine::{origin_losses, Goal};
use crate::error::{ensure, Result};
use crate::outcome::AttackOutcome;
use candle_core::{DType, Tensor, Var};
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// The budget's norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// L-inf: the largest change to any one pixel value; steps follow the gradient's sign.
    Linf,
    /// L2: the Euclidean norm of each image's perturbation; steps follow the normalised gradient.
    L2,
}

/// PGD's settings (FGSM is one step of size epsilon without random start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pgd {
    /// The budget: the perturbation's norm stays within it.
    pub epsilon: f64,
    /// Step size.
    pub step: f64,
    /// Most gradient steps before giving up (default 10); FGSM takes one.
    pub steps: usize,
    /// The norm that `epsilon` and `step` are measured in (default L-inf).
    pub norm: Norm,
    /// Start from a uniform random point in the budget (L-inf) or a random direction (L2).
    pub random_start: bool,
    /// Seed for the random start (default 0).
    pub seed: u64,
    /// The probability the label must exceed to count as a success.
    pub confidence: f64,
}

impl Default for Pgd {
    /// torchattacks' defaults: L-inf 8/255, step 2/255, 10 steps, random start.
    fn default() -> Self {
        Self {
            epsilon: 8.0 / 255.0,
            step: 2.0 / 255.0,
            steps: 10,
            norm: Norm::Linf,
            random_start: true,
            seed: 0,
            confidence: 0.9,
        }
    }
}

impl Pgd {
    /// FGSM: one step of epsilon from the image.
    pub fn fgsm(epsilon: f64, norm: Norm) -> Self {
        Self {
            epsilon,
            step: epsilon,
            steps: 1,
            norm,
            random_start: false,
            ..Self::default()
        }
    }
}

/// Projects `delta` (`N x C x H x W`) into the budget.
fn project(delta: &Tensor, epsilon: f64, norm: Norm) -> Result<Tensor> {
    Ok(match norm {
        Norm::Linf => delta.clamp(-epsilon, epsilon)?,
        Norm::L2 => {
            let n = delta.sqr()?.sum_keepdim((1, 2, 3))?.sqrt()?;
            let scale = (n.affine(1.0 / epsilon, 0.0)?.maximum(1.0)?).recip()?;
            delta.broadcast_mul(&scale)?
        }
    })
}

/// Runs PGD on every image (batched), each stopping at its first success; `masks` (one `H x W`
/// per image) confine the perturbation.
pub fn pgd(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    spec: &Pgd,
    masks: Option<&[Tensor]>,
) -> Result<Vec<AttackOutcome>> {
    let (n, c, h, w) = pixels.dims4()?;
    ensure(goals.len() == n, || {
        format!("{} goals for {n} images", goals.len())
    })?;
    ensure(spec.epsilon > 0.0 && spec.step > 0.0, || {
        format!(
            "epsilon and step must be positive, got {} and {}",
            spec.epsilon, spec.step
        )
    })?;
    let device = model.device().clone();
    let x0 = pixels.to_device(&device)?.to_dtype(DType::F32)?.detach();
    let logits = model.logits(&x0)?;
    let clean: Vec<usize> = logits
        .argmax(1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    for g in goals {
        g.check(model)?;
    }
    let labels: Vec<u32> = goals
        .iter()
        .zip(&clean)
        .map(|(g, &c)| g.class(c) as u32)
        .collect();
    let origin = origin_losses(&candle_nn::ops::log_softmax(&logits, 1)?, goals, &clean)?;
    let origin_odds: Vec<f32> = vulnmap_models::log_odds(&logits, &labels)?.to_vec1()?;
    let mask = match masks {
        Some(m) => {
            ensure(m.len() == n, || "one mask per image".into())?;
            let m: Vec<Tensor> = m
                .iter()
                .map(|t| {
                    t.to_device(&device)?
                        .to_dtype(DType::F32)?
                        .reshape((1, h, w))
                })
                .collect::<candle_core::Result<_>>()?;
            Some(Tensor::stack(&m, 0)?)
        }
        None => None,
    };
    let confine = |d: Tensor| -> Result<Tensor> {
        Ok(match &mask {
            Some(m) => d.broadcast_mul(m)?,
            None => d,
        })
    };
    let mut delta = if spec.random_start {
        let mut rng = random::rng(spec.seed, "pgd start");
        let u = Tensor::from_vec(
            random::uniform_vec(&mut rng, n * c * h * w, -1.0, 1.0),
            (n, c, h, w),
            &device,
        )?;
        project(&(u * spec.epsilon)?, spec.epsilon, spec.norm)?
    } else {
        x0.zeros_like()?
    };
    delta = confine(delta)?;
    let signs: Vec<f32> = goals.iter().map(|g| g.direction()).collect();
    let signs = Tensor::new(signs.as_slice(), &device)?;
    let index = Tensor::new(labels.as_slice(), &device)?.unsqueeze(1)?;
    let mut outcomes: Vec<Option<AttackOutcome>> = vec![None; n];
    let mut probabilities: Vec<Vec<f64>> = vec![Vec::with_capacity(spec.steps + 1); n];
    let mut log_odds: Vec<Vec<f64>> = vec![Vec::with_capacity(spec.steps + 1); n];
    for k in 0..=spec.steps {
        let x = Var::from_tensor(&(&x0 + &delta)?.clamp(0f32, 1f32)?)?;
        let logits = model.logits(x.as_tensor())?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
        let ce = log_probs.gather(&index, 1)?.squeeze(1)?.neg()?;
        let predicted: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let conf: Vec<f32> = log_probs.max(1)?.exp()?.to_vec1()?;
        let losses: Vec<f32> = ce.to_vec1()?;
        let odds: Vec<f32> = vulnmap_models::log_odds(&logits, &labels)?.to_vec1()?;
        for i in 0..n {
            if outcomes[i].is_some() {
                continue;
            }
            probabilities[i].push((-losses[i] as f64).exp());
            log_odds[i].push(odds[i] as f64);
            let label = predicted[i] as usize;
            let met = goals[i].met_by(label, clean[i]) && conf[i] as f64 > spec.confidence;
            if met || k == spec.steps {
                let perturbed = x.as_tensor().get(i)?.detach();
                outcomes[i] = Some(AttackOutcome {
                    alpha: spec.epsilon,
                    origin_loss: origin[i],
                    final_loss: if goals[i].moves_away() {
                        -(losses[i] as f64)
                    } else {
                        losses[i] as f64
                    },
                    label_from: clean[i],
                    label_to: label,
                    target: goals[i].target(),
                    iterations: k,
                    confidence: conf[i] as f64,
                    probabilities: std::mem::take(&mut probabilities[i]),
                    origin_log_odds: origin_odds[i] as f64,
                    log_odds: std::mem::take(&mut log_odds[i]),
                    success: met,
                    failure: (!met).then(|| format!("no success within {} steps", spec.steps)),
                    noise: Some((&perturbed - x0.get(i)?)?),
                    perturbed: Some(perturbed),
                    mask: mask.as_ref().map(|m| m.get(i)?.squeeze(0)).transpose()?,
                    contribution: None,
                });
            }
        }
        if k == spec.steps || outcomes.iter().all(Option::is_some) {
            break;
        }
        // Ascend the cross-entropy of the original label, descend the target's.
        let grads = (ce * &signs)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("the input has a gradient")
            .clone();
        let step = match spec.norm {
            Norm::Linf => (g.sign()? * spec.step)?,
            Norm::L2 => {
                let n = (g.sqr()?.sum_keepdim((1, 2, 3))?.sqrt()? + 1e-12)?;
                (g.broadcast_div(&n)? * spec.step)?
            }
        };
        // Images already done keep their perturbation.
        let done: Vec<f32> = outcomes.iter().map(|o| o.is_none() as u8 as f32).collect();
        let live = Tensor::from_vec(done, (n, 1, 1, 1), &device)?;
        delta = confine(project(
            &(&delta + step.broadcast_mul(&live)?)?,
            spec.epsilon,
            spec.norm,
        )?)?;
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every image ends with an outcome"))
        .collect())
}
