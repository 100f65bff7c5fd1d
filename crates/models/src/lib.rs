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
//! - [`resnet`]: ResNet 18/34/50/101/152 and `tiny-resnet`, torchvision tensor names.
//! - [`efficientnet_lite`]: EfficientNet-Lite0 (lukemelas tensor names, TF-"SAME" padding).
//! - [`generator`]: the attacks' noise generators (the authors' DCGAN and a size-generic one).
//! - [`unet`]: the mask attack's U-Net.
//! - [`free_mask`]: the authors' free low-resolution mask.
//! - [`bank`]: banks of independent small networks run as one (one per image, window, seed).
//! - [`batch_norm`]: BatchNorm with eval and train modes.
//! - [`conv`]: dense and depthwise convolutions, PyTorch or TF-"SAME" padding.
//! - [`depthwise`]: CPU depthwise convolution kernels with their own backward pass.
//! - `cpu_kernels`: what the CPU kernels share (float types, contiguous views).
//! - [`conv_grad`]: convolution whose backward is GEMM + col2im, skipping unneeded gradients.
//! - [`fused_conv`]: constant-weight convolution with its bias, residual add and ReLU in one op.
//! - [`pool`]: max-pooling with a working backward pass; global average pooling.
//! - [`windows`]: strided window views, the building block of pooling and depthwise convolution.
//! - [`resize`]: differentiable bilinear resizing (PyTorch's `interpolate`), on every device.
//! - [`checkpoint`]: reading safetensors and `.pth`, strict fit checks, atomic saving.
//! - [`hub`]: weights from the Hugging Face hub through the local cache.
//! - [`zoo`]: models by name, from checkpoints or freshly initialised.
//! - [`fundus_benchmark`]: tiny-resnet trained on the synthetic fundus set, cached.
//! - [`train`]: training and fine-tuning on a dataset, with the best checkpoint kept.
//! - [`optim`]: Adam with PyTorch's semantics (and AdamW).
//! - [`init`]: seeded initialisation of trainable weights.
//! - `random`: seeded random draws (re-exported from `vulnmap_data::random`).
//! - [`device`]: device names (`cpu`, `cuda:N`, `auto`), and `$VULNMAP_DEVICE` for the tests.
//! - [`gradcheck`]: finite-difference checks of input gradients.
//! - [`imagenet`]: the 1000 ImageNet class names.
//!
//! Cargo features:
//! - `hub` (default): download weights from the Hugging Face hub (the cache is read without it).
//! - `cuda`: NVIDIA GPUs through candle's CUDA backend.
//! - `cudnn`: cuDNN convolutions (implies `cuda`).

pub mod bank;
pub mod batch_norm;
pub mod checkpoint;
pub mod classifier;
pub mod conv;
pub mod conv_grad;
mod cpu_kernels;
pub mod depthwise;
pub mod device;
pub mod efficientnet_lite;
pub mod error;
pub mod free_mask;
pub mod fundus_benchmark;
pub mod fused_conv;
pub mod generator;
pub mod gradcheck;
pub mod hub;
pub mod imagenet;
pub mod init;
pub mod optim;
pub mod pool;
pub mod resize;
pub mod resnet;
pub mod train;
pub mod unet;
pub mod windows;
pub mod zoo;

pub use checkpoint::{save_safetensors, Checkpoint};
pub use classifier::{Classes, Classifier, InputSpec, Score, ScoredClassifier};
pub use device::{device_from_env, parse_device};
pub use efficientnet_lite::EfficientNetLite0;
pub use error::{Error, Result, TensorProblem};
pub use hub::HubFile;
pub use resnet::ResNet;
pub use vulnmap_data::random;
pub use zoo::Arch;
