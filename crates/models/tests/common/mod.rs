//! Helpers shared by the models crate's integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The device the tests run on: `$VULNMAP_DEVICE`, `cpu` when unset.
pub fn device() -> Device {
    vulnmap_models::device_from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// All tensors of a safetensors fixture, on [`device`], in f32 where they are floating point.
pub fn read_fixture(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &device())
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// ||a - b|| / ||b||.
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
