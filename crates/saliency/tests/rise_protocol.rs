//! Deletion and insertion against an independent PyTorch implementation of RISE's protocol
//! (`fixtures/causal_curves_lite0.json`): EfficientNet-Lite0, two shared photos, two maps defined
//! in the file; every curve point within 1e-3 and every area within 1e-4.

mod common;

use candle_core::{DType, Tensor};
use common::device;
use vulnmap_models::{zoo, Arch};
use vulnmap_saliency::metrics::causal::{CausalMetric, Curve};
use vulnmap_testkit::{read_fixture, test_asset};

/// The file's maps on the 224 x 224 crop.
fn map(name: &str) -> Tensor {
    let values: Vec<f64> = (0..224 * 224u64)
        .map(|i| {
            let (y, x) = ((i / 224) as f64, (i % 224) as f64);
            match name {
                "blob" => {
                    (-((y - 90.0).powi(2) + (x - 130.0).powi(2)) / (2.0 * 40.0f64.powi(2))).exp()
                }
                "hash" => ((i * 2654435761) % (1 << 32)) as f64 / (1u64 << 32) as f64,
                other => panic!("the fixture names an unknown map `{other}`"),
            }
        })
        .collect();
    Tensor::from_vec(values, (224, 224), &device()).unwrap()
}

fn numbers(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .expect("a list of numbers")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn assert_matches(what: &str, got: &Curve, curve: &serde_json::Value, auc: &serde_json::Value) {
    let want = numbers(curve);
    assert_eq!(got.scores.len(), want.len(), "{what}: points");
    for (k, (g, w)) in got.scores.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-3,
            "{what}: point {k} is {g}, the reference {w}"
        );
    }
    let auc = auc.as_f64().unwrap();
    assert!(
        (got.auc - auc).abs() < 1e-4,
        "{what}: area {} against the reference {auc}",
        got.auc
    );
}

#[test]
fn deletion_and_insertion_reproduce_the_rise_protocol_reference() {
    let (Some(weights), Some(pixels), Some(reference)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("fixtures/efficientnet_lite0_pixels.safetensors"),
        test_asset("fixtures/causal_curves_lite0.json"),
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
    let pixels = read_fixture(&pixels, &device());
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let cases = reference["cases"].as_array().expect("`cases`");
    assert_eq!(cases.len(), 4);
    let metric = CausalMetric::default();
    for case in cases {
        let file = case["image"].as_str().unwrap();
        let image = pixels[file].clone();
        let name = case["map"].as_str().unwrap();
        let target = case["target"].as_u64().unwrap() as usize;
        let map = map(name);
        let what = format!("{file}, {name} map");
        let deletion = metric
            .deletion(model.as_ref(), &image, &map, target)
            .unwrap();
        assert_matches(
            &format!("{what}, deletion"),
            &deletion,
            &case["deletion_curve"],
            &case["deletion_auc"],
        );
        let insertion = metric
            .insertion(model.as_ref(), &image, &map, target)
            .unwrap();
        assert_matches(
            &format!("{what}, insertion"),
            &insertion,
            &case["insertion_curve"],
            &case["insertion_auc"],
        );
    }
}
