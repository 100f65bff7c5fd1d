//! The local attack (paper, III-C-1, Figs. 7-8): noise confined to a `w x w` window slid with
//! stride `s`, a fresh generator per window from the same seed; how fast each window flips the
//! label is a saliency map. A (w, s) sweep reports each map's contrast, the criterion by which
//! the paper chose w = 100, s = 50.
//!
//! Beyond the paper (each result names its variant, [`LocalAttack::variant`]): a continuous
//! window score from the attacked label's probability instead of whole updates
//! ([`WindowScore::ProbabilityDrop`]), the preserve game (noise everywhere but the window:
//! how well does the label survive?), the occlude game (occlusion sharpened by the attack), a
//! score in log-odds for models sure of their label, several generator seeds per window,
//! averaged, and each window's score shared among its pixels by their part in the attack's
//! first perturbation ([`WindowSpread::Attack`]), so that a map is finer than its windows.

use crate::engine::{run_keeping, AttackConfig, Goal, Job, Keep, Masking, Region};
use crate::error::{ensure, Result};
use crate::outcome::AttackOutcome;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use vulnmap_models::Classifier;
use vulnmap_saliency::WindowGrid;

/// What noise a window's attack adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalGame {
    /// Noise inside the window (the paper's): a window is salient when attacking it moves the
    /// label.
    Delete,
    /// Noise everywhere but the window: a window is salient when the label survives the attack
    /// on the rest of the image.
    Preserve,
    /// The window blurred as occlusion's baseline, noise added to it: a window is salient when
    /// occluding it and attacking what is left there moves the label (occlusion, sharpened by
    /// the attack). The `local_attack` step's default, its window scores spread by the attack:
    /// it makes the better map (docs/attack_maps.md).
    #[default]
    Occlude,
}

/// How a window's attack becomes the window's score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowScore {
    /// The paper's: `(cap - iterations) / cap` for a success, 0 for a failure (whole updates,
    /// so windows tie).
    #[default]
    Speed,
    /// The attacked label's probability over the updates, continuous: deleting, how far its
    /// mean falls below the clean image's (untargeted) or how high the target's mean rises
    /// (targeted); preserving, how much of it survives (untargeted) or how little the target
    /// gains (targeted). A stopped attack's last probability stands for its remaining updates.
    ProbabilityDrop,
    /// The same with the label's log-odds (`log(p / (1 - p))`, from the logits) instead of its
    /// probability: where the model is sure, every window leaves the probability at 1 and
    /// only the log-odds still rank them (occlusion ranks by logits for the same reason).
    LogOddsDrop,
}

/// How a window's score spreads over the window's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowSpread {
    /// Evenly (the paper's): each pixel gets the mean score of the windows covering it.
    #[default]
    Even,
    /// By the attack: each window's score is shared among its pixels by their share of what the
    /// attack's first perturbation took from the label's log-odds, the gradients at the clean
    /// and the perturbed image averaged ([`AttackOutcome::contribution`]), so a map is finer than
    /// its stride. The delete and occlude games only: the preserve game leaves the window as it
    /// is.
    Attack,
}

impl WindowSpread {
    /// Whether windows attacked in `game` can spread their scores this way: by the attack only
    /// where the attack changes the window, which the preserve game does not.
    pub fn fits(self, game: LocalGame) -> bool {
        !(self == WindowSpread::Attack && game == LocalGame::Preserve)
    }
}

/// The local attack's windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalAttack {
    /// Side of the square window, in pixels (default 100, the paper's w); at most the image's.
    pub window: usize,
    /// Pixels between neighbouring windows (default 50, the paper's s).
    pub stride: usize,
    /// Noise in the window or around it (default the paper's: in it).
    pub game: LocalGame,
    /// How a window's attack is scored (default the paper's speed).
    pub score: WindowScore,
    /// Generator seeds per window, `config.seed`, `config.seed + 1` ...; the window's score is
    /// their mean (default 1, the paper's).
    pub seeds: usize,
    /// How a window's score spreads over its pixels (default the paper's: evenly).
    pub spread: WindowSpread,
}

impl Default for LocalAttack {
    /// The paper's choice: w = 100, s = 50, noise in the window, speed, one seed.
    fn default() -> Self {
        Self {
            window: 100,
            stride: 50,
            game: LocalGame::Delete,
            score: WindowScore::Speed,
            seeds: 1,
            spread: WindowSpread::Even,
        }
    }
}

