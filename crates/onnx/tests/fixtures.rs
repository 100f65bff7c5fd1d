//! ONNX classifiers exported by PyTorch against PyTorch's own logits and input gradients: the
//! shared fixtures (`fixtures/onnx`: six torchvision families and the real EfficientNet-Lite0),
//! this crate's own (`tests/data`: torchvision's and timm's ViTs and an operator zoo exported at
//! opsets 13, 17 and 20), and any folder of `NAME.onnx` + `NAME_reference.safetensors` pairs
//! named by `VULNMAP_ONNX_FIXTURES` (how other exported models are tried).

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vulnmap_models::Classifier;
use vulnmap_testkit::compare::{cosine, max_abs, max_abs_diff, to_vec};
use vulnmap_testkit::{read_fixture, test_asset};

/// The models of the shared `fixtures/onnx/index.json`.
const SHARED: &[&str] = &[
    "resnet_basic_1111",
    "densenet_small_config",
    "efficientnet_b0_half",
    "mobilenet_v3_small",
    "convnext_small_config",
    "vit_small_config",
    "efficientnet_lite0_imagenet",
];

/// This crate's fixtures; their references hold no pixels (they are the shared fixtures').
const OWN: &[&str] = &[
    "vit_tiny",
    "timm_vit_small_config",
    "opzoo_opset13",
    "opzoo_opset17",
    "opzoo_opset20",
];

