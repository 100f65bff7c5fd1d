//! Test helpers shared by vulnmap's crates (a dev-dependency only): the device the tests run on,
//! the shared assets, finite-difference gradient checks and tolerance comparisons.
//!
//! ```
//! let device = vulnmap_testkit::device(); // $VULNMAP_DEVICE, cpu when unset
//! let x = candle_core::Tensor::new(&[1.0f64, -2.0, 3.0], &device).unwrap();
//! let check = vulnmap_testkit::gradcheck::finite_difference_check(&x, |x| x.sqr(), 1e-6, 1e-6);
//! assert!(check.is_ok());
//! ```
//!
//! Modules:
//! - [`assets`]: shared assets for tests: skip with a reason when absent, fail when required.
//! - [`gradcheck`]: analytic input gradients against central differences.
//! - [`compare`]: tensors as vectors, largest differences, cosine, relative L2, closeness.
//! - [`mutate`]: damaged copies of files, for the property tests of untrusted-input readers.
//!
//! Cargo features: none.

pub mod assets;
pub mod compare;
pub mod gradcheck;
pub mod mutate;

pub use assets::{read_fixture, test_asset};
pub use compare::{assert_close, max_abs, max_abs_diff, max_diff, to_vec};

use candle_core::Device;

/// The variable that names the device [`device`] opens.
pub const DEVICE_VAR: &str = "VULNMAP_DEVICE";

/// The device the tests run on: `$VULNMAP_DEVICE`, `cpu` when it is unset, so
/// `VULNMAP_DEVICE=cuda cargo test --workspace --features vulnmap-models/cuda` runs them on a
/// GPU. Panics (failing the test) with the variable's name when it names no usable device.
pub fn device() -> Device {
    device_named_by(std::env::var(DEVICE_VAR)).unwrap_or_else(|e| panic!("{e}"))
}

fn device_named_by(value: Result<String, std::env::VarError>) -> Result<Device, String> {
    match value {
        Ok(name) => vulnmap_models::parse_device(&name).map_err(|e| format!("${DEVICE_VAR}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(Device::Cpu),
        Err(e) => Err(format!("${DEVICE_VAR}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_the_device_and_cpu_is_the_default() {
        use std::env::VarError;
        assert!(device_named_by(Err(VarError::NotPresent)).unwrap().is_cpu());
        assert!(device_named_by(Ok("CPU".into())).unwrap().is_cpu());
        let err = device_named_by(Ok("tpu".into())).unwrap_err();
        assert!(
            err.contains("VULNMAP_DEVICE") && err.contains("tpu"),
            "{err}"
        );
        let err = device_named_by(Err(VarError::NotUnicode("\u{fffd}".into()))).unwrap_err();
        assert!(err.contains("VULNMAP_DEVICE"), "{err}");
    }
}
