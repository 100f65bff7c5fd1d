//! On the synthetic fundus benchmark, where the right map is known: saliency methods point at
//! the lesions of the trained tiny-resnet, and its maps change when its top layers are
//! re-initialised (the model-randomisation sanity check).
//!
//! The model is explained through its centred logits (each logit minus their mean): for a
//! two-class model the raw logits share a large component the softmax ignores.

mod common;

use candle_core::{DType, Tensor};
use common::device;
use std::path::Path;
use vulnmap_data::{Dataset, Preprocess};
use vulnmap_models::{zoo, Arch, Checkpoint, Classifier, Score, ScoredClassifier};
use vulnmap_saliency::metrics::localisation::{auroc, PointingGame};
use vulnmap_saliency::metrics::randomisation::{cascade, spearman};
use vulnmap_saliency::metrics::road::{Order, Road};
use vulnmap_saliency::{
    Cam, CamRule, Gradient, GuidedBackprop, InputXGradient, Method, Occlusion, OcclusionBaseline,
    SmoothGrad, Surrogate,
};
use vulnmap_train::fundus_benchmark::{BenchmarkConfig, FundusBenchmark};

struct Lesions {
    model: Box<dyn Classifier>,
    pixels: Tensor,
    masks: Vec<Vec<bool>>,
    checkpoint: std::path::PathBuf,
}

fn centred(model: Box<dyn Classifier>) -> Box<dyn Classifier> {
    Box::new(ScoredClassifier::new(model, Score::CentredLogit))
}

