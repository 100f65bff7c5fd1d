//! Convolution with constant weights and a fused epilogue, `relu(conv(x, w) + bias + residual)`,
//! for the pretrained classifiers that attacks and saliency differentiate to the input only.
//!
//! With BatchNorm folded into `w` and `bias`, a ResNet unit (conv, BN, residual add, ReLU) is one
//! op and one activation instead of five, and its backward pass is one masking pass plus
//! `col2im(W^T G)`. On the CPU each image is done whole while it is in cache: its columns laid out
//! `(C k k) x P` (a row per kernel tap, as Caffe's im2col, so a row is a copy of image rows), one
//! GEMM that adds onto the bias and residual already in the NCHW output, then the ReLU; columns
//! over a few MB are built a band of output rows at a time. Batches run an image per thread; a
//! single image splits its GEMM across threads instead.
//!
//! Other devices, and tracked weights, get the same value from [`crate::conv_grad`] plus plain
//! tensor ops.

use crate::conv_grad::{conv2d, Geometry};
use crate::cpu_kernels::{constant_values, slice, widest_simd, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// What follows the convolution, in this order: `+ bias` (per output channel), `+ residual`
/// (same shape as the output), ReLU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `Cout` values, one added to each output channel (default none).
    pub bias: Option<&'a Tensor>,
    /// A tensor of the output's shape added after the bias, such as a skip connection (default
    /// none); the backward pass reaches it.
    pub residual: Option<&'a Tensor>,
    /// Apply ReLU last (default `false`).
    pub relu: bool,
    /// That ReLU's upper clip, `Some(6.0)` for ReLU6 (default none).
    pub relu_max: Option<f64>,
    /// That ReLU's backward rule (default the exact gradient).
    pub relu_backward: crate::guided::ReluBackward,
}

/// `conv2d(x, w)` (weight `Cout x Cin x k x k`, uniform `padding`) followed by `epilogue`, with
/// a backward pass for the input and the residual.
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    epilogue: Epilogue,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    // Trained weights (fine-tuning, the benchmark model) keep the plain path: their weight
    // gradient is needed anyway, and training stays bit-for-bit what it was.
    let trained = w.track_op() || epilogue.bias.is_some_and(|b| b.track_op());
    if !cpu || trained || w.dim(2)? != w.dim(3)? {
        return unfused(x, w, epilogue, stride, padding);
    }
    let geometry = Geometry::conv(
        x.dim(1)?,
        (x.dim(2)?, x.dim(3)?),
        w.dim(2)?,
        stride,
        padding,
    )?;
    let bias = match epilogue.bias {
        Some(b) => Some(constant_values(b, w.dim(0)?, "convolution's bias")?),
        None => None,
    };
    let node = FusedConv {
        geometry,
        bias,
        relu: epilogue.relu,
        relu_max: epilogue.relu_max,
        guided: epilogue.relu_backward == crate::guided::ReluBackward::Guided,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match epilogue.residual {
        Some(r) => x.apply_op3(&w, &r.contiguous()?, node),
        None => x.apply_op2(&w, node),
    }
}

/// The same value from plain ops, on every device.
fn unfused(
    x: &Tensor,
    w: &Tensor,
    epilogue: Epilogue,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    epilogue_by_tensor_ops(conv2d(x, w, stride, padding)?, epilogue)
}

/// `epilogue` applied to a convolution's output `y` with plain tensor ops (any device, tracked
/// bias or residual).
pub(crate) fn epilogue_by_tensor_ops(mut y: Tensor, epilogue: Epilogue) -> Result<Tensor> {
    if let Some(b) = epilogue.bias {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
    }
    if let Some(r) = epilogue.residual {
        y = (y + r)?;
    }
    if epilogue.relu {
        y = y.relu()?;
        if let Some(max) = epilogue.relu_max {
            y = y.minimum(max)?;
        }
        y = epilogue.relu_backward.apply(y)?;
    }
    Ok(y)
}

/// The convolution and its epilogue as one graph node over `(x, w)` or `(x, w, residual)`.
struct FusedConv {
    geometry: Geometry,
    bias: Option<Vec<f64>>,
    relu: bool,
    relu_max: Option<f64>,
    /// Guided backpropagation: the ReLU passes only positive gradients back.
    guided: bool,
}

