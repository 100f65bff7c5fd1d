//! Depthwise convolution kernels for the CPU, with their own backward pass.
//!
//! The device-generic depthwise convolution in [`crate::conv`] sums `k * k` shifted views times
//! per-channel weights. Its autograd graph keeps every product and partial sum until the backward
//! pass: gigabytes per layer for a batch of ImageNet images. Here the forward and both gradients
//! are direct loops over each channel plane, and only the input and weights are kept.

use crate::cpu_kernels::{constant_values, slice, widest_simd, Float};
use crate::fused_conv::{epilogue_by_tensor_ops, Epilogue, ReluMask};
use crate::windows::Pad2d;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a depthwise convolution: `h x w` is the padded plane the kernels loop over, `ih x
/// iw` the input's plane, placed at `(pad.top, pad.left)` in it.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    ih: usize,
    iw: usize,
    pad: Pad2d,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn of(x: &[usize], k: usize, stride: usize, pad: Pad2d) -> Result<Self> {
        let [n, c, ih, iw] = *x else {
            candle_core::bail!("{WHAT}: an N x C x H x W input, got {x:?}");
        };
        let (h, w) = (ih + pad.top + pad.bottom, iw + pad.left + pad.right);
        let out = |s: usize| crate::windows::output_size(s, k, stride);
        Ok(Self {
            n,
            c,
            ih,
            iw,
            pad,
            h,
            w,
            k,
            stride,
            oh: out(h)?,
            ow: out(w)?,
        })
    }

    /// Whether the input plane is the padded plane.
    fn unpadded(&self) -> bool {
        self.pad == Pad2d::default()
    }

    /// Input plane `index` of `x` as the kernels read it: with its zero border when it has one.
    fn plane<'a, T: Float>(&self, x: &'a [T], index: usize) -> std::borrow::Cow<'a, [T]> {
        let plane = &x[index * self.ih * self.iw..][..self.ih * self.iw];
        if self.unpadded() {
            std::borrow::Cow::Borrowed(plane)
        } else {
            std::borrow::Cow::Owned(self.padded(plane))
        }
    }

    /// The input plane `plane` (`ih x iw`) with its zero border (`h x w`).
    fn padded<T: Float>(&self, plane: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.h * self.w];
        for (row, values) in out[self.pad.top * self.w..]
            .chunks_mut(self.w)
            .zip(plane.chunks(self.iw.max(1)))
        {
            row[self.pad.left..self.pad.left + self.iw].copy_from_slice(values);
        }
        out
    }

    /// The input plane `plane` (`ih x iw`) with its zero border (`h x w`), split into the `s x s`
    /// phase planes of stride `s`, each `ceil(h / s) x ceil(w / s)`, into `out`, in one pass:
    /// phase `(py, px)` holds rows `py, py + s, ...` and columns `px, px + s, ...`. In it, every
    /// tap of a strided convolution reads contiguous elements.
    #[inline(always)]
    fn phase_planes<T: Float>(&self, plane: &[T], out: &mut Vec<T>) {
        let (s, (ph, pw)) = (self.stride, self.phase_size());
        out.clear();
        out.resize(s * s * ph * pw, T::default());
        for (phase, columns, first) in self.phase_columns() {
            let phase_plane = &mut out[phase * ph * pw..][..ph * pw];
            for (q, row) in self.phase_rows(phase / s) {
                let phase_row = &mut phase_plane[q * pw..][columns.clone()];
                take_every(s, &plane[row * self.iw + first..], phase_row);
            }
        }
    }

    /// The inverse of [`Geometry::phase_planes`]: the input plane's part of `split` (the phase
    /// planes of the bordered plane) into `plane` (`ih x iw`).
    #[inline(always)]
    fn unsplit_phase_planes<T: Float>(&self, split: &[T], plane: &mut [T]) {
        let (s, (ph, pw)) = (self.stride, self.phase_size());
        for (phase, columns, first) in self.phase_columns() {
            let phase_plane = &split[phase * ph * pw..][..ph * pw];
            for (q, row) in self.phase_rows(phase / s) {
                let phase_row = &phase_plane[q * pw..][columns.clone()];
                let row = &mut plane[row * self.iw + first..];
                if s == 1 {
                    row[..phase_row.len()].copy_from_slice(phase_row);
                } else {
                    for (o, &v) in row.iter_mut().step_by(s).zip(phase_row) {
                        *o = v;
                    }
                }
            }
        }
    }

    /// A phase plane's rows and columns: `ceil(h / s) x ceil(w / s)`.
    fn phase_size(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }

    /// `(q, input row)` for every row `q` of a phase plane of row phase `py` that holds an input
    /// row (not the border).
    fn phase_rows(&self, py: usize) -> impl Iterator<Item = (usize, usize)> {
        let (s, top, ph) = (self.stride, self.pad.top, self.phase_size().0);
        let start = top.saturating_sub(py).div_ceil(s);
        let end = (top + self.ih).saturating_sub(py).div_ceil(s).min(ph);
        (start..end.max(start)).map(move |q| (q, py + q * s - top))
    }

    /// `(phase, columns, first)` for every phase plane that holds input columns: the columns of
    /// its rows that do, and the input column of the first. Phase `(py, px)`'s column `p` is
    /// bordered column `px + p * s`.
    fn phase_columns(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>, usize)> {
        let (s, left, iw, pw) = (self.stride, self.pad.left, self.iw, self.phase_size().1);
        (0..s * s).filter_map(move |phase| {
            let px = phase % s;
            let start = left.saturating_sub(px).div_ceil(s);
            let end = (left + iw).saturating_sub(px).div_ceil(s).min(pw);
            (start < end).then(|| (phase, start..end, px + start * s - left))
        })
    }
}

