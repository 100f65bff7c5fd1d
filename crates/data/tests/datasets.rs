//! Manifests, folders, splits and the loader, including every kind of bad input.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use vulnmap_data::loader::Loader;
use vulnmap_data::split::{split_by_patient, summary, PAPER_FRACTIONS};
use vulnmap_data::synthetic::{write_dataset, FundusConfig};
use vulnmap_data::{Dataset, Error, ManifestOptions, Preprocess};

fn synthetic(dir: &Path, patients: usize) -> Dataset {
    let config = FundusConfig {
        patients,
        size: 48,
        seed: 11,
        ..Default::default()
    };
    let manifest = write_dataset(&config, dir).unwrap();
    Dataset::from_manifest(&manifest, &ManifestOptions::default())
        .unwrap()
        .0
}

#[test]
fn splits_group_patients_are_seeded_and_keep_proportions() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = synthetic(dir.path(), 40);
    let splits = split_by_patient(&dataset, PAPER_FRACTIONS, 7);
    let n = dataset.len() as f64;
    let largest_patient = 4.0;
    let mut seen = HashMap::new();
    for (name, indices) in splits.named() {
        for &i in indices {
            let patient = &dataset.samples[i].patient;
            if let Some(other) = seen.insert(patient.clone(), name) {
                assert_eq!(other, name, "patient {patient} is in {other} and {name}");
            }
        }
    }
    let all: BTreeSet<usize> = splits
        .named()
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .collect();
    assert_eq!(all.len(), dataset.len(), "every image in exactly one split");
    for ((name, indices), f) in splits.named().iter().zip(PAPER_FRACTIONS) {
        let off = (indices.len() as f64 - f * n).abs();
        assert!(
            off <= largest_patient,
            "{name}: {} images, target {}",
            indices.len(),
            f * n
        );
    }
    assert_eq!(
        splits,
        split_by_patient(&dataset, PAPER_FRACTIONS, 7),
        "same seed, same split"
    );
    assert_ne!(splits, split_by_patient(&dataset, PAPER_FRACTIONS, 8));

    // Labels are spread in about the dataset's proportions.
    for (name, indices) in splits.named() {
        let lesion = indices
            .iter()
            .filter(|&&i| dataset.samples[i].label == 1)
            .count() as f64;
        let frac = lesion / indices.len() as f64;
        assert!(
            (0.25..=0.75).contains(&frac),
            "{name}: lesion fraction {frac}"
        );
    }
    let table = summary(&dataset, &splits);
    assert!(
        table.contains("train") && table.contains("CFP") && table.contains("FA"),
        "{table}"
    );
    println!("{table}");
}

