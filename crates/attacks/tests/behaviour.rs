//! Determinism, batching, bad parameters, NaN losses, rounds, the alpha sweep and the FGSM/PGD
//! baselines, on the synthetic benchmark's small model.

mod common;

use candle_core::{DType, Device, Result as CResult, Tensor};
use common::{device, kept_noise, kept_perturbed};
use vulnmap_attacks::baselines::{pgd, Norm, Pgd};
use vulnmap_attacks::engine::run;
use vulnmap_attacks::engine::OCCLUDED_SIGMA;
use vulnmap_attacks::local::{
    local_attack, local_attacks, LocalAttack, LocalGame, LocalMap, WindowScore, WindowSpread,
};
use vulnmap_attacks::mask_attack::{mask_attack, mask_attack_averaged};
use vulnmap_attacks::random::random_attack;
use vulnmap_attacks::rounds::{alpha_sweep, rounds};
use vulnmap_attacks::{AttackConfig, DualReward, Goal, Job, LearnedMask, Masking, Region};
use vulnmap_models::{Classes, Classifier, InputSpec};
use vulnmap_saliency::GaussianBlur;
use vulnmap_testkit::compare::{max_abs, max_abs_diff, to_vec};

fn same(a: &Tensor, b: &Tensor) -> bool {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        == 0.0
}