impl FusedConv {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let n = x.1.dims()[0];
        let cout = w.1.dims()[0];
        let shape = Shape::from((n, cout, g.out_h, g.out_w));
        if let Some((_, rl)) = residual {
            if rl.shape() != &shape {
                candle_core::bail!("residual {:?} for a {shape:?} output", rl.dims());
            }
        }
        let out = match x.0.dtype() {
            DType::F32 => self.run::<f32>(x, w, residual, n, cout)?,
            DType::F64 => self.run::<f64>(x, w, residual, n, cout)?,
            other => candle_core::bail!("fused convolution: f32 or f64, not {other:?}"),
        };
        Ok((out, shape))
    }

    /// `relu(W cols(x_i) + bias + residual_i)` for every image `i`.
    fn run<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
        n: usize,
        cout: usize,
    ) -> Result<CpuStorage> {
        const WHAT: &str = "fused convolution";
        let (x, w) = (slice::<T>(x.0, x.1, WHAT)?, slice::<T>(w.0, w.1, WHAT)?);
        let residual = residual
            .map(|(r, rl)| slice::<T>(r, rl, WHAT))
            .transpose()?;
        let g = &self.geometry;
        let (image_in, image_out) = (g.channels * g.height * g.width, cout * g.positions());
        let mut out = vec![T::default(); n * image_out];
        let one_image = |i: usize, y: &mut [T], cols: &mut Vec<T>, threads: Parallelism| {
            let parallel = matches!(threads, Parallelism::Rayon(_));
            // Start from the bias and residual; the GEMM adds onto them.
            let start = |c: usize, plane: &mut [T]| {
                let b = self.bias.as_ref().map_or(T::default(), |b| T::of(b[c]));
                match residual {
                    Some(r) => {
                        let r = &r[i * image_out + c * g.positions()..][..g.positions()];
                        plane.iter_mut().zip(r).for_each(|(v, &r)| *v = r + b);
                    }
                    None => plane.fill(b),
                }
            };
            // Without either, the GEMM writes the zeroed output directly.
            let accumulate = self.bias.is_some() || residual.is_some();
            if accumulate {
                for_each_plane(y, g.positions(), parallel, start);
            }
            let image = &x[i * image_in..][..image_in];
            let p = g.positions();
            // y (Cout x P) += W (Cout x K) rhs (K x P), all row-major.
            if g.is_pointwise() {
                let w = (w, g.column() as isize, 1);
                gemm_into((y, p), accumulate, (cout, p), w, (image, p), threads);
            } else {
                // A band of output rows at a time: its columns, then its block of `y`.
                for rows in column_bands::<T>(g) {
                    let width = rows.len() * g.out_w;
                    cols.resize(g.column() * width, T::default());
                    im2rows(image, g, rows.clone(), cols, parallel);
                    let y = &mut y[rows.start * g.out_w..];
                    let w = (w, g.column() as isize, 1);
                    gemm_into((y, p), accumulate, (cout, width), w, (cols, width), threads);
                }
            }
            if self.relu {
                let max = self.relu_max.map(T::of);
                for_each_plane(y, g.positions(), parallel, |_, plane| {
                    widest_simd(
                        #[inline(always)]
                        || relu_in_place(plane, max),
                    )
                });
            }
        };
        per_image(&mut out, image_out, one_image);
        Ok(T::storage(out))
    }

    /// The ReLU's backward, if one follows.
    fn mask(&self) -> Option<ReluMask> {
        self.relu.then_some(ReluMask {
            guided: self.guided,
            max: self.relu_max,
        })
    }

    /// The gradient at the input, if it is tracked, from the output's gradient (`output` given:
    /// the ReLU's mask is applied image by image inside the op) or the pre-activation's.
    fn input_gradient(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        output: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let grad = grad.detach().contiguous()?;
        let geometry = self.geometry;
        match output.zip(self.mask()) {
            Some((output, mask)) => {
                let op = InputGradient {
                    geometry,
                    mask: Some(mask),
                };
                grad.apply_op3_no_bwd(&w.detach(), &output.detach(), &op)
            }
            None => {
                let op = InputGradient {
                    geometry,
                    mask: None,
                };
                grad.apply_op2_no_bwd(&w.detach(), &op)
            }
        }
        .map(Some)
    }

    /// The gradient at the pre-activation (the ReLU's mask applied): the residual's.
    fn pre_activation_gradient(&self, output: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let grad = grad.detach().contiguous()?;
        match self.mask() {
            Some(mask) => grad.apply_op2_no_bwd(&output.detach(), &mask),
            None => Ok(grad),
        }
    }
}

impl CustomOp2 for FusedConv {
    fn name(&self) -> &'static str {
        "vulnmap-fused-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, xl), (w, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.input_gradient(x, w, grad, Some(output))?, None))
    }
}

impl CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "vulnmap-fused-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, xl), (w, wl), Some((r, rl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        residual: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if residual.track_op() {
            let pre_activation = self.pre_activation_gradient(output, grad)?;
            let grad_x = self.input_gradient(x, w, &pre_activation, None)?;
            Ok((grad_x, None, Some(pre_activation)))
        } else {
            Ok((self.input_gradient(x, w, grad, Some(output))?, None, None))
        }
    }
}

