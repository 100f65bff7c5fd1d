//! YAML pipelines for vulnmap: a file names a model, data and steps; the runner executes it into
//! a run directory (resolved config, `results.jsonl`, figures, tables, `report.html`) that can be
//! resumed, sharded over machines and merged.
//!
//! ```no_run
//! # fn main() -> vulnmap_pipeline::Result<()> {
//! use vulnmap_pipeline::{config, runner};
//! let pipeline = config::load("pipelines/table1.yaml".as_ref())?; // every check, with lines
//! let options = runner::RunOptions {
//!     out: "runs/table1".into(),
//!     device: None,
//!     shard: None,
//!     resume: false,
//!     force: false,
//!     cache: runner::default_cache(),
//!     progress: true,
//! };
//! let summary = runner::run(&pipeline, &options)?;
//! println!("{:?}", summary.report);
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`schema`]: the pipeline file's types, with the paper's values as defaults, except the mask
//!   attack's: the dual game the attack-maps benchmark picked (`MaskAttackStep::DUAL`).
//! - [`config`]: loading a file: `${VAR}` expansion, parsing, checks with line and column.
//! - [`limits`]: the ranges of settings that multiply memory or time, for keys and flags alike.
//! - `yaml_budget`: bounds on a pipeline file's size and alias expansion, before parsing.
//! - `locate`: positions of YAML values by path, for checks made after parsing.
//! - `source`: the images (files, glob, manifest, folders, synthetic, benchmark) and masks.
//! - [`model`]: the classifier a pipeline or command names: a native architecture or an ONNX
//!   file.
//! - [`steps`]: each step's settings converted into the libraries' (shared with the CLI).
//! - [`runner`]: chunks, steps, `--resume`, `--shard`, and `merge`.
//! - `finetune`: the fine-tuning step.
//! - [`rows`]: the typed rows of `results.jsonl`, written by the steps and read by the report.
//! - [`rundir`]: the run directory: format marker, lock, image list, `results.jsonl` (append,
//!   repair, sort) and joining shards.
//! - [`figures`]: PNGs of inputs, maps, overlays, noise and perturbed images.
//! - `report`: Table I, the scores table, `report.html`.
//! - `plot`: the alpha-sweep plot (SVG).
//! - `error`: errors; configuration problems carry file, line and column.
//!
//! Cargo features: none (CUDA comes through `vulnmap-models`).

pub mod config;
mod error;
pub mod figures;
mod finetune;
pub mod limits;
mod locate;
pub mod model;
mod plot;
mod report;
pub mod rows;
pub mod rundir;
pub mod runner;
pub mod schema;
mod source;
pub mod steps;
mod yaml_budget;

pub use error::{Error, Problem, Result};
pub use runner::{merge, run, RunOptions, RunSummary, Shard};
pub use schema::Pipeline;
