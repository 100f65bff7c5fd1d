//! The commands on a classifier exported to ONNX: `classify` gives the reference classes of the
//! real EfficientNet-Lite0, `explain` writes maps, `layers` lists the feature maps, and flags
//! that do not fit the model are refused by name.

use std::process::Command;
use vulnmap_testkit::test_asset;

fn vulnmap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulnmap"));
    cmd.env_remove("RUST_LOG").arg("-q");
    cmd
}

#[test]
fn classify_explain_and_layers_take_an_onnx_model() {
    let (Some(model), Some(reference)) = (
        test_asset("fixtures/onnx/efficientnet_lite0_imagenet.onnx"),
        test_asset("fixtures/efficientnet_lite0_reference.json"),
    ) else {
        return;
    };
    let images = model
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("assets/images/imagenet");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let entry = &reference["images"][0];
    let image = images.join(entry["file"].as_str().unwrap());

    let out = vulnmap()
        .args(["classify", "--json", "--model"])
        .arg(&model)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["top"][0]["class"], entry["top5"][0], "{line}");

    let dir = tempfile::tempdir().unwrap();
    let out = vulnmap()
        .args(["explain", "--method", "grad-cam", "--model"])
        .arg(&model)
        .arg(&image)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pngs = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(pngs >= 2, "a map and an overlay, got {pngs} files");

    let out = vulnmap()
        .args(["layers", "--json", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layers: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let default: Vec<_> = layers.iter().filter(|l| l["default"] == true).collect();
    assert_eq!(default.len(), 1, "one default layer");
    assert_eq!(default[0]["usable"], true);
    assert!(
        default[0]["shape"][2].as_u64().unwrap() > 1,
        "a spatial map: {}",
        default[0]
    );
}

#[test]
fn flags_that_do_not_fit_the_model_are_refused() {
    let Some(model) = test_asset("fixtures/onnx/resnet_basic_1111.onnx") else {
        return;
    };
    let out = vulnmap()
        .args(["layers", "--weights", "w.safetensors", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--weights is for built-in"));
    let out = vulnmap()
        .args(["layers", "--model", "resnet18", "--normalize", "imagenet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--normalize is for ONNX models"));
    let out = vulnmap()
        .args(["layers", "--normalize", "0.5", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed normalisation is a usage error"
    );
}