/// `col2im(W^T G)` per image: the input gradient of the convolution, from the output's `G`.
struct InputGradient {
    geometry: Geometry,
    /// The ReLU's backward, applied to each image's `G` on the way in (the op's third input is
    /// the layer's output): the masked gradient, as big as that output, is never written whole.
    mask: Option<ReluMask>,
}

/// An image's scratch space: the convolution's columns and its masked output gradient.
#[derive(Default)]
struct Scratch<T> {
    cols: Vec<T>,
    masked: Vec<T>,
}

impl InputGradient {
    fn run<T: Float>(
        &self,
        grad: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        output: Option<(&CpuStorage, &Layout)>,
        n: usize,
        cout: usize,
    ) -> Result<CpuStorage> {
        const WHAT: &str = "fused convolution gradient";
        let (grad, w) = (
            slice::<T>(grad.0, grad.1, WHAT)?,
            slice::<T>(w.0, w.1, WHAT)?,
        );
        let output = output.map(|(o, ol)| slice::<T>(o, ol, WHAT)).transpose()?;
        if output.is_some_and(|o| o.len() != grad.len()) {
            candle_core::bail!("{WHAT}: an output of another size than its gradient");
        }
        let g = &self.geometry;
        let (image_in, image_out) = (g.channels * g.height * g.width, cout * g.positions());
        let mut out = vec![T::default(); n * image_in];
        let one_image = |i: usize, dx: &mut [T], scratch: &mut Scratch<T>, threads| {
            let parallel = matches!(threads, Parallelism::Rayon(_));
            let mut gi = &grad[i * image_out..][..image_out];
            if let (Some(mask), Some(y)) = (&self.mask, output) {
                scratch.masked.clear();
                mask.append(
                    gi,
                    &y[i * image_out..][..image_out],
                    &mut scratch.masked,
                    parallel,
                );
                gi = &scratch.masked;
            }
            let cols = &mut scratch.cols;
            // W^T is W read column-major: (K x Cout) with row stride 1, column stride K.
            let wt = (w, 1, g.column() as isize);
            let p = g.positions();
            if g.is_pointwise() {
                gemm_into((dx, p), true, (g.channels, p), wt, (gi, p), threads);
            } else {
                // A band of output rows at a time: its columns, then added into `dx`.
                for rows in column_bands::<T>(g) {
                    let width = rows.len() * g.out_w;
                    // Every entry is overwritten: no need to clear what was there.
                    cols.resize(g.column() * width, T::default());
                    let gi = (&gi[rows.start * g.out_w..], p);
                    gemm_into((cols, width), false, (g.column(), width), wt, gi, threads);
                    rows2im(cols, g, rows, dx, parallel);
                }
            }
        };
        per_image(&mut out, image_in, one_image);
        Ok(T::storage(out))
    }

    /// [`InputGradient::run`] for the gradient's dtype, and the input's shape.
    fn typed(
        &self,
        grad: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        output: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let (n, cout) = (grad.1.dims()[0], w.1.dims()[0]);
        let shape = Shape::from((n, g.channels, g.height, g.width));
        let out = match grad.0.dtype() {
            DType::F32 => self.run::<f32>(grad, w, output, n, cout)?,
            DType::F64 => self.run::<f64>(grad, w, output, n, cout)?,
            other => candle_core::bail!("fused convolution gradient: f32 or f64, not {other:?}"),
        };
        Ok((out, shape))
    }
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "vulnmap-fused-conv2d-input-gradient"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.typed((grad, gl), (w, wl), None)
    }
}

impl CustomOp3 for InputGradient {
    fn name(&self) -> &'static str {
        "vulnmap-fused-conv2d-masked-input-gradient"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        output: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.typed((grad, gl), (w, wl), Some((output, ol)))
    }
}

/// `grad * (0 < output < max)`: a (clipped) ReLU's backward from its output, in one pass;
/// `guided` also drops negative gradients (guided backpropagation).
pub(crate) struct ReluMask {
    pub guided: bool,
    pub max: Option<f64>,
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "vulnmap-relu-mask"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn mask<T: Float>(
            g: (&CpuStorage, &Layout),
            y: (&CpuStorage, &Layout),
            mask: &ReluMask,
        ) -> Result<CpuStorage> {
            let (g, y) = (
                slice::<T>(g.0, g.1, "relu mask")?,
                slice::<T>(y.0, y.1, "relu mask")?,
            );
            let mut out = Vec::new();
            mask.append(g, y, &mut out, true);
            Ok(T::storage(out))
        }
        if gl.shape() != yl.shape() {
            candle_core::bail!(
                "relu mask: gradient {:?} for output {:?}",
                gl.dims(),
                yl.dims()
            );
        }
        let out = match g.dtype() {
            DType::F32 => mask::<f32>((g, gl), (y, yl), self)?,
            DType::F64 => mask::<f64>((g, gl), (y, yl), self)?,
            other => candle_core::bail!("relu mask: f32 or f64, not {other:?}"),
        };
        Ok((out, gl.shape().clone()))
    }
}

