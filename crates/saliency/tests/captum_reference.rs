//! Guided backpropagation, input x gradient and Integrated Gradients against Captum's, on a small
//! ReLU network (convolutions, BatchNorm, max-pooling, residual blocks) exported from PyTorch to
//! ONNX (`tests/data/make_captum_reference.py`).

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use vulnmap_saliency::{GuidedBackprop, InputXGradient, IntegratedGradients, Integration};
use vulnmap_testkit::compare::{cosine, max_abs, max_abs_diff, to_vec};

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `got` matches Captum's `want`: cosine >= 0.99999 and every element within 1e-4 of the
/// largest.
fn assert_matches(method: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (to_vec(got), to_vec(want));
    let c = cosine(&g, &w);
    let relative = max_abs_diff(&g, &w) / max_abs(&w);
    assert!(
        c >= 0.99999 && relative <= 1e-4,
        "{method}: cosine {c}, relative difference {relative:e}"
    );
}

#[test]
fn gradient_methods_match_captum() {
    let device = Device::Cpu;
    let model = vulnmap_onnx::load(data("relu_net.onnx"), &device).unwrap();
    let reference = vulnmap_testkit::read_fixture(&data("relu_net_captum.safetensors"), &device);
    let pixels = &reference["pixels"];
    let targets: Vec<usize> = reference["target"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let guided = GuidedBackprop { batch_size: 2 }
        .attribute(&model, pixels, &targets)
        .unwrap();
    let plain = InputXGradient { batch_size: 2 }
        .attribute(&model, pixels, &targets)
        .unwrap();
    assert_matches(
        "guided backpropagation",
        &guided,
        &reference["guided_backprop"],
    );
    assert_matches("input x gradient", &plain, &reference["input_x_gradient"]);
    // Guided backpropagation is not the gradient: the test would pass for the wrong reason if
    // the two coincided.
    let c = cosine(&to_vec(&guided), &to_vec(&reference["input_x_gradient"]));
    assert!(c < 0.9, "guided and plain gradients agree ({c})");
    let ig = IntegratedGradients {
        steps: 16,
        integration: Integration::GaussLegendre,
        batch_size: 16,
        ..IntegratedGradients::default()
    }
    .attribute(&model, pixels, &targets)
    .unwrap();
    assert_matches(
        "integrated gradients",
        &ig,
        &reference["integrated_gradients"],
    );
}
