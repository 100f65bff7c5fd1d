//! `vulnmap`: find the pixels an image classifier depends on by attacking it.
//!
//! A thin front end over the vulnmap crates. Data goes to stdout (one JSON object per image with
//! `--json`), logs to stderr. Exit codes: 0 success, 1 failure, 2 usage.

mod attack;
mod classify;
mod eval;
mod explain;
mod finetune;
mod flags;
mod layers;
mod model_args;
mod output_names;
mod run;
mod synth;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory for reuse instead of returning it to the OS: tensors are large and
/// short-lived, and faulting their pages back in cost a third of a backward pass (measured on
/// EfficientNet-Lite0, batch 16: 7.7 s with glibc's defaults, 3.8 s this way).
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h, between `eager_commit_delay` (14) and
    // `use_numa_nodes` (16); libmimalloc-sys does not name it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "vulnmap",
    version,
    about = "Find the pixels an image classifier depends on by attacking it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Refuse images of more pixels than this before decoding them (default 67108864, 64
    /// megapixels; VULNMAP_MAX_PIXELS sets it too).
    #[arg(long, global = true, value_name = "PIXELS", value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: Option<u64>,
}

/// The longest error message printed: a message quoting untrusted input (a megabyte-long YAML
/// key, say) is cut here, at a character boundary.
const MAX_ERROR_CHARS: usize = 4000;

fn capped(message: &str) -> String {
    match message.char_indices().nth(MAX_ERROR_CHARS) {
        None => message.to_string(),
        Some((cut, _)) => format!(
            "{} ... ({} more characters)",
            &message[..cut],
            message[cut..].chars().count()
        ),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print each image's most likely classes.
    Classify(classify::Args),
    /// Saliency maps of images (PNG maps and overlays).
    Explain(explain::Args),
    /// Attack images: a Table I row each, and the noise and perturbed image as PNGs.
    Attack(attack::Args),
    /// Run a pipeline file into a run directory (results.jsonl, figures, report.html).
    Run(run::RunArgs),
    /// Score saliency methods on a dataset with lesion masks.
    Eval(eval::Args),
    /// Join the run directories of a sharded run (`vulnmap run --shard I/N`).
    Merge(run::MergeArgs),
    /// The offline demo: synthetic fundus data, a model trained on it, every method, a report.
    Demo(run::DemoArgs),
    /// Write a synthetic dataset (`fundus`: retinal images with known lesions and their masks).
    Synth(synth::Args),
    /// Train or fine-tune a classifier on a dataset (manifest or folder per class).
    Finetune(finetune::Args),
    /// List a model's feature maps (for --layer), with their shapes and Grad-CAM's default.
    Layers(layers::Args),
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            tracing_subscriber::EnvFilter::new(directives)
        }
        _ => tracing_subscriber::EnvFilter::new(level),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse(); // usage errors exit with 2
    init_logging(cli.verbose, cli.quiet);
    if let Some(pixels) = cli.max_pixels {
        vulnmap_data::image_io::set_max_pixels(pixels);
    }
    let result = match cli.command {
        Command::Classify(args) => classify::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Attack(args) => attack::run(args),
        Command::Run(args) => run::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => run::merge(args),
        Command::Demo(args) => run::demo(args),
        Command::Synth(args) => synth::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Layers(args) => layers::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `vulnmap ... | head`: the reader has what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` is the message chain, never a backtrace: RUST_BACKTRACE stays for bugs.
            eprintln!("error: {}", capped(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