impl ReluMask {
    /// Appends `g` masked by the ReLU's backward at its output `y` to `out`, on every thread or
    /// this one.
    pub(crate) fn append<T: Float>(&self, g: &[T], y: &[T], out: &mut Vec<T>, parallel: bool) {
        let zero = T::default();
        let max = self.max.map(T::of);
        // One loop per case, each a branch-free select that vectorises.
        match (self.guided, max) {
            (false, None) => select_onto(out, g, y, parallel, |_, y| y > zero),
            (true, None) => select_onto(out, g, y, parallel, |g, y| (y > zero) & (g > zero)),
            (false, Some(m)) => select_onto(out, g, y, parallel, |_, y| (y > zero) & (y < m)),
            (true, Some(m)) => select_onto(out, g, y, parallel, |g, y| {
                (y > zero) & (y < m) & (g > zero)
            }),
        }
    }
}

/// A chunk of the gradient and the output it is masked by.
type Pair<'a, T> = (&'a [T], &'a [T]);

/// Appends `keep(g, y) ? g : 0` for each element to `out`, on every thread or this one; the
/// new elements are written once, not zeroed first.
fn select_onto<T: Float>(
    out: &mut Vec<T>,
    g: &[T],
    y: &[T],
    parallel: bool,
    keep: impl Fn(T, T) -> bool + Sync,
) {
    const CHUNK: usize = 1 << 14;
    let len = g.len().min(y.len());
    let start = out.len();
    out.reserve(len);
    let chunk = |(o, (g, y)): (&mut [MaybeUninit<T>], Pair<T>)| {
        widest_simd(
            #[inline(always)]
            || {
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    o.write(if keep(g, y) { g } else { T::default() });
                }
            },
        )
    };
    let new = &mut out.spare_capacity_mut()[..len];
    if parallel {
        new.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(chunk);
    } else {
        new.chunks_mut(CHUNK)
            .zip(g.chunks(CHUNK).zip(y.chunks(CHUNK)))
            .for_each(chunk);
    }
    // SAFETY: the loops above wrote the `len` elements after the first `start`.
    unsafe { out.set_len(start + len) };
}

/// `dst (m x n) = lhs (m x k) rhs (k x n)`, or `+=` with `accumulate`; `dst` and `rhs`
/// row-major with the given row strides (the first `n` columns of wider matrices), `lhs`
/// row-major (strides `(k, 1)`) or column-major (`(1, m)`).
///
/// gemm's blocking depends on the matrix sizes only, not on `threads`, so an image gets the same
/// bits whether it runs alone (threads inside its GEMM) or in a batch (an image per thread): a
/// bank of attacks must not depend on what else is in it.
fn gemm_into<T: Float>(
    (dst, dst_rs): (&mut [T], usize),
    accumulate: bool,
    (m, n): (usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[T], isize, isize),
    (rhs, rhs_rs): (&[T], usize),
    threads: Parallelism,
) {
    let k = lhs.len() / m.max(1);
    let row_major = (lhs_rs, lhs_cs) == (k as isize, 1);
    let column_major = (lhs_rs, lhs_cs) == (1, m as isize);
    // The last row of a strided matrix ends after its n columns, not at its stride.
    let spans = |rows: usize, stride: usize| rows.checked_sub(1).map_or(0, |r| r * stride + n);
    assert!(lhs.len() == m * k && dst_rs >= n && rhs_rs >= n);
    assert!(dst.len() >= spans(m, dst_rs) && rhs.len() >= spans(k, rhs_rs));
    assert!(row_major || column_major, "unsupported lhs strides");
    // SAFETY: an m x k matrix with these strides (checked above to be row- or column-major)
    // lies inside `lhs`; `rhs` (k x n) and `dst` (m x n), row-major with row strides of at least
    // n, lie inside their slices (checked above); `dst` is borrowed mutably, so nothing else
    // reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            threads,
        )
    }
}

