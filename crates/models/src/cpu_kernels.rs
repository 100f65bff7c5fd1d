//! What the hand-written CPU kernels share: the float types they handle and a contiguous view of
//! a storage.

use candle_core::{Layout, Result};

/// A float type the CPU kernels handle (f32 and f64).
pub(crate) trait Float:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ONE: Self;
    fn of(x: f64) -> Self;
}

impl Float for f32 {
    const ONE: Self = 1.0;
    fn of(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    const ONE: Self = 1.0;
    fn of(x: f64) -> Self {
        x
    }
}

/// The elements of a contiguous tensor's storage, or an error naming the op (`what`) that
/// needed them contiguous.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} needs contiguous tensors"),
    }
}
