//! The attack steps: their settings as the attack library's (the shared [`AttackSettings`] as an
//! [`AttackConfig`], `saliency_attack` as a [`SaliencyAttack`], `mask_attack` as a
//! [`LearnedMask`]), and each step's run on a chunk of images.

use super::{Chunk, StepContext};
use crate::error::{Error, Result};
use crate::rows::{Found, LocalAttacked, MaskAttacked, RandomAttacked, SaliencyAttacked, Swept};
use crate::schema::spelling;
use crate::schema::{
    AlphaSweepStep, AttackSettings, LocalAttackStep, MaskAttackStep, RandomAttackStep,
    SaliencyAttackStep,
};
use candle_core::{DType, Device, Tensor};
use vulnmap_attacks::local::local_attacks;
use vulnmap_attacks::mask_attack::mask_attack_averaged;
use vulnmap_attacks::random::random_attack;
use vulnmap_attacks::rounds::{self, rounds};
use vulnmap_attacks::saliency_attack::{
    clean_masks, control_masks, fixed_mask_attack, saliency_attack, SaliencyAttack,
};
use vulnmap_attacks::{AttackConfig, AttackOutcome, DualReward, Goal, LearnedMask};
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
pub fn saliency_spec(step: &SaliencyAttackStep, seed: u64, batch_size: usize) -> SaliencyAttack {
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

/// The learned mask of `step` on images of `side` pixels; without a `mask_lr`, the network's
/// own learning rate (the dual game's, for a free mask in that game).
pub fn mask_spec(step: &MaskAttackStep, side: usize, seed: u64, batch_size: usize) -> LearnedMask {
    let defaults = LearnedMask::default();
    LearnedMask {
        network: step.network().network(step.base, step.cells(side)),
        lr: step.mask_lr(),
        sparsity: step.sparsity,
        lambda_sparsity: step.lambda_sparsity,
        lambda_tv: step.lambda_tv,
        beta: step.beta,
        gamma: step.gamma(),
        reference: SmoothGrad {
            samples: step.samples,
            seed,
            batch_size,
            ..SmoothGrad::authors()
        },
        game: step.game,
        area: defaults.area,
        lambda_area: step.lambda_area.unwrap_or(defaults.lambda_area),
        blur_sigma: step.blur_sigma.unwrap_or(defaults.blur_sigma),
        jitter: step.jitter(),
        smooth: step.smooth(side),
        field_of_view: step.field_of_view(),
        reward: step.reward,
    }
}

/// The mask attack's variant on images of `side` pixels: what differs from the paper's settings
/// (`dual`, `areas=...`, `smooth=X` in cells, `gamma=X`, `field_of_view`, `seeds=N`, joined by
/// `+`), or `paper`. The dual game's defaults are spelt out, so a row names the settings that made
/// it whatever the defaults of the version that wrote it.
pub fn mask_variant(step: &MaskAttackStep, side: usize) -> String {
    let mut parts = Vec::new();
    let paper_gamma = LearnedMask::default().gamma;
    if step.dual() {
        parts.push("dual".to_string());
    }
    let areas = step.areas();
    if !areas.is_empty() {
        let areas: Vec<String> = areas.iter().map(|a| a.to_string()).collect();
        parts.push(format!("areas={}", areas.join(",")));
    }
    if step.jitter.is_some_and(|j| j > 0.0) && !step.dual() {
        parts.push("jitter".to_string());
    }
    let smooth = step.smooth(side);
    if smooth > 0.0 {
        parts.push(format!("smooth={}", (smooth * 1e4).round() / 1e4));
    }
    let gamma = step.gamma();
    // The dual game without the pull is the game itself; with it, and the noise game with
    // another weight than Eq. 6's, the weight is named.
    if (step.dual() && gamma != 0.0) || (!step.dual() && gamma != paper_gamma) {
        parts.push(format!("gamma={gamma}"));
    }
    if step.field_of_view() {
        parts.push("field_of_view".to_string());
    }
    if step.seeds != 1 {
        parts.push(format!("seeds={}", step.seeds));
    }
    if step.reward == DualReward::LogOdds {
        parts.push("log_odds".to_string());
    }
    vulnmap_attacks::variant_name(&parts)
}

/// Each image's goal in an attack whose map is one of the chunk's maps: untargeted, away from
/// the class the chunk's maps explain (the prediction, or the label with `explain: label`);
/// targeted, the step's target.
fn map_goals(settings: &AttackSettings, chunk: &Chunk) -> Result<Vec<Goal>> {
    let goal = settings.goal()?;
    Ok(chunk
        .targets
        .iter()
        .map(|&class| match goal {
            Goal::Untargeted => Goal::Away(class),
            other => other,
        })
        .collect())
}

/// Runs the random attack `s` on every image of `chunk` (with `rounds`, seed after seed).
pub(crate) fn random(
    cx: &StepContext,
    s: &RandomAttackStep,
    id: &str,
    chunk: &Chunk,
) -> Result<Vec<Found>> {
    let model = cx.model;
    let n = chunk.items.len();
    let config = cx.attack_config(&s.attack())?;
    let goal = s.attack().goal()?;
    let mut rows = Vec::new();
    if s.rounds == 1 {
        let outcomes = random_attack(model, &chunk.pixels, &vec![goal; n], &config)?;
        for (o, item) in outcomes.iter().zip(chunk.items) {
            rows.push(Found::RandomAttack(RandomAttacked {
                outcome: cx.outcome(o),
                figures: cx.attack_figures(item, id, o)?,
                rounds: None,
                iterations: None,
            }));
        }
    } else {
        for (i, item) in chunk.items.iter().enumerate() {
            let (outcomes, stats) = rounds(model, &chunk.pixels, i, goal, s.rounds, &config)?;
            rows.push(Found::RandomAttack(RandomAttacked {
                outcome: cx.outcome(&outcomes[0]),
                figures: cx.attack_figures(item, id, &outcomes[0])?,
                rounds: Some(stats),
                iterations: Some(outcomes.iter().map(|o| o.iterations).collect()),
            }));
        }
    }
    Ok(rows)
}

/// Runs the alpha sweep `s` on every image of `chunk`.
pub(crate) fn alpha_sweep(
    cx: &StepContext,
    s: &AlphaSweepStep,
    chunk: &Chunk,
) -> Result<Vec<Found>> {
    let model = cx.model;
    let n = chunk.items.len();
    let config = cx.attack_config(&s.attack())?;
    let mut rows = Vec::new();
    for i in 0..n {
        let points = rounds::alpha_sweep(
            model,
            &chunk.pixels,
            i,
            s.attack().goal()?,
            &s.alphas,
            s.rounds,
            &config,
        )?;
        rows.push(Found::AlphaSweep(Swept { sweep: points }));
    }
    Ok(rows)
}

/// Runs the local attack `s` on every image of `chunk`; its window maps are the step's maps.
pub(crate) fn local(
    cx: &StepContext,
    s: &LocalAttackStep,
    id: &str,
    chunk: &Chunk,
) -> Result<(Vec<Found>, Tensor)> {
    let model = cx.model;
    let n = chunk.items.len();
    let config = cx.attack_config(&s.attack())?;
    let (_, _, height, width) = chunk.pixels.dims4()?;
    let spec = s.spec(height.min(width));
    let images: Vec<usize> = (0..n).collect();
    let goals = map_goals(&s.attack(), chunk)?;
    let locals = local_attacks(model, &chunk.pixels, &images, &goals, &spec, &config)?;
    let all: Vec<Tensor> = locals.iter().map(|l| l.map.clone()).collect();
    let m = Tensor::stack(&all, 0)?;
    let rows = locals
        .into_iter()
        .zip(cx.map_rows(chunk, id, &m)?)
        .map(|(local, map)| {
            let fastest_window = local
                .scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| local.windows[k]);
            Found::LocalAttack(LocalAttacked {
                variant: local.variant.clone(),
                windows: local.windows.len(),
                contrast: local.contrast,
                iterations: local.outcomes.iter().map(|o| o.iterations).collect(),
                successes: local.outcomes.iter().filter(|o| o.success).count(),
                fastest_window,
                map,
            })
        })
        .collect();
    Ok((rows, m))
}

