//! The model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps",
//! NeurIPS 2018): a map that explains the model must change when the model's layers are
//! re-initialised. Maps are compared by Spearman rank correlation; [`cascade`] re-initialises
//! the layers one more at a time from the top and gives the similarity curve (Quantus' `MPRT`
//! in its top-down order). Build randomised models with `vulnmap_models::zoo::randomized`.

use crate::error::{ensure, Result};
use crate::Method;
use candle_core::{DType, Tensor};
use vulnmap_models::Classifier;

/// Builds the model with the tensors under the given weight-name prefixes re-initialised.
pub type Randomiser<'a> = dyn Fn(&[&str]) -> Result<Box<dyn Classifier>> + 'a;

/// One point of the cascade.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeStep {
    /// The layers re-initialised so far, top first.
    pub randomised: Vec<String>,
    /// The mean over images of the Spearman correlation between the randomised model's map and
    /// the model's.
    pub similarity: f64,
}

/// The cascading randomisation of `layers` (weight-name prefixes such as `fc.`, `layer4.`, top
/// first): after re-initialising each one more, `method`'s maps of `pixels` compared with those
/// of `model`. `randomised(prefixes)` builds the model with the tensors under `prefixes`
/// re-initialised (with the same score as `model`).
pub fn cascade(
    model: &dyn Classifier,
    randomised: &Randomiser,
    method: &Method,
    pixels: &Tensor,
    targets: &[usize],
    layers: &[&str],
) -> Result<Vec<CascadeStep>> {
    ensure(!layers.is_empty(), || "no layers to randomise".into())?;
    let original = method.explain(model, pixels, targets)?;
    let n = pixels.dim(0)?;
    let mut curve = Vec::with_capacity(layers.len());
    for k in 1..=layers.len() {
        let changed = randomised(&layers[..k])?;
        let maps = method.explain(changed.as_ref(), pixels, targets)?;
        let mut total = 0.0;
        for i in 0..n {
            total += spearman(&original.get(i)?, &maps.get(i)?)?;
        }
        curve.push(CascadeStep {
            randomised: layers[..k].iter().map(|l| l.to_string()).collect(),
            similarity: total / n as f64,
        });
    }
    Ok(curve)
}

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
