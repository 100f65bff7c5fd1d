//! Helpers shared by the saliency crate's integration tests.
#![allow(dead_code)]

use candle_core::Device;

/// The device the tests run on: `$VULNMAP_DEVICE`, `cpu` when unset.
pub fn device() -> Device {
    vulnmap_models::device_from_env().unwrap_or_else(|e| panic!("{e}"))
}
