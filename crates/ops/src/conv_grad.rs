//! 2-D convolution with a fast backward pass: GEMM + col2im for the input gradient, im2col + GEMM
//! for the kernel gradient, each computed only when its argument needs it.
//!
//! candle's own backward uses `conv_transpose2d`, which on the CPU is a direct loop 10-30 times
//! slower than the forward convolution (4.2 s against 0.14 s for ResNet's 7x7 stem on 32 images),
//! and always computes the kernel gradient, even for constant weights. Every attack iteration and
//! every saliency sample pays for the backward pass, so it is rebuilt here:
//!
//! - the forward is candle's own `conv2d` (fast, on every device), run on detached inputs;
//! - a custom op over `(input, kernel, output)` passes the output through and carries the
//!   gradient: `d input = col2im(G^T W)` and `d kernel = G im2col(x)`, both GEMMs on candle's
//!   matmul; 1x1 stride-1 convolutions need no im2col/col2im at all.
//!
//! im2col and col2im have direct CPU kernels; other devices use the window views of
//! [`crate::windows`], which are slower but exact.

use crate::cpu_kernels::{slice, Float};
use crate::windows::{untap, Pad2d, Windows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a square-kernel convolution with uniform padding and no dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl Geometry {
    fn new(input: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let (c, h, w) = (input[1], input[2], input[3]);
        let out = |n: usize| -> Result<usize> {
            crate::windows::output_size(n + 2 * padding, kernel, stride)
        };
        Ok(Self {
            channels: c,
            height: h,
            width: w,
            kernel,
            stride,
            padding,
            out_h: out(h)?,
            out_w: out(w)?,
        })
    }

    /// The convolution from `channels x height x width` images with a `kernel` moved by
    /// `stride` over `padding` pixels of zeros.
    pub fn conv(
        channels: usize,
        (height, width): (usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::new(&[1, channels, height, width], kernel, stride, padding)
    }

    /// Output height and width of the convolution.
    pub fn output(&self) -> (usize, usize) {
        (self.out_h, self.out_w)
    }

    /// Positions per image (`Ho * Wo`).
    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Values per column (`C * k * k`).
    pub fn column(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    pub(crate) fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
}

/// `conv2d(x, w)` (weight `Cout x Cin x k x k`, uniform `padding`, no dilation or groups) whose
/// backward pass is fast and skips the gradients nobody asked for.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    if !x.track_op() && !w.track_op() {
        return Ok(y);
    }
    let kernel = w.dim(2)?;
    if w.dim(3)? != kernel {
        candle_core::bail!("square kernels only, got {:?}", w.dims());
    }
    let geometry = Geometry::new(x.dims(), kernel, stride, padding)?;
    x.apply_op3(w, &y.contiguous()?, ConvBackward { geometry })
}

/// Identity on the precomputed output; its backward is the convolution's.
struct ConvBackward {
    geometry: Geometry,
}

/// Copies `storage` as laid out by `layout` (contiguous from offset 0, as the convolution's fresh
/// output is).
fn pass_through<S: BackendStorage>(storage: &S, layout: &Layout) -> Result<(S, Shape)> {
    match layout.contiguous_offsets() {
        Some((0, end)) if end == layout.shape().elem_count() => {
            Ok((storage.try_clone(layout)?, layout.shape().clone()))
        }
        _ => candle_core::bail!("convolution output must be contiguous"),
    }
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "vulnmap-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(y, yl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _output: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w) = conv_gradients(&self.geometry, x, w, grad)?;
        Ok((grad_x, grad_w, None))
    }
}

