//! Devices by name: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when built with it and a GPU is
//! present).

use crate::error::{Error, Result};
use candle_core::Device;

/// A device as the CLI and pipelines name it: `cpu`, `cuda` (or `gpu`), `cuda:N`, or `auto`
/// (CUDA when built with it and a GPU is present, else the CPU). Names ignore case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceName {
    /// The CPU.
    Cpu,
    /// The first GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// A GPU: the first (`cuda`) or number N (`cuda:N`).
    Cuda(Option<usize>),
}

impl DeviceName {
    /// Opens the device; a CUDA device fails with what to do when this build has no CUDA.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceName::Cpu => Ok(Device::Cpu),
            DeviceName::Auto => Ok(Device::cuda_if_available(0)?),
            DeviceName::Cuda(ordinal) => cuda(ordinal.unwrap_or(0)),
        }
    }
}

impl std::str::FromStr for DeviceName {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "cpu" => Ok(DeviceName::Cpu),
            "auto" => Ok(DeviceName::Auto),
            "cuda" | "gpu" => Ok(DeviceName::Cuda(None)),
            _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceName::Cuda(Some(ordinal))),
                _ => Err(Error::InvalidArgument(format!(
                    "unknown device `{name}`; expected cpu, cuda, cuda:N or auto"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceName::Cpu => f.write_str("cpu"),
            DeviceName::Auto => f.write_str("auto"),
            DeviceName::Cuda(None) => f.write_str("cuda"),
            DeviceName::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        name.parse()
    }
}

impl From<DeviceName> for String {
    fn from(name: DeviceName) -> String {
        name.to_string()
    }
}

/// Parses a device name as the CLI and pipelines accept it and opens the device.
pub fn parse_device(name: &str) -> Result<Device> {
    name.parse::<DeviceName>()?.open()
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(format!(
            "device cuda:{ordinal} asked for, but this vulnmap was built without CUDA; rebuild with \
             `--features cuda` (README.md, section CUDA) or use --device cpu"
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
        for name in ["cpu", "auto", "cuda", "cuda:3"] {
            assert_eq!(name.parse::<DeviceName>().unwrap().to_string(), name);
        }
        assert_eq!("GPU".parse::<DeviceName>().unwrap(), DeviceName::Cuda(None));
        assert!(parse_device("auto").is_ok());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0") && err.contains("cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
        }
    }
}