#[test]
fn same_seed_same_result_and_batching_changes_nothing() {
    let data = common::lesions(4);
    let goals = vec![Goal::Untargeted; 4];
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 15,
        ..AttackConfig::default()
    };
    let one = random_attack(
        data.model.as_ref(),
        &data.pixels,
        &goals,
        &AttackConfig {
            batch_size: 1,
            ..config
        },
    )
    .unwrap();
    let four = random_attack(
        data.model.as_ref(),
        &data.pixels,
        &goals,
        &AttackConfig {
            batch_size: 4,
            ..config
        },
    )
    .unwrap();
    let again = random_attack(
        data.model.as_ref(),
        &data.pixels,
        &goals,
        &AttackConfig {
            batch_size: 4,
            ..config
        },
    )
    .unwrap();
    for ((a, b), c) in one.iter().zip(&four).zip(&again) {
        assert_eq!(
            (a.iterations, a.success, a.label_to),
            (b.iterations, b.success, b.label_to)
        );
        assert_eq!((b.iterations, b.success), (c.iterations, c.success));
        assert!(
            same(kept_noise(b), kept_noise(c)),
            "same seed, different noise"
        );
        let d = (kept_noise(a) - kept_noise(b))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "batched and unbatched noise differ by {d}");
    }
    let other = random_attack(
        data.model.as_ref(),
        &data.pixels,
        &goals,
        &AttackConfig { seed: 9, ..config },
    )
    .unwrap();
    assert!(
        !same(kept_noise(&other[0]), kept_noise(&four[0])),
        "another seed, same noise"
    );

    let spec = LocalAttack {
        window: 64,
        stride: 64,
        ..LocalAttack::default()
    };
    let cfg = AttackConfig {
        alpha: 0.3,
        max_iters: 5,
        ..AttackConfig::default()
    };
    let a = local_attack(
        data.model.as_ref(),
        &data.pixels,
        0,
        Goal::Untargeted,
        &spec,
        &AttackConfig {
            batch_size: 1,
            ..cfg
        },
    )
    .unwrap();
    let b = local_attack(
        data.model.as_ref(),
        &data.pixels,
        0,
        Goal::Untargeted,
        &spec,
        &AttackConfig {
            batch_size: 4,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(a.scores, b.scores);
    assert!(
        a.outcomes
            .iter()
            .all(|o| o.noise.is_none() && o.perturbed.is_none()),
        "window outcomes keep no images"
    );
    // Two images' windows banked together give each image's own map.
    let both = local_attacks(
        data.model.as_ref(),
        &data.pixels,
        &[2, 0],
        &[Goal::Untargeted; 2],
        &spec,
        &AttackConfig {
            batch_size: 12,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(both[1].scores, a.scores);
    assert!(same(&both[1].map, &a.map));
    let alone = local_attack(
        data.model.as_ref(),
        &data.pixels,
        2,
        Goal::Untargeted,
        &spec,
        &cfg,
    )
    .unwrap();
    assert_eq!(both[0].scores, alone.scores);
}

#[test]
fn bad_parameters_are_refused_with_the_reason() {
    let data = common::lesions(1);
    let m = data.model.as_ref();
    let err = |r: vulnmap_attacks::Result<Vec<vulnmap_attacks::AttackOutcome>>| {
        r.unwrap_err().to_string()
    };
    let e = err(random_attack(
        m,
        &data.pixels,
        &[Goal::Untargeted],
        &AttackConfig {
            alpha: 0.0,
            ..AttackConfig::default()
        },
    ));
    assert!(e.contains("alpha must be a positive"), "{e}");
    let e = err(random_attack(
        m,
        &data.pixels,
        &[Goal::Untargeted],
        &AttackConfig {
            alpha: -0.1,
            ..AttackConfig::default()
        },
    ));
    assert!(e.contains("alpha"), "{e}");
    let e = err(random_attack(
        m,
        &data.pixels,
        &[Goal::Targeted(2)],
        &AttackConfig::default(),
    ));
    assert!(
        e.contains("target class 2 is out of range") && e.contains("2 classes"),
        "{e}"
    );
    let e = local_attack(
        m,
        &data.pixels,
        0,
        Goal::Untargeted,
        &LocalAttack {
            window: 200,
            stride: 50,
            ..LocalAttack::default()
        },
        &AttackConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("200x200 window is larger than the 128x128 image"),
        "{e}"
    );
    let jobs = [Job {
        image: 0,
        goal: Goal::Untargeted,
        region: Region::Window {
            top: 100,
            left: 0,
            size: 40,
        },
        alpha: 0.1,
        seed: 0,
    }];
    let e = err(run(
        m,
        &data.pixels,
        &jobs,
        &Masking::None,
        &AttackConfig::default(),
    ));
    assert!(e.contains("does not fit"), "{e}");
    let e = err(random_attack(
        m,
        &data.pixels,
        &[Goal::Untargeted],
        &AttackConfig {
            generator: vulnmap_attacks::GeneratorChoice::Paper,
            ..AttackConfig::default()
        },
    ));
    assert!(e.contains("224x224") && e.contains("128x128"), "{e}");
    // The mask attack's dual game: an area outside (0, 1), a negative jitter, a smoothing that is
    // NaN or of a U-Net, a negative pull towards SmoothGrad, a field of view without the dual
    // game, a targeted goal.
    let dual = LearnedMask::dual(8);
    for (spec, goal, reason) in [
        (
            LearnedMask {
                gamma: -0.5,
                ..dual
            },
            Goal::Untargeted,
            "gamma weighs the pull towards SmoothGrad, 0 or more, got -0.5",
        ),
        (
            LearnedMask { area: 1.5, ..dual },
            Goal::Untargeted,
            "area is a fraction in (0, 1), got 1.5",
        ),
        (
            LearnedMask {
                jitter: -1.0,
                ..dual
            },
            Goal::Untargeted,
            "jitter is a fraction of a cell, got -1",
        ),
        (
            LearnedMask {
                smooth: f64::NAN,
                ..dual
            },
            Goal::Untargeted,
            "smooth is a fraction of a cell, 0 or more, got NaN",
        ),
        (
            LearnedMask {
                smooth: 1.0,
                network: vulnmap_attacks::MaskNetwork::UNet { base: 4 },
                ..dual
            },
            Goal::Untargeted,
            "smooth applies to the free mask only",
        ),
        (
            LearnedMask {
                field_of_view: true,
                ..LearnedMask::default()
            },
            Goal::Untargeted,
            "field_of_view blurs the dual game's baseline",
        ),
        (dual, Goal::Targeted(1), "its goal is untargeted"),
    ] {
        let e = err(mask_attack(
            m,
            &data.pixels,
            &[goal],
            &spec,
            &AttackConfig::default(),
        ));
        assert!(e.contains(reason), "{e}");
    }
}

/// Another model's classes, input and layers with logits of its own, `forward(model, pixels)`.
struct Relogit<'a, F>(&'a dyn Classifier, F);

impl<F: Fn(&dyn Classifier, &Tensor) -> CResult<Tensor> + Send + Sync> Classifier
    for Relogit<'_, F>
{
    fn arch(&self) -> &str {
        "relogit"
    }
    fn input_spec(&self) -> &InputSpec {
        self.0.input_spec()
    }
    fn classes(&self) -> &Classes {
        self.0.classes()
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn forward_t(&self, pixels: &Tensor, _train: bool) -> CResult<Tensor> {
        (self.1)(self.0, pixels)
    }
    fn layers(&self) -> Vec<String> {
        self.0.layers()
    }
    fn default_layer(&self) -> String {
        self.0.default_layer()
    }
    fn features(&self, pixels: &Tensor, layer: &str) -> CResult<Tensor> {
        self.0.features(pixels, layer)
    }
    fn forward_from(&self, features: &Tensor, layer: &str) -> CResult<Tensor> {
        self.0.forward_from(features, layer)
    }
}

/// The model's logits, turned to NaN for images whose first pixel is exactly 0.123.
fn poisoned(model: &dyn Classifier, pixels: &Tensor) -> CResult<Tensor> {
    let logits = model.forward(pixels)?;
    let marker = pixels
        .narrow(1, 0, 1)?
        .narrow(2, 0, 1)?
        .narrow(3, 0, 1)?
        .flatten_all()?;
    let poison = marker.eq(0.123f64)?.to_dtype(DType::F32)?; // 1 for poisoned images
    let nan = Tensor::full(f32::NAN, logits.shape(), logits.device())?;
    poison
        .unsqueeze(1)?
        .broadcast_as(logits.shape())?
        .to_dtype(DType::U8)?
        .where_cond(&nan, &logits)
}

#[test]
fn a_nan_loss_stops_that_image_with_a_reported_failure() {
    let data = common::lesions(2);
    // Image 0 gets the marker; the noise never touches the corner (outside the field of view,
    // a window elsewhere), so it stays poisoned.
    let mut first = data
        .pixels
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    first[0] = 0.123;
    let first = Tensor::from_vec(first, (3, 128, 128), &device()).unwrap();
    let pixels = Tensor::stack(&[first, data.pixels.get(1).unwrap()], 0).unwrap();
    let poisoned = Relogit(data.model.as_ref(), poisoned);
    let window = Region::Window {
        top: 40,
        left: 40,
        size: 48,
    };
    let jobs: Vec<Job> = (0..2)
        .map(|image| Job {
            image,
            goal: Goal::Untargeted,
            region: window,
            alpha: 0.3,
            seed: 0,
        })
        .collect();
    let outcomes = run(
        &poisoned,
        &pixels,
        &jobs,
        &Masking::None,
        &AttackConfig {
            max_iters: 10,
            ..AttackConfig::default()
        },
    )
    .unwrap();
    assert!(!outcomes[0].success);
    assert!(
        outcomes[0].failure.as_deref().unwrap().contains("NaN"),
        "{:?}",
        outcomes[0].failure
    );
    assert_eq!(outcomes[0].iterations, 0);
    assert!(outcomes[1]
        .failure
        .as_deref()
        .is_none_or(|f| !f.contains("NaN")));
}

#[test]
fn rounds_summarise_and_more_noise_flips_faster() {
    let data = common::lesions(1);
    let config = AttackConfig {
        max_iters: 30,
        ..AttackConfig::default()
    };
    let (outcomes, stats) = rounds(
        data.model.as_ref(),
        &data.pixels,
        0,
        Goal::Untargeted,
        4,
        &AttackConfig {
            alpha: 0.1,
            ..config
        },
    )
    .unwrap();
    assert_eq!(outcomes.len(), 4);
    assert_eq!(stats.rounds, 4);
    assert!((0.0..=1.0).contains(&stats.success_rate));
    let seeds_differ = outcomes
        .windows(2)
        .any(|w| !same(kept_noise(&w[0]), kept_noise(&w[1])));
    assert!(seeds_differ, "rounds use different seeds");
    let sweep = alpha_sweep(
        data.model.as_ref(),
        &data.pixels,
        0,
        Goal::Untargeted,
        &[0.03, 0.3],
        3,
        &config,
    )
    .unwrap();
    for p in &sweep {
        println!(
            "alpha {}: success {:.2}, mean iterations {:.1}",
            p.alpha, p.stats.success_rate, p.stats.mean_iterations
        );
    }
    let (weak, strong) = (&sweep[0].stats, &sweep[1].stats);
    assert!(strong.success_rate >= weak.success_rate);
    assert!(strong.success_rate > 0.0);
    assert!(weak.successes == 0 || strong.mean_iterations <= weak.mean_iterations);
}

#[test]
fn pgd_and_fgsm_respect_their_budget_and_flip_labels() {
    let data = common::lesions(4);
    let goals = vec![Goal::Untargeted; 4];
    for norm in [Norm::Linf, Norm::L2] {
        let epsilon = if norm == Norm::Linf {
            16.0 / 255.0
        } else {
            4.0
        };
        let spec = Pgd {
            epsilon,
            step: epsilon / 4.0,
            steps: 20,
            norm,
            ..Pgd::default()
        };
        let outcomes = pgd(data.model.as_ref(), &data.pixels, &goals, &spec, None).unwrap();
        for (o, i) in outcomes.iter().zip(0..) {
            let delta = (kept_perturbed(o) - data.pixels.get(i).unwrap()).unwrap();
            let size = match norm {
                Norm::Linf => delta
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                Norm::L2 => delta
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            };
            assert!(
                size as f64 <= epsilon + 1e-4,
                "{norm:?}: perturbation {size} over budget {epsilon}"
            );
        }
        let flipped = outcomes.iter().filter(|o| o.success).count();
        println!(
            "PGD {norm:?} eps {epsilon:.3}: {flipped}/4 flipped, iterations {:?}",
            outcomes.iter().map(|o| o.iterations).collect::<Vec<_>>()
        );
        assert!(flipped >= 3, "PGD {norm:?} flipped {flipped} of 4");
    }
    // FGSM is one step; a mask confines it.
    let mut m = vec![0f32; 128 * 128];
    for v in &mut m[..64 * 128] {
        *v = 1.0;
    }
    let mask = Tensor::from_vec(m.clone(), (128, 128), &device()).unwrap();
    let masks = vec![mask; 4];
    let outcomes = pgd(
        data.model.as_ref(),
        &data.pixels,
        &goals,
        &Pgd::fgsm(0.1, Norm::Linf),
        Some(&masks),
    )
    .unwrap();
    for (o, i) in outcomes.iter().zip(0..) {
        assert!(o.iterations <= 1);
        let diff = (kept_perturbed(o) - data.pixels.get(i).unwrap())
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
            "FGSM changed pixels outside its mask"
        );
    }
}

#[test]
fn window_noise_stays_in_the_window_preserve_noise_spares_it_and_occlusion_blurs_it() {
    let data = common::lesions(1);
    let (top, left, size) = (16, 48, 40);
    let job = |region| Job {
        image: 0,
        goal: Goal::Untargeted,
        region,
        alpha: 0.3,
        seed: 3,
    };
    let jobs = [
        job(Region::Window { top, left, size }),
        job(Region::Outside { top, left, size }),
        job(Region::Occluded { top, left, size }),
    ];
    let cap = 3;
    let config = AttackConfig {
        max_iters: cap,
        confidence: 0.999_999,
        ..AttackConfig::default()
    };
    let outcomes = run(
        data.model.as_ref(),
        &data.pixels,
        &jobs,
        &Masking::None,
        &config,
    )
    .unwrap();
    let inside = |t: &Tensor| -> (f32, f32) {
        let v = t.to_vec3::<f32>().unwrap();
        let (mut ins, mut out) = (0f32, 0f32);
        for c in &v {
            for (y, row) in c.iter().enumerate() {
                for (x, &n) in row.iter().enumerate() {
                    let within = (top..top + size).contains(&y) && (left..left + size).contains(&x);
                    if within {
                        ins = ins.max(n.abs());
                    } else {
                        out = out.max(n.abs());
                    }
                }
            }
        }
        (ins, out)
    };
    let (window_in, window_out) = inside(kept_noise(&outcomes[0]));
    let (preserve_in, preserve_out) = inside(kept_noise(&outcomes[1]));
    assert!(
        window_in > 0.0 && window_out == 0.0,
        "{window_in} {window_out}"
    );
    assert!(
        preserve_in == 0.0 && preserve_out > 0.0,
        "{preserve_in} {preserve_out}"
    );
    // The occluded window: noise in the window only, added to the window blurred; the rest is
    // the clean image.
    let (occluded_in, occluded_out) = inside(kept_noise(&outcomes[2]));
    assert!(occluded_in > 0.0 && occluded_out == 0.0);
    let blurred = GaussianBlur::full(OCCLUDED_SIGMA)
        .apply(&data.pixels)
        .unwrap()
        .get(0)
        .unwrap();
    let image = data.pixels.get(0).unwrap();
    let perturbed = kept_perturbed(&outcomes[2]).to_vec3::<f32>().unwrap();
    let noise = kept_noise(&outcomes[2]).to_vec3::<f32>().unwrap();
    let (blurred, image) = (
        blurred.to_vec3::<f32>().unwrap(),
        image.to_vec3::<f32>().unwrap(),
    );
    let mut checked = 0;
    for c in 0..perturbed.len() {
        for y in 0..perturbed[c].len() {
            for x in 0..perturbed[c][y].len() {
                let p = perturbed[c][y][x];
                let within = (top..top + size).contains(&y) && (left..left + size).contains(&x);
                if !within {
                    assert_eq!(p, image[c][y][x]);
                } else if p > 0.0 && p < 1.0 {
                    let want = blurred[c][y][x] + noise[c][y][x];
                    assert!((p - want).abs() < 1e-5, "({c}, {y}, {x}): {p} vs {want}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > size * size, "only {checked} unclamped pixels");
    for o in &outcomes {
        // One probability per judged image, the last the stop's: exp(-CE) of the clean label.
        assert_eq!(o.probabilities.len(), o.iterations + 1);
        let last = *o.probabilities.last().unwrap();
        assert!(
            (last - o.final_loss.exp()).abs() < 1e-5,
            "{last} vs {}",
            o.final_loss.exp()
        );
        // Beside each probability its log-odds, from the logits: log(p / (1 - p)) wherever p
        // is not too close to 0 or 1 for f32; the clean image's from its origin loss likewise.
        assert_eq!(o.log_odds.len(), o.probabilities.len());
        let logit = |p: f64| (p / (1.0 - p)).ln();
        for (&p, &odds) in o.probabilities.iter().zip(&o.log_odds) {
            if (1e-3..1.0 - 1e-3).contains(&p) {
                assert!((odds - logit(p)).abs() < 1e-2, "{odds} vs log-odds of {p}");
            }
        }
        let p0 = (-o.origin_loss).exp();
        if (1e-3..1.0 - 1e-3).contains(&p0) {
            assert!((o.origin_log_odds - logit(p0)).abs() < 1e-2);
        }
    }
}

#[test]
fn an_attack_away_from_a_class_is_about_that_class() {
    let data = common::lesions(2);
    let model = data.model.as_ref();
    let probs = candle_nn::ops::softmax_last_dim(&model.forward(&data.pixels).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let predicted: Vec<usize> = probs
        .iter()
        .map(|p| if p[1] > p[0] { 1 } else { 0 })
        .collect();
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 4,
        confidence: 0.5,
        ..AttackConfig::default()
    };
    // Away from the predicted class is the untargeted attack, to the bit.
    let untargeted = random_attack(model, &data.pixels, &[Goal::Untargeted; 2], &config).unwrap();
    let away: Vec<Goal> = predicted.iter().map(|&c| Goal::Away(c)).collect();
    let same_class = random_attack(model, &data.pixels, &away, &config).unwrap();
    for (u, a) in untargeted.iter().zip(&same_class) {
        assert_eq!(u.probabilities, a.probabilities);
        assert_eq!(u.origin_loss, a.origin_loss);
        assert!(same(kept_noise(u), kept_noise(a)));
    }
    // Away from the other class: its clean loss, its probability on the perturbed image, and a
    // goal the clean image already meets (a label other than that class, above the
    // confidence) in 0 updates.
    let other: Vec<Goal> = predicted.iter().map(|&c| Goal::Away(1 - c)).collect();
    let outcomes = random_attack(model, &data.pixels, &other, &config).unwrap();
    for (i, o) in outcomes.iter().enumerate() {
        let p_other = probs[i][1 - predicted[i]] as f64;
        assert!((o.origin_loss + p_other.ln()).abs() < 1e-4, "{o:?}");
        let judged = candle_nn::ops::softmax_last_dim(
            &model
                .forward(&kept_perturbed(o).unsqueeze(0).unwrap())
                .unwrap(),
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()[0][1 - predicted[i]] as f64;
        let last = *o.probabilities.last().unwrap();
        assert!((last - judged).abs() < 1e-4, "{last} vs {judged}");
        assert_eq!(o.target, None);
        if probs[i][predicted[i]] > 0.5 {
            assert!(o.success && o.iterations == 0, "{o:?}");
        }
    }
    // A class the model does not have is refused, naming it.
    let e = random_attack(model, &data.pixels, &[Goal::Away(7); 2], &config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class to attack 7"), "{e}");
}

#[test]
fn seeds_past_the_largest_wrap_around_instead_of_overflowing() {
    let data = common::lesions(1);
    let model = data.model.as_ref();
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 1,
        seed: u64::MAX,
        ..AttackConfig::default()
    };
    let (outcomes, _) = rounds(model, &data.pixels, 0, Goal::Untargeted, 2, &config).unwrap();
    // The second round's seed is 0: the same attack as a first round seeded 0.
    let zero = random_attack(
        model,
        &data.pixels,
        &[Goal::Untargeted],
        &AttackConfig { seed: 0, ..config },
    )
    .unwrap();
    assert!(same(kept_noise(&outcomes[1]), kept_noise(&zero[0])));
    let averaged = mask_attack_averaged(
        model,
        &data.pixels,
        &[Goal::Untargeted],
        &LearnedMask::dual(4),
        &[],
        2,
        &config,
    )
    .unwrap();
    assert!(averaged[0].mask.is_some());
}

/// The mean of an `H x W` mask over its columns `from .. from + width`.
fn column_mean(mask: &Tensor, from: usize, width: usize) -> f64 {
    mask.narrow(1, from, width)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// Two classes, each the mean red of one half of the image (class 0 the left, ahead by 5): the
/// SmoothGrad map of class 0 is the left half, uniformly, and that of class 1 the right half.
fn half_split(_: &dyn Classifier, pixels: &Tensor) -> CResult<Tensor> {
    let red = pixels.narrow(1, 0, 1)?;
    let half = red.dim(3)? / 2;
    let left = red.narrow(3, 0, half)?.mean((1, 2, 3))?;
    let right = red.narrow(3, half, half)?.mean((1, 2, 3))?;
    Tensor::stack(&[((left * 10.0)? + 5.0)?, (right * 10.0)?], 1)
}

#[test]
fn the_dual_games_pull_towards_smoothgrad_follows_the_class_it_explains() {
    let data = common::lesions(1);
    let model = Relogit(data.model.as_ref(), half_split);
    let config = AttackConfig {
        alpha: 0.01,
        max_iters: 40,
        ..AttackConfig::default()
    };
    // The mask's mean over the outer quarter of the left half and of the right half (the mask's
    // 8 cells are upsampled bilinearly, so it changes gradually across the middle).
    let halves = |goal: Goal, gamma: f64| -> (f64, f64) {
        let spec = LearnedMask {
            gamma,
            lr: 0.1,
            ..LearnedMask::dual(8)
        };
        let o = mask_attack(&model, &data.pixels, &[goal], &spec, &config).unwrap();
        let mask = o[0].mask.as_ref().expect("the learned mask");
        let w = mask.dim(1).unwrap();
        let halves = (
            column_mean(mask, 0, w / 4),
            column_mean(mask, 3 * w / 4, w / 4),
        );
        println!(
            "explaining {goal:?} with gamma {gamma}: the mask's left and right halves {halves:?}"
        );
        halves
    };
    // The model predicts class 0. Explaining it (untargeted), a strong pull turns the left side
    // on; explaining class 1 (away from it), the right side.
    let (left, right) = halves(Goal::Untargeted, 1e4);
    assert!(left - right > 0.6, "class 0: left {left}, right {right}");
    let (left, right) = halves(Goal::Away(1), 1e4);
    assert!(right - left > 0.6, "class 1: left {left}, right {right}");
    // Without the pull the area constraint (0.1 of the image) keeps both sides mostly off.
    let (left, right) = halves(Goal::Away(1), 0.0);
    assert!(
        left < 0.4 && right < 0.4,
        "class 1 without the pull: left {left}, right {right}"
    );
}

/// Two classes, class 0 sure beyond f32's probabilities: its logit is `400 mean(red^2)` over the
/// left half, class 1's 0, so blurring the left half's detail lowers class 0's logit while its
/// probability stays 1 and its log-probability 0 to the last bit.
fn sure_left(_: &dyn Classifier, pixels: &Tensor) -> CResult<Tensor> {
    let red = pixels.narrow(1, 0, 1)?;
    let half = red.dim(3)? / 2;
    let left = red.narrow(3, 0, half)?.sqr()?.mean((1, 2, 3))?;
    Tensor::stack(&[(&left * 400.0)?, left.zeros_like()?], 1)
}

#[test]
fn the_dual_games_log_odds_reward_finds_the_evidence_where_the_model_is_sure() {
    let data = common::lesions(1);
    let model = Relogit(data.model.as_ref(), sure_left);
    let config = AttackConfig {
        alpha: 0.01,
        max_iters: 40,
        ..AttackConfig::default()
    };
    // The mask's mean over the left half less its mean over the right half.
    let lead = |reward: DualReward| -> f64 {
        let spec = LearnedMask {
            lr: 0.1,
            reward,
            ..LearnedMask::dual(8)
        };
        let o = mask_attack(&model, &data.pixels, &[Goal::Untargeted], &spec, &config).unwrap();
        let mask = o[0].mask.as_ref().expect("the learned mask");
        let w = mask.dim(1).unwrap();
        let lead = column_mean(mask, 0, w / 2) - column_mean(mask, w / 2, w / 2);
        println!("{reward:?}: the mask's left half leads its right by {lead:.3}");
        lead
    };
    // The log-probability's gradient, `1 - p`, is below 1e-30 of the area constraint's: the
    // mask has nothing to go on. The log-odds' is the logit's: the mask keeps the left half,
    // where the evidence is.
    let by_log_probability = lead(DualReward::LogProbability);
    let by_log_odds = lead(DualReward::LogOdds);
    assert!(
        by_log_odds > 0.2 && by_log_odds > by_log_probability + 0.2,
        "log-odds {by_log_odds:.3}, log-probability {by_log_probability:.3}"
    );
}

/// Two classes whose log-odds, `40 mean(red^2)` over the left half less `10 mean(red)` over the
/// right half, are quadratic in the pixels.
fn squared_split(_: &dyn Classifier, pixels: &Tensor) -> CResult<Tensor> {
    let red = pixels.narrow(1, 0, 1)?;
    let half = red.dim(3)? / 2;
    let left = red.narrow(3, 0, half)?.sqr()?.mean((1, 2, 3))?;
    let right = red.narrow(3, half, half)?.mean((1, 2, 3))?;
    Tensor::stack(&[(left * 40.0)?, (right * 10.0)?], 1)
}

#[test]
fn a_windows_contributions_add_up_to_what_its_first_perturbation_took() {
    let data = common::lesions(1);
    // The log-odds of class 0 are quadratic in the pixels, where the trapezoid rule is exact: a
    // window's contributions add up to the log-odds its first perturbation took. (The gradient
    // at either end alone is off by the whole second-order term: the clean end misses it, the
    // perturbed end counts it twice.) The image within [0.3, 0.7] and alpha
    // 0.2: no noise is clamped.
    let model = Relogit(data.model.as_ref(), squared_split);
    let pixels = data.pixels.affine(0.4, 0.3).unwrap();
    let config = AttackConfig {
        alpha: 0.2,
        max_iters: 1,
        ..AttackConfig::default()
    };
    // Moving towards class 1, a contribution is what the perturbation gave its log-odds.
    let goals = [
        (LocalGame::Delete, Goal::Untargeted),
        (LocalGame::Occlude, Goal::Untargeted),
        (LocalGame::Occlude, Goal::Targeted(1)),
    ];
    for (game, goal) in goals {
        let spec = LocalAttack {
            window: 32,
            stride: 32,
            game,
            score: WindowScore::LogOddsDrop,
            spread: WindowSpread::Attack,
            ..LocalAttack::default()
        };
        let local = local_attack(&model, &pixels, 0, goal, &spec, &config).unwrap();
        assert_eq!(local.outcomes.len(), 16);
        let mut sizeable = 0;
        for (o, window) in local.outcomes.iter().zip(&local.windows) {
            let c = o.contribution.as_ref().expect("a window's contributions");
            assert_eq!(c.dims(), &[32, 32]);
            let total = c.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            // The noise's terms cancel in the sum, and the model's means are single-precision
            // sums of 8192 pixels: the error is relative to the terms' size.
            let size = c
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let expected = match goal {
                Goal::Targeted(_) => o.log_odds[0] - o.origin_log_odds,
                _ => o.origin_log_odds - o.log_odds[0],
            };
            // Where the sum is not mostly cancelled, within 5% of itself too.
            if expected.abs() >= 0.2 * size {
                sizeable += 1;
                assert!(
                    (total - expected).abs() <= 0.05 * expected.abs(),
                    "{game:?}, {goal:?}, window at {window:?}: contributions add up to {total:e}, expected {expected:e}"
                );
            }
            assert!(
                (total - expected).abs() <= 1e-2 * size,
                "{game:?}, {goal:?}, window at {window:?}: contributions add up to {total:e} (of terms of size {size:e}), expected {expected:e}"
            );
        }
        // The delete game's noise is centred: its sums cancel. The blur's do not.
        if game == LocalGame::Occlude {
            assert!(
                sizeable >= 4,
                "{game:?}, {goal:?}: only {sizeable} windows not mostly cancelled"
            );
        }
    }
    // The preserve game leaves the window as it is: nothing to spread by.
    let e = local_attack(
        &model,
        &pixels,
        0,
        Goal::Untargeted,
        &LocalAttack {
            window: 32,
            stride: 32,
            game: LocalGame::Preserve,
            spread: WindowSpread::Attack,
            ..LocalAttack::default()
        },
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("spread: attack needs the delete or occlude game"),
        "{e}"
    );
}

/// A two-class model's logits as a function of the pixels.
type Split = fn(&dyn Classifier, &Tensor) -> CResult<Tensor>;

/// `split`'s logits with class 0 ahead by `lead` more.
fn ahead(split: Split, model: &dyn Classifier, pixels: &Tensor, lead: f32) -> CResult<Tensor> {
    split(model, pixels)?.broadcast_add(&Tensor::new(&[lead, 0.0], pixels.device())?)
}

#[test]
fn a_sure_models_contributions_are_its_log_odds_gradients() {
    // The log-odds' gradient does not see a constant added to a logit, and the first
    // perturbation is the generators' initial noise: a model 25 more sure (its probability is 1
    // in f32) or 100 more (the attack's loss, log p, has no usable f32 gradient left) has the
    // contributions of the model itself, pixel by pixel. The quadratic model's two ends differ,
    // so there the attack's end counts; the linear model's do not, so there the clean end may
    // stand for both.
    let data = common::lesions(1);
    let pixels = data.pixels.affine(0.4, 0.3).unwrap();
    let config = AttackConfig {
        alpha: 0.2,
        max_iters: 1,
        ..AttackConfig::default()
    };
    let spec = LocalAttack {
        window: 32,
        stride: 32,
        game: LocalGame::Occlude,
        score: WindowScore::LogOddsDrop,
        spread: WindowSpread::Attack,
        ..LocalAttack::default()
    };
    for (split, lead) in [(squared_split as Split, 25f32), (half_split, 100.0)] {
        let unsure = Relogit(data.model.as_ref(), split);
        let unsure = local_attack(&unsure, &pixels, 0, Goal::Untargeted, &spec, &config).unwrap();
        let sure = Relogit(
            data.model.as_ref(),
            move |m: &dyn Classifier, p: &Tensor| ahead(split, m, p, lead),
        );
        let sure = local_attack(&sure, &pixels, 0, Goal::Untargeted, &spec, &config).unwrap();
        compare_contributions(&sure, &unsure, lead);
    }
}

/// Asserts that `sure`'s contributions are `unsure`'s, window by window.
fn compare_contributions(sure: &LocalMap, unsure: &LocalMap, lead: f32) {
    for ((s, u), window) in sure
        .outcomes
        .iter()
        .zip(&unsure.outcomes)
        .zip(&sure.windows)
    {
        assert!(s.log_odds[0] > lead as f64, "{}", s.log_odds[0]);
        assert!(u.log_odds[0] < 12.0, "{}", u.log_odds[0]);
        let (s, u) = (
            to_vec(s.contribution.as_ref().expect("a window's contributions")),
            to_vec(u.contribution.as_ref().expect("a window's contributions")),
        );
        let largest = max_abs(&u);
        assert!(largest > 0.0, "window at {window:?}: no contribution");
        assert!(
            max_abs_diff(&s, &u) <= 1e-3 * largest,
            "ahead by {lead}, window at {window:?}: the contributions differ by {:e} (largest {largest:e})",
            max_abs_diff(&s, &u)
        );
    }
}

#[test]
fn asking_for_contributions_changes_no_attack() {
    let data = common::lesions(2);
    let model = data.model.as_ref();
    // Three updates: the probe's backward also feeds the optimiser's first step.
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 3,
        lr: 2e-3,
        batch_size: 8,
        ..AttackConfig::default()
    };
    let spec = LocalAttack {
        window: 64,
        stride: 32,
        game: LocalGame::Occlude,
        score: WindowScore::LogOddsDrop,
        ..LocalAttack::default()
    };
    let goals = [Goal::Untargeted; 2];
    let maps = |spread| {
        local_attacks(
            model,
            &data.pixels,
            &[0, 1],
            &goals,
            &LocalAttack { spread, ..spec },
            &config,
        )
        .unwrap()
    };
    let (even, spread) = (maps(WindowSpread::Even), maps(WindowSpread::Attack));
    for (e, s) in even.iter().zip(&spread) {
        assert_eq!(e.scores, s.scores);
        for (a, b) in e.outcomes.iter().zip(&s.outcomes) {
            assert_eq!(a.log_odds, b.log_odds);
            assert_eq!(a.probabilities, b.probabilities);
            assert!(a.contribution.is_none() && b.contribution.is_some());
        }
    }
}
