//! `vulnmap classify` end to end: reference classes with EfficientNet-Lite0, JSON on stdout,
//! and the exit codes (0 success, 1 failure, 2 usage).

use std::process::Command;
use vulnmap_testkit::test_asset;

fn vulnmap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulnmap"));
    cmd.env_remove("RUST_LOG");
    cmd
}

#[test]
fn classify_json_prints_the_reference_top1_for_every_shared_image() {
    let (Some(weights), Some(reference)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("fixtures/efficientnet_lite0_reference.json"),
    ) else {
        return;
    };
    let images_dir = weights
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("images/imagenet");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let entries = reference["images"].as_array().unwrap();
    let files: Vec<_> = entries
        .iter()
        .map(|e| images_dir.join(e["file"].as_str().unwrap()))
        .collect();

    let out = vulnmap()
        .args([
            "classify",
            "--json",
            "--model",
            "efficientnet-lite0",
            "--weights",
        ])
        .arg(&weights)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), entries.len());
    for (line, entry) in lines.iter().zip(entries) {
        let got = line["top"][0]["class"].as_u64().unwrap();
        let want = entry["top5"][0].as_u64().unwrap();
        assert_eq!(
            got, want,
            "{}: top-1 {got}, reference {want}",
            entry["file"]
        );
        assert!(line["image"]
            .as_str()
            .unwrap()
            .ends_with(entry["file"].as_str().unwrap()));
    }
    // Logs stay off stdout.
    assert!(!stdout.contains("INFO"));
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let out = vulnmap()
        .args(["classify", "x.png", "--model", "resnet51"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resnet51") && err.contains("tiny-resnet"),
        "{err}"
    );

    let out = vulnmap()
        .args(["classify", "--model", "resnet18"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no images is a usage error");

    let dir = std::env::temp_dir();
    let out = vulnmap()
        .args([
            "classify",
            "missing.png",
            "--model",
            "tiny-resnet",
            "--weights",
        ])
        .arg(dir.join("no-such-weights.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-weights.safetensors"), "{err}");
}
