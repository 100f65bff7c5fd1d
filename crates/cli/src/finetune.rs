//! `vulnmap finetune`: train a classifier on a dataset (a manifest or a folder per class), from
//! ImageNet weights with a new head, or from scratch.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vulnmap_data::split::{split_by_patient, summary, PAPER_FRACTIONS};
use vulnmap_data::{Dataset, ManifestOptions};
use vulnmap_models::{zoo, Arch, Checkpoint, Classes, DeviceName};
use vulnmap_pipeline::schema::{FinetuneStep, Step};
use vulnmap_train::train::{fit, TrainableModel};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A CSV manifest, a folder holding manifest.csv, or a folder with one subfolder per class.
    #[arg(long)]
    data: PathBuf,
    /// The architecture (as `--model` elsewhere).
    #[arg(long, alias = "model", value_parser = crate::model_args::parse_arch)]
    arch: Arch,
    /// Start from these weights (backbone kept, head replaced); default: the hub's ImageNet
    /// weights for ResNets, fresh weights for tiny-resnet. `--scratch` forces fresh weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Train from freshly initialised weights.
    #[arg(long, conflicts_with = "weights")]
    scratch: bool,
    /// Passes over the training split.
    #[arg(long, default_value_t = FinetuneStep::default().epochs)]
    epochs: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = FinetuneStep::default().lr)]
    lr: f64,
    /// Training images per update.
    #[arg(long, default_value_t = FinetuneStep::default().batch_size)]
    batch_size: usize,
    /// Adam weight decay (L2, as torch.optim.Adam).
    #[arg(long, default_value_t = FinetuneStep::default().weight_decay)]
    weight_decay: f64,
    /// Cosine decay of the learning rate over the epochs (default: constant, as the paper).
    #[arg(long)]
    cosine: bool,
    /// Random left-right and up-down flips of training images.
    #[arg(long)]
    flips: bool,
    /// Gaussian noise of this standard deviation added to training pixels (0: none).
    #[arg(long, default_value_t = FinetuneStep::default().noise)]
    noise: f64,
    /// Train only the new head.
    #[arg(long)]
    freeze_backbone: bool,
    /// Input size: images are resized (shorter side) to --resize and centre-cropped to this.
    #[arg(long, default_value_t = FinetuneStep::default().size)]
    size: usize,
    /// Shorter side before the crop (default: --size, as the paper's code).
    #[arg(long, value_parser = crate::flags::resize)]
    resize: Option<u32>,
    /// Seed of the split, the new head and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The classes of a manifest, in label order (comma-separated): a row with another label is
    /// an error. Default: the sorted labels present, at least two.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Leave out unreadable or inconsistent manifest rows (listed on stderr) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Output folder: best.safetensors and report.json (refused when they exist, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace best.safetensors and report.json in --out.
    #[arg(long)]
    force: bool,
    /// cpu, cuda, cuda:N or auto (a GPU when there is one).
    #[arg(long, default_value_t)]
    device: DeviceName,
    /// Print the training report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn read_dataset(data: &Path, labels: Option<&[String]>, skip_bad: bool) -> Result<Dataset> {
    let manifest = if data.is_dir() {
        data.join("manifest.csv")
    } else {
        data.to_path_buf()
    };
    if manifest.is_file() {
        let options = ManifestOptions {
            classes: labels.map(<[String]>::to_vec),
            skip_bad,
            verify: true,
        };
        let (dataset, skipped) = Dataset::from_manifest(&manifest, &options)?;
        if !skipped.is_empty() {
            tracing::warn!(
                "left out {} bad rows of {}",
                skipped.len(),
                manifest.display()
            );
        }
        Ok(dataset)
    } else {
        Ok(Dataset::from_folders(data)?)
    }
}

/// The pipeline's `finetune` step with the flags' settings.
fn step(args: &Args) -> FinetuneStep {
    FinetuneStep {
        id: None,
        epochs: args.epochs,
        lr: args.lr,
        weight_decay: args.weight_decay,
        batch_size: args.batch_size,
        freeze_backbone: args.freeze_backbone,
        scratch: args.scratch,
        cosine: args.cosine,
        flips: args.flips,
        noise: args.noise,
        size: args.size,
    }
}

pub(crate) fn run(args: Args) -> Result<()> {
    let step = step(&args);
    // The pipeline's checks, before any data is read.
    vulnmap_pipeline::config::check_step(&Step::Finetune(step.clone()), "vulnmap finetune")?;
    for name in ["best.safetensors", "report.json"] {
        let existing = args.out.join(name);
        anyhow::ensure!(
            args.force || !existing.exists(),
            "{} exists (an earlier fine-tuning); choose another --out, or pass --force to replace it",
            existing.display()
        );
    }
    let device = args.device.open()?;
    let dataset = Arc::new(read_dataset(
        &args.data,
        args.labels.as_deref(),
        args.skip_bad,
    )?);
    anyhow::ensure!(!dataset.is_empty(), "{}: no images", args.data.display());
    let splits = split_by_patient(&dataset, PAPER_FRACTIONS, args.seed);
    eprint!("{}", summary(&dataset, &splits));
    let classes = Classes::new(dataset.classes.clone());
    let weights = match args.scratch {
        true => None,
        false => Some(zoo::weights_path(args.arch, args.weights.as_deref())?),
    };
    let model = match &weights {
        Some(path) => {
            tracing::info!("fine-tuning {} from {}", args.arch, path.display());
            let checkpoint = Checkpoint::open(path)?;
            TrainableModel::finetune(
                args.arch,
                &checkpoint,
                &classes,
                args.size,
                args.seed,
                &device,
            )?
        }
        None => {
            tracing::info!("training {} from scratch", args.arch);
            TrainableModel::fresh(args.arch, &classes, args.size, args.seed, &device)?
        }
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = vulnmap_data::fs::DirLock::acquire(&args.out)?;
    let config = vulnmap_pipeline::steps::finetune::train_config(
        &step,
        args.seed,
        args.resize,
        args.out.join("best.safetensors"),
        true,
    );
    let report = fit(&model, dataset, &splits, &config)?;
    let json = serde_json::to_string_pretty(&report)?;
    vulnmap_data::fs::write_atomic(&args.out.join("report.json"), json.as_bytes())?;
    if args.json {
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            std::io::stdout(),
            "best epoch {}: test accuracy {:.3}; weights in {}",
            report.best_epoch,
            report.test_accuracy,
            args.out.join("best.safetensors").display()
        )?;
    }
    Ok(())
}
