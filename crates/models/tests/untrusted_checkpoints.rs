//! Property tests of the checkpoint readers on untrusted files: mutated and truncated
//! safetensors and PyTorch `.pth` files open and load, or fail naming the file; never a panic.

use candle_core::{DType, Device};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use vulnmap_models::{zoo, Arch, Checkpoint};
use vulnmap_testkit::mutate::mutate;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Opens `bytes` as a checkpoint and reads every tensor and the tiny-resnet built from it.
fn exercise(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let names_file = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        assert!(text.contains(name), "{text}");
    };
    let checkpoint = match Checkpoint::open(&path) {
        Ok(c) => c,
        Err(e) => return names_file(&e),
    };
    let names: Vec<String> = checkpoint.shapes().keys().map(|k| k.to_string()).collect();
    for tensor in names {
        if let Err(e) = checkpoint.tensor(&tensor, DType::F32, &Device::Cpu) {
            names_file(&e);
        }
    }
    if let Err(e) = zoo::from_checkpoint(Arch::TinyResNet, &checkpoint, DType::F32, &Device::Cpu) {
        names_file(&e);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mutated_checkpoints_load_or_fail_naming_the_file(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        keep in 0.0f64..=1.0,
        header_edits in prop::collection::vec((0usize..256, any::<u8>()), 0..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let safetensors = std::fs::read(fixture("tiny_resnet_expected.safetensors")).unwrap();
        // Edits aimed at the JSON header (its length and the offsets it declares) too.
        let mut aimed = edits.clone();
        aimed.extend(header_edits.iter().copied());
        exercise(dir.path(), "m.safetensors", &mutate(safetensors, &aimed, keep));
        let pth = std::fs::read(fixture("tiny_resnet.pth")).unwrap();
        exercise(dir.path(), "m.pth", &mutate(pth, &edits, keep));
    }
}
