//! Train/validation/test splits grouped by patient (no patient in two splits), stratified by
//! label, deterministic by seed; and a summary of what each split holds.

use crate::dataset::{Dataset, Sample};
use crate::random;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Sample indices of each split.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Splits {
    /// Indices into [`Dataset::samples`] to train on, ascending.
    pub train: Vec<usize>,
    /// Indices to validate on (choosing the best epoch), ascending.
    pub val: Vec<usize>,
    /// Indices held out for the final test, ascending.
    pub test: Vec<usize>,
}

impl Splits {
    /// `(name, indices)` of the three splits, in order.
    pub fn named(&self) -> [(&'static str, &[usize]); 3] {
        [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ]
    }
}

/// Which images of a dataset to use: one split, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    Train,
    /// The validation split.
    Val,
    /// The held-out test split.
    #[default]
    Test,
    /// Every image, in dataset order.
    All,
}

impl Split {
    /// The indices this split selects from `splits` of a dataset of `len` images.
    pub fn select(self, splits: &Splits, len: usize) -> Vec<usize> {
        match self {
            Split::Train => splits.train.clone(),
            Split::Val => splits.val.clone(),
            Split::Test => splits.test.clone(),
            Split::All => (0..len).collect(),
        }
    }
}

/// The paper's split: 60% train, 20% validation, 20% test.
pub const PAPER_FRACTIONS: [f64; 3] = [0.6, 0.2, 0.2];

/// Splits `dataset` by patient.
///
/// Patients are grouped into strata by their most frequent label, shuffled within each stratum
/// by `seed`, and each is given to the split that is furthest below its share of the images
/// assigned so far. Every split's image count ends within one patient of its fraction, and each
/// label is spread in about the same proportions.
pub fn split_by_patient(dataset: &Dataset, fractions: [f64; 3], seed: u64) -> Splits {
    let total: f64 = fractions.iter().sum();
    let fractions = fractions.map(|f| f / total);
    let mut patients: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in dataset.samples.iter().enumerate() {
        patients.entry(s.patient.as_str()).or_default().push(i);
    }
    let mut strata: BTreeMap<usize, Vec<Vec<usize>>> = BTreeMap::new();
    for indices in patients.into_values() {
        strata
            .entry(majority_label(&dataset.samples, &indices))
            .or_default()
            .push(indices);
    }
    let mut rng = random::rng(seed, "split");
    let mut splits = [Vec::new(), Vec::new(), Vec::new()];
    let mut assigned = 0usize;
    for mut group in strata.into_values() {
        group.shuffle(&mut rng);
        for indices in group {
            let after = (assigned + indices.len()) as f64;
            let k = (0..3)
                .max_by(|&a, &b| {
                    let deficit = |k: usize| fractions[k] * after - splits[k].len() as f64;
                    deficit(a).total_cmp(&deficit(b)).then(b.cmp(&a))
                })
                .unwrap_or(0);
            assigned += indices.len();
            splits[k].extend(indices);
        }
    }
    for s in &mut splits {
        s.sort_unstable();
    }
    let [train, val, test] = splits;
    Splits { train, val, test }
}

fn majority_label(samples: &[Sample], indices: &[usize]) -> usize {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in indices {
        *counts.entry(samples[i].label).or_default() += 1;
    }
    // Most frequent; ties go to the smallest label.
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(label, _)| label)
        .unwrap_or(0)
}

/// Image counts per split, label and modality, printable as a table.
pub fn summary(dataset: &Dataset, splits: &Splits) -> String {
    let modalities: Vec<Option<crate::dataset::Modality>> = {
        let mut m: Vec<_> = dataset.samples.iter().map(|s| s.modality).collect();
        m.sort();
        m.dedup();
        m
    };
    let name = |m: Option<crate::dataset::Modality>| m.map(|m| m.name()).unwrap_or("-");
    let mut out = String::new();
    let _ = write!(out, "{:<7} {:<20}", "split", "label");
    for &m in &modalities {
        let _ = write!(out, " {:>7}", name(m));
    }
    let _ = writeln!(out, " {:>7} {:>9}", "images", "patients");
    for (split, indices) in splits.named() {
        for (label, class) in dataset.classes.iter().enumerate() {
            let of_label: Vec<&Sample> = indices
                .iter()
                .map(|&i| &dataset.samples[i])
                .filter(|s| s.label == label)
                .collect();
            let _ = write!(out, "{split:<7} {class:<20}");
            for &m in &modalities {
                let _ = write!(
                    out,
                    " {:>7}",
                    of_label.iter().filter(|s| s.modality == m).count()
                );
            }
            let patients: std::collections::BTreeSet<&str> =
                of_label.iter().map(|s| s.patient.as_str()).collect();
            let _ = writeln!(out, " {:>7} {:>9}", of_label.len(), patients.len());
        }
    }
    out
}
