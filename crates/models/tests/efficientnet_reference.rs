//! EfficientNet-Lite0 with the real ImageNet weights against a numpy reference forward pass on
//! the shared ImageNet images: same top-1 class everywhere, probabilities within 0.02.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use vulnmap_models::{zoo, Arch};
use vulnmap_testkit::test_asset;

#[test]
fn lite0_matches_the_reference_on_every_image() {
    let (Some(weights), Some(pixels), Some(reference)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("fixtures/efficientnet_lite0_pixels.safetensors"),
        test_asset("fixtures/efficientnet_lite0_reference.json"),
    ) else {
        return;
    };
    let model = zoo::load(
        Arch::EfficientNetLite0,
        Some(&weights),
        DType::F32,
        &device(),
    )
    .unwrap();
    assert_eq!(model.classes().name(967), Some("espresso"));
    let pixels = read_fixture(&pixels);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let images = reference["images"].as_array().expect("`images` list");
    assert!(!images.is_empty());

    let batch: Vec<Tensor> = images
        .iter()
        .map(|img| pixels[img["file"].as_str().unwrap()].clone())
        .collect();
    let batch = Tensor::stack(&batch, 0).unwrap();
    let probs = candle_nn::ops::softmax(&model.forward(&batch).unwrap(), 1).unwrap();

    for (i, img) in images.iter().enumerate() {
        let file = img["file"].as_str().unwrap();
        let p = to_vec(&probs.get(i).unwrap());
        let top1 = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, _)| k)
            .unwrap();
        let top5: Vec<usize> = img["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let ref_probs: Vec<f64> = img["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        println!(
            "{file}: top-1 {top1} ({:.4}), reference {} ({:.4})",
            p[top1], top5[0], ref_probs[0]
        );
        assert_eq!(
            top1, top5[0],
            "{file}: top-1 class differs from the reference"
        );
        for (class, want) in top5.iter().zip(&ref_probs) {
            let got = p[*class];
            assert!(
                (got - want).abs() <= 0.02,
                "{file}: p(class {class}) = {got:.4}, reference {want:.4}"
            );
        }
    }
}
