//! ROAD, Remove And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
//! Attribution Methods", ICML 2022): remove a fraction of the pixels, most relevant first (MoRF)
//! or least relevant first (LeRF), fill them by noisy linear imputation so that the filled
//! shape itself tells the model nothing, and watch the target's probability.
//!
//! | | ROAD |
//! |---|---|
//! | order | map value, highest first (MoRF) or lowest first (LeRF); ties in row-major order |
//! | fractions | 10%, 20%, ..., 90% of the pixels, each from the original image |
//! | imputation | each removed pixel the weighted mean of its 8 neighbours (1/6 sideways, 1/12 diagonal, those inside the image), solved jointly, plus Gaussian noise of 0.01 |
//! | score | softmax probability of the target; also whether it is still the top class (Quantus' `ROAD`) |
//! | summary | the mean score over the fractions: MoRF low and LeRF high for a faithful map |
//! | matches | the authors' `NoisyLinearImputer`; Quantus `ROAD` |

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// Which pixels go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Most relevant first: a faithful map's curve falls fast.
    MoRF,
    /// Least relevant first: a faithful map's curve stays high.
    LeRF,
}

/// ROAD's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Road {
    /// Fractions of the pixels removed (default 0.1, 0.2, ..., 0.9).
    pub fractions: Vec<f64>,
    /// Standard deviation of the noise added to imputed pixels, in pixel units (default 0.01).
    pub noise: f64,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for Road {
    fn default() -> Self {
        Self {
            fractions: (1..10).map(|k| k as f64 / 10.0).collect(),
            noise: 0.01,
            seed: 0,
        }
    }
}

/// One image's ROAD curve.
#[derive(Debug, Clone, PartialEq)]
pub struct RoadCurve {
    /// The target's probability after each fraction is removed.
    pub scores: Vec<f64>,
    /// Whether the target is still the top class after each fraction is removed.
    pub kept: Vec<bool>,
    /// The mean of `scores`.
    pub mean: f64,
}

/// The 8 neighbours and their weights.
const NEIGHBOURS: [(isize, isize, f64); 8] = [
    (-1, -1, 1.0 / 12.0),
    (-1, 0, 1.0 / 6.0),
    (-1, 1, 1.0 / 12.0),
    (0, -1, 1.0 / 6.0),
    (0, 1, 1.0 / 6.0),
    (1, -1, 1.0 / 12.0),
    (1, 0, 1.0 / 6.0),
    (1, 1, 1.0 / 12.0),
];

/// Fills the pixels of `image` (`C x H x W`, row-major values) where `removed` is true by
/// linear imputation: each removed pixel equals the weighted mean of its neighbours, all such
/// equations solved together (conjugate gradients; the system is symmetric positive definite
/// while some pixel is kept). No noise.
pub fn linear_imputation(
    values: &[f64],
    (c, h, w): (usize, usize, usize),
    removed: &[bool],
) -> Result<Vec<f64>> {
    ensure(values.len() == c * h * w && removed.len() == h * w, || {
        "an image and a removal mask of different sizes".into()
    })?;
    ensure(removed.iter().any(|r| !r), || {
        "linear imputation needs at least one kept pixel".into()
    })?;
    let unknown: Vec<usize> = (0..h * w).filter(|&p| removed[p]).collect();
    let mut var = vec![usize::MAX; h * w];
    for (k, &p) in unknown.iter().enumerate() {
        var[p] = k;
    }
    // The system once for all channels, in rows: for each unknown its diagonal (the weights of
    // its neighbours inside the image), its removed neighbours as (unknown, weight) and its kept
    // ones as (pixel, weight), the latter two flat with row offsets.
    let mut diagonal = vec![0.0; unknown.len()];
    let (mut coupled, mut coupled_rows) = (Vec::new(), vec![0]);
    let (mut kept, mut kept_rows) = (Vec::new(), vec![0]);
    for (k, &p) in unknown.iter().enumerate() {
        let (y, x) = ((p / w) as isize, (p % w) as isize);
        for (dy, dx, wt) in NEIGHBOURS {
            let (ny, nx) = (y + dy, x + dx);
            if ny >= 0 && nx >= 0 && (ny as usize) < h && (nx as usize) < w {
                let q = ny as usize * w + nx as usize;
                diagonal[k] += wt;
                if removed[q] {
                    coupled.push((var[q], wt));
                } else {
                    kept.push((q, wt));
                }
            }
        }
        coupled_rows.push(coupled.len());
        kept_rows.push(kept.len());
    }
    let apply = |v: &[f64], out: &mut [f64]| {
        for (k, o) in out.iter_mut().enumerate() {
            let links = &coupled[coupled_rows[k]..coupled_rows[k + 1]];
            *o = diagonal[k] * v[k] - links.iter().map(|&(j, wt)| wt * v[j]).sum::<f64>();
        }
    };
    let mut out = values.to_vec();
    for ch in 0..c {
        let plane = &values[ch * h * w..(ch + 1) * h * w];
        let b: Vec<f64> = (0..unknown.len())
            .map(|k| {
                kept[kept_rows[k]..kept_rows[k + 1]]
                    .iter()
                    .map(|&(q, wt)| wt * plane[q])
                    .sum()
            })
            .collect();
        let solution = conjugate_gradients(&apply, &b)?;
        for (k, &p) in unknown.iter().enumerate() {
            out[ch * h * w + p] = solution[k];
        }
    }
    Ok(out)
}

