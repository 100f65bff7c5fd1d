//! Images to tensors, datasets and the synthetic fundus benchmark for vulnmap.
//!
//! Modules:
//! - [`image_io`]: decoding PNG/JPEG (grey, RGB, RGBA, 8/16-bit, EXIF orientation) to [0, 1]
//!   pixels and writing PNGs.
//! - [`preprocess`]: resize the shorter side and centre-crop as torchvision; parallel batches.
//! - [`fs`]: writing files through a temporary file and a rename.
//! - [`assets`]: locating the shared example images, weights and reference fixtures.
//! - [`error`]: errors that name the file at fault.
//!
//! Cargo features: none.

pub mod assets;
pub mod error;
pub mod fs;
pub mod image_io;
pub mod preprocess;

pub use error::{Error, Result};
pub use image_io::{load_rgb, save_png, RgbImage};
pub use preprocess::Preprocess;
