//! Pipeline files are checked before anything runs; every problem names its line and column.

use std::path::{Path, PathBuf};
use vulnmap_pipeline::{config, Error};

fn problems(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    match config::load(&path) {
        Err(e @ Error::Config(_)) => e.to_string(),
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("{yaml}\nwas accepted"),
    }
}

const HEAD: &str = "name: t\ndata:\n  fundus_benchmark: {}\n";

#[test]
fn an_unknown_key_names_its_line() {
    let e = problems(&format!(
        "{HEAD}steps:\n  - smoothgrad: {{samples: 5, sampels: 3}}\n"
    ));
    assert!(
        e.contains("line 5") && e.contains("unknown field `sampels`"),
        "{e}"
    );
    let e = problems(&format!("{HEAD}stepz: []\n"));
    assert!(e.contains("line 4") && e.contains("stepz"), "{e}");
}

#[test]
fn an_unknown_step_names_its_line() {
    let e = problems(&format!(
        "{HEAD}steps:\n  - classify: {{}}\n  - smoothgrid: {{}}\n"
    ));
    assert!(e.contains("line 6") && e.contains("smoothgrid"), "{e}");
}

#[test]
fn a_wrong_type_names_its_line() {
    let e = problems(&format!(
        "{HEAD}steps:\n  - classify: {{}}\n  - smoothgrad:\n      samples: many\n"
    ));
    assert!(e.contains("line 7") && e.contains("invalid type"), "{e}");
}

#[test]
fn a_missing_file_names_its_line_and_the_file() {
    let e = problems("name: t\nmodel:\n  arch: resnet18\n  weights: nowhere/weights.safetensors\ndata:\n  files: [a.png]\nsteps:\n  - classify: {}\n");
    assert!(
        e.contains("line 4") && e.contains("no such file") && e.contains("weights.safetensors"),
        "{e}"
    );
    assert!(e.contains("line 6") && e.contains("a.png"), "{e}");
}

#[test]
fn impossible_values_name_their_lines() {
    let e = problems(&format!(
        "{HEAD}steps:\n  - smoothgrad: {{samples: 0}}\n  - random_attack:\n      mode: targeted\n      alpha: -0.1\n  - metrics: {{of: [nothing]}}\n"
    ));
    assert!(
        e.contains("line 5") && e.contains("samples") && e.contains("between 1 and"),
        "{e}"
    );
    assert!(e.contains("line 8") && e.contains("alpha"), "{e}");
    // targeted without a target: reported at the attack's mapping.
    assert!(e.contains("target") && e.contains("line 7"), "{e}");
    assert!(
        e.contains("line 9") && e.contains("`nothing` is not an earlier map-making step"),
        "{e}"
    );
    let e = problems(
        "name: t\ndata:\n  fundus_benchmark: {}\n  split: training\nsteps: [classify: {}]\n",
    );
    assert!(
        e.contains("line 4") && e.contains("`training`") && e.contains("`train`, `val`, `test`"),
        "{e}"
    );
    // Every closed set is checked by its enum, with the values it takes.
    for (key, bad, expected) in [
        ("smoothgrad: {aggregate: mean}", "`mean`", "`vargrad`"),
        ("occlusion: {baseline: white}", "`white`", "`grey`"),
        ("random_attack: {generator: gan}", "`gan`", "`paper`"),
        ("mask_attack: {network: cnn}", "`cnn`", "`unet`"),
        ("local_attack: {spread: gradient}", "`gradient`", "`attack`"),
        ("mask_attack: {reward: logit}", "`logit`", "`log_odds`"),
        (
            "saliency_attack: {controls: [random]}",
            "`random`",
            "`bernoulli`",
        ),
    ] {
        let e = problems(&format!("{HEAD}steps:\n  - {key}\n"));
        assert!(
            e.contains("line 5") && e.contains(bad) && e.contains(expected),
            "{e}"
        );
    }
    let e = problems(&format!(
        "{HEAD}steps:\n  - integrated_gradients: {{baseline: grey}}\n"
    ));
    assert!(
        e.contains("line 5") && e.contains("`black` or `blurred`"),
        "{e}"
    );
    let e = problems(&format!(
        "{HEAD}steps:\n  - local_attack: {{game: preserve, spread: attack}}\n"
    ));
    assert!(
        e.contains("line 5") && e.contains("spread") && e.contains("game: delete or occlude"),
        "{e}"
    );
    let e = problems(&format!(
        "{HEAD}steps:\n  - mask_attack: {{game: noise, reward: log_odds}}\n"
    ));
    assert!(
        e.contains("line 5") && e.contains("reward") && e.contains("dual game"),
        "{e}"
    );
    // The mask network's sizes are bounded: a width or area out of range names its line.
    let e = problems(&format!(
        "{HEAD}steps:\n  - mask_network:\n      width: 100000\n      areas: [0.1, 1.5]\n"
    ));
    assert!(
        e.contains("line 6") && e.contains("width") && e.contains("between 1 and 512"),
        "{e}"
    );
    assert!(e.contains("line 7") && e.contains("areas[1]"), "{e}");
    let e = problems(&format!(
        "{HEAD}steps:\n  - gradient: {{}}\n  - metrics:\n      pointing_tolerance: 0\n"
    ));
    assert!(
        e.contains("line 7") && e.contains("pointing_tolerance") && e.contains("positive"),
        "{e}"
    );
}