/// The gradients of `conv2d(x, w)` given the output's, each only if its argument is tracked.
fn conv_gradients(
    g: &Geometry,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let n = x.dim(0)?;
    let cout = w.dim(0)?;
    let grad = grad
        .detach()
        .contiguous()?
        .reshape((n, cout, g.positions()))?;
    let w2 = w.detach().reshape((cout, g.column()))?;
    let grad_x = if x.track_op() {
        Some(if g.is_pointwise() {
            // (Cin x Cout) x (N x Cout x P) -> N x Cin x P.
            w2.t()?
                .broadcast_matmul(&grad)?
                .reshape((n, g.channels, g.height, g.width))?
        } else {
            // Columns N x P x K = G^T W, then scattered back to the image.
            let cols = grad.transpose(1, 2)?.broadcast_matmul(&w2)?;
            col2im(&cols, g)?
        })
    } else {
        None
    };
    let grad_w = if w.track_op() {
        // Cout x (N P) times (N P) x K.
        let g2 = grad
            .transpose(0, 1)?
            .contiguous()?
            .reshape((cout, n * g.positions()))?;
        let cols = if g.is_pointwise() {
            x.detach()
                .reshape((n, g.channels, g.positions()))?
                .transpose(1, 2)?
                .contiguous()?
        } else {
            im2col(&x.detach(), g)?
        };
        let cols = cols.reshape((n * g.positions(), g.column()))?;
        Some(g2.matmul(&cols)?.reshape(w.shape())?)
    } else {
        None
    };
    Ok((grad_x, grad_w))
}

/// Patches of `x` as columns: `N x P x (C k k)`, column order `(c, dy, dx)` as the weights'.
/// Differentiable: its backward is [`col2im`].
pub fn im2col(x: &Tensor, g: &Geometry) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.apply_op1(Im2Col(*g, Columns::PositionsFirst));
    }
    let n = x.dim(0)?;
    let k = g.kernel;
    let windows = Windows::new(&x, (k, k), g.stride, Pad2d::uniform(g.padding), 0.0)?;
    let mut taps = Vec::with_capacity(k * k);
    for dy in 0..k {
        for dx in 0..k {
            taps.push(windows.tap(dy, dx)?);
        }
    }
    // N x C x kk x Ho x Wo -> N x Ho x Wo x C x kk -> N x P x K.
    Tensor::stack(&taps, 2)?
        .permute((0, 3, 4, 1, 2))?
        .contiguous()?
        .reshape((n, g.positions(), g.column()))
}

/// The adjoint of [`im2col`]: sums columns `N x P x (C k k)` back into `N x C x H x W`. Seen
/// the other way, a transposed convolution of the `N x C' x Ho x Wo` input whose columns these
/// are. Differentiable: its backward is [`im2col`].
pub fn col2im(cols: &Tensor, g: &Geometry) -> Result<Tensor> {
    let cols = cols.contiguous()?;
    if cols.device().is_cpu() && matches!(cols.dtype(), DType::F32 | DType::F64) {
        return cols.apply_op1(Col2Im(*g, Columns::PositionsFirst));
    }
    let n = cols.dim(0)?;
    let k = g.kernel;
    // N x P x C x k x k -> per offset N x C x Ho x Wo.
    let cols = cols.reshape((n, g.out_h, g.out_w, g.channels, k, k))?;
    let mut values = Vec::with_capacity(k * k);
    for dy in 0..k {
        for dx in 0..k {
            let v = cols
                .narrow(4, dy, 1)?
                .narrow(5, dx, 1)?
                .squeeze(5)?
                .squeeze(4)?;
            values.push(((dy, dx), v.permute((0, 3, 1, 2))?.contiguous()?));
        }
    }
    let p = g.padding;
    let padded = untap(
        values,
        g.stride,
        (g.out_h, g.out_w),
        (g.height + 2 * p, g.width + 2 * p),
    )?;
    padded.narrow(2, p, g.height)?.narrow(3, p, g.width)
}

/// Patches of `x` channel-major: `N x (C k k) x P`, [`im2col`]'s layout transposed, as a kernel
/// stored `(C k k) x Cin` times an `N x Cin x P` input makes them (the attacks' transposed
/// convolutions). Transposing [`im2col`]'s columns instead is a strided copy as slow as the
/// product. Differentiable: its backward is [`col2im_channel_major`].
pub fn im2col_channel_major(x: &Tensor, g: &Geometry) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.apply_op1(Im2Col(*g, Columns::ChannelMajor));
    }
    im2col(&x, g)?.transpose(1, 2)?.contiguous()
}

/// The adjoint of [`im2col_channel_major`]: sums `N x (C k k) x P` back into `N x C x H x W`.
/// Differentiable: its backward is [`im2col_channel_major`].
pub fn col2im_channel_major(rows: &Tensor, g: &Geometry) -> Result<Tensor> {
    let rows = rows.contiguous()?;
    if rows.device().is_cpu() && matches!(rows.dtype(), DType::F32 | DType::F64) {
        return rows.apply_op1(Col2Im(*g, Columns::ChannelMajor));
    }
    col2im(&rows.transpose(1, 2)?, g)
}

