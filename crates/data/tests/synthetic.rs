//! The synthetic fundus benchmark: deterministic by seed, masks exactly where lesions are drawn,
//! labels from the lesions, patients with both eyes in both modalities.

use std::collections::BTreeMap;
use vulnmap_data::synthetic::anatomy::Eye;
use vulnmap_data::synthetic::{
    eye_model, render, render_eye, write_dataset, FundusConfig, LabelScheme,
};
use vulnmap_data::{random, Dataset, ManifestOptions, Modality};

fn small(seed: u64) -> FundusConfig {
    FundusConfig {
        patients: 6,
        size: 96,
        seed,
        ..Default::default()
    }
}

fn files(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in walk(dir) {
        let rel = entry
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(rel, std::fs::read(&entry).unwrap());
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn same_seed_gives_byte_identical_images_and_masks() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write_dataset(&small(1), a.path()).unwrap();
    write_dataset(&small(1), b.path()).unwrap();
    write_dataset(&small(2), c.path()).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    // 6 patients x 2 eyes x (CFP + FA) images, each with a mask, and the manifest.
    assert_eq!(fa.len(), 6 * 2 * 2 * 2 + 1);
    assert_eq!(fa, fb, "same seed, different bytes");
    let differing = fa.iter().filter(|(k, v)| fc.get(*k) != Some(v)).count();
    assert!(
        differing > fa.len() / 2,
        "another seed should give other images"
    );
}

#[test]
fn masks_cover_the_drawn_lesions_and_nothing_else() {
    let config = FundusConfig {
        size: 160,
        lesion_prevalence: 1.0,
        ..small(5)
    };
    let mut checked = 0;
    for patient in 0..6 {
        for eye in [Eye::Right, Eye::Left] {
            let model = eye_model(&config, patient, eye);
            assert!(!model.lesions.is_empty());
            for modality in [Modality::Cfp, Modality::Fa] {
                let grain = || random::rng(99, "grain");
                let with = render::render(&model.anatomy, &model.lesions, modality, &mut grain());
                let without = render::render(&model.anatomy, &[], modality, &mut grain());
                assert!(without.mask.iter().all(|&m| !m));
                let mut lesion_pixels = 0;
                for (i, &in_mask) in with.mask.iter().enumerate() {
                    let changed =
                        (0..3).any(|c| with.pixels[i * 3 + c] != without.pixels[i * 3 + c]);
                    assert_eq!(
                        changed, in_mask,
                        "pixel {i}: changed {changed}, mask {in_mask}"
                    );
                    lesion_pixels += in_mask as usize;
                }
                assert!(lesion_pixels > 0);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 24);
}

#[test]
fn manifest_lists_patients_eyes_modalities_labels_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let config = FundusConfig {
        patients: 10,
        size: 64,
        labels: LabelScheme::LesionType,
        ..small(3)
    };
    let manifest = write_dataset(&config, dir.path()).unwrap();
    let (dataset, skipped) = Dataset::from_manifest(
        &manifest,
        &ManifestOptions {
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(skipped.is_empty());
    assert_eq!(dataset.len(), 40);
    assert_eq!(
        dataset.classes,
        vec!["exudate", "haemorrhage", "healthy", "microaneurysm"]
    );
    let per_patient = dataset
        .samples
        .iter()
        .filter(|s| s.patient == "P0003")
        .count();
    assert_eq!(per_patient, 4, "two eyes, CFP and FA each");
    for s in &dataset.samples {
        let mask = vulnmap_data::load_rgb(s.mask.as_ref().unwrap()).unwrap();
        let lesion_pixels = mask.pixels().filter(|p| p[0] > 0.5).count();
        let healthy = dataset.classes[s.label] == "healthy";
        assert_eq!(
            lesion_pixels == 0,
            healthy,
            "{}: label and mask disagree",
            s.path.display()
        );
        // FA images are stored grey.
        let is_fa = s.modality == Some(Modality::Fa);
        let img = image::open(&s.path).unwrap();
        assert_eq!(matches!(img, image::DynamicImage::ImageLuma8(_)), is_fa);
    }
}

#[test]
fn cfp_and_fa_of_an_eye_share_anatomy_and_lesion_places() {
    let config = FundusConfig {
        lesion_prevalence: 1.0,
        ..small(8)
    };
    let cfp = render_eye(&config, 2, Eye::Left, Modality::Cfp);
    let fa = render_eye(&config, 2, Eye::Left, Modality::Fa);
    assert_eq!(cfp.lesions, fa.lesions);
    assert_eq!(cfp.label, fa.label);
    // Haemorrhages and microaneurysms occupy the same pixels in both; exudates show as leakage.
    if !cfp
        .lesions
        .contains(&vulnmap_data::synthetic::lesions::LesionKind::Exudate)
    {
        assert_eq!(cfp.rendering.mask, fa.rendering.mask);
    }
}
