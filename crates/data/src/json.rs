//! How vulnmap's numbers survive JSON: JSON has no NaN, so serde_json writes a NaN as `null`;
//! [`nan_from_null`] reads that `null` back as NaN, so a result row read from disk equals the
//! row that was written.

use serde::{Deserialize, Deserializer};

/// Deserialises a number, or `null` as NaN (use with `#[serde(deserialize_with = ...)]`).
pub fn nan_from_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stats {
        #[serde(deserialize_with = "super::nan_from_null")]
        mean: f64,
    }

    #[test]
    fn a_nan_written_as_null_reads_back_as_nan() {
        let text = serde_json::to_string(&Stats { mean: f64::NAN }).unwrap();
        assert_eq!(text, r#"{"mean":null}"#);
        let back: Stats = serde_json::from_str(&text).unwrap();
        assert!(back.mean.is_nan());
        let back: Stats = serde_json::from_str(r#"{"mean":2.5}"#).unwrap();
        assert_eq!(back.mean, 2.5);
    }
}
