//! `vulnmap run`, `attack` and `merge` end to end: exit codes, errors with lines, JSON on stdout.

use std::process::Command;
use vulnmap_testkit::test_asset;

fn vulnmap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulnmap"));
    cmd.env_remove("RUST_LOG");
    cmd
}

#[test]
fn an_invalid_pipeline_fails_with_its_line_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "name: bad\ndata:\n  fundus_benchmark: {}\nsteps:\n  - smoothgrad: {samples: 0}\n",
    )
    .unwrap();
    let out = vulnmap()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("samples"), "{err}");
    assert!(
        !dir.path().join("run").exists(),
        "nothing runs before the file is valid"
    );

    let out = vulnmap()
        .args(["run", "p.yaml", "--shard", "2/2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad shard is a usage error");
    let out = vulnmap().args(["merge", "--out", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "merge needs run directories");
}

#[test]
fn a_missing_file_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let out = vulnmap().arg("run").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let cause = std::fs::read(&missing).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}: {cause}", missing.display())),
        "{err}"
    );
    assert_eq!(
        err.matches(&cause).count(),
        1,
        "the cause printed twice: {err}"
    );
}

#[test]
fn error_messages_are_capped_and_never_backtraces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.yaml");
    // A name the checks refuse, quoted back in the message.
    let yaml = format!(
        "name: {}\nmodel: {{arch: resnet18}}\ndata: {{files: [x.png]}}\nsteps: [classify: {{}}]\n",
        "k/".repeat(50_000)
    );
    std::fs::write(&path, yaml).unwrap();
    let out = vulnmap()
        .arg("run")
        .arg(&path)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("long.yaml") && err.contains("more characters"),
        "{err}"
    );
    assert!(err.len() < 5_000, "{} bytes of error", err.len());
    assert!(!err.contains("Stack backtrace"), "{err}");
}

#[test]
fn flags_that_multiply_memory_are_range_checked_as_pipeline_keys_are() {
    for args in [
        "classify --model resnet18 --top 0 x.png",
        "classify --model resnet18 --batch-size 0 x.png",
        "classify --model resnet18 --resize 100000 x.png",
        "explain --model resnet18 --method gradient --batch-size 5000 x.png",
        "attack --model resnet18 --batch-size 0 x.png",
        "synth fundus --out nowhere --size 100000",
        "synth fundus --out nowhere --patients 0",
    ] {
        let out = vulnmap().args(args.split(' ')).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args}: {err}");
        assert!(err.contains("must be between"), "{args}: {err}");
    }
}

#[test]
fn attack_flags_get_the_pipeline_checks_before_any_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = vulnmap()
        .args(["attack", "x.png", "--model", "resnet18", "--alpha", "2"])
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vulnmap attack, `attack.alpha`: must be in (0, 1]"),
        "{err}"
    );
    assert!(!err.contains("hub"), "checked before the model: {err}");
}

#[test]
fn run_check_prints_the_resolved_pipeline() {
    let table1 =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/table1.yaml");
    if test_asset("assets/weights/efficientnet-lite0.safetensors").is_none() {
        return; // test_asset printed why, or failed when assets are required
    }
    let out = vulnmap()
        .arg("run")
        .arg(&table1)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("random_attack:") && text.contains("efficientnet-lite0.safetensors"),
        "{text}"
    );
    assert!(
        !text.contains("${VULNMAP_ASSETS}"),
        "variables are expanded:\n{text}"
    );
}

#[test]
fn attack_json_reports_a_table1_row_and_writes_the_pictures() {
    let (Some(weights), Some(image)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet/rocket.jpg"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = vulnmap()
        .arg("attack")
        .arg(&image)
        .args(["--model", "efficientnet-lite0", "--weights"])
        .arg(&weights)
        .args([
            // The paper's random attack (alpha 0.02, Adam 2e-4) flips the rocket in about 5 updates.
            "--max-iters",
            "20",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(line["label_from"], 657, "the rocket is a missile: {line}");
    assert_eq!(line["success"], true, "{line}");
    assert_ne!(line["label_to"], 657);
    assert!(line["confidence"].as_f64().unwrap() > 0.9);
    assert!(
        dir.path().join("rocket_noise.png").is_file()
            && dir.path().join("rocket_perturbed.png").is_file()
    );
}