/// `dst[i] = src[i * s]`: a phase row from an input row. Stride 2 as pairs, which vectorises.
#[inline(always)]
fn take_every<T: Float>(s: usize, src: &[T], dst: &mut [T]) {
    match s {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => {
            let pairs = dst.len().min(src.len() / 2);
            for (o, pair) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
                *o = pair[0];
            }
            if let Some(last) = dst.get_mut(pairs) {
                *last = src[2 * pairs];
            }
        }
        _ => {
            for (o, &v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                *o = v;
            }
        }
    }
}

/// `depthwise(x, weight, stride)` on a padded `x` (`N x C x H x W`, f32 or f64 on the CPU) with
/// `weight` `C x 1 x k x k`; no padding is added.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    depthwise_conv2d_fused(x, weight, Epilogue::default(), stride, Pad2d::default())
}

/// [`depthwise_conv2d`] of `x` with a zero border `pad`, followed by `epilogue`'s bias and
/// (clipped) ReLU in the same pass, so that a depthwise convolution with BatchNorm folded in and
/// its ReLU6 keep one activation, not four. The border is added plane by plane inside the op, so
/// no padded copy of `x` is kept for the backward pass. A residual is not supported; a tracked bias
/// takes plain tensor ops (its gradient is needed).
pub fn depthwise_conv2d_fused(
    x: &Tensor,
    weight: &Tensor,
    epilogue: Epilogue,
    stride: usize,
    pad: Pad2d,
) -> Result<Tensor> {
    if epilogue.residual.is_some() {
        candle_core::bail!("{WHAT}: a residual epilogue is not supported");
    }
    let k = weight.dim(2)?;
    let bias = match epilogue.bias {
        Some(b) if b.track_op() => {
            let plain = Epilogue {
                bias: None,
                relu: false,
                ..epilogue
            };
            let y = depthwise_conv2d_fused(x, weight, plain, stride, pad)?;
            return epilogue_by_tensor_ops(y, epilogue);
        }
        Some(b) => Some(constant_values(b, weight.dim(0)?, WHAT)?),
        None => None,
    };
    let op = Depthwise {
        k,
        stride,
        pad,
        bias,
        relu: epilogue.relu,
        mask: ReluMask {
            guided: epilogue.relu_backward == crate::guided::ReluBackward::Guided,
            max: epilogue.relu_max,
        },
    };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// The op's name in errors.
const WHAT: &str = "depthwise convolution";

struct Depthwise {
    k: usize,
    stride: usize,
    /// The zero border added to each input plane.
    pad: Pad2d,
    /// Added to each output channel.
    bias: Option<Vec<f64>>,
    /// Whether a (clipped) ReLU follows; `mask` is its backward.
    relu: bool,
    mask: ReluMask,
}

/// An output plane laid out with the (phase) input's row width `ceil(w / stride)` instead of
/// `ow`: then tap `(dy, dx)` of every output is one contiguous run of the input, starting at
/// [`Wide::tap`], and each tap is one long vectorised loop over the plane, not `oh` short ones.
/// The columns past `ow` are computed and dropped (forward) or zero (backward).
#[derive(Debug, Clone, Copy)]
struct Wide {
    /// The row width.
    pw: usize,
    /// One phase plane's elements.
    phase: usize,
    /// Elements from the first output to the last: `(oh - 1) * pw + ow`.
    span: usize,
}

impl Wide {
    fn of(g: Geometry) -> Self {
        let pw = g.w.div_ceil(g.stride);
        Self {
            pw,
            phase: g.h.div_ceil(g.stride) * pw,
            span: g.oh.saturating_sub(1) * pw + g.ow,
        }
    }

    /// Where tap `(dy, dx)` of the first output reads in the phase planes.
    fn tap(self, g: Geometry, dy: usize, dx: usize) -> usize {
        let s = g.stride;
        ((dy % s) * s + dx % s) * self.phase + (dy / s) * self.pw + dx / s
    }
}

fn forward<T: Float>(x: &[T], w: &[T], g: Geometry, op: &Depthwise) -> Vec<T> {
    let max = op.mask.max.map(T::of);
    let wide = Wide::of(g);
    let mut out = vec![T::default(); g.n * g.c * g.oh * g.ow];
    // Where each tap, in kernel order, reads the source planes.
    let offsets: Vec<usize> = (0..g.k * g.k)
        .map(|t| wide.tap(g, t / g.k, t % g.k))
        .collect();
    out.par_chunks_mut(g.oh * g.ow).enumerate().for_each_init(
        Scratch::default,
        |scratch, (plane, o)| {
            widest_simd(
                #[inline(always)]
                || {
                    if g.oh * g.ow == 0 {
                        return;
                    }
                    let c = plane % g.c;
                    let xin = &x[plane * g.ih * g.iw..][..g.ih * g.iw];
                    let Scratch {
                        planes,
                        wide: acc,
                        taps,
                    } = scratch;
                    let src = if g.unpadded() && g.stride == 1 {
                        xin
                    } else {
                        g.phase_planes(xin, planes);
                        &planes[..]
                    };
                    let kern = &w[c * g.k * g.k..][..g.k * g.k];
                    let bias = op.bias.as_ref().map_or(T::default(), |b| T::of(b[c]));
                    taps.clear();
                    taps.extend(kern.iter().copied().zip(offsets.iter().copied()));
                    acc.resize(wide.span, T::default());
                    sum_taps(acc, bias, src, taps);
                    for (row, wide_row) in o.chunks_mut(g.ow).zip(acc.chunks(wide.pw)) {
                        row.copy_from_slice(&wide_row[..g.ow]);
                    }
                    if op.relu {
                        crate::fused_conv::relu_in_place(o, max);
                    }
                },
            )
        },
    );
    out
}

/// Outputs summed in registers, a block at a time: `acc[p] = start + w * src[offset + p] + ...`
/// over `(w, offset)` of `taps` in order, so each output gets its taps' products in the order of
/// a direct loop. One write of `acc`, which is not read.
#[inline(always)]
fn sum_taps<T: Float>(acc: &mut [T], start: T, src: &[T], taps: &[(T, usize)]) {
    const BLOCK: usize = 32;
    let whole = acc.len() / BLOCK * BLOCK;
    for (b, out) in acc[..whole].chunks_exact_mut(BLOCK).enumerate() {
        let first = b * BLOCK;
        let mut sums = [start; BLOCK];
        for &(wv, offset) in taps {
            let line = &src[offset + first..][..BLOCK];
            for (a, &v) in sums.iter_mut().zip(line) {
                *a += wv * v;
            }
        }
        out.copy_from_slice(&sums);
    }
    let rest = &mut acc[whole..];
    rest.fill(start);
    for &(wv, offset) in taps {
        let line = &src[offset + whole..][..rest.len()];
        for (a, &v) in rest.iter_mut().zip(line) {
            *a += wv * v;
        }
    }
}

fn grad_input<T: Float>(grad: &[T], w: &[T], g: Geometry) -> Vec<T> {
    let wide = Wide::of(g);
    let mut out = vec![T::default(); g.n * g.c * g.ih * g.iw];
    // The output gradient in the wide layout has `reach` zeros before it: each input's gradient
    // gathers its outputs' at fixed offsets, zeros past the edges. A phase plane gets the taps
    // that read it, as `(kernel index, offset)`. Each input's gradient sums its outputs' in the
    // order of their rows, as a loop over output rows would: the later the tap row, the earlier
    // the output.
    let s = g.stride;
    let reach = (g.k - 1) / s * (wide.pw + 1);
    let phase_taps: Vec<Vec<(usize, usize)>> = (0..s * s)
        .map(|phase| {
            (0..g.k)
                .rev()
                .flat_map(|dy| (0..g.k).map(move |dx| (dy, dx)))
                .filter(|&(dy, dx)| (dy % s) * s + dx % s == phase)
                .map(|(dy, dx)| (dy * g.k + dx, reach - (dy / s * wide.pw + dx / s)))
                .collect()
        })
        .collect();
    out.par_chunks_mut((g.ih * g.iw).max(1))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (plane, input_gx)| {
            widest_simd(
                #[inline(always)]
                || {
                    if g.oh * g.ow == 0 {
                        return;
                    }
                    let c = plane % g.c;
                    let go = &grad[plane * g.oh * g.ow..][..g.oh * g.ow];
                    let kern = &w[c * g.k * g.k..][..g.k * g.k];
                    let Scratch {
                        planes,
                        wide: shifted,
                        taps,
                    } = scratch;
                    shifted.clear();
                    shifted.resize(reach + wide.phase.max(wide.span), T::default());
                    for (row, start) in go.chunks(g.ow).zip((reach..).step_by(wide.pw)) {
                        shifted[start..][..g.ow].copy_from_slice(row);
                    }
                    // With a border or a stride: the bordered plane's gradient in phase planes,
                    // its input part copied out at the end.
                    let direct = g.unpadded() && s == 1;
                    let dst = if direct {
                        &mut *input_gx
                    } else {
                        planes.resize(s * s * wide.phase, T::default());
                        &mut planes[..s * s * wide.phase]
                    };
                    for (phase, dst) in dst.chunks_mut(wide.phase).enumerate() {
                        taps.clear();
                        taps.extend(phase_taps[phase].iter().map(|&(t, at)| (kern[t], at)));
                        sum_taps(dst, T::default(), shifted, taps);
                    }
                    if !direct {
                        g.unsplit_phase_planes(planes, input_gx);
                    }
                },
            )
        });
    out
}