/// How a column matrix holds its patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// `N x P x (C k k)`, as a convolution's weights read them ([`im2col`]).
    PositionsFirst,
    /// `N x (C k k) x P`, as a kernel stored `(C k k) x Cin` makes them
    /// ([`im2col_channel_major`]).
    ChannelMajor,
}

impl Columns {
    /// The shape of `n` images' columns.
    fn shape(self, g: &Geometry, n: usize) -> Shape {
        match self {
            Columns::PositionsFirst => Shape::from((n, g.positions(), g.column())),
            Columns::ChannelMajor => Shape::from((n, g.column(), g.positions())),
        }
    }
}

struct Im2Col(Geometry, Columns);

impl Im2Col {
    fn run<T: Float>(&self, x: &[T], n: usize) -> Vec<T> {
        match self.1 {
            Columns::PositionsFirst => self.positions_first(x, n),
            Columns::ChannelMajor => self.channel_major(x, n),
        }
    }

    fn positions_first<T: Float>(&self, x: &[T], n: usize) -> Vec<T> {
        let g = &self.0;
        let (k, s, p) = (g.kernel, g.stride, g.padding as isize);
        let kk = g.column();
        let row = g.out_w * kk; // one output row of columns
        let mut cols = vec![T::default(); n * g.positions() * kk];
        cols.par_chunks_mut(row).enumerate().for_each(|(idx, out)| {
            let (b, i) = (idx / g.out_h, idx % g.out_h);
            let image =
                &x[b * g.channels * g.height * g.width..][..g.channels * g.height * g.width];
            for j in 0..g.out_w {
                let col = &mut out[j * kk..(j + 1) * kk];
                for c in 0..g.channels {
                    let plane = &image[c * g.height * g.width..][..g.height * g.width];
                    for dy in 0..k {
                        let y = (i * s + dy) as isize - p;
                        if y < 0 || y >= g.height as isize {
                            continue;
                        }
                        let line = &plane[y as usize * g.width..][..g.width];
                        for dx in 0..k {
                            let xx = (j * s + dx) as isize - p;
                            if xx >= 0 && xx < g.width as isize {
                                col[(c * k + dy) * k + dx] = line[xx as usize];
                            }
                        }
                    }
                }
            }
        });
        cols
    }

    fn channel_major<T: Float>(&self, x: &[T], n: usize) -> Vec<T> {
        let g = &self.0;
        let (k, s, p) = (g.kernel, g.stride, g.padding as isize);
        let kk = g.column();
        let plane_len = g.height * g.width;
        let mut rows = vec![T::default(); n * kk * g.positions()];
        rows.par_chunks_mut(g.positions())
            .enumerate()
            .for_each(|(idx, row)| {
                let (b, column) = (idx / kk, idx % kk);
                let (c, dy, dx) = (column / (k * k), column / k % k, column % k);
                let plane = &x[(b * g.channels + c) * plane_len..][..plane_len];
                for i in 0..g.out_h {
                    let y = (i * s + dy) as isize - p;
                    if y < 0 || y >= g.height as isize {
                        continue;
                    }
                    let line = &plane[y as usize * g.width..][..g.width];
                    let out = &mut row[i * g.out_w..][..g.out_w];
                    for (j, o) in out.iter_mut().enumerate() {
                        let xx = (j * s + dx) as isize - p;
                        if xx >= 0 && xx < g.width as isize {
                            *o = line[xx as usize];
                        }
                    }
                }
            });
        rows
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        match self.1 {
            Columns::PositionsFirst => "vulnmap-im2col",
            Columns::ChannelMajor => "vulnmap-im2col-channel-major",
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.1 {
            Columns::PositionsFirst => col2im(grad_res, &self.0)?,
            Columns::ChannelMajor => col2im_channel_major(grad_res, &self.0)?,
        }))
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = layout.dims()[0];
        let out = match storage.dtype() {
            DType::F32 => f32::storage(self.run(slice(storage, layout, "im2col")?, n)),
            DType::F64 => f64::storage(self.run(slice(storage, layout, "im2col")?, n)),
            other => candle_core::bail!("im2col: f32 or f64, not {other:?}"),
        };
        Ok((out, self.1.shape(&self.0, n)))
    }
}

