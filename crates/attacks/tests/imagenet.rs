//! EfficientNet-Lite0 on shared ImageNet images: the random attack succeeds untargeted (the
//! authors' generator, the paper's alpha 0.02) and targeted (the generic generator, alpha 0.05
//! to keep the test short); perturbed images stay in [0, 1] and change only where the mask
//! allows.

mod common;

use candle_core::{DType, Tensor};
use common::{device, kept_noise, kept_perturbed};
use vulnmap_attacks::engine::run;
use vulnmap_attacks::random::random_attack;
use vulnmap_attacks::{AttackConfig, GeneratorChoice, Goal, Job, Masking, Region};
use vulnmap_data::Preprocess;
use vulnmap_models::{zoo, Arch, Classifier};
use vulnmap_testkit::test_asset;

fn lite0_coffee() -> Option<(Box<dyn Classifier>, Tensor)> {
    let weights = test_asset("assets/weights/efficientnet-lite0.safetensors")?;
    let image = test_asset("assets/images/imagenet/coffee.png")?;
    let model = zoo::load(
        Arch::EfficientNetLite0,
        Some(&weights),
        DType::F32,
        &device(),
    )
    .unwrap();
    let pixels = Preprocess::torchvision_eval(224)
        .load_batch(&[image], &device())
        .unwrap();
    Some((model, pixels))
}

fn max_abs_of(t: &Tensor) -> f64 {
    vulnmap_testkit::max_abs(&vulnmap_testkit::to_vec(t))
}

#[test]
fn random_attacks_succeed_untargeted_and_targeted_within_the_cap() {
    let Some((model, pixels)) = lite0_coffee() else {
        return;
    };
    let config = AttackConfig {
        alpha: 0.02,
        generator: GeneratorChoice::Paper,
        ..AttackConfig::default()
    };
    let out = random_attack(model.as_ref(), &pixels, &[Goal::Untargeted], &config).unwrap();
    let o = &out[0];
    println!("untargeted, authors' generator: {}", o.table_row());
    assert!(o.success, "{o:?}");
    assert_eq!(o.label_from, 967);
    assert_ne!(o.label_to, 967);
    assert!(o.confidence > 0.9 && o.iterations <= 100);
    assert!(o.final_loss < 0.0, "untargeted loss is -CE");
    // The perturbed image is the clamped sum, in [0, 1], within alpha of the image.
    let p = kept_perturbed(o);
    assert!(
        p.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0
            && p.max_all().unwrap().to_scalar::<f32>().unwrap() <= 1.0
    );
    assert!(max_abs_of(&(p - pixels.get(0).unwrap()).unwrap()) <= 0.02 + 1e-6);
    assert!(max_abs_of(kept_noise(o)) <= 0.02 + 1e-6 && max_abs_of(kept_noise(o)) > 0.0);

    let config = AttackConfig {
        alpha: 0.05,
        generator: GeneratorChoice::Generic,
        ..AttackConfig::default()
    };
    let out = random_attack(model.as_ref(), &pixels, &[Goal::Targeted(10)], &config).unwrap();
    let o = &out[0];
    println!(
        "targeted to class 10, generic generator, alpha 0.05: {}",
        o.table_row()
    );
    assert!(
        o.success && o.label_to == 10 && o.target == Some(10),
        "{o:?}"
    );
}

#[test]
fn noise_stays_inside_its_window_and_its_mask() {
    let Some((model, pixels)) = lite0_coffee() else {
        return;
    };
    let config = AttackConfig {
        alpha: 0.3,
        max_iters: 2,
        ..AttackConfig::default()
    };
    let jobs = [Job {
        image: 0,
        goal: Goal::Untargeted,
        region: Region::Window {
            top: 50,
            left: 100,
            size: 40,
        },
        alpha: 0.3,
        seed: 1,
    }];
    let o = &run(model.as_ref(), &pixels, &jobs, &Masking::None, &config).unwrap()[0];
    let diff = (kept_perturbed(o) - pixels.get(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum(0)
        .unwrap();
    let inside = diff.narrow(0, 50, 40).unwrap().narrow(1, 100, 40).unwrap();
    assert!(
        inside.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
        "the window changed nothing"
    );
    let diff = diff.to_vec2::<f32>().unwrap();
    for (y, row) in diff.iter().enumerate() {
        for (x, &d) in row.iter().enumerate() {
            let in_window = (50..90).contains(&y) && (100..140).contains(&x);
            assert!(
                in_window || d == 0.0,
                "pixel ({y}, {x}) changed outside the window"
            );
        }
    }

    // A fixed mask: only its non-zero pixels may change.
    let mut m = vec![0f32; 224 * 224];
    for y in 20..60 {
        for x in 150..200 {
            m[y * 224 + x] = if (x + y) % 2 == 0 { 1.0 } else { 0.3 };
        }
    }
    let mask = Tensor::from_vec(m.clone(), (224, 224), &device()).unwrap();
    let jobs = [Job {
        image: 0,
        goal: Goal::Untargeted,
        region: Region::Whole,
        alpha: 0.3,
        seed: 1,
    }];
    let config = AttackConfig {
        generator: GeneratorChoice::Generic,
        ..config
    };
    let o = &run(
        model.as_ref(),
        &pixels,
        &jobs,
        &Masking::Fixed(vec![mask]),
        &config,
    )
    .unwrap()[0];
    let diff = (kept_perturbed(o) - pixels.get(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        diff.iter().zip(&m).all(|(d, &mv)| mv > 0.0 || *d == 0.0),
        "pixels changed where the mask is zero"
    );
    assert!(diff.iter().any(|&d| d > 0.0));
}
