//! `vulnmap synth fundus` then `vulnmap finetune` then `vulnmap classify`, end to end on a tiny
//! synthetic set.

use std::process::Command;

fn vulnmap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulnmap"));
    cmd.env_remove("RUST_LOG").arg("-q");
    cmd
}

#[test]
fn synth_finetune_classify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = vulnmap()
        .args([
            "synth",
            "fundus",
            "--patients",
            "4",
            "--size",
            "48",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = String::from_utf8(out.stdout).unwrap();
    assert!(manifest.trim().ends_with("manifest.csv"));
    let rows = std::fs::read_to_string(data.join("manifest.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 16);

    let run = dir.path().join("run");
    let out = vulnmap()
        .args([
            "finetune",
            "--arch",
            "tiny-resnet",
            "--scratch",
            "--epochs",
            "2",
            "--size",
            "48",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--json",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["epochs"].as_array().unwrap().len(), 2);
    assert!(report["test_accuracy"].as_f64().unwrap() >= 0.0);
    assert!(run.join("report.json").is_file());

    let image = data.join("images/P0001_OD_CFP.png");
    let out = vulnmap()
        .args([
            "classify",
            "--json",
            "--model",
            "tiny-resnet",
            "--resize",
            "48",
            "--weights",
        ])
        .arg(run.join("best.safetensors"))
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = line["top"][0]["name"].as_str().unwrap();
    assert!(name == "healthy" || name == "lesion", "{name}");
}

#[test]
fn bad_values_are_usage_errors_and_bad_data_fails_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = vulnmap()
        .args(["synth", "fundus", "--lesion-prevalence", "1.5", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a probability"));

    std::fs::write(
        dir.path().join("manifest.csv"),
        "path,label\nnowhere.png,healthy\n",
    )
    .unwrap();
    let out = vulnmap()
        .args(["finetune", "--arch", "tiny-resnet", "--scratch", "--data"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("manifest.csv:2:") && err.contains("nowhere.png"),
        "{err}"
    );
}
