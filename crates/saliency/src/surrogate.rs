//! Local linear surrogates on superpixels: LIME (Ribeiro et al., KDD 2016) and KernelSHAP
//! (Lundberg and Lee, NeurIPS 2017). The image is cut into superpixels (a `cells x cells` grid);
//! each sample switches some of them off (filled with the baseline), the model scores it, and a
//! weighted linear regression of the target's score on the on/off pattern gives each superpixel
//! its attribution (its coefficient, painted over its pixels).
//!
//! | | LIME | KernelSHAP |
//! |---|---|---|
//! | samples | all on first, then each superpixel on with probability 1/2 | all on and all off first, then k on, k drawn with probability proportional to (M-1) / (k (M-k)), the k at random |
//! | weight | `sqrt(exp(-d^2 / 0.25^2))`, d the cosine distance of the pattern to all on | 1; all on and all off 1e6 (the efficiency constraint) |
//! | regression | ridge, alpha 1, unpenalised intercept | least squares with intercept |
//! | matches | `lime_image.LimeImageExplainer` (lime 0.2) | Captum `KernelShap` |
//!
//! The score is the model's output for the target (a logit, or what `ScoredClassifier` chose),
//! where lime explains probabilities. Every image sees the same samples (drawn from the seed).

use crate::error::{ensure, Result};
use crate::occlusion::OcclusionBaseline;
use crate::target::check_inputs;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// Which surrogate: how patterns are drawn and weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SurrogateKind {
    /// LIME.
    Lime,
    /// KernelSHAP.
    KernelShap,
}

/// A local linear surrogate's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    /// LIME or KernelSHAP.
    pub kind: SurrogateKind,
    /// Superpixels per side of the grid (`cells^2` superpixels; default 8).
    pub cells: usize,
    /// Patterns scored per image, the fixed first ones included (default 1000).
    pub samples: usize,
    /// What fills a superpixel that is off.
    pub baseline: OcclusionBaseline,
    /// Ridge penalty of the regression (LIME: 1, KernelSHAP: 0).
    pub ridge: f64,
    /// Seed of the patterns.
    pub seed: u64,
    /// Patterns per forward pass.
    pub batch_size: usize,
}

impl Surrogate {
    /// lime_image's defaults on an 8 x 8 grid, superpixels off going black (Captum's baseline).
    pub fn lime() -> Self {
        Self {
            kind: SurrogateKind::Lime,
            cells: 8,
            samples: 1000,
            baseline: OcclusionBaseline::Value(0.0),
            ridge: 1.0,
            seed: 0,
            batch_size: 32,
        }
    }

    /// Captum's KernelShap on an 8 x 8 grid, superpixels off going black.
    pub fn kernel_shap() -> Self {
        Self {
            kind: SurrogateKind::KernelShap,
            ridge: 0.0,
            ..Self::lime()
        }
    }

    /// The method's name in file names and messages.
    pub fn name(&self) -> &'static str {
        match self.kind {
            SurrogateKind::Lime => "lime",
            SurrogateKind::KernelShap => "kernel-shap",
        }
    }

    /// The on/off patterns (`samples x cells^2`, 1 on) and their regression weights.
    fn patterns(&self) -> (Vec<Vec<f64>>, Vec<f64>) {
        let m = self.cells * self.cells;
        let mut rng = random::rng(self.seed, self.name());
        let mut patterns = vec![vec![1.0; m]];
        match self.kind {
            SurrogateKind::Lime => {
                while patterns.len() < self.samples {
                    patterns.push((0..m).map(|_| rng.random_range(0..2) as f64).collect());
                }
                let weights = patterns
                    .iter()
                    .map(|z| {
                        let on: f64 = z.iter().sum();
                        // Cosine distance to all on: 1 - on / sqrt(on * m).
                        let d = if on == 0.0 {
                            1.0
                        } else {
                            1.0 - on / (on * m as f64).sqrt()
                        };
                        (-(d * d) / (0.25 * 0.25)).exp().sqrt()
                    })
                    .collect();
                (patterns, weights)
            }
            SurrogateKind::KernelShap => {
                patterns.push(vec![0.0; m]);
                let sizes: Vec<f64> = (1..m)
                    .map(|k| (m - 1) as f64 / (k * (m - k)) as f64)
                    .collect();
                let total: f64 = sizes.iter().sum();
                let mut order: Vec<usize> = (0..m).collect();
                while patterns.len() < self.samples && m > 1 {
                    let mut u = rng.random::<f64>() * total;
                    let mut k = m - 1;
                    for (i, s) in sizes.iter().enumerate() {
                        if u < *s {
                            k = i + 1;
                            break;
                        }
                        u -= s;
                    }
                    order.shuffle(&mut rng);
                    let mut z = vec![0.0; m];
                    for &j in &order[..k] {
                        z[j] = 1.0;
                    }
                    patterns.push(z);
                }
                let weights = patterns
                    .iter()
                    .map(|z| {
                        let on = z.iter().sum::<f64>() as usize;
                        if on == 0 || on == m {
                            1e6
                        } else {
                            1.0
                        }
                    })
                    .collect();
                (patterns, weights)
            }
        }
    }

    /// Attributions `N x 1 x H x W`: each superpixel's regression coefficient over its pixels.
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        let (n, _, h, w) = pixels.dims4()?;
        ensure(self.cells >= 1 && self.cells <= h.min(w), || {
            format!(
                "{} needs between 1 and {} superpixels per side, got {}",
                self.name(),
                h.min(w),
                self.cells
            )
        })?;
        let m = self.cells * self.cells;
        ensure(self.samples > m + 1, || {
            format!(
                "{} needs more samples than superpixels plus one ({}), got {}",
                self.name(),
                m + 1,
                self.samples
            )
        })?;
        ensure(self.ridge >= 0.0 && self.ridge.is_finite(), || {
            format!("the ridge penalty must be zero or more, got {}", self.ridge)
        })?;
        let device = pixels.device();
        let dtype = pixels.dtype();
        // Superpixel of each pixel, and the superpixels as masks (M x HW).
        let cell_of = |y: usize, x: usize| (y * self.cells / h) * self.cells + x * self.cells / w;
        let mut segments = vec![0f32; m * h * w];
        for y in 0..h {
            for x in 0..w {
                segments[cell_of(y, x) * h * w + y * w + x] = 1.0;
            }
        }
        let segments = Tensor::from_vec(segments, (m, h * w), device)?.to_dtype(dtype)?;
        let fill = self.baseline.fill(pixels)?;
        let (patterns, weights) = self.patterns();
        let mut maps = Vec::with_capacity(n);
        for (i, &t) in targets.iter().enumerate() {
            let x = pixels.narrow(0, i, 1)?;
            let x_fill = fill.narrow(0, i, 1)?;
            let mut scores = Vec::with_capacity(patterns.len());
            for chunk in patterns.chunks(self.batch_size) {
                let z: Vec<f32> = chunk.iter().flatten().map(|&v| v as f32).collect();
                let z = Tensor::from_vec(z, (chunk.len(), m), device)?.to_dtype(dtype)?;
                let on = z.matmul(&segments)?.reshape((chunk.len(), 1, h, w))?;
                // x where on, the baseline where off.
                let images = x
                    .broadcast_mul(&on)?
                    .broadcast_add(&x_fill.broadcast_mul(&on.affine(-1.0, 1.0)?)?)?;
                let s = model.forward(&images)?.narrow(1, t, 1)?.squeeze(1)?;
                scores.extend(s.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            }
            let coefficients = weighted_ridge(&patterns, &scores, &weights, self.ridge)?;
            let c: Vec<f32> = coefficients.iter().map(|&v| v as f32).collect();
            let c = Tensor::from_vec(c, (1, m), device)?.to_dtype(dtype)?;
            maps.push(c.matmul(&segments)?.reshape((1, h, w))?);
        }
        Ok(Tensor::stack(&maps, 0)?)
    }
}