/// `one_image(i, output_i, scratch, threads)` for each `len`-long image of `out`: an image per
/// thread when there are enough of them, otherwise one at a time with its GEMM split across the
/// threads. Either way an image gets the same bits (see [`gemm_into`]).
fn per_image<T: Float, S: Default + Send>(
    out: &mut [T],
    len: usize,
    one_image: impl Fn(usize, &mut [T], &mut S, Parallelism) + Sync,
) {
    let threads = rayon::current_num_threads();
    if out.len() / len.max(1) >= threads && threads > 1 {
        // A scratch buffer per worker thread, reused across its images, so that the columns are
        // allocated and zeroed once per thread, not once per rayon job. `one_image` starts no
        // rayon work of its own here, so a thread never steals a job that waits on its own slot.
        let scratch: Vec<Mutex<S>> = (0..threads).map(|_| Mutex::default()).collect();
        out.par_chunks_mut(len).enumerate().for_each(|(i, image)| {
            let slot = rayon::current_thread_index().unwrap_or(0) % threads;
            // A panic in another image leaves its columns poisoned but still plain floats.
            let mut cols = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
            one_image(i, image, &mut cols, Parallelism::None)
        });
    } else {
        let mut cols = S::default();
        for (i, image) in out.chunks_mut(len).enumerate() {
            one_image(i, image, &mut cols, Parallelism::Rayon(threads));
        }
    }
}

/// `f(index, plane)` for each `len`-long plane of `values`, on every thread or this one.
fn for_each_plane<T: Float>(
    values: &mut [T],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if parallel {
        values
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(c, p)| f(c, p));
    } else {
        values
            .chunks_mut(len)
            .enumerate()
            .for_each(|(c, p)| f(c, p));
    }
}

/// ReLU, clipped at `max` if given (ReLU6), as branch-free selects that vectorise.
#[inline(always)]
pub(crate) fn relu_in_place<T: Float>(values: &mut [T], max: Option<T>) {
    let zero = T::default();
    // NaN stays NaN (both comparisons are false), as in PyTorch: a diverging attack must show
    // in its loss.
    match max {
        None => values
            .iter_mut()
            .for_each(|v| *v = if *v < zero { zero } else { *v }),
        Some(m) => values.iter_mut().for_each(|v| {
            let r = if *v < zero { zero } else { *v };
            *v = if r > m { m } else { r };
        }),
    }
}

/// The range of output columns `j` whose input column `j s + dx - p` lies in `0..width`.
fn valid_columns(g: &Geometry, dx: usize) -> std::ops::Range<usize> {
    let (s, p) = (g.stride, g.padding);
    let start = p.saturating_sub(dx).div_ceil(s);
    let end = (g.width + p).saturating_sub(dx).div_ceil(s).min(g.out_w);
    start..end.max(start)
}

/// The bands of output rows whose columns are built and used one at a time: each band's columns
/// fit in [`COLUMN_BYTES`] (a band is at least one row), so a large kernel on a large image (a
/// 7x7 stem: 7.4 MB of columns at 224 x 224) does not set the memory peak.
fn column_bands<T>(g: &Geometry) -> impl Iterator<Item = std::ops::Range<usize>> {
    let row_bytes = g.column() * g.out_w * std::mem::size_of::<T>();
    let (rows, out_h) = ((COLUMN_BYTES / row_bytes.max(1)).max(1), g.out_h);
    (0..out_h)
        .step_by(rows)
        .map(move |r| r..(r + rows).min(out_h))
}

/// The most bytes of columns built at once, per image (see [`column_bands`]).
const COLUMN_BYTES: usize = 2 << 20;

/// One image's columns `(C k k) x (R out_w)` for the band `out_rows` of R output rows (every
/// entry written; zeros in the padding): row `(c, dy, dx)` holds the pixels that tap meets at
/// each output position of the band.
fn im2rows<T: Float>(
    image: &[T],
    g: &Geometry,
    out_rows: std::ops::Range<usize>,
    cols: &mut [T],
    parallel: bool,
) {
    let (k, positions) = (g.kernel, out_rows.len() * g.out_w);
    let fill_channel = |c: usize, rows: &mut [T]| {
        let plane = &image[c * g.height * g.width..][..g.height * g.width];
        for (tap, row) in rows.chunks_mut(positions).enumerate() {
            let (dy, dx) = (tap / k, tap % k);
            let valid = valid_columns(g, dx);
            for (i, out) in out_rows.clone().zip(row.chunks_mut(g.out_w)) {
                let y = (i * g.stride + dy).checked_sub(g.padding);
                let Some(y) = y.filter(|&y| y < g.height && !valid.is_empty()) else {
                    out.fill(T::default());
                    continue;
                };
                out[..valid.start].fill(T::default());
                out[valid.end..].fill(T::default());
                let line = &plane[y * g.width..][..g.width];
                let first = valid.start * g.stride + dx - g.padding;
                let inside = &mut out[valid.clone()];
                if g.stride == 1 {
                    inside.copy_from_slice(&line[first..first + inside.len()]);
                } else {
                    for (o, &v) in inside
                        .iter_mut()
                        .zip(line[first..].iter().step_by(g.stride))
                    {
                        *o = v;
                    }
                }
            }
        }
    };
    let per_channel = k * k * positions;
    if parallel {
        cols.par_chunks_mut(per_channel)
            .enumerate()
            .for_each(|(c, rows)| fill_channel(c, rows));
    } else {
        for (c, rows) in cols.chunks_mut(per_channel).enumerate() {
            fill_channel(c, rows);
        }
    }
}

