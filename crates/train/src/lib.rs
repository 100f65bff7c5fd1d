//! Training and fine-tuning vulnmap's classifiers on a dataset.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vulnmap_train::{fit, TrainConfig, TrainableModel};
//! # fn main() -> vulnmap_models::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let dataset = Arc::new(vulnmap_data::Dataset::from_folders("scans")?);
//! let splits = vulnmap_data::split_by_patient(&dataset, vulnmap_data::split::PAPER_FRACTIONS, 0);
//! let arch = vulnmap_models::Arch::TinyResNet;
//! let classes = vulnmap_models::Classes::new(dataset.classes.clone());
//! let model = TrainableModel::fresh(arch, &classes, 128, 0, &device)?;
//! let report = fit(&model, dataset, &splits, &TrainConfig::default())?;
//! println!("best epoch {}, test accuracy {}", report.best_epoch, report.test_accuracy);
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`train`]: `TrainableModel` (fresh, or a checkpoint's backbone with a fresh head), `fit`
//!   (BatchNorm in train mode, best epoch kept), `evaluate`.
//! - [`optim`]: Adam with PyTorch's semantics (and AdamW), in place on the CPU.
//! - [`fundus_benchmark`]: tiny-resnet trained on the synthetic fundus set, cached by
//!   configuration.
//!
//! Cargo features: none (CUDA comes through `vulnmap-models`).

pub mod fundus_benchmark;
pub mod optim;
pub mod train;

pub use fundus_benchmark::{BenchmarkConfig, FundusBenchmark};
pub use optim::{Adam, AdamConfig};
pub use train::{evaluate, fit, LrSchedule, TrainConfig, TrainReport, TrainableModel};
