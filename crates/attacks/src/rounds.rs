//! Rounds and the alpha sweep (paper, III-B and Fig. 6): an attack repeated over seeds (the paper
//! averages 100 rounds), summarised; and the same against alpha.

use crate::engine::{run, AttackConfig, Goal, Job, Masking, Region};
use crate::error::{ensure, Result};
use crate::outcome::AttackOutcome;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use vulnmap_models::Classifier;

/// Iterations to success over rounds (of the successful rounds), and the success rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Rounds run (one seed each).
    pub rounds: usize,
    /// Rounds that met the goal.
    pub successes: usize,
    /// `successes / rounds`, in [0, 1].
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub success_rate: f64,
    /// Mean iterations to success over the successful rounds (NaN when none succeeded).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub mean_iterations: f64,
    /// Median iterations to success over the successful rounds (NaN when none succeeded).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub median_iterations: f64,
    /// Standard deviation.
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub std_iterations: f64,
    /// Fewest iterations to success (0 when none succeeded).
    pub min_iterations: usize,
    /// Most iterations to success (0 when none succeeded).
    pub max_iterations: usize,
}

impl RoundStats {
    /// Summarises outcomes (NaN statistics when no round succeeded).
    pub fn of(outcomes: &[AttackOutcome]) -> Self {
        let mut its: Vec<usize> = outcomes
            .iter()
            .filter(|o| o.success)
            .map(|o| o.iterations)
            .collect();
        its.sort_unstable();
        let n = its.len();
        let mean = its.iter().sum::<usize>() as f64 / n as f64;
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => its[n / 2] as f64,
            _ => (its[n / 2 - 1] + its[n / 2]) as f64 / 2.0,
        };
        let var = its.iter().map(|&i| (i as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        Self {
            rounds: outcomes.len(),
            successes: n,
            success_rate: n as f64 / outcomes.len().max(1) as f64,
            mean_iterations: mean,
            median_iterations: median,
            std_iterations: var.sqrt(),
            min_iterations: its.first().copied().unwrap_or(0),
            max_iterations: its.last().copied().unwrap_or(0),
        }
    }
}

/// The attack of image `image` repeated over `rounds` seeds (`config.seed`, `config.seed + 1`,
/// ...), all rounds in banks of `config.batch_size`.
pub fn rounds(
    model: &dyn Classifier,
    pixels: &Tensor,
    image: usize,
    goal: Goal,
    rounds: usize,
    config: &AttackConfig,
) -> Result<(Vec<AttackOutcome>, RoundStats)> {
    ensure(rounds > 0, || {
        "at least one round is needed (rounds = 0)".into()
    })?;
    let jobs: Vec<Job> = (0..rounds as u64)
        .map(|r| Job {
            image,
            goal,
            region: Region::Whole,
            alpha: config.alpha,
            seed: config.seed.wrapping_add(r),
        })
        .collect();
    let outcomes = run(model, pixels, &jobs, &Masking::None, config)?;
    let stats = RoundStats::of(&outcomes);
    Ok((outcomes, stats))
}

/// One point of the alpha sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Noise strength in pixel units.
    pub alpha: f64,
    /// The rounds at this alpha, summarised.
    pub stats: RoundStats,
}

/// Iterations and success against alpha (Fig. 6): `rounds` seeds per alpha, every (alpha, seed)
/// attack in one set of banks.
pub fn alpha_sweep(
    model: &dyn Classifier,
    pixels: &Tensor,
    image: usize,
    goal: Goal,
    alphas: &[f64],
    rounds: usize,
    config: &AttackConfig,
) -> Result<Vec<SweepPoint>> {
    ensure(rounds > 0 && !alphas.is_empty(), || {
        "an alpha sweep needs alphas and at least one round".into()
    })?;
    let jobs: Vec<Job> = alphas
        .iter()
        .flat_map(|&alpha| {
            (0..rounds as u64).map(move |r| Job {
                image,
                goal,
                region: Region::Whole,
                alpha,
                seed: config.seed.wrapping_add(r),
            })
        })
        .collect();
    let outcomes = run(model, pixels, &jobs, &Masking::None, config)?;
    Ok(alphas
        .iter()
        .zip(outcomes.chunks(rounds))
        .map(|(&alpha, chunk)| SweepPoint {
            alpha,
            stats: RoundStats::of(chunk),
        })
        .collect())
}
