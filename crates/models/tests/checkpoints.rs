//! Reading, checking and writing checkpoints: PyTorch `.pth` files, strict fit errors that name
//! the tensor and both shapes, truncated files, the hub cache, and atomic saving.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use vulnmap_models::checkpoint::{varmap_tensors, META_CLASSES};
use vulnmap_models::{
    save_safetensors, zoo, Arch, Checkpoint, Classes, Error, HubFile, TensorProblem,
};
use vulnmap_testkit::test_asset;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn all_tensors(ckpt: &Checkpoint) -> BTreeMap<String, Tensor> {
    ckpt.shapes()
        .keys()
        .map(|k| {
            (
                k.to_string(),
                ckpt.tensor(k, DType::F32, &device()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn pytorch_pth_nested_prefixed_and_mixed_dtype_loads_and_matches_torch() {
    let ckpt = Checkpoint::open(fixture("tiny_resnet.pth")).unwrap();
    // `module.` stripped, `state_dict` found, `num_batches_tracked` tolerated.
    assert_eq!(ckpt.shape("fc.weight"), Some(&[3usize, 128][..]));
    assert_eq!(
        vulnmap_models::checkpoint::detect_architecture(&ckpt.shapes()).as_deref(),
        Some("tiny-resnet")
    );
    let model = zoo::from_checkpoint(Arch::TinyResNet, &ckpt, DType::F32, &device()).unwrap();
    assert_eq!(model.num_classes(), 3);
    let expected = read_fixture(&fixture("tiny_resnet_expected.safetensors"));
    let got = to_vec(&model.forward(&expected["pixels"]).unwrap());
    let want = to_vec(&expected["logits"]);
    let diff = max_abs_diff(&got, &want);
    assert!(
        diff < 1e-4,
        "tiny-resnet from .pth differs from PyTorch by {diff}"
    );
}

#[test]
fn truncated_safetensors_says_truncated_and_names_the_file() {
    let Some(src) = test_asset("fixtures/resnet18_tvinit_f16.safetensors") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18_cut.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{msg}");
    assert!(msg.contains("resnet18_cut.safetensors"), "{msg}");
    assert!(msg.contains("truncated safetensors file"), "{msg}");
    assert!(msg.contains("is cut off"), "{msg}");

    // Cut inside the header too.
    std::fs::write(&path, &bytes[..100]).unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("truncated safetensors file: the header says"),
        "{msg}"
    );

    // And a file that is no checkpoint at all.
    std::fs::write(&path, b"hello").unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(msg.contains("not a safetensors file"), "{msg}");
}

#[test]
fn checkpoint_of_another_architecture_names_tensors_and_both_shapes() {
    let Some(path) = test_asset("fixtures/resnet50_tvinit_f16.safetensors") else {
        return;
    };
    let err = zoo::load(Arch::ResNet18, Some(&path), DType::F32, &device()).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("does not fit resnet18"), "{msg}");
    assert!(
        msg.contains("tensor `layer1.0.conv1.weight` has shape [64, 64, 1, 1] in the checkpoint but the model expects [64, 64, 3, 3]"),
        "{msg}"
    );
    assert!(
        msg.contains("24 misshapen, 0 missing, 165 unexpected"),
        "{msg}"
    );
    assert!(msg.contains("look like a resnet50 checkpoint"), "{msg}");
    let Error::CheckpointMismatch { problems, .. } = err else {
        panic!("wrong error kind")
    };
    assert!(problems.contains(&TensorProblem::Unexpected {
        name: "layer1.0.conv3.weight".into(),
        shape: vec![256, 64, 1, 1]
    }));
}

#[test]
fn a_missing_tensor_is_named_with_its_expected_shape() {
    let Some(src) = test_asset("fixtures/resnet18_tvinit_f16.safetensors") else {
        return;
    };
    let mut tensors = all_tensors(&Checkpoint::open(&src).unwrap());
    tensors.remove("layer2.0.bn1.running_var").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18_missing.safetensors");
    save_safetensors(&path, &tensors, HashMap::new(), Some(DType::F16)).unwrap();
    let msg = zoo::load(Arch::ResNet18, Some(&path), DType::F32, &device())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("resnet18_missing.safetensors does not fit resnet18: 0 misshapen, 1 missing, 0 unexpected"), "{msg}");
    assert!(
        msg.contains("missing tensor `layer2.0.bn1.running_var` (the model expects shape [128])"),
        "{msg}"
    );
}

#[test]
fn an_unexpected_tensor_is_an_error_too() {
    let Some(src) = test_asset("fixtures/resnet18_tvinit_f16.safetensors") else {
        return;
    };
    let mut tensors = all_tensors(&Checkpoint::open(&src).unwrap());
    tensors.insert(
        "head.extra".into(),
        Tensor::zeros((2, 5), DType::F32, &device()).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("extra.safetensors");
    save_safetensors(&path, &tensors, HashMap::new(), None).unwrap();
    let msg = zoo::load(Arch::ResNet18, Some(&path), DType::F32, &device())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unexpected tensor `head.extra` of shape [2, 5]"),
        "{msg}"
    );
}

#[test]
fn saved_trained_weights_reload_with_their_class_names() {
    let device = device();
    let classes = Classes::new(vec!["healthy".into(), "lesion".into()]);
    let (model, varmap) = zoo::fresh(Arch::TinyResNet, &classes, 5, DType::F32, &device).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 64), &device).unwrap();
    let before = to_vec(&model.forward(&x).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    let names = serde_json::to_string(classes.names()).unwrap();
    let meta = HashMap::from([(META_CLASSES.to_string(), names)]);
    save_safetensors(&path, &varmap_tensors(&varmap).unwrap(), meta, None).unwrap();
    // Nothing but the checkpoint is left in the folder: the temporary file was renamed.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("tiny.safetensors")]);

    let reloaded = zoo::load(Arch::TinyResNet, Some(&path), DType::F32, &device).unwrap();
    assert_eq!(reloaded.classes(), &classes);
    // Loaded weights are constants, so eval-mode BatchNorm is folded into the convolutions: the
    // same network up to float rounding.
    let after = to_vec(&reloaded.forward(&x).unwrap());
    for (a, b) in after.iter().zip(&before) {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{after:?} vs {before:?}"
        );
    }

    // The same seed draws the same network; another seed does not.
    let (again, _) = zoo::fresh(Arch::TinyResNet, &classes, 5, DType::F32, &device).unwrap();
    assert_eq!(to_vec(&again.forward(&x).unwrap()), before);
    let (other, _) = zoo::fresh(Arch::TinyResNet, &classes, 6, DType::F32, &device).unwrap();
    assert_ne!(to_vec(&other.forward(&x).unwrap()), before);
}

