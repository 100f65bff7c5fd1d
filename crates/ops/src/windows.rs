//! Sliding-window views of a padded feature map, built from reshapes and narrows only.
//!
//! `tap(dy, dx)` is the `N x C x Ho x Wo` tensor whose element `(i, j)` is the padded input at
//! `(i * stride + dy, j * stride + dx)`: one kernel offset of a pooling or depthwise convolution
//! for every output position at once. Taps are views (no copies), and every operation on the way
//! is differentiable on every device, so anything built from taps has a working backward pass.

use candle_core::{Result, Tensor};

/// Padding in pixels on each side of a feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad2d {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Pad2d {
    /// The same padding on every side, as PyTorch's `padding=p`.
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// TensorFlow's "SAME" padding: output `ceil(in / stride)`, the extra pixel bottom and right.
    pub(crate) fn tf_same(in_size: (usize, usize), kernel: usize, stride: usize) -> Self {
        let along = |n: usize| {
            let out = n.div_ceil(stride);
            let total = ((out - 1) * stride + kernel).saturating_sub(n);
            (total / 2, total - total / 2)
        };
        let (top, bottom) = along(in_size.0);
        let (left, right) = along(in_size.1);
        Self {
            top,
            bottom,
            left,
            right,
        }
    }

    /// Whether all four sides are equal, so a convolution's own padding argument can do it.
    pub fn is_uniform(&self) -> bool {
        self.top == self.bottom && self.top == self.left && self.top == self.right
    }
}

/// Pads the last two dimensions of `x` with `value` (zeros, or -inf for max-pooling).
pub fn pad2d(x: &Tensor, pad: Pad2d, value: f64) -> Result<Tensor> {
    if value == 0.0 {
        return x
            .pad_with_zeros(2, pad.top, pad.bottom)?
            .pad_with_zeros(3, pad.left, pad.right);
    }
    let x = pad_dim(x, 2, pad.top, pad.bottom, value)?;
    pad_dim(&x, 3, pad.left, pad.right, value)
}

fn pad_dim(x: &Tensor, dim: usize, before: usize, after: usize, value: f64) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let block = |n: usize| -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims[dim] = n;
        Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(block(after)?);
    }
    Tensor::cat(&parts, dim)
}

/// The output size of a window of `kernel` with `stride` over `size` padded pixels.
pub(crate) fn output_size(padded: usize, kernel: usize, stride: usize) -> Result<usize> {
    if stride == 0 || kernel == 0 {
        candle_core::bail!("kernel and stride must be positive, got {kernel} and {stride}");
    }
    if padded < kernel {
        candle_core::bail!("a {kernel}-pixel window does not fit in {padded} (padded) pixels");
    }
    Ok((padded - kernel) / stride + 1)
}

/// The taps of a `kernel x kernel` window with `stride` over a padded feature map.
pub(crate) struct Windows {
    /// The padded input folded to `N x C x Hb x s x Wb x s`, so offset `dy` is block `dy / s`,
    /// phase `dy % s`.
    grid: Tensor,
    stride: usize,
    out: (usize, usize),
    /// The padded input's height and width (before folding).
    padded: (usize, usize),
}