impl LocalAttack {
    /// Which variant made a map: `paper`, or the settings that differ from the paper's
    /// (`preserve` or `occlude`, `probability_drop`, `seeds=3`, `spread=attack`), joined by `+`.
    pub fn variant(&self) -> String {
        let mut parts = Vec::new();
        match self.game {
            LocalGame::Delete => {}
            LocalGame::Preserve => parts.push("preserve".to_string()),
            LocalGame::Occlude => parts.push("occlude".to_string()),
        }
        match self.score {
            WindowScore::Speed => {}
            WindowScore::ProbabilityDrop => parts.push("probability_drop".to_string()),
            WindowScore::LogOddsDrop => parts.push("log_odds_drop".to_string()),
        }
        if self.seeds != 1 {
            parts.push(format!("seeds={}", self.seeds));
        }
        if self.spread == WindowSpread::Attack {
            parts.push("spread=attack".to_string());
        }
        crate::variant_name(&parts)
    }

    /// Refuses settings no map can be made with.
    fn check(&self) -> Result<()> {
        ensure(self.seeds >= 1, || "seeds must be at least 1".into())?;
        ensure(self.spread.fits(self.game), || {
            "spread: attack needs the delete or occlude game: the preserve game leaves the window as it is".into()
        })
    }

    /// One window attack's score (higher: more salient).
    fn window_score(&self, outcome: &AttackOutcome, cap: usize) -> f64 {
        match (self.score, self.game) {
            (WindowScore::Speed, LocalGame::Delete | LocalGame::Occlude) => speed(outcome, cap),
            (WindowScore::Speed, LocalGame::Preserve) => 1.0 - speed(outcome, cap),
            (WindowScore::ProbabilityDrop, game) => {
                let mean = held_mean(&outcome.probabilities, cap);
                let targeted = outcome.target.is_some();
                match (game, targeted) {
                    (LocalGame::Delete | LocalGame::Occlude, false) => {
                        (-outcome.origin_loss).exp() - mean
                    }
                    (LocalGame::Delete | LocalGame::Occlude, true) => mean,
                    (LocalGame::Preserve, false) => mean,
                    (LocalGame::Preserve, true) => 1.0 - mean,
                }
            }
            (WindowScore::LogOddsDrop, game) => {
                // The gap to the clean image's log-odds of the same label, signed so that
                // higher is more salient.
                let moved = held_mean(&outcome.log_odds, cap) - outcome.origin_log_odds;
                let targeted = outcome.target.is_some();
                match (game, targeted) {
                    (LocalGame::Delete | LocalGame::Occlude, false)
                    | (LocalGame::Preserve, true) => -moved,
                    (LocalGame::Delete | LocalGame::Occlude, true)
                    | (LocalGame::Preserve, false) => moved,
                }
            }
        }
    }
}

/// The mean of `cap + 1` judged probabilities, the last one standing for any after the stop.
fn held_mean(probabilities: &[f64], cap: usize) -> f64 {
    let Some(&last) = probabilities.last() else {
        return 0.0;
    };
    let judged = probabilities.len().min(cap + 1);
    let held = (cap + 1 - judged) as f64 * last;
    (probabilities[..judged].iter().sum::<f64>() + held) / (cap + 1) as f64
}

/// A local-attack map and what it was made of.
#[derive(Debug, Clone)]
pub struct LocalMap {
    /// `H x W`: the mean over the windows covering each pixel of their score, or with
    /// [`WindowSpread::Attack`] of their score weighted by the pixel's contribution.
    pub map: Tensor,
    /// Top-left corners of the windows, row by row.
    pub windows: Vec<(usize, usize)>,
    /// Each window's attacks, in the order of `windows`, seed after seed: `windows x seeds`
    /// (without their noise and perturbed images).
    pub outcomes: Vec<AttackOutcome>,
    /// Per window: its score, the mean over seeds ([`speed`] for the paper's variant).
    pub scores: Vec<f64>,
    /// The standard deviation of the window scores: how much the map tells windows apart.
    pub contrast: f64,
    /// Which variant made the map ([`LocalAttack::variant`]).
    pub variant: String,
}

/// One window's speed: `(cap - iterations) / cap` for a success, 0 for a failure.
pub fn speed(outcome: &AttackOutcome, cap: usize) -> f64 {
    if outcome.success && cap > 0 {
        (cap - outcome.iterations.min(cap)) as f64 / cap as f64
    } else if outcome.success {
        1.0
    } else {
        0.0
    }
}

/// The local-attack map of image `image` of `pixels`, each window's attack wanting `goal`;
/// every window and seed is one job, banked `config.batch_size` at a time.
pub fn local_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    image: usize,
    goal: Goal,
    spec: &LocalAttack,
    config: &AttackConfig,
) -> Result<LocalMap> {
    let mut maps = local_attacks(model, pixels, &[image], &[goal], spec, config)?;
    Ok(maps.remove(0))
}

