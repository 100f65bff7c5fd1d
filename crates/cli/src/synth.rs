//! `vulnmap synth fundus`: write a synthetic fundus dataset (images, lesion masks, manifest).

use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use vulnmap_data::split::{split_by_patient, summary, PAPER_FRACTIONS};
use vulnmap_data::synthetic::{write_dataset, FundusConfig, LabelScheme};
use vulnmap_data::{Dataset, ManifestOptions};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// What to synthesise.
    #[arg(value_enum)]
    kind: SynthKind,
    /// Output folder (created; new or empty); gets images/, masks beside the images, and
    /// manifest.csv.
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even when it holds files (a dataset there is overwritten).
    #[arg(long)]
    force: bool,
    /// Patients (two eyes each; a CFP image per eye, and an FA image per eye by --fa-fraction).
    #[arg(long, default_value_t = 150, value_parser = crate::flags::patients)]
    patients: usize,
    /// Image size in pixels (square, at least 32).
    #[arg(long, default_value_t = 224, value_parser = crate::flags::image_size)]
    size: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Probability that an eye has lesions.
    #[arg(long, default_value_t = 0.5, value_parser = parse_probability)]
    lesion_prevalence: f64,
    /// Probability that an eye also has a fluorescein angiogram.
    #[arg(long, default_value_t = 1.0, value_parser = parse_probability)]
    fa_fraction: f64,
    /// What the labels say.
    #[arg(long, value_enum, default_value_t)]
    labels: LabelScheme,
}

/// The kinds of synthetic data set.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum SynthKind {
    /// Colour fundus photographs and fluorescein angiograms with known lesions.
    Fundus,
}

fn parse_probability(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a probability between 0 and 1")),
    }
}

pub(crate) fn run(args: Args) -> Result<()> {
    let SynthKind::Fundus = args.kind;
    let config = FundusConfig {
        patients: args.patients,
        size: args.size as usize,
        seed: args.seed,
        lesion_prevalence: args.lesion_prevalence,
        fa_fraction: args.fa_fraction,
        labels: args.labels,
    };
    vulnmap_data::fs::refuse_foreign(&args.out, args.force, "a new folder for the dataset")?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", args.out.display()))?;
    let _lock = vulnmap_data::fs::DirLock::acquire(&args.out)?;
    let start = Instant::now();
    let manifest = write_dataset(&config, &args.out)?;
    let options = ManifestOptions {
        classes: Some(args.labels.classes()),
        ..ManifestOptions::default()
    };
    let dataset = Dataset::from_manifest(&manifest, &options)?.0;
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(
        "{} images in {seconds:.1} s ({:.0} images/s, with masks and PNG encoding)",
        dataset.len(),
        dataset.len() as f64 / seconds
    );
    let splits = split_by_patient(&dataset, PAPER_FRACTIONS, args.seed);
    writeln!(std::io::stdout(), "{}", manifest.display())?;
    eprint!("{}", summary(&dataset, &splits));
    Ok(())
}
