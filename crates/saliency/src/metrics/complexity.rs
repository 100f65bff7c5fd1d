//! How concentrated a map is, without a model or a ground truth, as Quantus measures it:
//!
//! | metric | formula on the map's absolute values `a` (n pixels, sorted ascending for Gini) | paper | Quantus |
//! |---|---|---|---|
//! | sparseness | Gini index `sum_i (2i - n - 1) a_i / (n sum a)`, after `a += 1e-7`; 0 even, towards 1 concentrated | Chalasani et al., ICML 2020 | `Sparseness` |
//! | complexity | entropy `-sum p log p` of `p = a / sum a` (nats); 0 one pixel, `ln n` even | Bhatt et al., IJCAI 2020 | `Complexity` |
//!
//! Both take the map as vulnmap makes it (`H x W`, channels already reduced); Quantus reshapes
//! whatever attribution it is given, channels included.

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};

fn magnitudes(map: &Tensor) -> Result<Vec<f64>> {
    let a: Vec<f64> = map
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(f64::abs)
        .collect();
    ensure(!a.is_empty(), || "an empty map".into())?;
    ensure(a.iter().all(|v| v.is_finite()), || {
        "a map with a value that is not finite".into()
    })?;
    Ok(a)
}

/// The Gini index of the map's absolute values, in [0, 1): higher is sparser.
pub fn sparseness(map: &Tensor) -> Result<f64> {
    let mut a: Vec<f64> = magnitudes(map)?.into_iter().map(|v| v + 1e-7).collect();
    a.sort_by(f64::total_cmp);
    let n = a.len() as f64;
    let weighted: f64 = a
        .iter()
        .enumerate()
        .map(|(i, v)| (2.0 * (i as f64 + 1.0) - n - 1.0) * v)
        .sum();
    Ok(weighted / (n * a.iter().sum::<f64>()))
}

/// The entropy (nats) of the map's absolute values as a distribution: lower is simpler; NaN for
/// an all-zero map, which is no distribution (as Quantus gives).
pub fn complexity(map: &Tensor) -> Result<f64> {
    let a = magnitudes(map)?;
    let total: f64 = a.iter().sum();
    if total == 0.0 {
        return Ok(f64::NAN);
    }
    Ok(-a
        .iter()
        .map(|v| v / total)
        .filter(|&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn map(values: Vec<f32>) -> Tensor {
        let n = values.len();
        Tensor::from_vec(values, (1, n), &Device::Cpu).unwrap()
    }

    #[test]
    fn even_and_one_pixel_maps_are_the_extremes() {
        let n = 100;
        let even = map(vec![0.5; n]);
        assert!(sparseness(&even).unwrap().abs() < 1e-12);
        assert!((complexity(&even).unwrap() - (n as f64).ln()).abs() < 1e-12);
        let mut one = vec![0.0; n];
        one[37] = 1.0;
        let one = map(one);
        // Gini of one non-zero among n is (n - 1) / n, up to the 1e-7 Quantus adds.
        assert!((sparseness(&one).unwrap() - 0.99).abs() < 1e-5);
        assert!(complexity(&one).unwrap().abs() < 1e-12);
    }

    #[test]
    fn a_worked_example_and_sign_blindness() {
        // a = (1, 2, 3, 4) sorted: sum (2i - 5) a_i = -3 - 2 + 3 + 12 = 10 over 4 * 10.
        let a = map(vec![4.0, -1.0, 3.0, 2.0]);
        assert!((sparseness(&a).unwrap() - 0.25).abs() < 1e-6);
        let p = [0.1f64, 0.2, 0.3, 0.4];
        let h: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        assert!((complexity(&a).unwrap() - h).abs() < 1e-12);
        assert!(complexity(&map(vec![0.0; 3])).unwrap().is_nan());
        assert!(sparseness(&map(vec![1.0, f32::NAN])).is_err());
    }
}
