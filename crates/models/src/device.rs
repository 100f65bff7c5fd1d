//! Devices by name: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when built with it and a GPU is
//! present), given directly or through `$VULNMAP_DEVICE`.

use crate::error::{Error, Result};
use candle_core::Device;

/// Parses a device name as the CLI and pipelines accept it.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0)?),
        "cuda" | "gpu" => cuda(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{name}`; expected cpu, cuda, cuda:N or auto"
            ))),
        },
    }
}

/// The variable that names the device [`device_from_env`] opens.
pub const DEVICE_VAR: &str = "VULNMAP_DEVICE";

/// The device named by `$VULNMAP_DEVICE`, `cpu` when it is unset: the test suites run on it, so
/// `VULNMAP_DEVICE=cuda cargo test --workspace --features vulnmap-models/cuda` runs them on a GPU.
pub fn device_from_env() -> Result<Device> {
    device_named_by(std::env::var(DEVICE_VAR))
}

fn device_named_by(value: std::result::Result<String, std::env::VarError>) -> Result<Device> {
    let in_var = |e: &dyn std::fmt::Display| Error::InvalidArgument(format!("${DEVICE_VAR}: {e}"));
    match value {
        Ok(name) => parse_device(&name).map_err(|e| in_var(&e)),
        Err(std::env::VarError::NotPresent) => Ok(Device::Cpu),
        Err(e) => Err(in_var(&e)),
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(format!(
            "device cuda:{ordinal} asked for, but this vulnmap was built without CUDA; rebuild with \
             `--features cuda` (see ../docs/CUDA.md) or use --device cpu"
        )));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| Error::InvalidArgument(format!("cannot open CUDA device {ordinal}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_say_what_is_expected() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0") && err.contains("cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
        }
    }

    #[test]
    fn the_environment_names_the_device_and_cpu_is_the_default() {
        use std::env::VarError;
        assert!(device_named_by(Err(VarError::NotPresent)).unwrap().is_cpu());
        assert!(device_named_by(Ok("CPU".into())).unwrap().is_cpu());
        let err = device_named_by(Ok("tpu".into())).unwrap_err().to_string();
        assert!(
            err.contains("VULNMAP_DEVICE") && err.contains("tpu"),
            "{err}"
        );
        let err = device_named_by(Err(VarError::NotUnicode("\u{fffd}".into())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VULNMAP_DEVICE"), "{err}");
    }
}