/// The coefficients of `y ~ b + X beta` by weighted least squares with a ridge penalty on beta
/// only (the intercept is free), as scikit-learn's `Ridge(alpha).fit(X, y, sample_weight)`: the
/// columns centred on their weighted means, then `(Xc' W Xc + alpha I) beta = Xc' W yc`.
fn weighted_ridge(x: &[Vec<f64>], y: &[f64], weights: &[f64], alpha: f64) -> Result<Vec<f64>> {
    let m = x.first().map_or(0, Vec::len);
    let total: f64 = weights.iter().sum();
    let mean_x: Vec<f64> = (0..m)
        .map(|j| x.iter().zip(weights).map(|(r, w)| r[j] * w).sum::<f64>() / total)
        .collect();
    let mean_y = y.iter().zip(weights).map(|(v, w)| v * w).sum::<f64>() / total;
    let mut a = vec![vec![0.0; m + 1]; m]; // [A | b]
    for ((row, &v), &wt) in x.iter().zip(y).zip(weights) {
        let xc: Vec<f64> = row.iter().zip(&mean_x).map(|(r, mu)| r - mu).collect();
        for j in 0..m {
            for k in 0..m {
                a[j][k] += wt * xc[j] * xc[k];
            }
            a[j][m] += wt * xc[j] * (v - mean_y);
        }
    }
    for (j, row) in a.iter_mut().enumerate() {
        row[j] += alpha;
    }
    // Gaussian elimination with partial pivoting.
    let scale = a
        .iter()
        .map(|r| r[..m].iter().fold(0f64, |s, v| s.max(v.abs())))
        .fold(0f64, f64::max);
    for col in 0..m {
        let pivot = (col..m)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        ensure(a[pivot][col].abs() > 1e-12 * scale.max(1e-300), || {
            "the samples do not determine every superpixel's coefficient (too few samples, or \
             a superpixel always on or always off)"
                .into()
        })?;
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            if r != col && f != 0.0 {
                for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    Ok((0..m).map(|j| a[j][m] / a[j][j]).collect())
}

#[cfg(test)]
mod tests {
    use super::weighted_ridge;

    #[test]
    fn ridge_matches_a_hand_solved_fit() {
        // y = 1 + 2 a - 3 b exactly: least squares recovers (2, -3) whatever the weights.
        let x = vec![
            vec![0.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 1.0],
            vec![1.0, 1.0],
        ];
        let y: Vec<f64> = x.iter().map(|r| 1.0 + 2.0 * r[0] - 3.0 * r[1]).collect();
        let beta = weighted_ridge(&x, &y, &[1.0, 2.0, 0.5, 1.0, 3.0], 0.0).unwrap();
        assert!((beta[0] - 2.0).abs() < 1e-12 && (beta[1] + 3.0).abs() < 1e-12);
        // One feature, unit weights, x = (0, 1), y = (0, 1): centred, (1/2 + alpha) beta = 1/2.
        let beta = weighted_ridge(&[vec![0.0], vec![1.0]], &[0.0, 1.0], &[1.0, 1.0], 1.0).unwrap();
        assert!((beta[0] - 1.0 / 3.0).abs() < 1e-12);
        assert!(weighted_ridge(&[vec![1.0], vec![1.0]], &[0.0, 1.0], &[1.0, 1.0], 0.0).is_err());
    }
}
