//! Value parsers for flags that multiply memory or time: the pipeline's own ranges
//! (`vulnmap_pipeline::limits`), so a flag and the same pipeline key get the same answer; and
//! for numbers that must be positive, by the pipeline's rule.

use vulnmap_pipeline::limits::{self, Limit};

fn within_u32(limit: &Limit, s: &str) -> Result<u32, String> {
    limit
        .parse(s)
        .and_then(|v| u32::try_from(v).map_err(|_| format!("`{s}` is too large")))
}

pub(crate) fn batch_size(s: &str) -> Result<usize, String> {
    limits::BATCH_SIZE.parse(s)
}

pub(crate) fn resize(s: &str) -> Result<u32, String> {
    within_u32(&limits::RESIZE, s)
}

pub(crate) fn image_size(s: &str) -> Result<u32, String> {
    within_u32(&limits::IMAGE_SIZE, s)
}

pub(crate) fn top(s: &str) -> Result<usize, String> {
    limits::TOP.parse(s)
}

pub(crate) fn patients(s: &str) -> Result<usize, String> {
    limits::PATIENTS.parse(s)
}

pub(crate) fn positive(s: &str) -> Result<f64, String> {
    limits::parse_positive(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_refuses_zero_negatives_and_non_numbers() {
        assert_eq!(positive("1"), Ok(1.0));
        assert_eq!(positive("0.5"), Ok(0.5));
        for bad in ["0", "-3", "nan", "inf", "fifteen", ""] {
            let e = positive(bad).unwrap_err();
            assert!(
                e.contains("positive") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
    }
}
