//! ResNet18 and ResNet50 against PyTorch: the same torchvision-initialised weights and images
//! must give torchvision's eval logits, train-mode BatchNorm logits and input gradients.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use vulnmap_models::{zoo, Arch, Checkpoint};
use vulnmap_testkit::test_asset;

fn check(arch: Arch, stem: &str) {
    let (Some(weights), Some(parity)) = (
        test_asset(&format!("fixtures/{stem}_tvinit_f16.safetensors")),
        test_asset(&format!("fixtures/{stem}_parity.safetensors")),
    ) else {
        return;
    };
    let fixture = read_fixture(&parity);
    let pixels = &fixture["pixels"];
    let checkpoint = Checkpoint::open(&weights).unwrap();
    let model = zoo::from_checkpoint(arch, &checkpoint, DType::F32, &device()).unwrap();
    assert_eq!(model.num_classes(), 1000);

    // Eval logits.
    let want = to_vec(&fixture["logits_eval"]);
    let got = to_vec(&model.forward(pixels).unwrap());
    let diff = max_abs_diff(&got, &want);
    let tol = 1e-3 * max_abs(&want);
    println!("{stem}: eval logits max |diff| {diff:.3e} (tolerance {tol:.3e})");
    assert!(diff <= tol, "{stem} eval logits differ by {diff} > {tol}");

    // Input gradient of each image's top logit.
    let targets = fixture["target"].to_dtype(DType::U32).unwrap();
    let x = Var::from_tensor(pixels).unwrap();
    let logits = model.forward(x.as_tensor()).unwrap();
    let top = logits.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    let grads = top.sum_all().unwrap().backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .expect("no gradient reached the pixels");
    let want_grad = &fixture["grad_pixels_top_logit"];
    for i in 0..pixels.dim(0).unwrap() {
        let g = to_vec(&grad.get(i).unwrap());
        let w = to_vec(&want_grad.get(i).unwrap());
        let (cos, rel) = (cosine(&g, &w), relative_l2(&g, &w));
        println!("{stem} image {i}: gradient cosine {cos:.6}, relative L2 {rel:.3e}");
        assert!(
            cos >= 0.999,
            "{stem} image {i}: gradient cosine {cos} < 0.999"
        );
        assert!(
            rel <= 1e-2,
            "{stem} image {i}: gradient relative L2 error {rel} > 1e-2"
        );
    }

    // Train-mode BatchNorm (batch statistics).
    let want = to_vec(&fixture["logits_train_bn"]);
    let got = to_vec(&model.forward_t(pixels, true).unwrap());
    let diff = max_abs_diff(&got, &want);
    let tol = 1e-3 * max_abs(&want);
    println!("{stem}: train-mode logits max |diff| {diff:.3e} (tolerance {tol:.3e})");
    assert!(
        diff <= tol,
        "{stem} train-mode logits differ by {diff} > {tol}"
    );
}

#[test]
fn resnet18_matches_pytorch() {
    check(Arch::ResNet18, "resnet18");
}

#[test]
fn resnet50_matches_pytorch() {
    check(Arch::ResNet50, "resnet50");
}

#[test]
fn features_then_forward_from_equals_forward() {
    let Some(weights) = test_asset("fixtures/resnet18_tvinit_f16.safetensors") else {
        return;
    };
    let model = zoo::load(Arch::ResNet18, Some(&weights), DType::F32, &device()).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 64), &device()).unwrap();
    let want = to_vec(&model.forward(&x).unwrap());
    for layer in model
        .layers()
        .iter()
        .map(String::as_str)
        .chain(["layer3.1", "layer1.0"])
    {
        let f = model.features(&x, layer).unwrap();
        let got = to_vec(&model.forward_from(&f, layer).unwrap());
        assert!(
            max_abs_diff(&got, &want) < 1e-4,
            "split at {layer} changes the logits"
        );
    }
    assert_eq!(
        model.features(&x, "layer4").unwrap().dims(),
        &[2, 512, 2, 2]
    );
    let err = model.features(&x, "layer5").unwrap_err().to_string();
    assert!(err.contains("layer5") && err.contains("layer4"), "{err}");
}