struct Col2Im(Geometry, Columns);

impl Col2Im {
    fn run<T: Float>(&self, cols: &[T], n: usize) -> Vec<T> {
        match self.1 {
            Columns::PositionsFirst => self.positions_first(cols, n),
            Columns::ChannelMajor => self.channel_major(cols, n),
        }
    }

    fn positions_first<T: Float>(&self, cols: &[T], n: usize) -> Vec<T> {
        let g = &self.0;
        let (k, s, p) = (g.kernel, g.stride, g.padding as isize);
        let kk = g.column();
        let plane_len = g.height * g.width;
        let mut out = vec![T::default(); n * g.channels * plane_len];
        out.par_chunks_mut(plane_len)
            .enumerate()
            .for_each(|(idx, plane)| {
                let (b, c) = (idx / g.channels, idx % g.channels);
                let image_cols = &cols[b * g.positions() * kk..][..g.positions() * kk];
                for i in 0..g.out_h {
                    for dy in 0..k {
                        let y = (i * s + dy) as isize - p;
                        if y < 0 || y >= g.height as isize {
                            continue;
                        }
                        let line = &mut plane[y as usize * g.width..][..g.width];
                        for j in 0..g.out_w {
                            let col =
                                &image_cols[(i * g.out_w + j) * kk + c * k * k + dy * k..][..k];
                            for (dx, &v) in col.iter().enumerate() {
                                let xx = (j * s + dx) as isize - p;
                                if xx >= 0 && xx < g.width as isize {
                                    line[xx as usize] += v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }

    fn channel_major<T: Float>(&self, rows: &[T], n: usize) -> Vec<T> {
        let g = &self.0;
        let (k, s, p) = (g.kernel, g.stride, g.padding as isize);
        let kk = g.column();
        let positions = g.positions();
        let plane_len = g.height * g.width;
        let mut out = vec![T::default(); n * g.channels * plane_len];
        out.par_chunks_mut(plane_len)
            .enumerate()
            .for_each(|(idx, plane)| {
                let (b, c) = (idx / g.channels, idx % g.channels);
                for dy in 0..k {
                    for dx in 0..k {
                        let column = (c * k + dy) * k + dx;
                        let row = &rows[(b * kk + column) * positions..][..positions];
                        for i in 0..g.out_h {
                            let y = (i * s + dy) as isize - p;
                            if y < 0 || y >= g.height as isize {
                                continue;
                            }
                            let line = &mut plane[y as usize * g.width..][..g.width];
                            for (j, &v) in row[i * g.out_w..][..g.out_w].iter().enumerate() {
                                let xx = (j * s + dx) as isize - p;
                                if xx >= 0 && xx < g.width as isize {
                                    line[xx as usize] += v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        match self.1 {
            Columns::PositionsFirst => "vulnmap-col2im",
            Columns::ChannelMajor => "vulnmap-col2im-channel-major",
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.1 {
            Columns::PositionsFirst => im2col(grad_res, &self.0)?,
            Columns::ChannelMajor => im2col_channel_major(grad_res, &self.0)?,
        }))
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let n = layout.dims()[0];
        let shape = Shape::from((n, g.channels, g.height, g.width));
        let out = match storage.dtype() {
            DType::F32 => f32::storage(self.run(slice(storage, layout, "col2im")?, n)),
            DType::F64 => f64::storage(self.run(slice(storage, layout, "col2im")?, n)),
            other => candle_core::bail!("col2im: f32 or f64, not {other:?}"),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::gradcheck::finite_difference_check;
    use vulnmap_testkit::max_diff;

    const CASES: [(usize, usize, usize, usize, usize); 6] = [
        // (channels in, size, kernel, stride, padding)
        (3, 11, 7, 2, 3),
        (4, 8, 3, 1, 1),
        (4, 9, 3, 2, 1),
        (5, 6, 1, 1, 0),
        (5, 7, 1, 2, 0),
        (2, 10, 5, 3, 2),
    ];

    #[test]
    fn gradients_equal_candles_own_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, size, k, s, p) in CASES {
            // Square inputs: candle's own backward miscomputes some non-square stride-2 shapes.
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, cin, size, size), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, cin, k, k), &dev)?)?;
            let probe = Tensor::randn(
                0f32,
                1.0,
                conv2d(x.as_tensor(), w.as_tensor(), s, p)?.shape(),
                &dev,
            )?;
            let ours = (conv2d(x.as_tensor(), w.as_tensor(), s, p)? * &probe)?
                .sum_all()?
                .backward()?;
            let theirs = (x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1)? * &probe)?
                .sum_all()?
                .backward()?;
            for v in [&x, &w] {
                let d = max_diff(ours.get(v).unwrap(), theirs.get(v).unwrap());
                assert!(d < 1e-4, "k={k} s={s} p={p}: gradient differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn cpu_kernels_equal_the_device_generic_path() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, size, k, s, p) in CASES {
            let x = Tensor::randn(0f64, 1.0, (2, cin, size, size + 2), &dev)?;
            let g = Geometry::new(x.dims(), k, s, p)?;
            // The generic (any device) path, built from window views.
            let windows = Windows::new(&x, (k, k), s, Pad2d::uniform(p), 0.0)?;
            let mut taps = Vec::new();
            for dy in 0..k {
                for dx in 0..k {
                    taps.push(windows.tap(dy, dx)?);
                }
            }
            let generic = Tensor::stack(&taps, 2)?
                .permute((0, 3, 4, 1, 2))?
                .contiguous()?
                .reshape((2, g.positions(), g.column()))?;
            let fast = im2col(&x, &g)?;
            assert_eq!(max_diff(&fast, &generic), 0.0);

            let cols = Tensor::randn(0f64, 1.0, fast.shape(), &dev)?;
            let fast = col2im(&cols, &g)?;
            // col2im is im2col's adjoint: <im2col(x), cols> == <x, col2im(cols)>.
            let lhs = (im2col(&x, &g)? * &cols)?.sum_all()?.to_scalar::<f64>()?;
            let rhs = (&x * &fast)?.sum_all()?.to_scalar::<f64>()?;
            assert!(
                (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
                "adjoint: {lhs} vs {rhs}"
            );
        }
        Ok(())
    }

    #[test]
    fn im2col_and_col2im_are_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, size, k, s, p) in CASES {
            let x = Tensor::randn(0f64, 1.0, (2, cin, size, size + 1), &dev)?;
            let g = Geometry::new(x.dims(), k, s, p)?;
            finite_difference_check(&x, |x| im2col(x, &g), 1e-6, 1e-6)?;
            let cols = Tensor::randn(0f64, 1.0, (2, g.positions(), g.column()), &dev)?;
            finite_difference_check(&cols, |c| col2im(c, &g), 1e-6, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn channel_major_columns_are_the_transposed_columns_and_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, size, k, s, p) in CASES {
            let x = Tensor::randn(0f64, 1.0, (2, cin, size, size + 1), &dev)?;
            let g = Geometry::new(x.dims(), k, s, p)?;
            let rows = im2col_channel_major(&x, &g)?;
            assert_eq!(max_diff(&rows, &im2col(&x, &g)?.transpose(1, 2)?), 0.0);
            let probe = Tensor::randn(0f64, 1.0, rows.shape(), &dev)?;
            let ours = col2im_channel_major(&probe, &g)?;
            assert!(max_diff(&ours, &col2im(&probe.transpose(1, 2)?, &g)?) < 1e-12);
            finite_difference_check(&x, |x| im2col_channel_major(x, &g), 1e-6, 1e-6)?;
            finite_difference_check(&probe, |r| col2im_channel_major(r, &g), 1e-6, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_and_skip_constants() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, size, k, s, p) in CASES {
            let w = Tensor::randn(0f64, 1.0, (2, cin, k, k), &dev)?;
            let x = Tensor::randn(0f64, 1.0, (2, cin, size, size + 1), &dev)?;
            finite_difference_check(&x, |x| conv2d(x, &w, s, p), 1e-6, 1e-7)?;
            finite_difference_check(&w, |w| conv2d(&x, w, s, p), 1e-6, 1e-7)?;
        }
        // With a constant kernel no kernel gradient is produced.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 2, 3, 3), &dev)?;
        let grads = conv2d(x.as_tensor(), &w, 1, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
        Ok(())
    }
}
