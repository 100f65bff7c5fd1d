//! The trained synthetic-fundus model and lesion images the attack tests share.
#![allow(dead_code, unused_imports, unreachable_pub)]

use candle_core::Tensor;
use std::path::Path;
use vulnmap_data::Preprocess;
use vulnmap_models::Classifier;
use vulnmap_train::fundus_benchmark::{BenchmarkConfig, FundusBenchmark};

pub use vulnmap_testkit::device;

pub struct Lesions {
    pub model: Box<dyn Classifier>,
    pub pixels: Tensor,
    /// Row-major lesion masks, 128 x 128.
    pub masks: Vec<Vec<bool>>,
}

/// The first `count` lesion images of the benchmark's test split.
pub fn lesions(count: usize) -> Lesions {
    lesions_of(count, |splits| &splits.test)
}

/// The first `count` lesion images of the benchmark's training split.
pub fn training_lesions(count: usize) -> Lesions {
    lesions_of(count, |splits| &splits.train)
}

fn lesions_of(
    count: usize,
    split: impl Fn(&vulnmap_data::split::Splits) -> &Vec<usize>,
) -> Lesions {
    let bench = FundusBenchmark::prepare(
        &BenchmarkConfig::default(),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
    .unwrap();
    let model = bench.model(&device()).unwrap();
    let dataset = bench.dataset().unwrap();
    let splits = bench.splits(&dataset);
    let idx: Vec<usize> = split(&splits)
        .iter()
        .copied()
        .filter(|&i| dataset.samples[i].label == 1)
        .take(count)
        .collect();
    let paths: Vec<_> = idx
        .iter()
        .map(|&i| dataset.samples[i].path.clone())
        .collect();
    let pixels = Preprocess::none().load_batch(&paths, &device()).unwrap();
    let masks = idx
        .iter()
        .map(|&i| {
            vulnmap_data::load_rgb(dataset.samples[i].mask.as_ref().unwrap())
                .unwrap()
                .pixels()
                .map(|p| p[0] > 0.5)
                .collect()
        })
        .collect();
    Lesions {
        model,
        pixels,
        masks,
    }
}

/// An outcome's noise: whole-image attacks and the engine's window jobs keep it.
pub fn kept_noise(o: &vulnmap_attacks::AttackOutcome) -> &Tensor {
    o.noise.as_ref().expect("the attack kept its noise")
}

/// An outcome's perturbed image, kept beside its noise.
pub fn kept_perturbed(o: &vulnmap_attacks::AttackOutcome) -> &Tensor {
    o.perturbed
        .as_ref()
        .expect("the attack kept its perturbed image")
}
