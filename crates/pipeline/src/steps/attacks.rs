//! The attack steps' settings as the attack library's: the shared [`AttackSettings`] as an
//! [`AttackConfig`], `saliency_attack` as a [`SaliencyAttack`], `mask_attack` as a
//! [`LearnedMask`].

use crate::schema::{AttackSettings, MaskAttackStep, SaliencyAttackStep};
use vulnmap_attacks::saliency_attack::SaliencyAttack;
use vulnmap_attacks::{AttackConfig, LearnedMask};
use vulnmap_saliency::SmoothGrad;

/// The attack configuration of `settings`, its generators drawn from `seed` and banked
/// `batch_size` at a time.
pub fn config(settings: &AttackSettings, seed: u64, batch_size: usize) -> AttackConfig {
    AttackConfig {
        alpha: settings.alpha,
        max_iters: settings.max_iters,
        lr: settings.lr,
        confidence: settings.confidence,
        seed,
        generator: settings.generator,
        batch_size,
        progress: false,
        ..AttackConfig::default()
    }
}

/// The saliency-mask attack of `step`: the authors' SmoothGrad with the step's samples and
/// noise, its noise drawn from `seed`.
pub fn saliency_attack(step: &SaliencyAttackStep, seed: u64, batch_size: usize) -> SaliencyAttack {
    SaliencyAttack {
        method: SmoothGrad {
            samples: step.samples,
            noise_level: step.noise_level,
            seed,
            batch_size,
            ..SmoothGrad::authors()
        },
        every: (step.every > 0).then_some(step.every),
        threshold: step.threshold,
    }
}

/// The learned mask of `step`; without a `mask_lr`, the network's own learning rate.
pub fn learned_mask(step: &MaskAttackStep, seed: u64, batch_size: usize) -> LearnedMask {
    LearnedMask {
        network: step.network.network(step.base, step.cells),
        lr: step.mask_lr.unwrap_or(step.network.default_lr()),
        sparsity: step.sparsity,
        lambda_sparsity: step.lambda_sparsity,
        lambda_tv: step.lambda_tv,
        beta: step.beta,
        gamma: step.gamma,
        reference: SmoothGrad {
            samples: step.samples,
            seed,
            batch_size,
            ..SmoothGrad::authors()
        },
    }
}