/// Solves `A x = b` for the symmetric positive definite `A` given as its product (written into
/// the second argument).
fn conjugate_gradients(apply: &dyn Fn(&[f64], &mut [f64]), b: &[f64]) -> Result<Vec<f64>> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = vec![0.0; b.len()];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut ap = vec![0.0; b.len()];
    let mut rr = dot(&r, &r);
    let target = 1e-20 * dot(b, b).max(1e-300);
    for _ in 0..10 * b.len().max(10) {
        if rr <= target {
            return Ok(x);
        }
        apply(&p, &mut ap);
        let alpha = rr / dot(&p, &ap);
        for i in 0..x.len() {
            x[i] += alpha * p[i];
            r[i] -= alpha * ap[i];
        }
        let next = dot(&r, &r);
        let beta = next / rr;
        rr = next;
        for i in 0..p.len() {
            p[i] = r[i] + beta * p[i];
        }
    }
    ensure(rr <= 1e-12 * dot(b, b).max(1e-300), || {
        "linear imputation did not converge".into()
    })?;
    Ok(x)
}

impl Road {
    /// The ROAD curve of `map` (`H x W`) for `image` (`C x H x W`) and class `target`.
    pub fn curve(
        &self,
        model: &dyn Classifier,
        image: &Tensor,
        map: &Tensor,
        target: usize,
        order: Order,
    ) -> Result<RoadCurve> {
        ensure(!self.fractions.is_empty(), || {
            "no fractions to remove".into()
        })?;
        ensure(
            self.fractions.iter().all(|f| (0.0..1.0).contains(f)),
            || format!("fractions must be in [0, 1), got {:?}", self.fractions),
        )?;
        ensure(self.noise >= 0.0 && self.noise.is_finite(), || {
            format!(
                "the imputation noise must be zero or more, got {}",
                self.noise
            )
        })?;
        let (c, h, w) = image.dims3()?;
        ensure(map.dims() == [h, w], || {
            format!("map of shape {:?} for a {h}x{w} image", map.dims())
        })?;
        ensure(target < model.num_classes(), || {
            format!(
                "target class {target} is out of range for {} classes",
                model.num_classes()
            )
        })?;
        let values = map.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut ranking: Vec<usize> = (0..h * w).collect();
        ranking.sort_by(|&a, &b| {
            let by_value = match order {
                Order::MoRF => values[b].total_cmp(&values[a]),
                Order::LeRF => values[a].total_cmp(&values[b]),
            };
            by_value.then(a.cmp(&b))
        });
        let pixels = image
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        // The fractions' imputations are independent: solved in parallel.
        let images = self
            .fractions
            .par_iter()
            .enumerate()
            .map(|(k, &fraction)| {
                let count = (fraction * (h * w) as f64).round() as usize;
                let mut removed = vec![false; h * w];
                for &p in &ranking[..count] {
                    removed[p] = true;
                }
                let mut filled = linear_imputation(&pixels, (c, h, w), &removed)?;
                let mut rng = random::rng(self.seed, &format!("road {k}"));
                let noise = random::normal_vec(&mut rng, c * h * w, 0.0, self.noise);
                for ch in 0..c {
                    for p in 0..h * w {
                        if removed[p] {
                            filled[ch * h * w + p] += noise[ch * h * w + p] as f64;
                        }
                    }
                }
                let filled: Vec<f32> = filled.into_iter().map(|v| v as f32).collect();
                Ok(Tensor::from_vec(filled, (c, h, w), image.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = Tensor::stack(&images, 0)?.to_dtype(image.dtype())?;
        let probs = candle_nn::ops::softmax(&model.logits(&batch)?, 1)?.to_dtype(DType::F64)?;
        let scores = probs
            .narrow(1, target, 1)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let top = probs.argmax(1)?.to_vec1::<u32>()?;
        Ok(RoadCurve {
            mean: scores.iter().sum::<f64>() / scores.len() as f64,
            kept: top.iter().map(|&t| t as usize == target).collect(),
            scores,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::linear_imputation;

    #[test]
    fn a_linear_ramp_is_imputed_exactly() {
        // A plane a + b y + c x satisfies the symmetric weighted-mean equations at every pixel
        // with all 8 neighbours, so imputing removed pixels off the border (here a block and a
        // scatter) gives it back.
        let (h, w) = (9, 11);
        let plane: Vec<f64> = (0..h * w)
            .map(|p| 0.2 + 0.03 * (p / w) as f64 - 0.01 * (p % w) as f64)
            .collect();
        let mut removed = vec![false; h * w];
        for y in 2..6 {
            for x in 3..9 {
                removed[y * w + x] = true;
            }
        }
        for p in (0..h * w).step_by(7) {
            let (y, x) = (p / w, p % w);
            removed[p] |= y > 0 && x > 0 && y + 1 < h && x + 1 < w;
        }
        let filled = linear_imputation(&plane, (1, h, w), &removed).unwrap();
        for (p, (a, b)) in filled.iter().zip(&plane).enumerate() {
            assert!((a - b).abs() < 1e-9, "pixel {p}: {a} vs {b}");
        }
        assert!(linear_imputation(&plane, (1, h, w), &vec![true; h * w]).is_err());
    }

    #[test]
    fn one_removed_pixel_is_its_neighbours_weighted_mean() {
        let values: Vec<f64> = (0..9).map(|v| (v * v) as f64).collect();
        let mut removed = vec![false; 9];
        removed[4] = true;
        let filled = linear_imputation(&values, (1, 3, 3), &removed).unwrap();
        let want = (values[1] + values[3] + values[5] + values[7]) / 6.0
            + (values[0] + values[2] + values[6] + values[8]) / 12.0;
        assert!((filled[4] - want).abs() < 1e-12);
    }
}
