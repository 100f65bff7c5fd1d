//! Every saliency method and every attack runs on classifiers exported to ONNX, a vision
//! transformer and a ConvNeXt, through a pipeline naming them with `model: {onnx: ...}`.

use std::path::{Path, PathBuf};
use vulnmap_pipeline::{config, rundir, runner, RunOptions};
use vulnmap_testkit::test_asset;

const STEPS: &str = "
  - classify: {top: 2}
  - gradient: {}
  - input_x_gradient: {}
  - guided_backprop: {}
  - smoothgrad: {samples: 2}
  - integrated_gradients: {steps: 4}
  - grad_cam: {}
  - grad_cam_plus_plus: {}
  - layer_cam: {}
  - eigen_cam: {}
  - score_cam: {}
  - occlusion: {window: 112, stride: 112}
  - rise: {masks: 8, cells: 4}
  - extremal_perturbation: {areas: [0.1], max_iters: 2, step: 8, sigma: 8, max_blur: 5}
  - lime: {cells: 3, samples: 12}
  - kernel_shap: {cells: 3, samples: 12}
  - random_attack: {alpha: 0.05, max_iters: 2}
  - alpha_sweep: {alphas: [0.05], rounds: 1, max_iters: 2}
  - local_attack: {window: 112, stride: 112}
  - saliency_attack: {alpha: 0.05, max_iters: 2, samples: 2, controls: [permuted]}
  - mask_attack: {game: noise, network: free, cells: 8, alpha: 0.05, max_iters: 2, samples: 2}
  - metrics: {measures: [deletion, insertion], pixels_per_step: 8192}
";

/// Runs every step on two ImageNet photos with the model at `onnx`; returns the rows' kinds.
fn run_all(onnx: &Path, image: &Path) -> Vec<String> {
    let text = format!(
        "name: onnx\nbatch_size: 4\nmodel: {{onnx: {}}}\ndata:\n  files: [{}]\n  resize: 256\n\
         outputs: {{figures: false, report: false}}\nsteps:{STEPS}",
        onnx.display(),
        image.display()
    );
    let pipeline = config::parse(&text, Path::new("onnx.yaml"), Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let options = RunOptions {
        out: dir.path().to_path_buf(),
        device: Some(vulnmap_models::DeviceName::Cpu),
        shard: None,
        resume: false,
        force: false,
        cache: PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        progress: false,
    };
    runner::run(&pipeline, &options).unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    rundir::read_rows(&dir.path().join("results.jsonl"), false)
        .unwrap()
        .into_iter()
        .map(|r| {
            let value = serde_json::to_value(&r).unwrap();
            value["kind"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[test]
fn every_method_and_attack_runs_on_an_onnx_vit_and_convnext() {
    let Some(image) = test_asset("assets/images/imagenet/chelsea.png") else {
        return;
    };
    let vit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx/tests/data/vit_tiny.onnx");
    let Some(convnext) = test_asset("fixtures/onnx/convnext_small_config.onnx") else {
        return;
    };
    let steps = STEPS
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .count();
    for model in [vit, convnext] {
        let kinds = run_all(&model, &image);
        assert_eq!(
            kinds.len(),
            steps,
            "{}: one row per step: {kinds:?}",
            model.display()
        );
    }
}