#[test]
fn two_data_sources_and_an_unset_variable_are_refused() {
    let e = problems(
        "name: t\ndata:\n  fundus_benchmark: {}\n  files: [x.png]\nsteps: [classify: {}]\n",
    );
    assert!(e.contains("exactly one of"), "{e}");
    let e = problems("name: t\nmodel: {arch: resnet18, weights: ${VULNMAP_SURELY_UNSET_VARIABLE}/w.safetensors}\ndata: {fundus_benchmark: {}}\nsteps: [classify: {}]\n");
    assert!(
        e.contains("line 2") && e.contains("VULNMAP_SURELY_UNSET_VARIABLE"),
        "{e}"
    );
}

#[test]
fn a_syntax_error_names_its_line() {
    let e = problems("name: t\nsteps: [classify: {}\ndata: x\n");
    assert!(e.contains("line"), "{e}");
}

fn pipelines_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines")
}

#[test]
fn every_shipped_pipeline_parses_and_validates() {
    let assets = vulnmap_data::assets::assets_dir();
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(pipelines_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in &entries {
        let text = std::fs::read_to_string(path).unwrap();
        if text.contains("${VULNMAP_ASSETS}") && assets.is_none() {
            assert!(
                !vulnmap_testkit::assets::assets_required(),
                "{} needs the shared assets (VULNMAP_ASSETS)",
                path.display()
            );
            eprintln!(
                "skipping {}: shared assets not found (set VULNMAP_ASSETS)",
                path.display()
            );
            continue;
        }
        let p = config::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!p.steps.is_empty());
        checked += 1;
    }
    for name in [
        "table1",
        "fig6_alpha_sweep",
        "fig7_8_local_attack",
        "fig9_10_saliency_attack",
        "fig11_mask_attack",
        "fig12_imagenet",
        "finetune_fundus",
        "benchmark_fundus",
        "attack_maps_benchmark",
        "attack_maps_imagenet",
        "demo",
    ] {
        assert!(
            entries.iter().any(|p| p.file_stem().unwrap() == name),
            "pipelines/{name}.yaml is missing"
        );
    }
    assert!(checked >= 5, "only {checked} pipelines checked");
}

/// Step ids and the pipeline's name become file and folder names in the run directory: any
/// that could climb out of it, or into another folder, is refused at its line.
#[test]
fn ids_and_names_that_could_write_elsewhere_are_refused() {
    for id in ["../escape", "a/b", "..", "x..y", "/abs", "a b", ""] {
        let e = problems(&format!(
            "{HEAD}steps:\n  - gradient: {{}}\n  - smoothgrad: {{id: \"{id}\"}}\n"
        ));
        assert!(
            e.contains("line 6") && e.contains("steps[1].smoothgrad.id") && e.contains("no `..`"),
            "{id}: {e}"
        );
    }
    let e =
        problems("name: ../../outside\ndata:\n  fundus_benchmark: {}\nsteps:\n  - gradient: {}\n");
    assert!(e.contains("line 1") && e.contains("`name`"), "{e}");
    // Ordinary names pass.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.yaml");
    std::fs::write(
        &path,
        "name: run-2.v1_final\ndata:\n  fundus_benchmark: {}\nsteps:\n  - gradient: {id: grad.raw-1}\n",
    )
    .unwrap();
    config::load(&path).unwrap();
}

#[test]
fn alias_bombs_and_oversized_files_are_refused_in_bounded_memory() {
    // Nine levels of ten aliases each: 10^10 strings if expanded, 1 KB as written.
    let mut bomb = String::from("name: bomb\nsteps:\n  - classify: {top: 1}\n");
    bomb.push_str("data:\n  files: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    bomb.push_str("outputs:\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("  k{i}: &a{i} [{refs}]\n"));
    }
    let msg = problems(&bomb);
    assert!(msg.contains("more than 100000 values"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::write(
        &big,
        format!("name: big\ndescription: {}\n", "x".repeat(2 << 20)),
    )
    .unwrap();
    let msg = config::load(&big).unwrap_err().to_string();
    assert!(
        msg.contains("big.yaml") && msg.contains("not a pipeline file"),
        "{msg}"
    );
}
