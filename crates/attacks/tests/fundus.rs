//! The paper's claims on the synthetic fundus benchmark, where the lesions are known: the local
//! attack flips the label fastest with windows on the lesions, and noise confined by the
//! SmoothGrad mask flips it in fewer iterations than the same pixel budget placed at random; the
//! learned masks rank the lesions above the rest, and a dual mask blurred within the field of
//! view keeps less of the frame's edge; window scores spread by the attack rank the lesions
//! above the same scores spread evenly; a mask network trained on other images finds the
//! lesions of the test split in one pass.

mod common;

use candle_core::Tensor;
use common::{device, kept_perturbed};
use vulnmap_attacks::amortised::{AmortisedMask, MaskModel};
use vulnmap_attacks::local::{
    local_attack, local_attacks, local_map, LocalAttack, LocalGame, WindowScore, WindowSpread,
};
use vulnmap_attacks::mask_attack::{mask_attack, mask_attack_averaged};
use vulnmap_attacks::saliency_attack::{
    clean_masks, control_masks, fixed_mask_attack, saliency_attack, Control, SaliencyAttack,
};
use vulnmap_attacks::{
    AttackConfig, AttackOutcome, GeneratorChoice, Goal, LearnedMask, MaskNetwork,
};
use vulnmap_saliency::metrics::localisation::{auroc, PointingGame};
use vulnmap_saliency::SmoothGrad;

#[test]
fn local_attack_flips_fastest_on_the_lesions() {
    let data = common::lesions(6);
    // Windows of 32 pixels without overlap (16 per image); alpha large enough for a window's noise
    // to hide a lesion; Adam 10x the paper's rate to keep the test short.
    let spec = LocalAttack {
        window: 32,
        stride: 32,
        ..LocalAttack::default()
    };
    let config = AttackConfig {
        alpha: 0.3,
        max_iters: 20,
        lr: 2e-3,
        batch_size: 16,
        ..AttackConfig::default()
    };
    let (mut peaks, mut hits) = (0, 0);
    let (mut speed_auroc, mut drop_auroc, mut odds_auroc) = (0.0, 0.0, 0.0);
    for (i, mask) in data.masks.iter().enumerate() {
        let local = local_attack(
            data.model.as_ref(),
            &data.pixels,
            i,
            Goal::Untargeted,
            &spec,
            &config,
        )
        .unwrap();
        // The same attacks scored by the attacked label's probability instead of whole updates.
        let continuous = LocalAttack {
            score: WindowScore::ProbabilityDrop,
            ..spec
        };
        let drop = local_map(
            &continuous,
            (128, 128),
            local.outcomes.clone(),
            config.max_iters,
        )
        .unwrap();
        assert_eq!(drop.windows, local.windows);
        assert_eq!(drop.variant, "probability_drop");
        // And by its log-odds, which keep ranking windows where the model is sure of a lesion.
        let odds = local_map(
            &LocalAttack {
                score: WindowScore::LogOddsDrop,
                ..spec
            },
            (128, 128),
            local.outcomes.clone(),
            config.max_iters,
        )
        .unwrap();
        assert_eq!(odds.variant, "log_odds_drop");
        speed_auroc += auroc(&local.map, mask).unwrap() / 6.0;
        drop_auroc += auroc(&drop.map, mask).unwrap() / 6.0;
        odds_auroc += auroc(&odds.map, mask).unwrap() / 6.0;
        let best = local.scores.iter().cloned().fold(0.0, f64::max);
        // The fastest windows: do they cover the lesion?
        let on_lesion = local
            .windows
            .iter()
            .zip(&local.scores)
            .filter(|(_, &s)| s == best && s > 0.0)
            .any(|(&(t, l), _)| (t..t + 32).any(|y| (l..l + 32).any(|x| mask[y * 128 + x])));
        let pointed = PointingGame {
            tolerance: 15.0,
            smooth: 0.0,
        }
        .hit(&local.map, mask)
        .unwrap();
        println!("image {i}: fastest window on a lesion {on_lesion}, map points at a lesion {pointed}, contrast {:.3}", local.contrast);
        peaks += on_lesion as usize;
        hits += pointed as usize;
        assert_eq!(local.map.dims(), &[128, 128]);
    }
    println!("fastest window on a lesion for {peaks} of 6 images; pointing game {hits}/6");
    println!(
        "AUROC against the lesion masks: speed {speed_auroc:.3}, probability drop {drop_auroc:.3}, log-odds drop {odds_auroc:.3}"
    );
    for (name, continuous) in [("probability", drop_auroc), ("log-odds", odds_auroc)] {
        assert!(
            continuous > speed_auroc,
            "the {name} score ({continuous:.3}) did not separate lesions better than the speed ({speed_auroc:.3})"
        );
    }
    assert!(
        peaks >= 4,
        "the local attack peaked on the lesion for only {peaks} of 6 images"
    );
}