/// Checks `model` against `reference`: logits within 1e-4 of the largest (relative) and each
/// image's gradient of its top logit with cosine >= 0.99999. Returns the logits' relative error.
fn check(name: &str, model: &Path, reference: &HashMap<String, Tensor>, pixels: &Tensor) -> f64 {
    let device = pixels.device();
    let model = vulnmap_onnx::load(model, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let run = || -> candle_core::Result<f64> {
        let x = Var::from_tensor(pixels)?;
        let logits = model.forward(x.as_tensor())?;
        let want = to_vec(&reference["logits_eval"]);
        let got = to_vec(&logits);
        let scale = max_abs(&want);
        let relative = if scale == 0.0 {
            max_abs(&got)
        } else {
            max_abs_diff(&got, &want) / scale
        };
        assert!(
            relative <= 1e-4,
            "{name}: logits differ by {relative:e} (relative)"
        );
        let targets = reference["target"].to_dtype(DType::I64)?;
        let n = targets.dim(0)?;
        let picked = logits.gather(&targets.reshape((n, 1))?, 1)?.sum_all()?;
        let grads = picked.backward()?;
        let grad = grads
            .get(x.as_tensor())
            .expect("a gradient reaches the pixels");
        let want = reference["grad_pixels_top_logit"].to_dtype(DType::F32)?;
        for i in 0..n {
            let (g, w) = (to_vec(&grad.get(i)?), to_vec(&want.get(i)?));
            if max_abs(&w) == 0.0 {
                assert!(
                    max_abs(&g) < 1e-6,
                    "{name}: image {i}'s gradient should be zero"
                );
                continue;
            }
            let c = cosine(&g, &w);
            assert!(
                c >= 0.99999,
                "{name}: image {i}'s input gradient has cosine {c}"
            );
        }
        Ok(relative)
    };
    run().unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The shared fixtures' pixels (chelsea.png and coffee.png, 224 x 224).
fn shared_pixels(device: &Device) -> Option<Tensor> {
    let path = test_asset("fixtures/onnx/resnet_basic_1111_reference.safetensors")?;
    Some(read_fixture(&path, device)["pixels"].clone())
}

#[test]
fn shared_fixtures_match_pytorch() {
    let device = vulnmap_testkit::device();
    for name in SHARED {
        let (Some(model), Some(reference)) = (
            test_asset(&format!("fixtures/onnx/{name}.onnx")),
            test_asset(&format!("fixtures/onnx/{name}_reference.safetensors")),
        ) else {
            return;
        };
        let reference = read_fixture(&reference, &device);
        let relative = check(name, &model, &reference, &reference["pixels"]);
        println!("{name}: logits within {relative:e}");
    }
}

#[test]
fn own_fixtures_match_pytorch() {
    let device = vulnmap_testkit::device();
    let Some(pixels) = shared_pixels(&device) else {
        return;
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for name in OWN {
        let reference = read_fixture(&data.join(format!("{name}_reference.safetensors")), &device);
        let relative = check(
            name,
            &data.join(format!("{name}.onnx")),
            &reference,
            &pixels,
        );
        println!("{name}: logits within {relative:e}");
    }
}

#[test]
fn models_in_vulnmap_onnx_fixtures_match_pytorch() {
    let Some(dir) = std::env::var_os("VULNMAP_ONNX_FIXTURES").map(PathBuf::from) else {
        println!("VULNMAP_ONNX_FIXTURES is not set: no further models to try");
        return;
    };
    let device = vulnmap_testkit::device();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("VULNMAP_ONNX_FIXTURES is a folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".onnx").map(String::from))
        .collect();
    names.sort();
    let mut failures = Vec::new();
    for name in &names {
        let reference = read_fixture(&dir.join(format!("{name}_reference.safetensors")), &device);
        let pixels = reference["pixels"].clone();
        let model = dir.join(format!("{name}.onnx"));
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(name, &model, &reference, &pixels)
        })) {
            Ok(relative) => println!("{name}: ok, logits within {relative:e}"),
            Err(e) => {
                let message = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panicked".into());
                println!("{name}: FAILED {message}");
                failures.push(name.clone());
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn lite0_exported_to_onnx_ranks_the_shared_photos_as_the_native_lite0() {
    use vulnmap_data::Preprocess;
    let device = Device::Cpu;
    let (Some(onnx), Some(weights), Some(images)) = (
        test_asset("fixtures/onnx/efficientnet_lite0_imagenet.onnx"),
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet"),
    ) else {
        return;
    };
    let onnx = vulnmap_onnx::load(&onnx, &device).unwrap();
    let native = vulnmap_models::zoo::load(
        vulnmap_models::Arch::EfficientNetLite0,
        Some(&weights),
        DType::F32,
        &device,
    )
    .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
        .collect();
    files.sort();
    let preprocess = Preprocess {
        resize: Some(256),
        crop: Some((224, 224)),
    };
    let pixels = preprocess.load_batch(&files, &device).unwrap();
    let top5 = |logits: Tensor| -> Vec<Vec<usize>> {
        logits
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                order.truncate(5);
                order
            })
            .collect()
    };
    let (a, b) = (
        top5(onnx.forward(&pixels).unwrap()),
        top5(native.forward(&pixels).unwrap()),
    );
    for (file, (a, b)) in files.iter().zip(a.iter().zip(&b)) {
        assert_eq!(a, b, "{}", file.display());
    }
    assert!(files.len() >= 10, "{} photos", files.len());
}

/// The multiply-add count (what the bench's GFLOP/s column divides by) against the published
/// figures: torchvision's MobileNetV3-Small, 0.057 G at 224 (its weights' `_ops`, three
/// digits), and EfficientNet-Lite0, 0.4 G (timm's model card, one digit).
#[test]
fn multiply_adds_match_the_published_counts() {
    let device = Device::Cpu;
    // The ViT's is counted from its architecture: a 16 x 16 patch embedding of 14 x 14 patches
    // to width 192, then 4 layers over 197 tokens of the in-projection (192 -> 576), the two
    // attention products (197 x 197 x 192 each), the out-projection and the MLP (192 -> 768 ->
    // 192), and the 1000-class head.
    let vit = 14 * 14 * 192 * 768
        + 4 * (197 * 192 * 576 + 2 * 197 * 197 * 192 + 197 * 192 * 192 + 2 * 197 * 192 * 768)
        + 192 * 1000;
    for (name, published, tolerance) in [
        ("mobilenet_v3_small", 0.057e9, 0.01),
        ("efficientnet_lite0_imagenet", 0.4e9, 0.05),
        ("vit_small_config", vit as f64, 0.0),
    ] {
        let Some(path) = test_asset(&format!("fixtures/onnx/{name}.onnx")) else {
            return;
        };
        let counted = vulnmap_onnx::load(&path, &device).unwrap().multiply_adds() as f64;
        let relative = (counted / published - 1.0).abs();
        println!("{name}: {counted:.4e} multiply-adds, published {published:.3e}");
        assert!(
            relative <= tolerance,
            "{name}: {counted} multiply-adds, published {published} (off by {relative:.3})"
        );
    }
}
