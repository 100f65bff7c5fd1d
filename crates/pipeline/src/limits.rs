//! The ranges of settings that multiply memory or time, defined once: the pipeline checks its
//! keys with them and the CLI parses its flags with them, so `--batch-size 0` and
//! `batch_size: 0` get the same answer; likewise the rule for numbers that must be positive.

/// An inclusive range of whole numbers, with what the number counts (for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The smallest value allowed.
    pub min: u64,
    /// The largest value allowed.
    pub max: u64,
    /// What the number counts, as in "images per pass".
    pub counts: &'static str,
}

/// Images per forward or backward pass.
pub const BATCH_SIZE: Limit = Limit::new(1, 1024, "images per pass");
/// Images per chunk of a run (the unit of `--resume` and `--shard`).
pub const CHUNK_SIZE: Limit = Limit::new(1, 100_000, "images per chunk");
/// The shorter side an image is resized to before the crop.
pub const RESIZE: Limit = Limit::new(8, 4096, "pixels");
/// A model's (square) input size, for generated data and fine-tuning.
pub const IMAGE_SIZE: Limit = Limit::new(32, 2048, "pixels");
/// Noisy or random copies of an image (SmoothGrad, sensitivity, infidelity, attack samples).
pub const SAMPLES: Limit = Limit::new(1, 10_000, "samples per image");
/// RISE's random masks.
pub const MASKS: Limit = Limit::new(1, 100_000, "masks per image");
/// Cells per side of a coarse grid (RISE masks, LIME and KernelSHAP superpixels).
pub const CELLS: Limit = Limit::new(1, 256, "cells per side");
/// Points on a path (Integrated Gradients).
pub const STEPS: Limit = Limit::new(1, 10_000, "steps");
/// Generator updates of an attack.
pub const MAX_ITERS: Limit = Limit::new(1, 1_000_000, "updates");
/// Repeats of an attack.
pub const ROUNDS: Limit = Limit::new(1, 10_000, "rounds");
/// Channels at the first level of a network the pipeline trains (the mask network).
pub const CHANNELS: Limit = Limit::new(1, 512, "channels");
/// Passes over a training split.
pub const EPOCHS: Limit = Limit::new(1, 100_000, "epochs");
/// Patients of a synthetic data set (four images each at most).
pub const PATIENTS: Limit = Limit::new(1, 100_000, "patients");
/// Classes listed per image.
pub const TOP: Limit = Limit::new(1, 100_000, "classes");

/// What is wrong with a number that must be positive and finite (a sigma, a tolerance), or
/// `None` when it is.
pub fn positive_problem(value: f64) -> Option<String> {
    (!(value > 0.0 && value.is_finite())).then(|| format!("must be a positive number, got {value}"))
}

/// Parses a command-line number that must be positive and finite, by the pipeline's rule.
pub fn parse_positive(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if positive_problem(value).is_none() => Ok(value),
        _ => Err(format!("must be a positive number, got `{text}`")),
    }
}

impl Limit {
    const fn new(min: u64, max: u64, counts: &'static str) -> Self {
        Self { min, max, counts }
    }

    /// Whether `value` is allowed.
    pub fn contains(&self, value: u64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    /// What is wrong with `value`, or `None` when it is allowed.
    pub fn problem(&self, value: u64) -> Option<String> {
        (!self.contains(value)).then(|| {
            format!(
                "must be between {} and {} ({}), got {value}",
                self.min, self.max, self.counts
            )
        })
    }

    /// Parses a command-line value, with the pipeline's message when it is out of range.
    pub fn parse(&self, text: &str) -> Result<usize, String> {
        let value: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a whole number"))?;
        match self.problem(value) {
            Some(problem) => Err(problem),
            None => usize::try_from(value).map_err(|_| format!("`{text}` is too large")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_outside_a_range_are_named_with_the_range() {
        assert_eq!(super::BATCH_SIZE.parse("16"), Ok(16));
        let e = super::BATCH_SIZE.parse("0").unwrap_err();
        assert_eq!(e, "must be between 1 and 1024 (images per pass), got 0");
        assert!(super::RESIZE.parse("-3").unwrap_err().contains("`-3`"));
        assert!(super::SAMPLES.problem(10_001).is_some());
    }
}