#[test]
fn spreading_the_window_scores_by_the_attack_ranks_the_lesions_higher() {
    let data = common::lesions(8);
    // The occlude game of the benchmark pipeline: windows of 32, stride 16, one update.
    let spec = LocalAttack {
        window: 32,
        stride: 16,
        game: LocalGame::Occlude,
        score: WindowScore::LogOddsDrop,
        spread: WindowSpread::Attack,
        ..LocalAttack::default()
    };
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 1,
        lr: 2e-3,
        batch_size: 16,
        ..AttackConfig::default()
    };
    let images: Vec<usize> = (0..8).collect();
    let goals = vec![Goal::Untargeted; 8];
    let spread = local_attacks(
        data.model.as_ref(),
        &data.pixels,
        &images,
        &goals,
        &spec,
        &config,
    )
    .unwrap();
    let (mut by_attack, mut evenly) = (0.0, 0.0);
    for (local, mask) in spread.iter().zip(&data.masks) {
        assert_eq!(local.variant, "occlude+log_odds_drop+spread=attack");
        // The same attacks, each window's score on all its pixels alike.
        let even = local_map(
            &LocalAttack {
                spread: WindowSpread::Even,
                ..spec
            },
            (128, 128),
            local.outcomes.clone(),
            config.max_iters,
        )
        .unwrap();
        by_attack += auroc(&local.map, mask).unwrap() / 8.0;
        evenly += auroc(&even.map, mask).unwrap() / 8.0;
    }
    println!(
        "AUROC against the lesion masks: spread by the attack {by_attack:.3}, evenly {evenly:.3}"
    );
    assert!(
        by_attack > evenly,
        "spreading by the attack ({by_attack:.3}) did not rank the lesions above evenly ({evenly:.3})"
    );
}

fn iterations(outcomes: &[AttackOutcome], cap: usize) -> Vec<usize> {
    outcomes
        .iter()
        .map(|o| if o.success { o.iterations } else { cap })
        .collect()
}

#[test]
fn the_saliency_mask_flips_faster_than_the_same_budget_at_random() {
    let data = common::lesions(8);
    let goals = vec![Goal::Untargeted; 8];
    let cap = 40;
    // The paper's alpha for masked attacks and learning rate; SmoothGrad with 10 samples,
    // recomputed every update as in the paper.
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: cap,
        ..AttackConfig::default()
    };
    let spec = SaliencyAttack {
        method: SmoothGrad {
            samples: 10,
            ..SmoothGrad::authors()
        },
        ..SaliencyAttack::default()
    };
    let saliency = iterations(
        &saliency_attack(data.model.as_ref(), &data.pixels, &goals, &spec, &config).unwrap(),
        cap,
    );
    let masks = clean_masks(data.model.as_ref(), &data.pixels, &spec).unwrap();
    let permuted_masks = control_masks(&masks, Control::Permuted, 0).unwrap();
    // The control has the saliency mask's exact values: the same pixel budget.
    for (a, b) in masks.iter().zip(&permuted_masks) {
        let (sa, sb) = (
            a.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            b.sum_all().unwrap().to_scalar::<f32>().unwrap(),
        );
        assert!((sa - sb).abs() < 1e-2 * sa.max(1.0));
    }
    let permuted = iterations(
        &fixed_mask_attack(
            data.model.as_ref(),
            &data.pixels,
            &goals,
            permuted_masks,
            &config,
        )
        .unwrap(),
        cap,
    );
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
    println!("iterations (cap {cap} counted for failures): saliency {saliency:?} mean {:.1}; permuted {permuted:?} mean {:.1}", mean(&saliency), mean(&permuted));
    assert!(
        mean(&saliency) < mean(&permuted),
        "the saliency mask was not faster"
    );
}

