//! The local attack (paper, III-C-1, Figs. 7-8): noise confined to a `w x w` window slid with
//! stride `s`, a fresh generator per window from the same seed; how fast each window flips the
//! label is a saliency map. A (w, s) sweep reports each map's contrast, the criterion by which
//! the paper chose w = 100, s = 50.

use crate::engine::{run, AttackConfig, Goal, Job, Masking, Region};
use crate::error::Result;
use crate::outcome::AttackOutcome;
use candle_core::{Device, Tensor};
use serde::Serialize;
use vulnmap_models::Classifier;
use vulnmap_saliency::WindowGrid;

/// The local attack's windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalAttack {
    /// Side of the square window, in pixels (default 100, the paper's w); at most the image's.
    pub window: usize,
    /// Pixels between neighbouring windows (default 50, the paper's s).
    pub stride: usize,
    /// What each window's attack wants (default untargeted).
    pub goal: Goal,
}

impl Default for LocalAttack {
    /// The paper's choice: w = 100, s = 50, untargeted.
    fn default() -> Self {
        Self {
            window: 100,
            stride: 50,
            goal: Goal::Untargeted,
        }
    }
}

/// A local-attack map and what it was made of.
#[derive(Debug, Clone)]
pub struct LocalMap {
    /// `H x W`: the mean attack speed of the windows covering each pixel, in [0, 1].
    pub map: Tensor,
    /// Top-left corners of the windows, row by row.
    pub windows: Vec<(usize, usize)>,
    /// Each window's attack, in the order of `windows`.
    pub outcomes: Vec<AttackOutcome>,
    /// Per window: `(cap - iterations) / cap` if it succeeded, 0 if not.
    pub speeds: Vec<f64>,
    /// The standard deviation of the window speeds: how much the map tells windows apart.
    pub contrast: f64,
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

/// The local-attack map of image `image` of `pixels`.
pub fn local_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    image: usize,
    spec: &LocalAttack,
    config: &AttackConfig,
) -> Result<LocalMap> {
    let (h, w) = crate::engine::image_size(pixels)?;
    let grid = WindowGrid::new(spec.window, spec.stride);
    let windows = grid.positions((h, w))?;
    let jobs: Vec<Job> = windows
        .iter()
        .map(|&(top, left)| Job {
            image,
            goal: spec.goal,
            region: Region::Window {
                top,
                left,
                size: spec.window,
            },
            alpha: config.alpha,
            seed: config.seed,
        })
        .collect();
    let outcomes = run(model, pixels, &jobs, &Masking::None, config)?;
    let speeds: Vec<f64> = outcomes
        .iter()
        .map(|o| speed(o, config.max_iters))
        .collect();
    let coverage = grid.coverage((h, w))?;
    let mut total = vec![0f64; h * w];
    for (&(top, left), &s) in windows.iter().zip(&speeds) {
        for y in top..top + spec.window {
            for x in left..left + spec.window {
                total[y * w + x] += s;
            }
        }
    }
    let map: Vec<f32> = total
        .iter()
        .zip(&coverage)
        .map(|(t, &c)| (*t / c as f64) as f32)
        .collect();
    let mean = speeds.iter().sum::<f64>() / speeds.len() as f64;
    let contrast =
        (speeds.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / speeds.len() as f64).sqrt();
    Ok(LocalMap {
        map: Tensor::from_vec(map, (h, w), &Device::Cpu)?,
        windows,
        outcomes,
        speeds,
        contrast,
    })
}

/// One (w, s) setting of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSetting {
    /// Side of the square window, in pixels.
    pub window: usize,
    /// Pixels between neighbouring windows.
    pub stride: usize,
    /// The map's contrast: the standard deviation of its window speeds.
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
                &LocalAttack {
                    window,
                    stride,
                    goal,
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
