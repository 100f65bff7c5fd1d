//! `vulnmap synth fundus` then `vulnmap finetune` then `vulnmap classify`, end to end on a tiny
//! synthetic set.

use std::process::Command;

/// `out`, after failing the test with its stderr unless the command succeeded.
fn succeeded(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn vulnmap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulnmap"));
    cmd.env_remove("RUST_LOG").arg("-q");
    cmd
}

#[test]
fn synth_finetune_classify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = succeeded(
        vulnmap()
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
            .unwrap(),
    );
    let manifest = String::from_utf8(out.stdout).unwrap();
    assert!(manifest.trim().ends_with("manifest.csv"));
    let rows = std::fs::read_to_string(data.join("manifest.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 16);
    // A second synth over the dataset is refused, naming the folder, unless --force.
    let again = || {
        let mut c = vulnmap();
        c.args([
            "synth",
            "fundus",
            "--patients",
            "4",
            "--size",
            "48",
            "--seed",
            "3",
        ])
        .arg("--out")
        .arg(&data);
        c
    };
    let refused = again().output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&*data.to_string_lossy()) && err.contains("--force"),
        "{err}"
    );
    succeeded(again().arg("--force").output().unwrap());
    assert_eq!(
        std::fs::read_to_string(data.join("manifest.csv")).unwrap(),
        rows
    );

    let run = dir.path().join("run");
    let out = succeeded(
        vulnmap()
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
            .unwrap(),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["epochs"].as_array().unwrap().len(), 2);
    assert!(report["test_accuracy"].as_f64().unwrap() >= 0.0);
    assert!(run.join("report.json").is_file());
    // Fine-tuning into the same --out again would replace the checkpoint: refused.
    let refused = vulnmap()
        .args(["finetune", "--arch", "tiny-resnet", "--scratch", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("best.safetensors exists"), "{err}");

    let image = data.join("images/P0001_OD_CFP.png");
    let out = succeeded(
        vulnmap()
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
            .unwrap(),
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
        .args(["finetune", "--arch", "tiny-resnet", "--scratch"])
        .args(["--labels", "healthy,lesion", "--data"])
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

    // The pipeline step's checks, before the data is read.
    let out = vulnmap()
        .args([
            "finetune",
            "--arch",
            "tiny-resnet",
            "--scratch",
            "--epochs",
            "0",
        ])
        .args(["--size", "16", "--data"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`finetune.epochs`: must be between 1 and")
            && err.contains("`finetune.size`: must be between 32 and")
            && !err.contains("nowhere.png"),
        "{err}"
    );
}

/// The rows of a `results.jsonl`, without the timing that differs between runs.
fn rows_without_timing(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
            row.as_object_mut().unwrap().remove("seconds");
            row
        })
        .collect()
}

