//! The model-randomisation sanity check (Adebayo et al., 2018): a map that explains the model
//! must change when the model's top layers are re-initialised. Maps are compared by Spearman rank
//! correlation; build the randomised model with `vulnmap_models::zoo::randomized`.

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};

/// Spearman's rank correlation of two maps of the same shape (ties share their average rank).
pub fn spearman(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure(a.dims() == b.dims(), || {
        format!("maps of shapes {:?} and {:?}", a.dims(), b.dims())
    })?;
    let ra = ranks(&a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    let rb = ranks(&b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    Ok(pearson(&ra, &rb))
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&x, &y| values[x].total_cmp(&values[y]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        for &p in &order[i..=j] {
            out[p] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    out
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va.sqrt() * vb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn spearman_is_one_for_monotone_maps_and_minus_one_reversed() {
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 10.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0.1f32, 0.2], [0.25, 0.9]], &Device::Cpu).unwrap();
        assert!((spearman(&a, &b).unwrap() - 1.0).abs() < 1e-12);
        let c = Tensor::new(&[[4f32, 3.0], [2.0, 1.0]], &Device::Cpu).unwrap();
        assert!((spearman(&a, &c).unwrap() + 1.0).abs() < 1e-12);
    }
}
