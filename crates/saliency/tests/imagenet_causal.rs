//! EfficientNet-Lite0 on the shared ImageNet images: SmoothGrad's maps are causal, deleting its
//! most salient pixels first drops the class probability faster than a random order (lower
//! deletion AUC), and inserting them first raises it faster (higher insertion AUC).

mod common;

use candle_core::{DType, Tensor};
use common::device;
use vulnmap_data::random;
use vulnmap_data::Preprocess;
use vulnmap_models::{zoo, Arch};
use vulnmap_saliency::metrics::causal::CausalMetric;
use vulnmap_saliency::{Method, SmoothGrad};
use vulnmap_testkit::test_asset;

#[test]
fn smoothgrad_beats_a_random_map_on_deletion_and_insertion() {
    let (Some(weights), Some(dir)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet"),
    ) else {
        return;
    };
    let model = zoo::load(
        Arch::EfficientNetLite0,
        Some(&weights),
        DType::F32,
        &device(),
    )
    .unwrap();
    let files: Vec<_> = [
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "astronaut.png",
        "imagenet_01_559.jpg",
        "imagenet_04_949.jpg",
        "imagenet_05_853.jpg",
        "imagenet_08_915.jpg",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    let pixels = Preprocess::torchvision_eval(224)
        .load_batch(&files, &device())
        .unwrap();
    let targets = vulnmap_saliency::predicted_classes(model.as_ref(), &pixels, 8).unwrap();
    let smoothgrad = Method::SmoothGrad(SmoothGrad {
        samples: 16,
        ..SmoothGrad::authors()
    });
    let maps = smoothgrad
        .explain(model.as_ref(), &pixels, &targets)
        .unwrap();
    // RISE's protocol, with 32 steps instead of 224 to keep the test short.
    let metric = CausalMetric {
        pixels_per_step: 224 * 224 / 32,
        ..CausalMetric::default()
    };
    let mut better = 0;
    let mut sums = [0f64; 4];
    for (i, file) in files.iter().enumerate() {
        let image = pixels.get(i).unwrap();
        let map = maps.get(i).unwrap();
        let noise = random::uniform_vec(
            &mut random::rng(i as u64, "random map"),
            224 * 224,
            0.0,
            1.0,
        );
        let random_map = Tensor::from_vec(noise, (224, 224), &device()).unwrap();
        let del = metric
            .deletion(model.as_ref(), &image, &map, targets[i])
            .unwrap()
            .auc;
        let del_random = metric
            .deletion(model.as_ref(), &image, &random_map, targets[i])
            .unwrap()
            .auc;
        let ins = metric
            .insertion(model.as_ref(), &image, &map, targets[i])
            .unwrap()
            .auc;
        let ins_random = metric
            .insertion(model.as_ref(), &image, &random_map, targets[i])
            .unwrap()
            .auc;
        let name = file.file_name().unwrap().to_string_lossy();
        println!("{name}: deletion {del:.3} (random {del_random:.3}), insertion {ins:.3} (random {ins_random:.3})");
        better += (del < del_random && ins > ins_random) as usize;
        sums[0] += del;
        sums[1] += del_random;
        sums[2] += ins;
        sums[3] += ins_random;
    }
    let n = files.len() as f64;
    let [del, del_random, ins, ins_random] = sums.map(|s| s / n);
    println!(
        "SmoothGrad beats the random map on both curves for {better} of {} images; means: deletion {del:.3} (random {del_random:.3}), insertion {ins:.3} (random {ins_random:.3})",
        files.len()
    );
    // The papers' comparison: mean areas over the images.
    assert!(
        del < del_random && ins > ins_random,
        "SmoothGrad's mean areas do not beat a random map's"
    );
}

#[test]
fn curves_start_and_end_where_they_must() {
    let Some(weights) = test_asset("assets/weights/efficientnet-lite0.safetensors") else {
        return;
    };
    let model = zoo::load(
        Arch::EfficientNetLite0,
        Some(&weights),
        DType::F32,
        &device(),
    )
    .unwrap();
    let image = Tensor::rand(0f32, 1.0, (3, 32, 32), &device()).unwrap();
    let map = Tensor::rand(0f32, 1.0, (32, 32), &device()).unwrap();
    let metric = CausalMetric {
        pixels_per_step: 100,
        ..CausalMetric::default()
    };
    let curve = metric.deletion(model.as_ref(), &image, &map, 3).unwrap();
    assert_eq!(curve.fractions.len(), 12); // 0, 100, ..., 1000, 1024 pixels
    assert_eq!(curve.fractions[0], 0.0);
    assert_eq!(*curve.fractions.last().unwrap(), 1.0);
    let p = |x: &Tensor| {
        let probs =
            candle_nn::ops::softmax(&model.forward(&x.unsqueeze(0).unwrap()).unwrap(), 1).unwrap();
        probs
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    assert!((curve.scores[0] - p(&image)).abs() < 1e-5);
    assert!((curve.scores.last().unwrap() - p(&image.zeros_like().unwrap())).abs() < 1e-5);
    let err = metric
        .deletion(model.as_ref(), &image, &map, 5000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    let err = CausalMetric {
        pixels_per_step: 0,
        ..metric
    }
    .deletion(model.as_ref(), &image, &map, 3)
    .unwrap_err()
    .to_string();
    assert!(err.contains("pixels_per_step"), "{err}");
}
