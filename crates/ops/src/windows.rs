//! Sliding-window views of a padded feature map, built from reshapes and narrows only.
//!
//! `tap(dy, dx)` is the `N x C x Ho x Wo` tensor whose element `(i, j)` is the padded input at
//! `(i * stride + dy, j * stride + dx)`: one kernel offset of a pooling or depthwise convolution
//! for every output position at once. Taps are views (no copies), and every operation on the way
//! is differentiable on every device, so anything built from taps has a working backward pass.
//! The padding itself is one parallel CPU copy with a cropping backward ([`pad2d`]).

use crate::cpu_kernels::{slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
///
/// On the CPU one parallel copy whose backward crops the gradient (candle's `pad_with_zeros` is
/// two single-threaded concatenations, each kept for the backward pass); tensor ops elsewhere.
pub fn pad2d(x: &Tensor, pad: Pad2d, value: f64) -> Result<Tensor> {
    if pad == Pad2d::default() {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2 {
        return x.contiguous()?.apply_op1(Pad { pad, value });
    }
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

/// `pad2d` on a contiguous CPU tensor.
struct Pad {
    pad: Pad2d,
    value: f64,
}

impl Pad {
    /// (planes, height, width) of `dims`.
    fn planes(dims: &[usize]) -> (usize, usize, usize) {
        let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        (dims.iter().product::<usize>() / (h * w).max(1), h, w)
    }

    fn forward<T: Float>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let (planes, h, w) = Self::planes(dims);
        let p = self.pad;
        let (oh, ow) = (h + p.top + p.bottom, w + p.left + p.right);
        let mut out = vec![T::of(self.value); planes * oh * ow];
        if h * w == 0 {
            return out;
        }
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, x)| {
                for (i, row) in x.chunks(w).enumerate() {
                    o[(i + p.top) * ow + p.left..][..w].copy_from_slice(row);
                }
            });
        out
    }

    /// The gradient's inner `h x w` window of each plane.
    fn crop<T: Float>(&self, grad: &[T], dims: &[usize]) -> Vec<T> {
        let (planes, h, w) = Self::planes(dims);
        let p = self.pad;
        let ow = w + p.left + p.right;
        let oh = h + p.top + p.bottom;
        let mut out = vec![T::default(); planes * h * w];
        if h * w == 0 {
            return out;
        }
        out.par_chunks_mut(h * w)
            .zip(grad.par_chunks(oh * ow))
            .for_each(|(o, g)| {
                for (i, row) in o.chunks_mut(w).enumerate() {
                    row.copy_from_slice(&g[(i + p.top) * ow + p.left..][..w]);
                }
            });
        out
    }
}

impl CustomOp1 for Pad {
    fn name(&self) -> &'static str {
        "vulnmap-pad2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let out = match x.dtype() {
            DType::F32 => f32::storage(self.forward(slice::<f32>(x, l, "pad2d")?, dims)),
            DType::F64 => f64::storage(self.forward(slice::<f64>(x, l, "pad2d")?, dims)),
            other => candle_core::bail!("pad2d: f32 or f64, not {other:?}"),
        };
        let mut shape = dims.to_vec();
        let r = shape.len();
        shape[r - 2] += self.pad.top + self.pad.bottom;
        shape[r - 1] += self.pad.left + self.pad.right;
        Ok((out, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let crop = Crop {
            pad: self,
            input: x.dims().to_vec(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&crop)?))
    }
}

/// The backward of [`Pad`]: the gradient without its padding.
struct Crop<'a> {
    pad: &'a Pad,
    input: Vec<usize>,
}

impl CustomOp1 for Crop<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-pad2d-backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = &self.input;
        let out = match g.dtype() {
            DType::F32 => f32::storage(self.pad.crop(slice::<f32>(g, l, "pad2d backward")?, dims)),
            DType::F64 => f64::storage(self.pad.crop(slice::<f64>(g, l, "pad2d backward")?, dims)),
            other => candle_core::bail!("pad2d backward: f32 or f64, not {other:?}"),
        };
        Ok((out, Shape::from(dims.clone())))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    #[test]
    fn the_cpu_padding_equals_concatenation_with_the_same_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(15, "pad2d test");
        let x = Var::from_tensor(&vulnmap_data::random::randn(&mut rng, (2, 3, 5, 7), &dev)?)?;
        let pads = [
            Pad2d::uniform(1),
            Pad2d {
                top: 0,
                bottom: 2,
                left: 1,
                right: 0,
            },
        ];
        for pad in pads {
            for value in [0.0, -1.5] {
                let ours = pad2d(x.as_tensor(), pad, value)?;
                let theirs = pad_dim(
                    &pad_dim(x.as_tensor(), 2, pad.top, pad.bottom, value)?,
                    3,
                    pad.left,
                    pad.right,
                    value,
                )?;
                assert_eq!(ours.dims(), theirs.dims());
                assert_eq!(max_diff(&ours, &theirs), 0.0, "{pad:?} {value}");
                let probe = vulnmap_data::random::randn(&mut rng, ours.shape(), &dev)?;
                let g1 = (&ours * &probe)?.sum_all()?.backward()?;
                let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
                let (Some(g1), Some(g2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                    panic!("no input gradient");
                };
                assert_eq!(max_diff(g1, g2), 0.0, "{pad:?} {value} gradient");
            }
        }
        Ok(())
    }
}
