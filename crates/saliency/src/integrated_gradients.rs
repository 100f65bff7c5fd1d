//! Integrated Gradients (Sundararajan et al., 2017): gradients along the straight path from a
//! baseline to the image, times the difference; the attributions add up to
//! `f(x) - f(baseline)` (completeness).

use crate::blur::gaussian_blur;
use crate::error::{ensure, Result};
use crate::gradient::batch_gradient;
use crate::target::check_inputs;
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// Where the path starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Baseline {
    /// All zeros (a black image).
    Black,
    /// The image blurred by a Gaussian of this many pixels.
    Blurred {
        /// The Gaussian's standard deviation, in pixels (positive).
        sigma: f64,
    },
}

/// How the path integral is approximated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Integration {
    /// Midpoints of equal steps.
    RiemannMiddle,
    /// Trapezoids over equal steps, ends included.
    RiemannTrapezoid,
    /// Gauss-Legendre nodes and weights (Captum's default).
    #[default]
    GaussLegendre,
}

/// The baselines a setting can name (`baseline: blurred` with its `sigma`): Integrated
/// Gradients' path start and occlusion's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BaselineKind {
    /// Zeros.
    Black,
    /// 0.5 everywhere (occlusion only).
    Grey,
    /// The image blurred by a Gaussian of `sigma` pixels.
    #[default]
    Blurred,
}

impl BaselineKind {
    /// Integrated Gradients' baseline of this kind, or `None` for one it cannot start from.
    pub fn path_start(self, sigma: f64) -> Option<Baseline> {
        match self {
            BaselineKind::Black => Some(Baseline::Black),
            BaselineKind::Grey => None,
            BaselineKind::Blurred => Some(Baseline::Blurred { sigma }),
        }
    }

    /// Occlusion's fill of this kind.
    pub fn fill(self, sigma: f64) -> crate::OcclusionBaseline {
        match self {
            BaselineKind::Black => crate::OcclusionBaseline::Value(0.0),
            BaselineKind::Grey => crate::OcclusionBaseline::Value(0.5),
            BaselineKind::Blurred => crate::OcclusionBaseline::Blurred { sigma },
        }
    }
}

/// Integrated Gradients' settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntegratedGradients {
    /// Path points per image, one gradient each (at least 1; default 50).
    pub steps: usize,
    /// Where the path starts (default black).
    pub baseline: Baseline,
    /// How the path integral is approximated (default Gauss-Legendre).
    pub integration: Integration,
    /// Path points per backward pass.
    pub batch_size: usize,
}

impl Default for IntegratedGradients {
    /// Captum's defaults: 50 steps, Gauss-Legendre, black baseline.
    fn default() -> Self {
        Self {
            steps: 50,
            baseline: Baseline::Black,
            integration: Integration::GaussLegendre,
            batch_size: 16,
        }
    }
}

impl IntegratedGradients {
    /// Path positions in [0, 1] and their weights (summing to 1).
    pub fn nodes(&self) -> Result<Vec<(f64, f64)>> {
        let m = self.steps;
        ensure(m > 0, || {
            "Integrated Gradients needs at least one step (steps = 0)".into()
        })?;
        Ok(match self.integration {
            Integration::RiemannMiddle => (0..m)
                .map(|k| ((k as f64 + 0.5) / m as f64, 1.0 / m as f64))
                .collect(),
            Integration::RiemannTrapezoid => {
                if m == 1 {
                    vec![(1.0, 1.0)]
                } else {
                    let h = 1.0 / (m - 1) as f64;
                    (0..m)
                        .map(|k| (k as f64 * h, if k == 0 || k == m - 1 { h / 2.0 } else { h }))
                        .collect()
                }
            }
            Integration::GaussLegendre => gauss_legendre(m)
                .into_iter()
                .map(|(x, w)| ((x + 1.0) / 2.0, w / 2.0))
                .collect(),
        })
    }

    /// The baseline of each image.
    pub fn baseline_of(&self, pixels: &Tensor) -> Result<Tensor> {
        match self.baseline {
            Baseline::Black => Ok(pixels.zeros_like()?),
            Baseline::Blurred { sigma } => gaussian_blur(pixels, sigma),
        }
    }

    /// Attributions `N x C x H x W` (signed; they sum to about `f(x) - f(baseline)`).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        let nodes = self.nodes()?;
        let baselines = self.baseline_of(pixels)?;
        let n = pixels.dim(0)?;
        let mut out = Vec::with_capacity(n);
        for (i, &target) in targets.iter().enumerate().take(n) {
            let (x, x0) = (pixels.get(i)?, baselines.get(i)?);
            let delta = (&x - &x0)?;
            let mut total: Option<Tensor> = None;
            for chunk in nodes.chunks(self.batch_size) {
                let points = chunk
                    .iter()
                    .map(|&(alpha, _)| &x0 + (&delta * alpha)?)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let batch = Tensor::stack(&points, 0)?;
                drop(points);
                let grads = batch_gradient(model, batch, &vec![target as u32; chunk.len()])?;
                let weights: Vec<f32> = chunk.iter().map(|&(_, w)| w as f32).collect();
                let weights = Tensor::from_vec(weights, (chunk.len(), 1, 1, 1), pixels.device())?
                    .to_dtype(grads.dtype())?;
                let part = grads.broadcast_mul(&weights)?.sum(0)?;
                total = Some(match total {
                    Some(t) => (t + part)?,
                    None => part,
                });
            }
            out.push((delta * total.expect("at least one node"))?);
        }
        Ok(Tensor::stack(&out, 0)?)
    }
}

/// Nodes and weights of `n`-point Gauss-Legendre quadrature on [-1, 1].
fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Chebyshev guess, then Newton on P_n.
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut derivative = 0.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            let pn = if n == 1 { x } else { p1 };
            let pn_1 = if n == 1 { 1.0 } else { p0 };
            derivative = n as f64 * (x * pn - pn_1) / (x * x - 1.0);
            let dx = pn / derivative;
            x -= dx;
            if dx.abs() < 1e-15 {
                break;
            }
        }
        out.push((x, 2.0 / ((1.0 - x * x) * derivative * derivative)));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadratures_integrate_polynomials() {
        for integration in [
            Integration::GaussLegendre,
            Integration::RiemannMiddle,
            Integration::RiemannTrapezoid,
        ] {
            let ig = IntegratedGradients {
                steps: 64,
                integration,
                ..Default::default()
            };
            let nodes = ig.nodes().unwrap();
            let sum_w: f64 = nodes.iter().map(|n| n.1).sum();
            assert!((sum_w - 1.0).abs() < 1e-12);
            // int_0^1 3 a^2 = 1
            let integral: f64 = nodes.iter().map(|&(a, w)| 3.0 * a * a * w).sum();
            assert!((integral - 1.0).abs() < 1e-3, "{integration:?}: {integral}");
        }
        // Gauss-Legendre with 5 nodes is exact for degree 9.
        let ig = IntegratedGradients {
            steps: 5,
            ..Default::default()
        };
        let integral: f64 = ig
            .nodes()
            .unwrap()
            .iter()
            .map(|&(a, w)| 10.0 * a.powi(9) * w)
            .sum();
        assert!((integral - 1.0).abs() < 1e-12, "{integral}");
    }
}