impl Windows {
    /// Pads `x` (`N x C x H x W`) by `pad` with `value` and prepares the taps of a `kernel`-sized
    /// window moved by `stride`.
    pub(crate) fn new(
        x: &Tensor,
        kernel: (usize, usize),
        stride: usize,
        pad: Pad2d,
        value: f64,
    ) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        let out = (
            output_size(hp, kernel.0, stride)?,
            output_size(wp, kernel.1, stride)?,
        );
        // Blocks of `stride` rows needed so that every tap's block offset plus the output fits.
        let hb = out.0 + (kernel.0 - 1) / stride;
        let wb = out.1 + (kernel.1 - 1) / stride;
        // Pad the far side up to whole blocks (or crop rows no window reaches): rows past the
        // last window are never read, so the caller's bottom/right padding only matters up to it.
        let padded = pad2d(
            x,
            Pad2d {
                top: pad.top,
                bottom: (hb * stride).saturating_sub(h + pad.top),
                left: pad.left,
                right: (wb * stride).saturating_sub(w + pad.left),
            },
            value,
        )?
        .narrow(2, 0, hb * stride)?
        .narrow(3, 0, wb * stride)?;
        let grid = padded.reshape((n, c, hb, stride, wb, stride))?;
        Ok(Self {
            grid,
            stride,
            out,
            padded: (hp, wp),
        })
    }

    /// Output height and width.
    pub(crate) fn output(&self) -> (usize, usize) {
        self.out
    }

    /// The padded input's height and width.
    pub(crate) fn padded_size(&self) -> (usize, usize) {
        self.padded
    }

    /// The view for kernel offset `(dy, dx)`: `N x C x Ho x Wo`.
    pub(crate) fn tap(&self, dy: usize, dx: usize) -> Result<Tensor> {
        let s = self.stride;
        let (ho, wo) = self.out;
        self.grid
            .narrow(2, dy / s, ho)?
            .narrow(3, dy % s, 1)?
            .narrow(4, dx / s, wo)?
            .narrow(5, dx % s, 1)?
            .squeeze(5)?
            .squeeze(3)
    }
}

/// The adjoint of [`Windows::tap`]: scatters per-tap values back to the padded input's positions,
/// summing where windows overlap. `values` holds `((dy, dx), N x C x Ho x Wo)` pairs; the result
/// is `N x C x Hp x Wp` for the padded size.
pub(crate) fn untap(
    values: Vec<((usize, usize), Tensor)>,
    stride: usize,
    out: (usize, usize),
    padded: (usize, usize),
) -> Result<Tensor> {
    let Some((_, first)) = values.first() else {
        candle_core::bail!("untap needs at least one tap");
    };
    let (n, c, _, _) = first.dims4()?;
    let (dtype, device) = (first.dtype(), first.device().clone());
    let s = stride;
    let max_dy = values.iter().map(|((dy, _), _)| *dy).max().unwrap_or(0);
    let max_dx = values.iter().map(|((_, dx), _)| *dx).max().unwrap_or(0);
    let hb = out.0 + max_dy / s;
    let wb = out.1 + max_dx / s;
    // One accumulator per phase (dy % s, dx % s), each at block resolution.
    let mut phases: Vec<Option<Tensor>> = vec![None; s * s];
    for ((dy, dx), v) in values {
        let placed = v
            .pad_with_zeros(2, dy / s, hb - out.0 - dy / s)?
            .pad_with_zeros(3, dx / s, wb - out.1 - dx / s)?;
        let slot = &mut phases[(dy % s) * s + dx % s];
        *slot = Some(match slot.take() {
            Some(acc) => (acc + placed)?,
            None => placed,
        });
    }
    let zeros = Tensor::zeros((n, c, hb, wb), dtype, &device)?;
    let mut rows = Vec::with_capacity(s);
    for py in 0..s {
        let cols: Vec<Tensor> = (0..s)
            .map(|px| phases[py * s + px].clone().unwrap_or_else(|| zeros.clone()))
            .collect();
        rows.push(Tensor::stack(&cols, 4)?); // N x C x Hb x Wb x s
    }
    // N x C x Hb x s(py) x Wb x s(px): row = block * s + py, column = block * s + px.
    let grid = Tensor::stack(&rows, 3)?;
    let full = grid.reshape((n, c, hb * s, wb * s))?;
    let (hp, wp) = padded;
    let full = fit_dim(&full, 2, hp)?;
    fit_dim(&full, 3, wp)
}

/// Crops or zero-pads dimension `dim` to `size` at its far end.
fn fit_dim(x: &Tensor, dim: usize, size: usize) -> Result<Tensor> {
    let have = x.dim(dim)?;
    if have >= size {
        x.narrow(dim, 0, size)
    } else {
        x.pad_with_zeros(dim, 0, size - have)
    }
}