/// Runs the saliency-mask attack `s` and its random-mask controls on every image of `chunk`.
pub(crate) fn saliency(
    cx: &StepContext,
    s: &SaliencyAttackStep,
    id: &str,
    chunk: &Chunk,
) -> Result<Vec<Found>> {
    let model = cx.model;
    let n = chunk.items.len();
    let config = cx.attack_config(&s.attack())?;
    let goals = vec![s.attack().goal()?; n];
    let spec = saliency_spec(s, cx.seed, cx.batch_size);
    let outcomes = saliency_attack(model, &chunk.pixels, &goals, &spec, &config)?;
    let mut controls: Vec<(String, Vec<AttackOutcome>)> = Vec::new();
    if !s.controls.is_empty() {
        let clean = clean_masks(model, &chunk.pixels, &spec)?;
        for &control in &s.controls {
            let masks = control_masks(&clean, control, cx.seed)?;
            controls.push((
                spelling(&control),
                fixed_mask_attack(model, &chunk.pixels, &goals, masks, &config)?,
            ));
        }
    }
    let mut rows = Vec::new();
    for (i, item) in chunk.items.iter().enumerate() {
        rows.push(Found::SaliencyAttack(SaliencyAttacked {
            outcome: cx.outcome(&outcomes[i]),
            figures: cx.attack_figures(item, id, &outcomes[i])?,
            controls: controls
                .iter()
                .map(|(name, os)| (name.clone(), cx.outcome(&os[i])))
                .collect(),
        }));
    }
    Ok(rows)
}