#[test]
fn the_mask_attack_learns_a_mask_that_finds_the_lesions() {
    let data = common::lesions(4);
    let goals = vec![Goal::Untargeted; 4];
    let config = AttackConfig {
        alpha: 0.05,
        max_iters: 30,
        ..AttackConfig::default()
    };
    for network in [
        MaskNetwork::UNet { base: 8 },
        MaskNetwork::Free { cells: 16 },
    ] {
        let lr = if matches!(network, MaskNetwork::Free { .. }) {
            0.01
        } else {
            1e-3
        };
        let spec = LearnedMask {
            network,
            lr,
            reference: SmoothGrad {
                samples: 10,
                ..SmoothGrad::authors()
            },
            ..LearnedMask::default()
        };
        let outcomes =
            mask_attack(data.model.as_ref(), &data.pixels, &goals, &spec, &config).unwrap();
        let mut area = 0.0;
        for (o, lesion) in outcomes.iter().zip(&data.masks) {
            let mask: &Tensor = o.mask.as_ref().expect("the learned mask");
            assert_eq!(mask.dims(), &[128, 128]);
            let (lo, hi) = (
                mask.min_all().unwrap().to_scalar::<f32>().unwrap(),
                mask.max_all().unwrap().to_scalar::<f32>().unwrap(),
            );
            assert!(lo >= 0.0 && hi <= 1.0);
            area += auroc(mask, lesion).unwrap();
        }
        let its: Vec<String> = outcomes
            .iter()
            .map(|o| {
                if o.success {
                    o.iterations.to_string()
                } else {
                    "-".into()
                }
            })
            .collect();
        println!(
            "{network:?}: iterations {}, mean AUROC of the learned mask against the lesions {:.3}",
            its.join(" "),
            area / 4.0
        );
        assert!(
            area / 4.0 > 0.5,
            "{network:?}: the learned mask does not rank lesions above the rest"
        );
    }
}

