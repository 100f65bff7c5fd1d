//! Training: tiny-resnet learns the synthetic fundus task (healthy vs lesion) to >= 90% test
//! accuracy; fine-tuning keeps the backbone from a checkpoint, trains a fresh head, and can freeze
//! the backbone.

use candle_core::DType;
use std::path::Path;
use std::sync::Arc;
use vulnmap_data::loader::Loader;
use vulnmap_data::split::{split_by_patient, PAPER_FRACTIONS};
use vulnmap_data::synthetic::{write_dataset, FundusConfig};
use vulnmap_data::{Dataset, ManifestOptions, Preprocess};
use vulnmap_models::{Arch, Checkpoint, Classes};
use vulnmap_testkit::device;
use vulnmap_train::fundus_benchmark::{BenchmarkConfig, FundusBenchmark};
use vulnmap_train::optim::AdamConfig;
use vulnmap_train::train::{evaluate, fit, TrainConfig, TrainableModel};

#[test]
fn tiny_resnet_learns_healthy_vs_lesion_on_synthetic_fundus() {
    let bench = FundusBenchmark::prepare(
        &BenchmarkConfig::default(),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
    .unwrap();
    let report = &bench.report;
    for e in &report.epochs {
        println!(
            "epoch {}: train {:.3}/{:.3}, val {:.3}/{:.3}, {:.1} s",
            e.epoch, e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy, e.seconds
        );
    }
    println!(
        "best epoch {}, test accuracy {:.3}",
        report.best_epoch, report.test_accuracy
    );
    assert!(
        report.test_accuracy >= 0.90,
        "test accuracy {}",
        report.test_accuracy
    );

    // The cached checkpoint is reusable: reloaded, it scores what training reported.
    let model = bench.model(&device()).unwrap();
    assert_eq!(
        model.classes().names(),
        &["healthy".to_string(), "lesion".to_string()]
    );
    assert_eq!(model.input_spec().height, 128);
    let dataset = Arc::new(bench.dataset().unwrap());
    assert_eq!(dataset.len(), 600);
    let splits = bench.splits(&dataset);
    let loader = Loader::new(dataset, Preprocess::none(), 32);
    let (_, accuracy) = evaluate(model.as_ref(), &loader, &splits.test).unwrap();
    assert!(
        (accuracy - report.test_accuracy).abs() < 1e-9,
        "{accuracy} vs {}",
        report.test_accuracy
    );
}

fn tiny_dataset(dir: &Path) -> Arc<Dataset> {
    let config = FundusConfig {
        patients: 6,
        size: 64,
        seed: 4,
        ..FundusConfig::default()
    };
    let manifest = write_dataset(&config, dir).unwrap();
    Arc::new(
        Dataset::from_manifest(&manifest, &ManifestOptions::default())
            .unwrap()
            .0,
    )
}

#[test]
fn finetuning_replaces_the_head_and_a_frozen_backbone_stays_put() {
    let fixture = tiny_resnet_pth();
    let checkpoint = Checkpoint::open(&fixture).unwrap();
    let classes = Classes::new(vec!["healthy".into(), "lesion".into()]);
    let model = TrainableModel::finetune(Arch::TinyResNet, &checkpoint, &classes, 64, 1, &device())
        .unwrap();
    assert_eq!(model.model.num_classes(), 2);
    let before = model.snapshot().unwrap();
    assert_eq!(before["fc.weight"].dims(), &[2, 128]);
    let conv = checkpoint
        .tensor("layer2.0.conv1.weight", DType::F32, &device())
        .unwrap();
    assert_eq!(
        before["layer2.0.conv1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        conv.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(dir.path());
    let splits = split_by_patient(&dataset, PAPER_FRACTIONS, 0);
    let config = TrainConfig {
        epochs: 1,
        batch_size: 8,
        adam: AdamConfig {
            lr: 1e-2,
            ..AdamConfig::default()
        },
        preprocess: Preprocess::none(),
        freeze_backbone: true,
        checkpoint: Some(dir.path().join("best.safetensors")),
        progress: false,
        ..TrainConfig::default()
    };
    let report = fit(&model, dataset, &splits, &config).unwrap();
    assert_eq!(report.epochs.len(), 1);
    let after = model.snapshot().unwrap();
    let same = |name: &str| {
        before[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            == after[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert!(!same("fc.weight"), "the head trains");
    assert!(
        same("layer2.0.conv1.weight") && same("conv1.weight") && same("bn1.weight"),
        "the backbone is frozen"
    );
    assert!(
        !same("bn1.running_mean"),
        "BatchNorm statistics follow the data in train mode"
    );

    // The best checkpoint reloads as a constant classifier with the dataset's class names.
    let reloaded = vulnmap_models::zoo::load(
        Arch::TinyResNet,
        Some(&dir.path().join("best.safetensors")),
        DType::F32,
        &device(),
    )
    .unwrap();
    assert_eq!(reloaded.classes(), &classes);
    assert_eq!(reloaded.input_spec().height, 64);
}

#[test]
fn finetuning_from_a_checkpoint_of_another_architecture_fails_naming_tensors() {
    let fixture = tiny_resnet_pth();
    let checkpoint = Checkpoint::open(&fixture).unwrap();
    let classes = Classes::numbered(2);
    let err = TrainableModel::finetune(Arch::ResNet18, &checkpoint, &classes, 224, 1, &device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("does not fit resnet18")
            && err.contains("conv1.weight")
            && err.contains("tiny-resnet"),
        "{err}"
    );
}

/// The PyTorch-saved tiny-resnet checkpoint the models crate's tests also read.
fn tiny_resnet_pth() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny_resnet.pth")
}