#[test]
fn splits_stay_within_one_patient_with_uneven_patients() {
    use rand::Rng;
    use vulnmap_data::random;
    for seed in 0..20 {
        let mut rng = random::rng(seed, "uneven");
        let mut samples = Vec::new();
        for p in 0..rng.random_range(10..60) {
            let size = rng.random_range(1..=9);
            let label = rng.random_range(0..3);
            for _ in 0..size {
                samples.push(vulnmap_data::Sample {
                    path: format!("p{p}.png").into(),
                    label,
                    modality: None,
                    patient: format!("p{p}"),
                    mask: None,
                    line: None,
                });
            }
        }
        let dataset = Dataset {
            classes: vec!["a".into(), "b".into(), "c".into()],
            samples,
            source: "x".into(),
        };
        let splits = split_by_patient(&dataset, PAPER_FRACTIONS, seed);
        let n = dataset.len() as f64;
        for ((name, indices), f) in splits.named().iter().zip(PAPER_FRACTIONS) {
            assert!(
                (indices.len() as f64 - f * n).abs() <= 9.0,
                "seed {seed} {name}: {} of {n}",
                indices.len()
            );
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::new(w, h).save(path).unwrap();
}

#[test]
fn bad_manifest_rows_name_the_file_and_line_and_skip_bad_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(&d.join("a.png"), 8, 8);
    png(&d.join("b.png"), 8, 8);
    png(&d.join("mask_small.png"), 4, 4);
    write(&d.join("corrupt.png"), "garbage");
    let manifest = d.join("manifest.csv");
    let opts = |skip_bad, verify| ManifestOptions {
        classes: Some(vec!["healthy".into(), "lesion".into()]),
        skip_bad,
        verify,
    };

    write(
        &manifest,
        "path,label,modality,patient_id\na.png,healthy,CFP,p1\nmissing.png,lesion,FA,p2\n",
    );
    let err = Dataset::from_manifest(&manifest, &opts(false, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv:3:")
            && err.contains("missing.png")
            && err.contains("does not exist"),
        "{err}"
    );

    write(&manifest, "path,label\na.png,healthy\nb.png,lesoin\n");
    let err = Dataset::from_manifest(&manifest, &opts(false, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv:3:")
            && err.contains("unknown label `lesoin`")
            && err.contains("healthy, lesion"),
        "{err}"
    );

    write(&manifest, "path,label,modality\na.png,healthy,OCT\n");
    let err = Dataset::from_manifest(&manifest, &opts(false, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv:2:") && err.contains("unknown modality `OCT`"),
        "{err}"
    );

    write(&manifest, "file,class\na.png,healthy\n");
    let err = Dataset::from_manifest(&manifest, &opts(false, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv:1:") && err.contains("`path` and `label`"),
        "{err}"
    );

    write(
        &manifest,
        "path,label,mask_path\na.png,healthy,\ncorrupt.png,lesion,\nb.png,lesion,mask_small.png\n",
    );
    // Without verification the rows look fine; verification decodes and finds both problems.
    assert_eq!(
        Dataset::from_manifest(&manifest, &opts(false, false))
            .unwrap()
            .0
            .len(),
        3
    );
    let err = Dataset::from_manifest(&manifest, &opts(false, true)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Manifest { line: 3, .. }), "{msg}");
    assert!(msg.contains("corrupt.png"), "{msg}");

    write(
        &manifest,
        "path,label,mask_path\na.png,healthy,\nb.png,lesion,mask_small.png\n",
    );
    let msg = Dataset::from_manifest(&manifest, &opts(false, true))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("manifest.csv:3:")
            && msg.contains("mask_small.png is 4x4 but the image is 8x8"),
        "{msg}"
    );

    // skip_bad: every bad row listed with its line, the good ones kept.
    write(
        &manifest,
        "path,label,mask_path\na.png,healthy,\nmissing.png,lesion,\nb.png,lesoin,\ncorrupt.png,lesion,\nb.png,lesion,mask_small.png\nb.png,lesion,\n",
    );
    let (dataset, skipped) = Dataset::from_manifest(&manifest, &opts(true, true)).unwrap();
    assert_eq!(dataset.len(), 2);
    let lines: Vec<Option<usize>> = skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![Some(3), Some(4), Some(5), Some(6)]);
    assert!(
        skipped[1].to_string().starts_with("line 4: "),
        "{}",
        skipped[1]
    );
}

#[test]
fn folder_per_class_datasets_read_classes_from_folder_names() {
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 2), ("dog", 3)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..n {
            png(&dir.path().join(class).join(format!("{i}.png")), 5, 5);
        }
    }
    let dataset = Dataset::from_folders(dir.path()).unwrap();
    assert_eq!(dataset.classes, vec!["cat", "dog"]);
    assert_eq!(dataset.samples.iter().filter(|s| s.label == 1).count(), 3);
    let empty = tempfile::tempdir().unwrap();
    assert!(Dataset::from_folders(empty.path())
        .unwrap_err()
        .to_string()
        .contains("no class folders"));
}

#[test]
fn loader_batches_every_index_once_shuffled_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = Arc::new(synthetic(dir.path(), 5));
    let loader = Loader::new(dataset.clone(), Preprocess::none(), 6);
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let order = |seed| -> Vec<usize> {
        loader
            .batches(&indices, seed)
            .flat_map(|b| b.unwrap().indices)
            .collect()
    };
    let plain = order(None);
    assert_eq!(plain, indices);
    let shuffled = order(Some(3));
    assert_ne!(shuffled, indices);
    assert_eq!(shuffled, order(Some(3)));
    let mut sorted = shuffled.clone();
    sorted.sort();
    assert_eq!(sorted, indices);
    let batch = loader.batches(&indices, None).next().unwrap().unwrap();
    assert_eq!(batch.pixels.dims(), &[6, 3, 48, 48]);
    let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
    let want: Vec<u32> = (0..6).map(|i| dataset.samples[i].label as u32).collect();
    assert_eq!(labels, want);
    // Stopping early does not hang.
    let mut it = loader.batches(&indices, None);
    it.next();
    drop(it);
}

#[test]
fn a_manifest_of_one_label_is_refused_unless_its_classes_are_declared() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(&d.join("a.png"), 8, 8);
    png(&d.join("b.png"), 8, 8);
    let manifest = d.join("manifest.csv");
    write(&manifest, "path,label\na.png,lesion\nb.png,lesion\n");
    let err = Dataset::from_manifest(&manifest, &ManifestOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv") && err.contains("`lesion`") && err.contains("--labels"),
        "{err}"
    );
    let declared = ManifestOptions {
        classes: Some(vec!["healthy".into(), "lesion".into()]),
        ..ManifestOptions::default()
    };
    let (dataset, _) = Dataset::from_manifest(&manifest, &declared).unwrap();
    assert!(dataset.samples.iter().all(|s| s.label == 1));
}
