//! Whole networks pass finite-difference checks of their input gradient in f64: every layer on
//! the path (normalisation, padding, max-pool, depthwise convolution, BatchNorm in both modes)
//! composes to the right backward pass.

mod common;

use candle_core::{DType, Tensor};
use common::device;
use vulnmap_data::random;
use vulnmap_models::{zoo, Arch, Classes, Classifier};
use vulnmap_testkit::gradcheck::gradient_error;
use vulnmap_testkit::test_asset;

fn check(model: &dyn Classifier, size: usize, train: bool) {
    let device = device();
    let arch = model.arch();
    let mut rng = random::rng(3, "gradcheck pixels");
    let values = random::uniform_vec(&mut rng, 2 * 3 * size * size, 0.0, 1.0);
    let x = Tensor::from_vec(values, (2, 3, size, size), &device)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    // A small step: with real weights, larger steps cross ReLU/ReLU6 kinks.
    let report = gradient_error(&x, |x| model.forward_t(x, train), 1e-6, 300).unwrap();
    println!("{arch} train={train}: {report:?}");
    assert!(
        report.max_abs_gradient > 1e-3,
        "{arch}: gradient too small to check: {report:?}"
    );
    let tol = 1e-5 * report.max_abs_gradient;
    assert!(report.max_abs_error <= tol, "{arch}: {report:?}");
}

#[test]
fn tiny_resnet_input_gradient_matches_finite_differences() {
    let (model, _) = zoo::fresh(
        Arch::TinyResNet,
        &Classes::numbered(4),
        11,
        DType::F64,
        &device(),
    )
    .unwrap();
    check(model.as_ref(), 33, false);
    // Train mode at 64 px, so that BatchNorm in layer4 sees 2 x 2 x 2 values per channel.
    check(model.as_ref(), 64, true);
}

#[test]
fn efficientnet_lite0_input_gradient_matches_finite_differences() {
    // Real weights: a fresh Lite0's gradients all but vanish, which would make the check empty.
    let Some(weights) = test_asset("assets/weights/efficientnet-lite0.safetensors") else {
        return;
    };
    let model = zoo::load(
        Arch::EfficientNetLite0,
        Some(&weights),
        DType::F64,
        &device(),
    )
    .unwrap();
    check(model.as_ref(), 35, false);
}