#[test]
fn the_cli_and_a_pipeline_with_the_same_settings_give_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    succeeded(
        vulnmap()
            .args([
                "synth",
                "fundus",
                "--patients",
                "4",
                "--size",
                "64",
                "--out",
            ])
            .arg(&data)
            .output()
            .unwrap(),
    );
    let model = dir.path().join("model");
    succeeded(
        vulnmap()
            .args([
                "finetune",
                "--model",
                "tiny-resnet",
                "--scratch",
                "--epochs",
                "1",
            ])
            .args(["--size", "64", "--batch-size", "8", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&model)
            .output()
            .unwrap(),
    );
    let weights = model.join("best.safetensors");
    let run = |pipeline: &std::path::Path, out: &std::path::Path| {
        succeeded(
            vulnmap()
                .arg("run")
                .arg(pipeline)
                .arg("--out")
                .arg(out)
                .output()
                .unwrap(),
        )
    };

    // `vulnmap eval` with its defaults, and the pipeline file a user would write for it.
    let by_cli = dir.path().join("eval");
    succeeded(
        vulnmap()
            .args([
                "eval",
                "--model",
                "tiny-resnet",
                "--device",
                "cpu",
                "--split",
                "all",
            ])
            .args([
                "--methods",
                "grad-cam,occlusion",
                "--score",
                "centred-logit",
                "--limit",
                "3",
            ])
            .arg("--weights")
            .arg(&weights)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&by_cli)
            .output()
            .unwrap(),
    );
    let pipeline = dir.path().join("same.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: same\ndevice: cpu\nmodel: {{arch: tiny-resnet, weights: {}, score: centred-logit}}\n\
             data: {{manifest: {}, split: all, limit: 3}}\n\
             steps:\n  - grad_cam: {{}}\n  - occlusion: {{}}\n  - metrics: {{}}\n",
            weights.display(),
            data.join("manifest.csv").display()
        ),
    )
    .unwrap();
    let by_file = dir.path().join("run");
    run(&pipeline, &by_file);
    let rows = rows_without_timing(&by_cli);
    assert_eq!(
        rows.len(),
        3 * 3,
        "three images, two maps and their metrics"
    );
    assert_eq!(rows, rows_without_timing(&by_file));

    // The same with other methods, measures and the explained class named on both sides; the
    // scores table gives each mean with its bootstrap interval.
    let by_cli = dir.path().join("eval-measures");
    succeeded(
        vulnmap()
            .args(["eval", "--model", "tiny-resnet", "--device", "cpu"])
            .args(["--split", "all", "--methods", "layer-cam,kernel-shap"])
            .args(["--measures", "sparseness,complexity,pointing-game"])
            .args(["--explain", "label"])
            .args(["--score", "centred-logit", "--limit", "3", "--weights"])
            .arg(&weights)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&by_cli)
            .output()
            .unwrap(),
    );
    std::fs::write(
        &pipeline,
        format!(
            "name: same\ndevice: cpu\nexplain: label\n\
             model: {{arch: tiny-resnet, weights: {}, score: centred-logit}}\n\
             data: {{manifest: {}, split: all, limit: 3}}\n\
             steps:\n  - layer_cam: {{}}\n  - kernel_shap: {{}}\n\
             \x20 - metrics: {{measures: [sparseness, complexity, pointing_game]}}\n",
            weights.display(),
            data.join("manifest.csv").display()
        ),
    )
    .unwrap();
    let by_file = dir.path().join("run-measures");
    run(&pipeline, &by_file);
    assert_eq!(rows_without_timing(&by_cli), rows_without_timing(&by_file));
    let table = std::fs::read_to_string(by_cli.join("metrics.md")).unwrap();
    assert!(
        table.contains("sparseness (Gini) [95% CI]")
            && table
                .lines()
                .any(|l| l.starts_with("| kernel_shap | 3 | ") && l.contains("] |")),
        "{table}"
    );

    // `vulnmap attack FLAGS` and a pipeline with `step` on the same image: the outcome's `keys`
    // agree; the pipeline's row is returned.
    let image = data.join("images/P0001_OD_CFP.png");
    let cli_and_step = |name: &str, flags: &[&str], step: &str, keys: &[&str]| {
        let out = succeeded(
            vulnmap()
                .args([
                    "attack",
                    "--json",
                    "--model",
                    "tiny-resnet",
                    "--device",
                    "cpu",
                ])
                .args(flags)
                .arg("--weights")
                .arg(&weights)
                .arg("--out")
                .arg(dir.path().join(name))
                .arg(&image)
                .output()
                .unwrap(),
        );
        let by_cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        std::fs::write(
            &pipeline,
            format!(
                "name: {name}\ndevice: cpu\nmodel: {{arch: tiny-resnet, weights: {}}}\n\
                 data: {{files: [{}]}}\nsteps:\n  - {step}\n",
                weights.display(),
                image.display()
            ),
        )
        .unwrap();
        let by_file = dir.path().join(format!("{name}-run"));
        run(&pipeline, &by_file);
        let row = rows_without_timing(&by_file).remove(0);
        for &key in keys {
            assert!(!by_cli[key].is_null(), "{key} missing from {by_cli}");
            assert_eq!(by_cli[key], row["outcome"][key], "{key}");
        }
        row
    };

    // `vulnmap attack` and a pipeline's `random_attack` step: the same Table I row.
    cli_and_step(
        "attack",
        &["--max-iters", "3"],
        "random_attack: {max_iters: 3}",
        &[
            "label_from",
            "label_to",
            "iterations",
            "success",
            "origin_loss",
            "final_loss",
        ],
    );

    // `--mask dual` and a pipeline's mask attack with its defaults: the same outcome and a mask
    // PNG.
    let row = cli_and_step(
        "dual",
        &["--mask", "dual", "--max-iters", "3"],
        "mask_attack: {max_iters: 3}",
        &["label_from", "iterations", "origin_loss", "final_loss"],
    );
    assert_eq!(
        row["variant"],
        "dual+areas=0.025,0.05,0.1+smooth=0.5+gamma=300+field_of_view"
    );
    assert!(dir.path().join("dual/P0001_OD_CFP_mask.png").is_file());
    let refused = vulnmap()
        .args([
            "attack", "--mask", "dual", "--mode", "targeted", "--target", "1",
        ])
        .args(["--model", "tiny-resnet", "--weights"])
        .arg(&weights)
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--mask dual"));
}
