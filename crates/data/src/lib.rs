//! Images to tensors, datasets and the synthetic fundus benchmark for vulnmap.
//!
//! Modules:
//! - [`image_io`]: decoding PNG/JPEG (grey, RGB, RGBA, 8/16-bit, EXIF orientation) to [0, 1]
//!   pixels and writing PNGs.
//! - `preprocess`: resize the shorter side and centre-crop as torchvision; parallel batches.
//! - `dataset`: folder-per-class and CSV-manifest datasets (modality, patient, lesion mask).
//! - [`split`]: patient-grouped, label-stratified, seeded train/val/test splits and summaries.
//! - [`loader`]: shuffled batches decoded ahead of the model on a rayon pool.
//! - [`synthetic`]: the synthetic fundus benchmark (CFP and FA images with known lesions).
//! - [`random`]: seeded random draws, identical across runs and devices for a seed.
//! - [`fs`]: writing files through a temporary file and a rename; one writer per output folder.
//! - [`json`]: NaN through JSON (written as `null`, read back as NaN).
//! - [`npy`]: NumPy `.npy` files, for arrays handed to Python.
//! - [`assets`]: locating the shared example images, weights and reference fixtures.
//! - `error`: errors that name the file (and manifest line) at fault.
//!
//! Cargo features: none.

pub mod assets;
mod dataset;
mod error;
pub mod fs;
pub mod image_io;
pub mod json;
pub mod loader;
pub mod npy;
mod preprocess;
pub mod random;
pub mod split;
pub mod synthetic;

pub use dataset::{Dataset, ManifestOptions, Modality, Sample, Skipped};
pub use error::{describe, Error, Result};
pub use image_io::{load_rgb, save_png, RgbImage};
pub use preprocess::Preprocess;
pub use split::{split_by_patient, Split, Splits};
