//! `vulnmap`: find the pixels an image classifier depends on by attacking it.
//!
//! A thin front end over the vulnmap crates. Data goes to stdout (one JSON object per image with
//! `--json`), logs to stderr. Exit codes: 0 success, 1 failure, 2 usage.

mod classify;
mod finetune;
mod model_args;
mod synth;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
}

#[derive(Subcommand)]
enum Command {
    /// Print each image's most likely classes.
    Classify(classify::Args),
    /// Write a synthetic dataset (`fundus`: retinal images with known lesions and their masks).
    Synth(synth::Args),
    /// Train or fine-tune a classifier on a dataset (manifest or folder per class).
    Finetune(finetune::Args),
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

fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit with 2
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Classify(args) => classify::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Finetune(args) => finetune::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
