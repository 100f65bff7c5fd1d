//! Damaged ONNX files (bytes overwritten, the file cut short) load or fail with an error naming
//! the file; they never panic, and a damaged model that loads runs or fails the same way.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use std::path::Path;
use vulnmap_models::Classifier;
use vulnmap_testkit::mutate::mutate;

fn original() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/opzoo_opset17.onnx");
    std::fs::read(path).unwrap()
}

fn exercise(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.onnx");
    std::fs::write(&path, bytes).unwrap();
    match vulnmap_onnx::load(&path, &Device::Cpu) {
        Ok(model) => {
            let spec = model.input_spec();
            let x = Tensor::zeros(
                (2, spec.channels, spec.height, spec.width),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let _ = model.forward(&x);
        }
        Err(e) => assert!(e.to_string().contains("damaged.onnx"), "{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn damaged_models_load_or_fail_naming_the_file(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        keep in 0.0f64..=1.0,
    ) {
        exercise(&mutate(original(), &edits, keep));
    }

    #[test]
    fn overwritten_bytes_load_or_fail_naming_the_file(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        exercise(&mutate(original(), &edits, 1.0));
    }
}

#[test]
fn a_truncated_model_fails_naming_the_file() {
    let bytes = original();
    for keep in [1, 10, 100, 1000, bytes.len() / 2, bytes.len() - 1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.onnx");
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let error = vulnmap_onnx::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cut.onnx"), "{error}");
    }
}

#[test]
fn an_unknown_operator_is_named_with_its_node_opset_and_the_supported_list() {
    let bytes = original();
    // Rename every `Softplus` node to an operator no one implements (same length).
    let needle = b"Softplus";
    let mut renamed = bytes.clone();
    let mut count = 0;
    for i in 0..renamed.len() - needle.len() {
        if &renamed[i..i + needle.len()] == needle {
            renamed[i..i + needle.len()].copy_from_slice(b"Softpluz");
            count += 1;
        }
    }
    assert!(count > 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.onnx");
    std::fs::write(&path, &renamed).unwrap();
    let error = vulnmap_onnx::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains("custom.onnx"), "{error}");
    assert!(
        error.contains("Softpluz") && error.contains("opset 17"),
        "{error}"
    );
    assert!(error.contains("supported: Abs, Add"), "{error}");
}

#[test]
fn class_names_must_fit_the_head() {
    // Class names that do not fit the head.
    let Some(path) = vulnmap_testkit::test_asset("fixtures/onnx/efficientnet_b0_half.onnx") else {
        return;
    };
    let model = vulnmap_onnx::load_with(
        &path,
        &vulnmap_onnx::LoadOptions {
            classes: Some(vulnmap_models::Classes::numbered(3)),
            ..Default::default()
        },
        &Device::Cpu,
    );
    let error = model.unwrap_err().to_string();
    assert!(
        error.contains("3 class names for a model with 1000 outputs"),
        "{error}"
    );
}
