//! `vulnmap run`, `vulnmap merge` and `vulnmap demo`: pipelines into run directories.

use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use vulnmap_models::DeviceName;
use vulnmap_pipeline::{config, runner, Pipeline, RunOptions, RunSummary, Shard};

/// The demo: the synthetic fundus benchmark, every saliency method and attack, scored.
const DEMO: &str = include_str!("../../../pipelines/demo.yaml");

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// The run directory (default: runs/<pipeline name>, with the shard appended).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (overrides the pipeline's).
    #[arg(long)]
    device: Option<DeviceName>,
    /// Run only every N-th chunk of images starting at I (e.g. 0/4), for job arrays.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<Shard>,
    /// Continue the run in --out, skipping finished rows.
    #[arg(long)]
    resume: bool,
    /// Write into --out even when it holds results (discarded: the run starts again) or files
    /// that are not a vulnmap run's (kept, beside the run's).
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Check the pipeline and print it resolved, without running anything.
    #[arg(long)]
    check: bool,
    /// Where the synthetic fundus benchmark is cached (default $VULNMAP_CACHE or ~/.cache/vulnmap).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print the run's summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct MergeArgs {
    /// The shards' run directories.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// The merged run directory (new or empty).
    #[arg(long)]
    out: PathBuf,
    /// Replace what --out holds (a merged run from before, or other files).
    #[arg(long)]
    force: bool,
    /// Merge even when a shard is missing or has not finished (the report says which images it has).
    #[arg(long)]
    allow_partial: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// The run directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long)]
    device: Option<DeviceName>,
    /// Continue an interrupted demo in --out.
    #[arg(long)]
    resume: bool,
    /// Run the demo again in --out, discarding the results there.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    s.parse()
}

fn print(summary: &RunSummary, json: bool) -> Result<()> {
    if json {
        let line = json!({
            "out": summary.out,
            "images": summary.images,
            "rows": summary.rows,
            "report": summary.report,
        });
        writeln!(std::io::stdout(), "{line}")?;
    } else {
        writeln!(
            std::io::stdout(),
            "{} images, {} result rows in {}",
            summary.images,
            summary.rows,
            summary.out.join("results.jsonl").display()
        )?;
        if let Some(report) = &summary.report {
            writeln!(std::io::stdout(), "report: {}", report.display())?;
        }
    }
    Ok(())
}

fn execute(pipeline: &Pipeline, options: RunOptions, json: bool) -> Result<()> {
    let summary = runner::run(pipeline, &options)
        .with_context(|| format!("running pipeline `{}`", pipeline.name))?;
    print(&summary, json)
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let pipeline = config::load(&args.pipeline)?;
    if args.check {
        write!(std::io::stdout(), "{}", config::to_yaml(&pipeline)?)?;
        return Ok(());
    }
    let out = args.out.unwrap_or_else(|| {
        let mut name = pipeline.name.clone();
        if let Some(s) = args.shard {
            name.push_str(&format!("-shard-{}-of-{}", s.index, s.count));
        }
        Path::new("runs").join(name)
    });
    let options = RunOptions {
        out,
        device: args.device,
        shard: args.shard,
        resume: args.resume,
        force: args.force,
        cache: args.cache.unwrap_or_else(runner::default_cache),
        progress: true,
    };
    execute(&pipeline, options, args.json)
}

pub(crate) fn merge(args: MergeArgs) -> Result<()> {
    let summary = runner::merge(&args.out, &args.shards, args.force, args.allow_partial)?;
    print(&summary, args.json)
}

pub(crate) fn demo(args: DemoArgs) -> Result<()> {
    let pipeline = config::parse(
        DEMO,
        Path::new("<the embedded demo pipeline>"),
        Path::new("."),
    )?;
    tracing::info!(
        "demo: a synthetic fundus set, tiny-resnet trained on it (cached after the first run), every saliency method and attack"
    );
    let options = RunOptions {
        out: args.out,
        device: args.device,
        shard: None,
        resume: args.resume,
        force: args.force,
        cache: args.cache.unwrap_or_else(runner::default_cache),
        progress: true,
    };
    execute(&pipeline, options, args.json)
}