/// The local-attack maps of images `images` of `pixels`, one per image, the windows of image
/// `images[i]` wanting `goals[i]`: the windows and seeds of all of them are one list of jobs,
/// banked `config.batch_size` at a time, so small images with few windows still fill a bank.
pub fn local_attacks(
    model: &dyn Classifier,
    pixels: &Tensor,
    images: &[usize],
    goals: &[Goal],
    spec: &LocalAttack,
    config: &AttackConfig,
) -> Result<Vec<LocalMap>> {
    spec.check()?;
    ensure(goals.len() == images.len(), || {
        format!("{} goals for {} images", goals.len(), images.len())
    })?;
    let (h, w) = crate::engine::image_size(pixels)?;
    let grid = WindowGrid::new(spec.window, spec.stride);
    let windows = grid.positions((h, w))?;
    let jobs: Vec<Job> = images
        .iter()
        .zip(goals)
        .flat_map(|(&image, &goal)| {
            windows.iter().flat_map(move |&(top, left)| {
                (0..spec.seeds as u64).map(move |s| Job {
                    image,
                    goal,
                    region: match spec.game {
                        LocalGame::Delete => Region::Window {
                            top,
                            left,
                            size: spec.window,
                        },
                        LocalGame::Occlude => Region::Occluded {
                            top,
                            left,
                            size: spec.window,
                        },
                        LocalGame::Preserve => Region::Outside {
                            top,
                            left,
                            size: spec.window,
                        },
                    },
                    alpha: config.alpha,
                    seed: config.seed.wrapping_add(s),
                })
            })
        })
        .collect();
    // Window outcomes keep no images: a map is made of hundreds of windows.
    let keep = Keep {
        images: false,
        contributions: spec.spread == WindowSpread::Attack,
    };
    let mut outcomes = run_keeping(model, pixels, &jobs, &Masking::None, config, keep)?.into_iter();
    images
        .iter()
        .map(|_| {
            let mine: Vec<AttackOutcome> =
                outcomes.by_ref().take(windows.len() * spec.seeds).collect();
            local_map(spec, (h, w), mine, config.max_iters)
        })
        .collect()
}

/// The map of attacks already run on an `h x w` image: `outcomes` are `windows x spec.seeds` in
/// the order [`local_attack`] makes them, with `spec`'s window, stride, game and seeds, `cap`
/// their `max_iters`. Scoring the same attacks another way (another [`WindowScore`], or an even
/// spread) costs no model call; [`WindowSpread::Attack`] needs outcomes that kept their
/// contributions.
pub fn local_map(
    spec: &LocalAttack,
    (h, w): (usize, usize),
    outcomes: Vec<AttackOutcome>,
    cap: usize,
) -> Result<LocalMap> {
    spec.check()?;
    let grid = WindowGrid::new(spec.window, spec.stride);
    let windows = grid.positions((h, w))?;
    ensure(outcomes.len() == windows.len() * spec.seeds, || {
        format!(
            "{} attacks for {} windows x {} seeds",
            outcomes.len(),
            windows.len(),
            spec.seeds
        )
    })?;
    let scores: Vec<f64> = outcomes
        .chunks(spec.seeds)
        .map(|per_seed| {
            per_seed
                .iter()
                .map(|o| spec.window_score(o, cap))
                .sum::<f64>()
                / spec.seeds as f64
        })
        .collect();
    let coverage = grid.coverage((h, w))?;
    let mut total = vec![0f64; h * w];
    let size = spec.window;
    for (k, (&(top, left), &s)) in windows.iter().zip(&scores).enumerate() {
        let spread = match spec.spread {
            WindowSpread::Even => vec![s; size * size],
            WindowSpread::Attack => {
                attack_spread(s, &outcomes[k * spec.seeds..(k + 1) * spec.seeds], size)?
            }
        };
        for y in 0..size {
            for x in 0..size {
                total[(top + y) * w + left + x] += spread[y * size + x];
            }
        }
    }
    let map: Vec<f32> = total
        .iter()
        .zip(&coverage)
        .map(|(t, &c)| (*t / c as f64) as f32)
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let contrast =
        (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64).sqrt();
    Ok(LocalMap {
        map: Tensor::from_vec(map, (h, w), &Device::Cpu)?,
        windows,
        outcomes,
        scores,
        contrast,
        variant: spec.variant(),
    })
}

/// The part of a window's score its pixels earn by their share of the attack
/// ([`WindowSpread::Attack`]); the rest goes to every pixel of the window alike. Picked on the
/// benchmarks' images (docs/attack_maps.md, "Spread by the attack").
pub const ATTACK_SPREAD_SHARE: f64 = 0.8;

