//! Comparing results with references: tensors as plain vectors, largest differences, cosine
//! similarity and relative L2 error.

use candle_core::{DType, Tensor};

/// A tensor's elements, flattened, as f64. Panics if the tensor cannot be read.
pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap_or_else(|e| panic!("cannot read a {:?} tensor: {e}", t.shape()))
}

/// The largest `|x|` (NaN if any is).
pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().copied().map(f64::abs).fold(0.0, largest)
}

/// The largest `|a_i - b_i|` (NaN if any is); panics if the lengths differ.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, largest)
}

/// The larger of two numbers, NaN if either is: `f64::max` drops a NaN, and a tolerance check
/// against a NaN must fail.
fn largest(m: f64, x: f64) -> f64 {
    if m.is_nan() || x.is_nan() {
        f64::NAN
    } else {
        m.max(x)
    }
}

/// The largest element-wise difference of two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs_diff(&to_vec(a), &to_vec(b))
}

/// Cosine similarity `a.b / (|a| |b|)`.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `||a - b|| / ||b||`.
pub fn relative_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

/// Fails unless `|a_i - b_i| <= tol` for every element, naming the first that is not.
pub fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "element {i}: {x} vs {y} (tolerance {tol})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_and_similarities_of_known_vectors() {
        assert_eq!(max_abs(&[1.0, -3.0, 2.0]), 3.0);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 0.0]), 2.0);
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(
            (relative_l2(&[3.0, 4.0], &[0.0, 0.0 + 5.0]) - (9.0f64 + 1.0).sqrt() / 5.0).abs()
                < 1e-12
        );
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &candle_core::Device::Cpu).unwrap();
        assert_eq!(to_vec(&t), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(max_diff(&t, &(&t + 0.5).unwrap()), 0.5);
        // A NaN anywhere is the answer: a tolerance check against it fails.
        assert!(max_abs(&[f64::NAN, 1.0]).is_nan());
        assert!(max_abs_diff(&[1.0, 2.0], &[1.0, f64::NAN]).is_nan());
    }

    #[test]
    #[should_panic(expected = "element 1")]
    fn assert_close_names_the_first_element_that_differs() {
        assert_close(&[1.0, 2.0, 3.0], &[1.0, 2.5, 3.0], 0.1);
    }
}
