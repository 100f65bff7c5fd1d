//! Differentiable image classifiers for vulnmap, in pure Rust on candle.
//!
//! Every model implements [`Classifier`]: pixels in [0, 1] in, logits out, normalisation inside,
//! intermediate feature maps reachable, and an input gradient that matches PyTorch's.
//!
//! ```no_run
//! use vulnmap_models::{zoo, Arch, Classifier};
//! # fn main() -> vulnmap_models::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let model = zoo::load(Arch::ResNet50, None, candle_core::DType::F32, &device)?; // from the hub
//! let pixels = candle_core::Tensor::rand(0f32, 1f32, (1, 3, 224, 224), &device)?;
//! let logits = model.forward(&pixels)?;
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`classifier`]: the `Classifier` trait, input specs and class names.
//! - `conv_bn`: a convolution and its BatchNorm, folded into one fused op in eval mode.
//! - `resnet`: ResNet 18/34/50/101/152 and `tiny-resnet`, torchvision tensor names.
//! - `efficientnet_lite`: EfficientNet-Lite0 (lukemelas tensor names, TF-"SAME" padding).
//! - [`checkpoint`]: reading safetensors and `.pth`, strict fit checks, atomic saving.
//! - [`hub`]: weights from the Hugging Face hub through the local cache.
//! - [`zoo`]: models by name, from checkpoints or freshly initialised.
//! - [`init`]: seeded initialisation of trainable weights.
//! - `device`: device names (`cpu`, `cuda`, `cuda:N`, `auto`).
//! - `imagenet`: the 1000 ImageNet class names.
//!
//! Cargo features:
//! - `hub` (default): download weights from the Hugging Face hub (the cache is read without it).
//! - `cuda`: NVIDIA GPUs through candle's CUDA backend.
//! - `cudnn`: cuDNN convolutions (implies `cuda`).

pub mod checkpoint;
pub mod classifier;
mod conv_bn;
mod device;
mod efficientnet_lite;
mod error;
pub mod hub;
mod imagenet;
pub mod init;
mod resnet;
pub mod zoo;

pub use checkpoint::{save_safetensors, Checkpoint};
pub use classifier::{
    differentiable_log_odds, log_odds, Classes, Classifier, InputSpec, Score, ScoredClassifier,
};
pub use device::{parse_device, DeviceName};
pub use efficientnet_lite::EfficientNetLite0;
pub use error::{Error, Result, TensorProblem};
pub use hub::HubFile;
pub use resnet::{BlockKind, ResNet, ResNetConfig};
pub use zoo::Arch;
