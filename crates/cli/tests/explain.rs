//! `vulnmap explain`: maps and overlays written as PNGs, one JSON object per image.

use std::process::Command;
use vulnmap_testkit::test_asset;

#[test]
fn explain_writes_a_map_and_an_overlay_per_image() {
    let (Some(weights), Some(image)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet/coffee.png"),
    ) else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args([
            "explain",
            "-q",
            "--json",
            "--method",
            "grad-cam",
            "--model",
            "efficientnet-lite0",
            "--weights",
        ])
        .arg(&weights)
        .arg(&image)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(line["target"], 967);
    assert_eq!(line["target_name"], "espresso");
    for key in ["map", "overlay"] {
        let png = image::open(line[key].as_str().unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (224, 224));
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args([
            "explain",
            "--method",
            "lime",
            "--model",
            "efficientnet-lite0",
            "x.png",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("lime") && err.contains("grad-cam"), "{err}");
}