#[test]
fn the_dual_mask_game_finds_the_lesions_and_within_the_field_of_view_not_the_frame_edge() {
    let data = common::lesions(4);
    let goals = vec![Goal::Untargeted; 4];
    let config = AttackConfig {
        alpha: 0.01,
        max_iters: 30,
        lr: 2e-3,
        generator: GeneratorChoice::Generic,
        ..AttackConfig::default()
    };
    // The frame's edge: black pixels (every channel below 10 / 255) within 3 px of a lit one.
    let (_, _, h, w) = data.pixels.dims4().unwrap();
    let brightest = data
        .pixels
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let edges: Vec<Vec<bool>> = brightest
        .chunks_exact(h * w)
        .map(|image| {
            let lit = |y: usize, x: usize| image[y * w + x] >= 10.0 / 255.0;
            (0..h * w)
                .map(|i| {
                    let (y, x) = (i / w, i % w);
                    !lit(y, x)
                        && (y.saturating_sub(3)..(y + 4).min(h))
                            .any(|v| (x.saturating_sub(3)..(x + 4).min(w)).any(|u| lit(v, u)))
                })
                .collect()
        })
        .collect();
    let mut surround = Vec::new();
    for field_of_view in [false, true] {
        let spec = LearnedMask {
            field_of_view,
            ..LearnedMask::dual(16)
        };
        let outcomes = mask_attack_averaged(
            data.model.as_ref(),
            &data.pixels,
            &goals,
            &spec,
            &[0.05, 0.1],
            1,
            &config,
        )
        .unwrap();
        let mut area = 0.0;
        let mut hits = 0;
        let mut leaked = 0.0;
        for ((o, lesion), edge) in outcomes.iter().zip(&data.masks).zip(&edges) {
            let mask: &Tensor = o.mask.as_ref().expect("the learned mask");
            assert_eq!(mask.dims(), &[128, 128]);
            area += auroc(mask, lesion).unwrap();
            let pointing = PointingGame {
                tolerance: 15.0,
                smooth: 0.0,
            };
            hits += pointing.hit(mask, lesion).unwrap() as usize;
            // The deleted image (the baseline where the mask is on) on the black surround.
            let deleted = kept_perturbed(o)
                .max_keepdim(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (sum, count) = deleted
                .iter()
                .zip(edge)
                .filter(|(_, &e)| e)
                .fold((0.0, 0), |(s, n), (&v, _)| (s + v as f64, n + 1));
            leaked += sum / count.max(1) as f64 / 4.0;
        }
        println!(
            "dual game, areas 0.05 and 0.1, field of view {field_of_view}: mean AUROC against the \
             lesions {:.3}, pointing game {hits}/4, the deleted image's brightness on the black \
             surround by the frame's edge {leaked:.3}",
            area / 4.0
        );
        assert!(area / 4.0 > 0.8, "the dual mask does not find the lesions");
        surround.push(leaked);
    }
    // A plain blur smears the frame into its black surround; blurred within the field of view,
    // the surround stays black but for the noise (alpha 0.01).
    assert!(
        surround[1] < 0.011 && surround[0] > 3.0 * surround[1],
        "the surround's brightness, plain blur and within the field of view: {surround:?}"
    );
}

#[test]
fn the_amortised_mask_network_finds_the_lesions_of_images_it_did_not_train_on() {
    // Trained on training-split lesion images, scored on the test split's first 16.
    let test = common::lesions(16);
    let train = common::training_lesions(96);
    let count = train.pixels.dim(0).unwrap();
    let spec = AmortisedMask {
        field_of_view: true,
        epochs: 4,
        ..AmortisedMask::default()
    };
    let lesion_class = vec![1; 16];
    // Mean AUROC against the lesion masks and pointing-game hits.
    let score = |net: &MaskModel| -> (f64, usize) {
        let maps = net.maps(&test.pixels, &lesion_class).unwrap();
        let mut area = 0.0;
        let mut hits = 0;
        for (i, lesion) in test.masks.iter().enumerate() {
            let map = maps.get(i).unwrap();
            area += auroc(&map, lesion).unwrap() / 16.0;
            let pointing = PointingGame {
                tolerance: 15.0,
                smooth: 0.0,
            };
            hits += pointing.hit(&map, lesion).unwrap() as usize;
        }
        (area, hits)
    };
    let mut net = MaskModel::new(&spec, 2, &device()).unwrap();
    let untrained = score(&net);
    let epochs = net
        .train(test.model.as_ref(), count, &|batch: &[usize]| {
            let index: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
            let index = Tensor::new(index.as_slice(), &device())?;
            Ok((train.pixels.index_select(&index, 0)?, vec![1; batch.len()]))
        })
        .unwrap();
    let trained = score(&net);
    println!(
        "amortised mask network, {count} training images, {} epochs: {epochs:?}; on 16 held-out \
         lesion images untrained AUROC {:.3}, pointing game {}/16; trained AUROC {:.3}, \
         pointing game {}/16",
        spec.epochs, untrained.0, untrained.1, trained.0, trained.1
    );
    // The game was played: the lesion class survives on the preserved images better and on the
    // deleted ones worse than at the start.
    let (first, last) = (epochs[0], epochs[epochs.len() - 1]);
    assert!(
        last.preserved > first.preserved && last.deleted < first.deleted / 2.0,
        "{epochs:?}"
    );
    // And what it learned carries over to images it never saw.
    assert!(
        trained.0 > 0.9 && trained.0 > untrained.0 + 0.25,
        "AUROC untrained {:.3}, trained {:.3}",
        untrained.0,
        trained.0
    );
}
