//! The models crate's integration tests share vulnmap-testkit's helpers, reading fixtures onto the
//! test device.
#![allow(dead_code, unused_imports, unreachable_pub)]

use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;
pub use vulnmap_testkit::compare::{cosine, max_abs, max_abs_diff, relative_l2, to_vec};
pub use vulnmap_testkit::device;

/// All tensors of a safetensors fixture, on [`device`], in f32 where they are floating point.
pub fn read_fixture(path: &Path) -> HashMap<String, Tensor> {
    vulnmap_testkit::read_fixture(path, &device())
}