/// The adjoint of [`im2rows`]: adds one image's rows `(C k k) x (R out_w)` of the band
/// `out_rows` into its `C x H x W`.
fn rows2im<T: Float>(
    cols: &[T],
    g: &Geometry,
    out_rows: std::ops::Range<usize>,
    image: &mut [T],
    parallel: bool,
) {
    let (k, positions) = (g.kernel, out_rows.len() * g.out_w);
    let add_channel = |c: usize, plane: &mut [T]| {
        let rows = &cols[c * k * k * positions..][..k * k * positions];
        for (tap, row) in rows.chunks(positions).enumerate() {
            let (dy, dx) = (tap / k, tap % k);
            let valid = valid_columns(g, dx);
            if valid.is_empty() {
                continue;
            }
            for (i, values) in out_rows.clone().zip(row.chunks(g.out_w)) {
                let y = (i * g.stride + dy).checked_sub(g.padding);
                let Some(y) = y.filter(|&y| y < g.height) else {
                    continue;
                };
                let line = &mut plane[y * g.width..][..g.width];
                let first = valid.start * g.stride + dx - g.padding;
                let values = &values[valid.clone()];
                if g.stride == 1 {
                    let line = &mut line[first..first + values.len()];
                    line.iter_mut().zip(values).for_each(|(o, &v)| *o += v);
                } else {
                    let line = line[first..].iter_mut().step_by(g.stride);
                    line.zip(values).for_each(|(o, &v)| *o += v);
                }
            }
        }
    };
    let plane = g.height * g.width;
    if parallel {
        image
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(c, p)| add_channel(c, p));
    } else {
        for (c, p) in image.chunks_mut(plane).enumerate() {
            add_channel(c, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv_grad::im2col;
    use crate::guided::ReluBackward;
    use candle_core::{Device, Var};
    use vulnmap_testkit::gradcheck::finite_difference_check;
    use vulnmap_testkit::max_diff;

    /// (channels in, height, width, kernel, stride, padding): ResNet's shapes and odd ones.
    const CASES: [(usize, usize, usize, usize, usize, usize); 7] = [
        (3, 11, 9, 7, 2, 3),
        (4, 8, 8, 3, 1, 1),
        (4, 9, 7, 3, 2, 1),
        (5, 6, 7, 1, 1, 0),
        (5, 7, 6, 1, 2, 0),
        (2, 10, 9, 5, 3, 2),
        (3, 5, 6, 3, 1, 0),
    ];

    #[test]
    fn every_epilogue_equals_plain_ops_with_the_same_input_and_residual_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(3, "fused convolution test");
        for (case, (cin, h, w, k, s, p)) in CASES.into_iter().enumerate() {
            // One image (its GEMM split across threads), or several (an image per thread).
            let batch = 1 + case % 3;
            let x = Var::from_tensor(&vulnmap_data::random::randn(
                &mut rng,
                (batch, cin, h, w),
                &dev,
            )?)?;
            let weight = vulnmap_data::random::randn(&mut rng, (5, cin, k, k), &dev)?;
            let bias = vulnmap_data::random::randn(&mut rng, 5, &dev)?;
            let out = conv2d(x.as_tensor(), &weight, s, p)?;
            let residual =
                Var::from_tensor(&vulnmap_data::random::randn(&mut rng, out.shape(), &dev)?)?;
            // The guided rows check the kernel's guided mask against `guided::positive_gradient`
            // after candle's ReLU.
            // ReLU clipped at 0.5 (as ReLU6 at 6) clips a third of these unit-variance outputs.
            for (with_bias, with_residual, relu, relu_backward, relu_max) in [
                (true, false, false, ReluBackward::Exact, None),
                (false, false, true, ReluBackward::Exact, None),
                (true, true, true, ReluBackward::Exact, None),
                (false, true, false, ReluBackward::Exact, None),
                (true, false, true, ReluBackward::Guided, None),
                (false, true, true, ReluBackward::Guided, None),
                (true, true, true, ReluBackward::Exact, Some(0.5)),
                (true, false, true, ReluBackward::Guided, Some(0.5)),
            ] {
                let epilogue = Epilogue {
                    bias: with_bias.then_some(&bias),
                    residual: with_residual.then_some(residual.as_tensor()),
                    relu,
                    relu_max,
                    relu_backward,
                };
                let fused = conv2d_fused(x.as_tensor(), &weight, epilogue, s, p)?;
                let plain = unfused(x.as_tensor(), &weight, epilogue, s, p)?;
                let case = format!("k={k} s={s} p={p} {h}x{w} bias={with_bias} residual={with_residual} relu={relu} {relu_backward:?} max={relu_max:?}");
                // Sums of up to 196 products of order 1 in another order: rounding only.
                assert!(max_diff(&fused, &plain) < 1e-4, "value, {case}");
                let probe = vulnmap_data::random::randn(&mut rng, fused.shape(), &dev)?;
                let g1 = (&fused * &probe)?.sum_all()?.backward()?;
                let g2 = (&plain * &probe)?.sum_all()?.backward()?;
                let gx = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).cloned();
                assert!(
                    max_diff(&gx(&g1).unwrap(), &gx(&g2).unwrap()) < 1e-4,
                    "input gradient, {case}"
                );
                if with_residual {
                    let r1 = g1.get(residual.as_tensor()).expect("residual gradient");
                    let r2 = g2.get(residual.as_tensor()).expect("residual gradient");
                    assert!(max_diff(r1, r2) < 1e-6, "residual gradient, {case}");
                }
                // The weights are constants here: no gradient for them.
                assert!(g1.get(&weight).is_none());
            }
        }
        Ok(())
    }

    #[test]
    fn an_image_gets_the_same_bits_alone_and_in_a_batch() -> Result<()> {
        // Banked attacks rely on it: a job's result must not depend on its bank.
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(6, "fused convolution batching");
        for (cin, h, w, k, s, p) in CASES {
            let x = Var::from_tensor(&vulnmap_data::random::randn(
                &mut rng,
                (3, cin, h, w),
                &dev,
            )?)?;
            let weight = vulnmap_data::random::randn(&mut rng, (40, cin, k, k), &dev)?;
            let bias = vulnmap_data::random::randn(&mut rng, 40, &dev)?;
            let epilogue = Epilogue {
                bias: Some(&bias),
                relu: true,
                ..Epilogue::default()
            };
            let batch = conv2d_fused(x.as_tensor(), &weight, epilogue, s, p)?;
            let probe = vulnmap_data::random::randn(&mut rng, batch.shape(), &dev)?;
            let grads = (&batch * &probe)?.sum_all()?.backward()?;
            let grad = grads.get(x.as_tensor()).expect("input gradient");
            for i in 0..3 {
                let xi = Var::from_tensor(&x.as_tensor().narrow(0, i, 1)?)?;
                let alone = conv2d_fused(xi.as_tensor(), &weight, epilogue, s, p)?;
                assert_eq!(
                    max_diff(&alone, &batch.narrow(0, i, 1)?),
                    0.0,
                    "k={k} s={s}"
                );
                let g = (&alone * &probe.narrow(0, i, 1)?)?.sum_all()?.backward()?;
                let gi = g.get(xi.as_tensor()).expect("input gradient");
                assert_eq!(
                    max_diff(gi, &grad.narrow(0, i, 1)?),
                    0.0,
                    "gradient k={k} s={s}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn input_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(4, "fused convolution finite differences");
        for (case, (cin, h, w, k, s, p)) in CASES.into_iter().enumerate() {
            let batch = 1 + case % 2;
            let x = vulnmap_data::random::randn(&mut rng, (batch, cin, h, w), &dev)?
                .to_dtype(DType::F64)?;
            let weight = vulnmap_data::random::randn(&mut rng, (3, cin, k, k), &dev)?
                .to_dtype(DType::F64)?;
            let bias = vulnmap_data::random::randn(&mut rng, 3, &dev)?.to_dtype(DType::F64)?;
            let shape = conv2d(&x, &weight, s, p)?.shape().clone();
            let residual =
                vulnmap_data::random::randn(&mut rng, shape, &dev)?.to_dtype(DType::F64)?;
            let epilogue = |relu| Epilogue {
                bias: Some(&bias),
                residual: Some(&residual),
                relu,
                ..Epilogue::default()
            };
            // Without ReLU everywhere; with it, away from its kink (step 1e-6, values of order 1).
            finite_difference_check(
                &x,
                |x| conv2d_fused(x, &weight, epilogue(false), s, p),
                1e-6,
                1e-7,
            )?;
            finite_difference_check(
                &x,
                |x| conv2d_fused(x, &weight, epilogue(true), s, p),
                1e-6,
                1e-6,
            )?;
            finite_difference_check(
                &residual,
                |r| {
                    conv2d_fused(
                        &x,
                        &weight,
                        Epilogue {
                            residual: Some(r),
                            ..epilogue(true)
                        },
                        s,
                        p,
                    )
                },
                1e-6,
                1e-6,
            )?;
        }
        Ok(())
    }

    #[test]
    fn convolutions_built_in_bands_equal_plain_ops_with_the_same_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(8, "fused convolution bands");
        // Columns over `COLUMN_BYTES` per image: built and used a band of output rows at a time.
        for (cin, h, w, k, s, p) in [(64, 40, 36, 3, 1, 1), (16, 61, 50, 7, 2, 3)] {
            let g = Geometry::conv(cin, (h, w), k, s, p)?;
            assert!(column_bands::<f32>(&g).count() > 1, "k={k}: one band");
            // One image (its GEMM split across threads), or three (an image per thread).
            for (batch, dtype) in [(1, DType::F32), (3, DType::F32), (3, DType::F64)] {
                let randn = |rng: &mut _, shape: &[usize]| -> Result<Tensor> {
                    vulnmap_data::random::randn(rng, shape, &dev)?.to_dtype(dtype)
                };
                let x = Var::from_tensor(&randn(&mut rng, &[batch, cin, h, w])?)?;
                let weight = randn(&mut rng, &[8, cin, k, k])?;
                let bias = randn(&mut rng, &[8])?;
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    relu: true,
                    ..Epilogue::default()
                };
                let fused = conv2d_fused(x.as_tensor(), &weight, epilogue, s, p)?;
                let plain = unfused(x.as_tensor(), &weight, epilogue, s, p)?;
                let case = format!("k={k} s={s} batch={batch} {dtype:?}");
                // Sums of up to 784 products of order 1 in another order: rounding only.
                assert!(max_diff(&fused, &plain) < 1e-3, "value, {case}");
                let probe = randn(&mut rng, fused.dims())?;
                let g1 = (&fused * &probe)?.sum_all()?.backward()?;
                let g2 = (&plain * &probe)?.sum_all()?.backward()?;
                let (g1, g2) = (g1.get(x.as_tensor()), g2.get(x.as_tensor()));
                let (g1, g2) = (g1.expect("fused gradient"), g2.expect("plain gradient"));
                assert!(max_diff(g1, g2) < 1e-3, "input gradient, {case}");
            }
        }
        Ok(())
    }

    #[test]
    fn rows_are_the_transposed_columns_and_rows2im_is_their_adjoint() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(5, "im2rows test");
        for (cin, h, w, k, s, p) in CASES {
            let x = vulnmap_data::random::randn(&mut rng, (1, cin, h, w), &dev)?
                .to_dtype(DType::F64)?;
            let g = Geometry::conv(cin, (h, w), k, s, p)?;
            let columns = im2col(&x, &g)?
                .transpose(1, 2)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let image = x.flatten_all()?.to_vec1::<f64>()?;
            for parallel in [false, true] {
                // Stale values in the buffer must all be overwritten.
                let mut rows = vec![f64::NAN; columns.len()];
                im2rows(&image, &g, 0..g.out_h, &mut rows, parallel);
                assert_eq!(rows, columns, "k={k} s={s} p={p}");
            }
            // A band of output rows: its positions' part of every row.
            let band = g.out_h / 3..g.out_h;
            let mut rows = vec![f64::NAN; g.column() * band.len() * g.out_w];
            im2rows(&image, &g, band.clone(), &mut rows, false);
            let part = band.start * g.out_w..band.end * g.out_w;
            let expected: Vec<f64> = columns
                .chunks(g.positions())
                .flat_map(|row| row[part.clone()].iter().copied())
                .collect();
            assert_eq!(rows, expected, "band, k={k} s={s} p={p}");
            let cols: Vec<f64> = (0..columns.len())
                .map(|i| (i as f64 * 0.37).sin())
                .collect();
            for parallel in [false, true] {
                let mut back = vec![0.0; image.len()];
                rows2im(&cols, &g, 0..g.out_h, &mut back, parallel);
                // <im2rows(x), cols> == <x, rows2im(cols)>.
                let lhs: f64 = columns.iter().zip(&cols).map(|(a, b)| a * b).sum();
                let rhs: f64 = image.iter().zip(&back).map(|(a, b)| a * b).sum();
                assert!(
                    (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
                    "adjoint: {lhs} vs {rhs}"
                );
            }
        }
        Ok(())
    }
}
