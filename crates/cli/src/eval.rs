//! `vulnmap eval`: saliency methods scored on a dataset with lesion masks (pointing game, AUROC,
//! IoU, deletion, insertion), through a pipeline run so that it can be resumed and reported.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use vulnmap_pipeline::schema::{DataSpec, MetricsStep, ModelSpec, Outputs, Pipeline, Step};
use vulnmap_pipeline::{runner, RunOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A manifest CSV with mask_path, or a folder holding manifest.csv.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated: gradient, smoothgrad, integrated-gradients, grad-cam, occlusion, rise,
    /// local-attack, mask-attack (default settings; use a pipeline to change them).
    #[arg(long, value_delimiter = ',', required = true)]
    methods: Vec<String>,
    /// Which patient-grouped split: train, val, test or all.
    #[arg(long, default_value = "test")]
    split: String,
    /// At most this many images.
    #[arg(long)]
    limit: Option<usize>,
    /// What the maps explain: logit, centred-logit or log-probability.
    #[arg(long, default_value = "logit")]
    score: String,
    /// The run directory (results.jsonl, figures, report.html).
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
    /// Continue an interrupted evaluation in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// One JSON object per image on stdout (its scores per method).
    #[arg(long)]
    json: bool,
}

/// The step a CLI method name stands for, with its defaults.
fn step(name: &str) -> Result<Step> {
    let key = name.trim().replace('-', "_");
    serde_yaml_ng::with::singleton_map::deserialize(serde_yaml_ng::Deserializer::from_str(&format!("{key}: {{}}"))).map_err(|_: serde_yaml_ng::Error| {
        anyhow::anyhow!(
            "unknown method `{name}`; known: gradient, smoothgrad, integrated-gradients, grad-cam, occlusion, rise, local-attack, mask-attack"
        )
    })
}

pub fn run(args: Args) -> Result<()> {
    let manifest = if args.data.is_dir() {
        args.data.join("manifest.csv")
    } else {
        args.data.clone()
    };
    let mut steps = Vec::new();
    for m in &args.methods {
        let s = step(m)?;
        anyhow::ensure!(s.makes_maps(), "`{m}` makes no saliency map to score");
        steps.push(s);
    }
    steps.push(Step::Metrics(MetricsStep::default()));
    let weights = args.model.weights.as_ref().map(|w| w.display().to_string());
    let pipeline = Pipeline {
        name: "eval".into(),
        description: format!(
            "{} scored on {}",
            args.methods.join(", "),
            manifest.display()
        ),
        seed: 0,
        device: args.model.device.clone(),
        model: Some(ModelSpec {
            arch: args.model.model.name().into(),
            weights,
            score: args.score.clone(),
        }),
        data: DataSpec {
            manifest: Some(manifest.display().to_string()),
            split: args.split.clone(),
            limit: args.limit,
            ..DataSpec::default()
        },
        steps,
        outputs: Outputs::default(),
        batch_size: args.batch_size,
        chunk_size: None,
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
        cache: runner::default_cache(),
        progress: true,
    };
    let summary = runner::run(&pipeline, &options).context("evaluating")?;
    let rows = vulnmap_pipeline::rundir::read_rows(&summary.out.join("results.jsonl"), false)?;
    if args.json {
        for row in rows
            .iter()
            .filter(|r| r.get("kind").and_then(|k| k.as_str()) == Some("metrics"))
        {
            println!("{}", serde_json::Value::Object(row.clone()));
        }
    } else {
        let table = summary.out.join("metrics.md");
        match std::fs::read_to_string(&table) {
            Ok(text) => print!("{text}"),
            Err(_) => println!("no images with lesion masks to score"),
        }
        if let Some(report) = &summary.report {
            println!("report: {}", report.display());
        }
    }
    Ok(())
}
