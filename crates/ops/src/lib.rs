//! Differentiable candle ops with fast CPU kernels and backward passes that keep only what the
//! backward needs: the layers vulnmap's classifiers and attack networks are built from, usable by
//! any candle user.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! # fn main() -> candle_core::Result<()> {
//! let x = Var::from_tensor(&Tensor::rand(0f32, 1f32, (2, 3, 16, 16), &Device::Cpu)?)?;
//! // Max-pooling whose backward routes each gradient to the first maximum, as PyTorch does.
//! let pooled = vulnmap_ops::pool::max_pool2d(x.as_tensor(), 3, 2, 1)?;
//! // Bilinear resizing with a backward pass (PyTorch's `interpolate`, align_corners = false).
//! let resized = vulnmap_ops::resize::bilinear(&pooled, (32, 32), false)?;
//! let grads = resized.sum_all()?.backward()?;
//! assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[2, 3, 16, 16]);
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`activation`]: GELU, SiLU, hard sigmoid and hard swish as single ops with their own backward.
//! - [`attention`]: `softmax(a b) v` as one op whose backward recomputes the weights.
//! - [`conv`]: dense and depthwise convolution layers, PyTorch or TF-"SAME" padding.
//! - [`fused_conv`]: constant-weight convolution with its bias, residual add and ReLU in one op.
//! - [`conv_grad`]: convolution whose backward is GEMM + col2im, skipping unneeded gradients.
//! - [`guided`]: guided backpropagation's rectifier backward (positive gradients only).
//! - `depthwise`: CPU depthwise convolution kernels with their own backward pass.
//! - [`batch_norm`]: BatchNorm with eval and train modes.
//! - [`instance_norm`]: each plane normalised over its own pixels, with a scale and shift per
//!   plane, as one op with its analytic backward (the attacks' banked generators).
//! - [`per_channel`]: train-mode BatchNorm's per-channel sums and arithmetic, fast and exact.
//! - [`channel_affine`]: a constant scale and shift per channel, then ReLU, as one op (an unfoldable
//!   inference BatchNorm).
//! - [`feed_forward`]: a feed-forward block (linear, activation, linear) with constant weights as
//!   one op that keeps only the pre-activation.
//! - [`channel_feed_forward`]: ConvNeXt's block after its depthwise convolution (LayerNorm over
//!   the channels, feed-forward, per-channel scale) on `N x C x H x W` as one op.
//! - [`channel_gate`]: a feature map times one gate per image and channel (squeeze-and-excitation)
//!   as one op with both gradients.
//! - [`linear`]: `x W` by a constant weight, whose backward computes the input's gradient only.
//! - [`layer_norm`]: layer normalisation over the last axis or the channels, one op with its own
//!   backward.
//! - [`pool`]: max-pooling with a working backward pass (on the CPU without a padded copy);
//!   global average pooling.
//! - [`pre_norm`]: a pre-norm transformer sublayer's LayerNorm and residual add, done inside the
//!   feed-forward or self-attention op ([`feed_forward::pre_norm_feed_forward`],
//!   [`self_attention::pre_norm_self_attention`]).
//! - [`resize`]: differentiable bilinear resizing, on every device.
//! - [`separable`]: one short kernel along every row or column (a separable blur's passes), a
//!   direct loop instead of candle's im2col for `1 x k` kernels.
//! - [`self_attention`]: a multi-head self-attention block as one op that keeps only `q, k, v`.
//! - [`softmax`]: softmax over the last axis, one op whose backward reads only its output.
//! - [`windows`]: padding and strided window views, the building block of pooling and depthwise convolution.
//! - [`cpu_kernels`]: what the hand-written CPU kernels share (float types, contiguous views,
//!   constant parameters' values).
//!
//! Cargo features:
//! - `cuda`: candle's CUDA backend (the hand-written kernels are CPU kernels; on CUDA the ops use
//!   candle's own).
//! - `cudnn`: cuDNN convolutions (implies `cuda`).

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod channel_affine;
pub mod channel_feed_forward;
pub mod channel_gate;
pub mod conv;
pub mod conv_grad;
pub mod cpu_kernels;
mod depthwise;
pub mod feed_forward;
pub mod fused_conv;
pub mod guided;
pub mod instance_norm;
pub mod layer_norm;
pub mod linear;
pub mod per_channel;
pub mod pool;
pub mod pre_norm;
pub mod resize;
pub mod self_attention;
pub mod separable;
pub mod softmax;
pub mod windows;

pub use batch_norm::BatchNorm;
pub use conv::{Conv2d, DepthwiseConv2d, Padding};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_fused};
pub use fused_conv::{conv2d_fused, Epilogue};