/// Up to `count` test-split lesion images that the model classifies as lesions, with masks.
fn lesion_images(count: usize) -> Lesions {
    let bench = FundusBenchmark::prepare(
        &BenchmarkConfig::default(),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
    .unwrap();
    let model = centred(bench.model(&device()).unwrap());
    let dataset: Dataset = bench.dataset().unwrap();
    let splits = bench.splits(&dataset);
    let lesion = dataset.classes.iter().position(|c| c == "lesion").unwrap();
    let candidates: Vec<usize> = splits
        .test
        .iter()
        .copied()
        .filter(|&i| dataset.samples[i].label == lesion)
        .collect();
    let paths: Vec<_> = candidates
        .iter()
        .map(|&i| dataset.samples[i].path.clone())
        .collect();
    let pixels = Preprocess::none().load_batch(&paths, &device()).unwrap();
    let predicted = vulnmap_saliency::predicted_classes(model.as_ref(), &pixels, 32).unwrap();
    let keep: Vec<usize> = (0..candidates.len())
        .filter(|&k| predicted[k] == lesion)
        .take(count)
        .collect();
    let masks = keep
        .iter()
        .map(|&k| {
            let mask =
                vulnmap_data::load_rgb(dataset.samples[candidates[k]].mask.as_ref().unwrap())
                    .unwrap();
            mask.pixels().map(|p| p[0] > 0.5).collect()
        })
        .collect();
    let index = Tensor::new(
        keep.iter()
            .map(|&k| k as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &device(),
    )
    .unwrap();
    Lesions {
        model,
        pixels: pixels.index_select(&index, 0).unwrap(),
        masks,
        checkpoint: bench.checkpoint.clone(),
    }
}

/// A surrogate on 16-pixel superpixels, off ones blurred (black would draw dark lesions).
fn surrogate(base: Surrogate) -> Method {
    Method::Surrogate(Surrogate {
        samples: 300,
        baseline: OcclusionBaseline::Blurred { sigma: 8.0 },
        batch_size: 64,
        ..base
    })
}

/// A class activation map on layer3.
fn layer3(rule: CamRule) -> Method {
    Method::Cam(Cam {
        rule,
        layer: Some("layer3".into()),
        batch_size: 16,
    })
}

/// TorchRay's pointing game: 15 pixels of tolerance; gradient-type maps smoothed by 2% of the
/// image first, class activation maps and occlusion as they are. Grad-CAM on layer3: at 128 px layer4 is a
/// 4 x 4 map whose 32-pixel cells cannot resolve lesions (it scores about 0.4).
#[test]
fn saliency_methods_point_at_the_lesions() {
    let data = lesion_images(32);
    let n = data.masks.len();
    assert!(
        n >= 30,
        "only {n} correctly classified lesion images in the test split"
    );
    let targets = vec![1; n];
    let smoothed = PointingGame::torchray();
    let raw = PointingGame {
        smooth: 0.0,
        ..smoothed
    };
    // The least hit rate each method must reach. Input x gradient scales by the pixel, and the
    // haemorrhages are dark (it reaches about 0.7, as does class-agnostic Eigen-CAM, whose
    // first component is not the lesion on every image); the rest reach 0.75 or more.
    let methods = [
        (Method::Gradient(Gradient::default()), smoothed, 0.7),
        (Method::SmoothGrad(SmoothGrad::authors()), smoothed, 0.7),
        (layer3(CamRule::GradCam), raw, 0.7),
        (
            Method::InputXGradient(InputXGradient::default()),
            smoothed,
            0.6,
        ),
        (layer3(CamRule::GradCamPlusPlus), raw, 0.7),
        (layer3(CamRule::LayerCam), raw, 0.7),
        (layer3(CamRule::ScoreCam), raw, 0.7),
        (layer3(CamRule::EigenCam), raw, 0.6),
        (surrogate(Surrogate::lime()), raw, 0.7),
        (surrogate(Surrogate::kernel_shap()), raw, 0.7),
        (
            Method::Occlusion(Occlusion {
                window: 16,
                stride: 8,
                baseline: OcclusionBaseline::Blurred { sigma: 8.0 },
                ..Occlusion::default()
            }),
            raw,
            0.7,
        ),
    ];
    let mut failures = Vec::new();
    for (method, game, least) in methods {
        let start = std::time::Instant::now();
        let maps = method
            .explain(data.model.as_ref(), &data.pixels, &targets)
            .unwrap();
        let (mut hits, mut area) = (0, 0.0);
        for (i, mask) in data.masks.iter().enumerate() {
            let map = maps.get(i).unwrap();
            hits += game.hit(&map, mask).unwrap() as usize;
            area += auroc(&map, mask).unwrap();
        }
        let rate = hits as f64 / n as f64;
        println!(
            "{}: pointing game {hits}/{n} = {rate:.2}, mean AUROC {:.3} ({:.1} s)",
            method.name(),
            area / n as f64,
            start.elapsed().as_secs_f64()
        );
        if rate < least {
            failures.push(format!(
                "{}: pointing-game hit rate {rate:.2}, below {least}",
                method.name()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Adebayo et al.'s cascading check, one step: re-initialise fc and layer4. Signed attributions
/// (and Grad-CAM) must decorrelate; absolute-value maps keep the image's structure (edges, the
/// field of view) and stay correlated, as Adebayo et al. also report, so they are printed only.
#[test]
fn maps_change_when_the_top_layers_are_reinitialised() {
    let data = lesion_images(12);
    let checkpoint = Checkpoint::open(&data.checkpoint).unwrap();
    let randomised = centred(
        zoo::randomized(
            Arch::TinyResNet,
            &checkpoint,
            &["fc.", "layer4."],
            7,
            DType::F32,
            &device(),
        )
        .unwrap(),
    );
    let n = data.masks.len();
    let targets = vec![1; n];
    let correlation = |a: &Tensor, b: &Tensor| -> f64 {
        (0..n)
            .map(|i| spearman(&a.get(i).unwrap(), &b.get(i).unwrap()).unwrap())
            .sum::<f64>()
            / n as f64
    };
    let signed = |m: &dyn Classifier| -> Tensor {
        let g = Gradient::default()
            .attribute(m, &data.pixels, &targets)
            .unwrap();
        g.sum(1).unwrap() // Reduction::Sum, without scaling: ranks are all that matter
    };
    let gradient = correlation(&signed(data.model.as_ref()), &signed(randomised.as_ref()));
    let cam = Method::Cam(Cam {
        layer: Some("layer3".into()),
        ..Cam::default()
    });
    let grad_cam = correlation(
        &cam.explain(data.model.as_ref(), &data.pixels, &targets)
            .unwrap(),
        &cam.explain(randomised.as_ref(), &data.pixels, &targets)
            .unwrap(),
    );
    let sg = Method::SmoothGrad(SmoothGrad::authors());
    let smoothgrad_abs = correlation(
        &sg.explain(data.model.as_ref(), &data.pixels, &targets)
            .unwrap(),
        &sg.explain(randomised.as_ref(), &data.pixels, &targets)
            .unwrap(),
    );
    println!("rank correlation after re-initialising fc and layer4: gradient (signed) {gradient:.3}, grad-cam {grad_cam:.3}, smoothgrad (absolute) {smoothgrad_abs:.3}");
    assert!(
        gradient < 0.5,
        "signed gradient maps barely changed: {gradient}"
    );
    assert!(grad_cam < 0.5, "Grad-CAM maps barely changed: {grad_cam}");

    // The same weights give the same maps, so the check can fail.
    let again = centred(
        zoo::load(
            Arch::TinyResNet,
            Some(&data.checkpoint),
            DType::F32,
            &device(),
        )
        .unwrap(),
    );
    assert!(correlation(&signed(data.model.as_ref()), &signed(again.as_ref())) > 0.999);
}

/// The cascade from the top: Grad-CAM's maps decorrelate once the head and layer4 are
/// re-initialised, and stay far from the trained model's as the rest follows; a "randomised"
/// model that is the model itself keeps its maps.
#[test]
fn the_randomisation_cascade_decorrelates_grad_cam() {
    let data = lesion_images(8);
    let checkpoint = Checkpoint::open(&data.checkpoint).unwrap();
    let n = data.masks.len();
    let targets = vec![1; n];
    let randomised = |prefixes: &[&str]| -> vulnmap_saliency::Result<Box<dyn Classifier>> {
        Ok(centred(zoo::randomized(
            Arch::TinyResNet,
            &checkpoint,
            prefixes,
            7,
            DType::F32,
            &device(),
        )?))
    };
    let layers = ["fc.", "layer4.", "layer3.", "layer2.", "layer1."];
    let cam = layer3(CamRule::GradCam);
    let curve = cascade(
        data.model.as_ref(),
        &randomised,
        &cam,
        &data.pixels,
        &targets,
        &layers,
    )
    .unwrap();
    assert_eq!(curve.len(), layers.len());
    for step in &curve {
        println!("{:?}: {:.3}", step.randomised, step.similarity);
    }
    assert_eq!(curve[4].randomised, layers);
    assert!(
        curve[1..].iter().all(|s| s.similarity < 0.5),
        "Grad-CAM stays like the trained model's: {curve:?}"
    );
    // Re-initialising nothing must give the model's own maps back (a check of the check).
    let same = cascade(
        data.model.as_ref(),
        &|_: &[&str]| {
            Ok(centred(zoo::load(
                Arch::TinyResNet,
                Some(&data.checkpoint),
                DType::F32,
                &device(),
            )?))
        },
        &cam,
        &data.pixels,
        &targets,
        &["fc."],
    )
    .unwrap();
    assert!(same[0].similarity > 0.999, "{same:?}");
}

/// Adebayo et al.'s finding, reproduced: guided backpropagation's maps stay like the trained
/// model's while the network is re-initialised from the top, where the plain gradient's do not.
#[test]
fn guided_backprop_fails_the_randomisation_check_that_the_gradient_passes() {
    let data = lesion_images(8);
    let checkpoint = Checkpoint::open(&data.checkpoint).unwrap();
    let targets = vec![1; data.masks.len()];
    let randomised = |prefixes: &[&str]| -> vulnmap_saliency::Result<Box<dyn Classifier>> {
        Ok(centred(zoo::randomized(
            Arch::TinyResNet,
            &checkpoint,
            prefixes,
            7,
            DType::F32,
            &device(),
        )?))
    };
    let layers = ["fc.", "layer4.", "layer3.", "layer2."];
    let curve = |method: Method| {
        cascade(
            data.model.as_ref(),
            &randomised,
            &method,
            &data.pixels,
            &targets,
            &layers,
        )
        .unwrap()
    };
    let guided = curve(Method::GuidedBackprop(GuidedBackprop::default()));
    let gradient = curve(Method::Gradient(Gradient::default()));
    for (g, v) in guided.iter().zip(&gradient) {
        println!(
            "{:?}: guided {:.3}, gradient {:.3}",
            g.randomised, g.similarity, v.similarity
        );
    }
    for (g, v) in guided.iter().zip(&gradient) {
        assert!(
            g.similarity > v.similarity + 0.15,
            "guided backprop should stay more like the trained model's maps: {guided:?} {gradient:?}"
        );
    }
    // Top two stages re-initialised (measured: guided 0.89, gradient 0.55).
    assert!(guided[1].similarity > 0.8, "{guided:?}");
    assert!(gradient[1].similarity < 0.65, "{gradient:?}");
}

/// ROAD on the lesion images: removing occlusion's most relevant pixels first costs the lesion
/// class more than removing its least relevant first, and more than a random order does.
#[test]
fn road_separates_a_faithful_map_from_a_random_one() {
    let data = lesion_images(8);
    let n = data.masks.len();
    let targets = vec![1; n];
    let occlusion = Method::Occlusion(Occlusion {
        window: 16,
        stride: 8,
        baseline: OcclusionBaseline::Blurred { sigma: 8.0 },
        ..Occlusion::default()
    });
    let maps = occlusion
        .explain(data.model.as_ref(), &data.pixels, &targets)
        .unwrap();
    let road = Road::default();
    let (mut morf, mut lerf, mut random_morf) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let image = data.pixels.get(i).unwrap();
        let map = maps.get(i).unwrap();
        let m = data.model.as_ref();
        morf += road.curve(m, &image, &map, 1, Order::MoRF).unwrap().mean / n as f64;
        lerf += road.curve(m, &image, &map, 1, Order::LeRF).unwrap().mean / n as f64;
        let noise = vulnmap_data::random::uniform_vec(
            &mut vulnmap_data::random::rng(i as u64, "random map"),
            map.elem_count(),
            0.0,
            1.0,
        );
        let random_map = Tensor::from_vec(noise, map.dims(), &device()).unwrap();
        random_morf += road
            .curve(m, &image, &random_map, 1, Order::MoRF)
            .unwrap()
            .mean
            / n as f64;
    }
    println!("ROAD on {n} lesion images: occlusion MoRF {morf:.3}, LeRF {lerf:.3}; random MoRF {random_morf:.3}");
    assert!(
        morf < lerf && morf < random_morf,
        "{morf} {lerf} {random_morf}"
    );
}