/// A window's `score` shared among its `size x size` pixels by its attacks' contributions (the
/// mean over seeds, then its positive part `r`): each pixel gets the score times
/// `1 - ATTACK_SPREAD_SHARE * (1 - r / max r)`, from 1 for the window's largest contribution down
/// to `1 - ATTACK_SPREAD_SHARE` for none. A window without a positive contribution keeps its
/// whole score on every pixel.
fn attack_spread(score: f64, attacks: &[AttackOutcome], size: usize) -> Result<Vec<f64>> {
    let mut shares = vec![0f64; size * size];
    for attack in attacks {
        let Some(c) = &attack.contribution else {
            return Err(crate::error::Error::InvalidParameter(
                "spreading a window's score by the attack needs the attack's contributions".into(),
            ));
        };
        let c = c
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        ensure(c.len() == shares.len(), || {
            format!(
                "a contribution of {} pixels for a {size}x{size} window",
                c.len()
            )
        })?;
        for (s, v) in shares.iter_mut().zip(c) {
            *s += v / attacks.len() as f64;
        }
    }
    let top = shares.iter().fold(0f64, |m, &v| m.max(v));
    if !(top > 0.0 && top.is_finite()) {
        return Ok(vec![score; shares.len()]);
    }
    Ok(shares
        .iter()
        .map(|&v| score * (1.0 - ATTACK_SPREAD_SHARE * (1.0 - v.max(0.0) / top)))
        .collect())
}

/// One (w, s) setting of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSetting {
    /// Side of the square window, in pixels.
    pub window: usize,
    /// Pixels between neighbouring windows.
    pub stride: usize,
    /// The map's contrast: the standard deviation of its window scores.
    pub contrast: f64,
    /// How many windows the grid has.
    pub windows: usize,
}

/// Local-attack maps for several (window, stride) settings and their contrast; the paper picks
/// the setting with "maximal difference between each region".
pub fn window_sweep(
    model: &dyn Classifier,
    pixels: &Tensor,
    image: usize,
    settings: &[(usize, usize)],
    goal: Goal,
    config: &AttackConfig,
) -> Result<Vec<(WindowSetting, LocalMap)>> {
    settings
        .iter()
        .map(|&(window, stride)| {
            let map = local_attack(
                model,
                pixels,
                image,
                goal,
                &LocalAttack {
                    window,
                    stride,
                    ..LocalAttack::default()
                },
                config,
            )?;
            Ok((
                WindowSetting {
                    window,
                    stride,
                    contrast: map.contrast,
                    windows: map.windows.len(),
                },
                map,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_contribution(values: &[f32]) -> AttackOutcome {
        AttackOutcome {
            alpha: 0.1,
            origin_loss: 0.0,
            final_loss: 0.0,
            label_from: 0,
            label_to: 0,
            target: None,
            iterations: 1,
            confidence: 1.0,
            probabilities: vec![1.0],
            origin_log_odds: 0.0,
            log_odds: vec![0.0],
            success: false,
            failure: None,
            noise: None,
            perturbed: None,
            mask: None,
            contribution: Some(Tensor::from_slice(values, (2, 2), &Device::Cpu).unwrap()),
        }
    }

    #[test]
    fn each_pixel_gets_the_score_weighted_by_its_contribution() {
        let rest = 1.0 - ATTACK_SPREAD_SHARE;
        // Seeds averaged: contributions 2, 1, 0 and -1 (a negative one counts as none).
        let seeds = [
            with_contribution(&[4.0, 2.0, 0.0, -2.0]),
            with_contribution(&[0.0, 0.0, 0.0, 0.0]),
        ];
        let spread = attack_spread(10.0, &seeds, 2).unwrap();
        let expected = [
            10.0,
            10.0 * (rest + ATTACK_SPREAD_SHARE / 2.0),
            10.0 * rest,
            10.0 * rest,
        ];
        for (got, want) in spread.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{spread:?} against {expected:?}");
        }
        // A negative score is weighted alike.
        let spread = attack_spread(-10.0, &seeds[..1], 2).unwrap();
        assert!(
            (spread[0] + 10.0).abs() < 1e-9 && (spread[2] + 10.0 * rest).abs() < 1e-9,
            "{spread:?}"
        );
        // Nothing contributed: the score on every pixel.
        assert_eq!(attack_spread(3.0, &seeds[1..], 2).unwrap(), vec![3.0; 4]);
        // Without contributions there is nothing to spread by.
        let bare = AttackOutcome {
            contribution: None,
            ..with_contribution(&[0.0; 4])
        };
        assert!(attack_spread(1.0, &[bare], 2).is_err());
    }
}
