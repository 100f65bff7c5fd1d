//! `vulnmap eval`: saliency methods scored on a dataset with lesion masks (pointing game, AUROC,
//! IoU, deletion, insertion, sparseness, complexity), through a pipeline run so that it can be
//! resumed and reported; the table gives each mean with its 95% bootstrap interval.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use vulnmap_data::Split;
use vulnmap_models::Score;
use vulnmap_pipeline::schema::{
    DataSpec, Explained, MapStep, Measure, MetricsStep, Outputs, Pipeline, Step, StepKind,
};
use vulnmap_pipeline::{runner, RunOptions};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A manifest CSV with mask_path, or a folder holding manifest.csv.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated map-making steps, with a pipeline's default settings (use a pipeline to
    /// change them).
    #[arg(long, value_delimiter = ',', required = true)]
    methods: Vec<MapStep>,
    /// Comma-separated measures (default: pointing game, AUROC, deletion, insertion).
    #[arg(long, value_delimiter = ',', value_enum)]
    measures: Vec<Measure>,
    /// The pointing game's tolerance in pixels (TorchRay's 15; 1: the maximum on a lesion
    /// pixel).
    #[arg(long, default_value_t = MetricsStep::default().pointing_tolerance, value_parser = crate::flags::positive)]
    pointing_tolerance: f64,
    /// Which patient-grouped split.
    #[arg(long, value_enum, default_value_t)]
    split: Split,
    /// The classes of the manifest, in label order (comma-separated), as the model's outputs.
    /// Default: the sorted labels present, at least two.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// At most this many images.
    #[arg(long)]
    limit: Option<usize>,
    /// What the maps explain.
    #[arg(long, value_enum, default_value_t)]
    score: Score,
    /// Which class the maps explain: the model's prediction or each image's label (the
    /// localisation benchmarks' protocol).
    #[arg(long, value_enum, default_value_t)]
    explain: Explained,
    /// The run directory (results.jsonl, figures, report.html).
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
    /// Continue an interrupted evaluation in --out.
    #[arg(long)]
    resume: bool,
    /// Discard the results already in --out and evaluate again.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    #[arg(long, default_value_t = 8, value_parser = crate::flags::batch_size)]
    batch_size: usize,
    /// One JSON object per image on stdout (its scores per method).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let manifest = if args.data.is_dir() {
        args.data.join("manifest.csv")
    } else {
        args.data.clone()
    };
    let mut steps: Vec<Step> = args.methods.iter().map(|m| m.step()).collect();
    let mut metrics = MetricsStep {
        pointing_tolerance: args.pointing_tolerance,
        ..MetricsStep::default()
    };
    if !args.measures.is_empty() {
        metrics.measures = args.measures.clone();
    }
    steps.push(Step::Metrics(metrics));
    let pipeline = Pipeline {
        name: "eval".into(),
        description: format!(
            "{} scored on {}",
            args.methods
                .iter()
                .map(|m| m.step().kind().name())
                .collect::<Vec<_>>()
                .join(", "),
            manifest.display()
        ),
        seed: 0,
        device: args.model.device,
        model: Some(args.model.spec(args.score)?),
        data: DataSpec {
            manifest: Some(manifest.display().to_string()),
            split: args.split,
            limit: args.limit,
            labels: args.labels.clone(),
            ..DataSpec::default()
        },
        steps,
        outputs: Outputs::default(),
        batch_size: args.batch_size,
        chunk_size: None,
        explain: args.explain,
    };
    // The same checks as a pipeline file's.
    let text = vulnmap_pipeline::config::to_yaml(&pipeline)?;
    let pipeline =
        vulnmap_pipeline::config::parse(&text, Path::new("<vulnmap eval>"), Path::new("."))?;
    let options = RunOptions {
        out: args.out.clone(),
        device: None,
        shard: None,
        resume: args.resume,
        force: args.force,
        cache: runner::default_cache(),
        progress: true,
    };
    let summary = runner::run(&pipeline, &options).context("evaluating")?;
    let rows = vulnmap_pipeline::rundir::read_rows(&summary.out.join("results.jsonl"), false)?;
    if args.json {
        for row in rows.iter().filter(|r| r.kind() == StepKind::Metrics) {
            writeln!(std::io::stdout(), "{}", row.to_line()?)?;
        }
    } else {
        let table = summary.out.join("metrics.md");
        match std::fs::read_to_string(&table) {
            Ok(text) => write!(std::io::stdout(), "{text}")?,
            Err(_) => writeln!(std::io::stdout(), "no images with lesion masks to score")?,
        }
        if let Some(report) = &summary.report {
            writeln!(std::io::stdout(), "report: {}", report.display())?;
        }
    }
    Ok(())
}