#[test]
fn hub_weights_come_from_the_local_cache_and_offline_misses_say_how_to_pass_a_file() {
    // Both halves run in one test: they set process-wide environment variables.
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", dir.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let err = zoo::load(Arch::ResNet50, None, DType::F32, &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("timm/resnet50.tv_in1k"), "{err}");
    assert!(err.contains("--weights PATH"), "{err}");

    let Some(src) = test_asset("fixtures/resnet18_tvinit_f16.safetensors") else {
        return;
    };
    // The layout huggingface_hub writes: refs/main -> snapshots/<commit>/<file>.
    let repo = dir.path().join("models--timm--resnet18.tv_in1k");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::copy(&src, snapshot.join("model.safetensors")).unwrap();
    let hub = HubFile::default_for("resnet18").unwrap();
    assert_eq!(hub.resolve().unwrap(), snapshot.join("model.safetensors"));
    let model = zoo::load(Arch::ResNet18, None, DType::F32, &device()).unwrap();
    assert_eq!(model.arch(), "resnet18");
    // Any repo by id, with an explicit file.
    let uri = Path::new("hf://timm/resnet18.tv_in1k/model.safetensors");
    assert_eq!(
        zoo::load(Arch::ResNet18, Some(uri), DType::F32, &device())
            .unwrap()
            .arch(),
        "resnet18"
    );
    let err = zoo::load(
        Arch::ResNet18,
        Some(Path::new("hf://someone/else")),
        DType::F32,
        &device(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("someone/else") && err.contains("--weights PATH"),
        "{err}"
    );
    let err = zoo::load(
        Arch::ResNet18,
        Some(Path::new("hf://justone")),
        DType::F32,
        &device(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hf://owner/name"), "{err}");

    let err = zoo::load(Arch::EfficientNetLite0, None, DType::F32, &device())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no default weights") && err.contains("--weights"),
        "{err}"
    );
}

#[test]
fn unknown_model_names_list_the_known_ones() {
    let err = "resnet51".parse::<Arch>().unwrap_err().to_string();
    assert!(
        err.contains("resnet51")
            && err.contains("efficientnet-lite0")
            && err.contains("tiny-resnet"),
        "{err}"
    );
    assert_eq!("ResNet50".parse::<Arch>().unwrap(), Arch::ResNet50);
}

#[test]
fn integer_or_non_finite_weights_are_refused_naming_the_tensor() {
    let device = device();
    let classes = Classes::new(vec!["healthy".into(), "lesion".into()]);
    let (_, varmap) = zoo::fresh(Arch::TinyResNet, &classes, 5, DType::F32, &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = "fc.weight";
    let good = varmap_tensors(&varmap).unwrap();
    let shape = good[name].dims().to_vec();
    let n: usize = shape.iter().product();
    let mut values = vec![0.5f32; n];
    values[7] = f32::NAN;
    let nan = Tensor::from_vec(values, shape.as_slice(), &device).unwrap();
    let ints = Tensor::zeros(shape.as_slice(), DType::I64, &device).unwrap();
    for (bad, expected) in [(nan, "NaN at element 7"), (ints, "I64 integers")] {
        let mut tensors = good.clone();
        tensors.insert(name.to_string(), bad);
        let path = dir.path().join("bad.safetensors");
        save_safetensors(&path, &tensors, HashMap::new(), None).unwrap();
        let msg = zoo::load(Arch::TinyResNet, Some(&path), DType::F32, &device)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("bad.safetensors") && msg.contains(name) && msg.contains(expected),
            "{msg}"
        );
    }
}