/// Runs the mask attack `s` on every image of `chunk`; its learned masks, stretched to [0, 1],
/// are the step's maps.
pub(crate) fn mask(
    cx: &StepContext,
    s: &MaskAttackStep,
    id: &str,
    chunk: &Chunk,
) -> Result<(Vec<Found>, Tensor)> {
    let model = cx.model;
    let config = cx.attack_config(&s.attack())?;
    let (_, _, h, w) = chunk.pixels.dims4()?;
    let side = h.max(w);
    let spec = mask_spec(s, side, cx.seed, cx.batch_size);
    let outcomes = mask_attack_averaged(
        model,
        &chunk.pixels,
        &map_goals(&s.attack(), chunk)?,
        &spec,
        &s.areas(),
        s.seeds,
        &config,
    )?;
    let mut masks = Vec::new();
    for o in &outcomes {
        let mask = match &o.mask {
            Some(m) => m
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .reshape((h, w))?,
            None => return Err(Error::Run("the mask attack returned no mask".into())),
        };
        // The learned mask's scale is arbitrary (it may barely move from its start):
        // stretch it to [0, 1] so it reads as a map, as every other method's does.
        let (lo, hi) = (
            mask.min_all()?.to_scalar::<f32>()?,
            mask.max_all()?.to_scalar::<f32>()?,
        );
        let mask = ((mask - lo as f64)? / ((hi - lo) as f64).max(1e-12))?;
        masks.push(mask);
    }
    let m = Tensor::stack(&masks, 0)?;
    let mut rows = Vec::new();
    for ((o, item), map) in outcomes
        .iter()
        .zip(chunk.items)
        .zip(cx.map_rows(chunk, id, &m)?)
    {
        rows.push(Found::MaskAttack(MaskAttacked {
            variant: mask_variant(s, side),
            outcome: cx.outcome(o),
            figures: cx.attack_figures(item, id, o)?,
            map,
        }));
    }
    Ok((rows, m))
}
