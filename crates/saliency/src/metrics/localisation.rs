//! Saliency maps against a known region (a lesion mask, an object box): the pointing game
//! (TorchRay: a hit if the map's maximum lies within 15 pixels of the region), AUROC of the map
//! as a pixel classifier, and IoU of the thresholded map.
//!
//! TorchRay's benchmark smooths gradient-type maps with a Gaussian of 2% of the image size
//! before taking the maximum (`smooth=0.02`), Grad-CAM's not: a single pixel of a raw gradient
//! is a noisy place to point from. [`PointingGame`] does the same. Its hit is TorchRay's: a
//! region pixel strictly closer than the tolerance (`(du^2 + dv^2) < tolerance^2`).
//!
//! The difficult subset is Excitation Backprop's (Zhang et al. 2016, which TorchRay ships as
//! flag files for VOC and COCO): images whose region covers less than a quarter of the image
//! *and* that show a distractor of another class. A lesion mask carries no other class, so
//! [`PointingGame::is_difficult`] applies the area rule alone.

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};

fn flat(map: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (h, w) = map.dims2()?;
    Ok((
        h,
        w,
        map.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
    ))
}

fn check(len: usize, mask: &[bool]) -> Result<()> {
    ensure(mask.len() == len, || {
        format!("mask of {} pixels for a map of {len}", mask.len())
    })?;
    ensure(mask.iter().any(|&m| m), || {
        "the ground-truth mask is empty".to_string()
    })
}

/// The pointing game's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointingGame {
    /// A hit is within this many pixels of the region (TorchRay: 15).
    pub tolerance: f64,
    /// Gaussian smoothing of the map before the maximum is taken, as a fraction of its larger
    /// side (TorchRay: 0.02 for gradient, deconvnet and guided backprop; 0 for the rest).
    pub smooth: f64,
}

impl PointingGame {
    /// TorchRay's protocol for gradient-type maps: tolerance 15 px, smoothing 2%.
    pub fn torchray() -> Self {
        Self {
            tolerance: 15.0,
            smooth: 0.02,
        }
    }

    /// The largest fraction of the image a region may cover in the difficult subset (1/4).
    pub const DIFFICULT_AREA: f64 = 0.25;

    /// Whether an image whose region is `mask` belongs to the difficult subset: the region covers
    /// less than [`Self::DIFFICULT_AREA`] of the image.
    pub fn is_difficult(mask: &[bool]) -> bool {
        let area = mask.iter().filter(|&&m| m).count();
        (area as f64) < Self::DIFFICULT_AREA * mask.len() as f64
    }

    /// Whether `map` (`H x W`) points at `mask` (row-major).
    pub fn hit(&self, map: &Tensor, mask: &[bool]) -> Result<bool> {
        if self.smooth <= 0.0 {
            return pointing_game(map, mask, self.tolerance);
        }
        let (h, w) = map.dims2()?;
        let sigma = self.smooth * h.max(w) as f64;
        let smoothed =
            crate::blur::gaussian_blur(&map.reshape((1, 1, h, w))?, sigma)?.reshape((h, w))?;
        pointing_game(&smoothed, mask, self.tolerance)
    }
}

/// Whether the maximum of `map` (`H x W`; the first in row-major order if tied) lies closer than
/// `tolerance` pixels (Euclidean, strictly, as TorchRay) to a pixel of `mask` (row-major).
pub fn pointing_game(map: &Tensor, mask: &[bool], tolerance: f64) -> Result<bool> {
    let (h, w, values) = flat(map)?;
    check(values.len(), mask)?;
    let best = values
        .iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > values[best] { i } else { best });
    let (by, bx) = ((best / w) as f64, (best % w) as f64);
    let t2 = tolerance * tolerance;
    Ok((0..h * w).any(|i| {
        mask[i] && {
            let (y, x) = ((i / w) as f64, (i % w) as f64);
            (y - by).powi(2) + (x - bx).powi(2) < t2
        }
    }))
}

/// The area under the ROC curve of `map` scoring pixels as inside `mask` (ties share ranks).
pub fn auroc(map: &Tensor, mask: &[bool]) -> Result<f64> {
    let (_, _, values) = flat(map)?;
    check(values.len(), mask)?;
    let positives = mask.iter().filter(|&&m| m).count();
    let negatives = mask.len() - positives;
    ensure(negatives > 0, || {
        "the ground-truth mask covers the whole image".to_string()
    })?;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    // Mann-Whitney U with average ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&p| mask[p]).count() as f64 * average;
        i = j + 1;
    }
    let p = positives as f64;
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Intersection over union of `map >= threshold` and `mask`.
pub fn iou(map: &Tensor, mask: &[bool], threshold: f32) -> Result<f64> {
    let (_, _, values) = flat(map)?;
    check(values.len(), mask)?;
    let (mut inter, mut union) = (0usize, 0usize);
    for (v, &m) in values.iter().zip(mask) {
        let on = *v >= threshold;
        inter += (on && m) as usize;
        union += (on || m) as usize;
    }
    Ok(inter as f64 / union as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn map(v: Vec<f32>, h: usize, w: usize) -> Tensor {
        Tensor::from_vec(v, (h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn scores_on_hand_made_maps() {
        // 1 x 5 strip, lesion at the last two pixels.
        let mask = [false, false, false, true, true];
        let perfect = map(vec![0.0, 0.1, 0.2, 0.8, 0.9], 1, 5);
        assert_eq!(auroc(&perfect, &mask).unwrap(), 1.0);
        let inverted = map(vec![0.9, 0.8, 0.2, 0.1, 0.0], 1, 5);
        assert_eq!(auroc(&inverted, &mask).unwrap(), 0.0);
        let flat_map = map(vec![0.5; 5], 1, 5);
        assert_eq!(auroc(&flat_map, &mask).unwrap(), 0.5);
        assert!(pointing_game(&perfect, &mask, 1.0).unwrap());
        // TorchRay's acceptance region is open: at exactly the tolerance it is a miss, and a
        // tolerance of 0 never hits.
        assert!(!pointing_game(&perfect, &mask, 0.0).unwrap());
        assert!(!pointing_game(&inverted, &mask, 3.0).unwrap());
        assert!(pointing_game(&inverted, &mask, 3.01).unwrap());
        assert_eq!(iou(&perfect, &mask, 0.5).unwrap(), 1.0);
        assert!(
            (iou(&map(vec![0.0, 0.0, 0.6, 0.7, 0.0], 1, 5), &mask, 0.5).unwrap() - 1.0 / 3.0).abs()
                < 1e-12
        );
        assert!(auroc(&perfect, &[false; 5]).is_err());
        assert!(pointing_game(&perfect, &[true; 4], 1.0).is_err());
    }

    #[test]
    fn the_difficult_subset_is_regions_under_a_quarter_of_the_image() {
        let mut mask = [false; 16];
        mask[..3].fill(true);
        assert!(PointingGame::is_difficult(&mask));
        mask[3] = true; // exactly a quarter: not difficult
        assert!(!PointingGame::is_difficult(&mask));
    }
}