/// Buffers a thread reuses from plane to plane: phase planes, a plane in the wide layout, taps.
struct Scratch<T> {
    planes: Vec<T>,
    wide: Vec<T>,
    taps: Vec<(T, usize)>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            planes: Vec::new(),
            wide: Vec::new(),
            taps: Vec::new(),
        }
    }
}

fn grad_weight<T: Float>(x: &[T], grad: &[T], g: Geometry) -> Vec<T> {
    // One k x k kernel per channel, summed over the batch.
    let per_channel: Vec<Vec<T>> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::default(); g.k * g.k];
            for b in 0..g.n {
                let plane = b * g.c + c;
                let xin = g.plane(x, plane);
                let go = &grad[plane * g.oh * g.ow..][..g.oh * g.ow];
                for i in 0..g.oh {
                    let grow = &go[i * g.ow..(i + 1) * g.ow];
                    for dy in 0..g.k {
                        let line = &xin[(i * g.stride + dy) * g.w..][..g.w];
                        for dx in 0..g.k {
                            let mut s = T::default();
                            for (j, &gv) in grow.iter().enumerate() {
                                s += gv * line[j * g.stride + dx];
                            }
                            acc[dy * g.k + dx] += s;
                        }
                    }
                }
            }
            acc
        })
        .collect();
    per_channel.concat()
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "vulnmap-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::of(xl.dims(), self.k, self.stride, self.pad)?;
        fn typed<T: Float>(x: &[T], w: &[T], g: Geometry, op: &Depthwise) -> CpuStorage {
            T::storage(forward(x, w, g, op))
        }
        let out = match x.dtype() {
            DType::F32 => typed::<f32>(slice(x, xl, WHAT)?, slice(w, wl, WHAT)?, g, self),
            DType::F64 => typed::<f64>(slice(x, xl, WHAT)?, slice(w, wl, WHAT)?, g, self),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        };
        Ok((out, Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad = if self.relu {
            grad.apply_op2_no_bwd(&output.detach(), &self.mask)?
        } else {
            grad
        };
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                &w.detach(),
                &Backward {
                    op: self,
                    part: Part::Input,
                    input: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.detach().apply_op2_no_bwd(
                &grad,
                &Backward {
                    op: self,
                    part: Part::Weight,
                    input: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `(grad, weight) -> d input`.
    Input,
    /// `(input, grad) -> d weight`.
    Weight,
}

struct Backward<'a> {
    op: &'a Depthwise,
    part: Part,
    input: Vec<usize>,
}

impl CustomOp2 for Backward<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-depthwise-conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::of(&self.input, self.op.k, self.op.stride, self.op.pad)?;
        fn typed<T: Float>(part: Part, a: &[T], b: &[T], g: Geometry) -> CpuStorage {
            T::storage(match part {
                Part::Input => grad_input(a, b, g),
                Part::Weight => grad_weight(a, b, g),
            })
        }
        let out = match a.dtype() {
            DType::F32 => typed::<f32>(self.part, slice(a, al, WHAT)?, slice(b, bl, WHAT)?, g),
            DType::F64 => typed::<f64>(self.part, slice(a, al, WHAT)?, slice(b, bl, WHAT)?, g),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        };
        let shape = match self.part {
            Part::Input => Shape::from((g.n, g.c, g.ih, g.iw)),
            Part::Weight => Shape::from((g.c, 1, g.k, g.k)),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use vulnmap_testkit::gradcheck::finite_difference_check;
    use vulnmap_testkit::max_diff;

    #[test]
    fn matches_grouped_convolution_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Seeded inputs: the finite-difference tolerance is tight, and a test must not flake.
        let mut rng = vulnmap_data::random::rng(7, "depthwise test");
        for &(k, s) in &[(3, 1), (3, 2), (5, 2), (5, 1)] {
            let x = vulnmap_data::random::randn(&mut rng, (2, 3, 11, 12), &dev)?
                .to_dtype(DType::F64)?;
            let w =
                vulnmap_data::random::randn(&mut rng, (3, 1, k, k), &dev)?.to_dtype(DType::F64)?;
            let (x, w) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let ours = depthwise_conv2d(x.as_tensor(), w.as_tensor(), s)?;
            let theirs = x.as_tensor().conv2d(w.as_tensor(), 0, s, 1, 3)?;
            let d = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-12, "forward differs by {d}");
            let wc = w.as_tensor().detach();
            finite_difference_check(
                &x.as_tensor().detach(),
                |x| depthwise_conv2d(x, &wc, s),
                1e-6,
                1e-8,
            )?;
            let xc = x.as_tensor().detach();
            finite_difference_check(
                &w.as_tensor().detach(),
                |w| depthwise_conv2d(&xc, w, s),
                1e-6,
                1e-8,
            )?;
        }
        Ok(())
    }

    /// The kernels sum in the order of a direct loop over output rows, taps and columns, so their
    /// results do not depend on how the planes are laid out: equal to the bit.
    /// The border added inside the op equals the convolution of a padded copy, in value and both
    /// gradients: uneven borders (TensorFlow's "SAME") and even ones, strides 1 and 2.
    #[test]
    fn its_own_border_equals_a_padded_copy_with_the_same_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(11, "depthwise border test");
        let uneven = |top, bottom, left, right| Pad2d {
            top,
            bottom,
            left,
            right,
        };
        for &(k, s, pad) in &[
            (3, 1, Pad2d::uniform(1)),
            (3, 2, uneven(0, 1, 0, 1)),
            (5, 2, uneven(1, 2, 2, 1)),
            (5, 1, Pad2d::uniform(2)),
        ] {
            let mut randn = |shape: &[usize]| -> Result<Tensor> {
                vulnmap_data::random::randn(&mut rng, shape, &dev)?.to_dtype(DType::F64)
            };
            let (x, w) = (
                Var::from_tensor(&randn(&[2, 3, 11, 12])?)?,
                Var::from_tensor(&randn(&[3, 1, k, k])?)?,
            );
            let run = |own: bool| -> Result<[Tensor; 3]> {
                let y = if own {
                    depthwise_conv2d_fused(
                        x.as_tensor(),
                        w.as_tensor(),
                        Epilogue::default(),
                        s,
                        pad,
                    )?
                } else {
                    let padded = crate::windows::pad2d(x.as_tensor(), pad, 0.0)?;
                    depthwise_conv2d(&padded, w.as_tensor(), s)?
                };
                let upstream = (y.ones_like()? * 0.5)?.add(&y.sin()?.detach())?;
                let grads = (&y * &upstream)?.sum_all()?.backward()?;
                let grad = |v: &Var| grads.get(v.as_tensor()).cloned().expect("a gradient");
                Ok([y.clone(), grad(&x), grad(&w)])
            };
            let (ours, theirs) = (run(true)?, run(false)?);
            for (what, (a, b)) in ["value", "input gradient", "weight gradient"]
                .iter()
                .zip(ours.iter().zip(&theirs))
            {
                assert!(max_diff(a, b) < 1e-12, "k {k} s {s} {pad:?}: {what}");
            }
        }
        Ok(())
    }

    #[test]
    fn sums_in_the_order_of_a_direct_loop_to_the_bit() {
        let mut rng = vulnmap_data::random::rng(3, "depthwise order test");
        for &(k, s, h, w) in &[(3, 1, 9, 10), (3, 2, 11, 12), (5, 2, 12, 11), (5, 1, 7, 7)] {
            let g = Geometry::of(&[2, 3, h, w], k, s, Pad2d::default()).unwrap();
            let mut draw = |len: usize| -> Vec<f32> {
                vulnmap_data::random::normal_vec(&mut rng, len, 0.0, 1.0)
            };
            let (x, wt) = (draw(2 * 3 * h * w), draw(3 * k * k));
            let grad = draw(2 * 3 * g.oh * g.ow);
            let op = Depthwise {
                k,
                stride: s,
                pad: Pad2d::default(),
                bias: Some(vec![0.25, -0.5, 1.0]),
                relu: false,
                mask: ReluMask {
                    guided: false,
                    max: None,
                },
            };
            let (mut y, mut gx) = (vec![0f32; grad.len()], vec![0f32; x.len()]);
            for plane in 0..2 * 3 {
                let c = plane % 3;
                let xin = &x[plane * h * w..][..h * w];
                let kern = &wt[c * k * k..][..k * k];
                let go = &grad[plane * g.oh * g.ow..][..g.oh * g.ow];
                let gxp = &mut gx[plane * h * w..][..h * w];
                for i in 0..g.oh {
                    for j in 0..g.ow {
                        let mut acc = [0.25f32, -0.5, 1.0][c];
                        for dy in 0..k {
                            for dx in 0..k {
                                acc += kern[dy * k + dx] * xin[(i * s + dy) * w + j * s + dx];
                            }
                        }
                        y[(plane * g.oh + i) * g.ow + j] = acc;
                    }
                    for dy in 0..k {
                        for dx in 0..k {
                            for j in 0..g.ow {
                                gxp[(i * s + dy) * w + j * s + dx] +=
                                    kern[dy * k + dx] * go[i * g.ow + j];
                            }
                        }
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&forward(&x, &wt, g, &op)),
                bits(&y),
                "forward, k {k} s {s}"
            );
            assert_eq!(
                bits(&grad_input(&grad, &wt, g)),
                bits(&gx),
                "grad, k {k} s {s}"
            );
        }
    }

    #[test]
    fn the_fused_epilogue_equals_plain_ops_with_the_same_input_gradient() -> Result<()> {
        use crate::guided::ReluBackward;
        let dev = Device::Cpu;
        let mut rng = vulnmap_data::random::rng(8, "depthwise epilogue test");
        let x = Var::from_tensor(&vulnmap_data::random::randn(&mut rng, (2, 4, 9, 10), &dev)?)?;
        let w = vulnmap_data::random::randn(&mut rng, (4, 1, 3, 3), &dev)?;
        let bias = vulnmap_data::random::randn(&mut rng, 4, &dev)?;
        // A ReLU clipped at 0.5 (as ReLU6 at 6) clips a good part of these outputs.
        for (relu, relu_max, relu_backward) in [
            (false, None, ReluBackward::Exact),
            (true, None, ReluBackward::Exact),
            (true, Some(0.5), ReluBackward::Exact),
            (true, Some(0.5), ReluBackward::Guided),
        ] {
            let epilogue = Epilogue {
                bias: Some(&bias),
                relu,
                relu_max,
                relu_backward,
                ..Epilogue::default()
            };
            let fused = depthwise_conv2d_fused(x.as_tensor(), &w, epilogue, 2, Pad2d::default())?;
            let plain = epilogue_by_tensor_ops(depthwise_conv2d(x.as_tensor(), &w, 2)?, epilogue)?;
            let case = format!("relu={relu} max={relu_max:?} {relu_backward:?}");
            assert!(max_diff(&fused, &plain) < 1e-5, "value, {case}");
            let probe = vulnmap_data::random::randn(&mut rng, fused.shape(), &dev)?;
            let g1 = (&fused * &probe)?.sum_all()?.backward()?;
            let g2 = (&plain * &probe)?.sum_all()?.backward()?;
            let (g1, g2) = (g1.get(x.as_tensor()), g2.get(x.as_tensor()));
            let (Some(g1), Some(g2)) = (g1, g2) else {
                panic!("no input gradient, {case}");
            };
            assert!(max_diff(g1, g2) < 1e-5, "input gradient, {case}");
        }
        Ok(())
    }
}
