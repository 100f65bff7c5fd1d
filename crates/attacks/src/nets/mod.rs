//! The attacks' trainable networks, each a bank of independent networks with stacked weights, so
//! that one image's, window's or seed's network runs in one batched matrix product with the
//! others'.
//!
//! - [`generator`]: the noise generators (the authors' DCGAN and a size-generic one).
//! - [`unet`]: the mask attack's U-Net.
//! - [`free_mask`]: the authors' free low-resolution mask.
//! - [`bank`]: banked layers and where each entry's output goes.

pub(crate) mod bank;
pub(crate) mod free_mask;
pub(crate) mod generator;
pub(crate) mod unet;
