//! Confidence intervals of a mean score over images by the percentile bootstrap (Efron, 1979):
//! the images resampled with replacement, the mean of each resample, and the interval between
//! the resampled means' lower and upper percentiles. Seeded, so a report is reproducible.

use crate::error::{ensure, Result};
use rand::Rng;
use vulnmap_data::random;

/// A mean and its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The mean of the values.
    pub mean: f64,
    /// The interval's lower end.
    pub low: f64,
    /// The interval's upper end.
    pub high: f64,
}

/// The mean of `values` with a `confidence` (e.g. 0.95) percentile-bootstrap interval from
/// `resamples` resamples drawn from `seed`.
pub fn mean_interval(
    values: &[f64],
    confidence: f64,
    resamples: usize,
    seed: u64,
) -> Result<Interval> {
    ensure(!values.is_empty(), || "no values to average".into())?;
    ensure(confidence > 0.0 && confidence < 1.0, || {
        format!("confidence must be in (0, 1), got {confidence}")
    })?;
    ensure(resamples >= 1, || "at least one resample is needed".into())?;
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = random::rng(seed, "bootstrap");
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    // numpy.percentile's linear interpolation between the closest ranks.
    let at = |q: f64| {
        let pos = q * (resamples - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        means[lo] + (means[hi] - means[lo]) * (pos - lo as f64)
    };
    let tail = (1.0 - confidence) / 2.0;
    Ok(Interval {
        mean,
        low: at(tail),
        high: at(1.0 - tail),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_of_a_large_sample_is_the_normal_one() {
        // 400 draws of a standard normal: the 95% interval of the mean is mean +- 1.96 s / 20.
        let mut rng = random::rng(3, "normal sample");
        let values: Vec<f64> = random::normal_vec(&mut rng, 400, 0.0, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let i = mean_interval(&values, 0.95, 4000, 0).unwrap();
        let mean = values.iter().sum::<f64>() / 400.0;
        let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 399.0).sqrt();
        let half = 1.96 * sd / 20.0;
        assert!((i.mean - mean).abs() < 1e-12);
        assert!(
            ((i.high - i.low) / 2.0 - half).abs() < 0.1 * half,
            "{i:?} vs {half}"
        );
        assert!(
            (((i.high + i.low) / 2.0) - mean).abs() < 0.2 * half,
            "{i:?}"
        );
        assert_eq!(i, mean_interval(&values, 0.95, 4000, 0).unwrap());
    }

    #[test]
    fn constant_values_have_no_width_and_bad_settings_are_refused() {
        let i = mean_interval(&[0.5; 7], 0.9, 100, 1).unwrap();
        assert_eq!((i.mean, i.low, i.high), (0.5, 0.5, 0.5));
        assert!(mean_interval(&[], 0.95, 100, 0).is_err());
        assert!(mean_interval(&[1.0], 1.0, 100, 0).is_err());
    }
}
