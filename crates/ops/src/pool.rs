//! Max-pooling whose backward pass works for any kernel and stride.
//!
//! candle's own `max_pool2d` backward refuses kernel != stride (candle issues 1593 and 1851), which
//! is exactly ResNet's 3x3 stride-2 stem pool. The backward routes each output's gradient to the
//! first maximum of its window in row-major order, as PyTorch does. On the CPU both directions are
//! direct loops over each plane that skip the border, so no padded copy of the input is kept for
//! the backward pass; elsewhere the forward runs candle's kernel on a padded copy and the backward
//! uses only tensor operations (so it runs on every device).

use crate::cpu_kernels::{slice, Float};
use crate::windows::{pad2d, untap, Pad2d, Windows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `max_pool2d(x, kernel, stride, padding)` as PyTorch's `nn.MaxPool2d`: padding counts as -inf.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if padding * 2 > kernel {
        candle_core::bail!(
            "max-pool padding {padding} must be at most half the kernel {kernel} (as in PyTorch)"
        );
    }
    max_pool2d_padded(x, kernel, stride, Pad2d::uniform(padding))
}

/// [`max_pool2d`] with any border `pad` (uneven ones: ONNX's explicit pads and `ceil_mode`),
/// counted as -inf.
pub fn max_pool2d_padded(x: &Tensor, kernel: usize, stride: usize, pad: Pad2d) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = CpuMaxPool {
            window: Window::of(x.dims(), kernel, stride, pad)?,
        };
        return x.contiguous()?.apply_op1(op);
    }
    let x = pad2d(x, pad, f64::NEG_INFINITY)?;
    x.apply_op1(MaxPool { kernel, stride })
}

/// A max-pool's planes and windows: `h x w` input planes with the border `pad` around them.
#[derive(Debug, Clone, Copy)]
struct Window {
    planes: usize,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    pad: Pad2d,
    oh: usize,
    ow: usize,
}

impl Window {
    fn of(x: &[usize], kernel: usize, stride: usize, pad: Pad2d) -> Result<Self> {
        let [n, c, h, w] = *x else {
            candle_core::bail!("max-pool: an N x C x H x W input, got {x:?}");
        };
        let out = |size| crate::windows::output_size(size, kernel, stride);
        Ok(Self {
            planes: n * c,
            h,
            w,
            kernel,
            stride,
            pad,
            oh: out(h + pad.top + pad.bottom)?,
            ow: out(w + pad.left + pad.right)?,
        })
    }

    /// The first maximum (row-major) of output `(i, j)`'s window in `plane`: its index and value;
    /// `None` if the window holds only border.
    fn first_max<T: Float>(&self, plane: &[T], i: usize, j: usize) -> Option<(usize, T)> {
        let span = |at: usize, before: usize, size: usize| {
            let start = (at * self.stride).saturating_sub(before);
            let end = (at * self.stride + self.kernel)
                .saturating_sub(before)
                .min(size);
            start..end
        };
        let (rows, cols) = (
            span(i, self.pad.top, self.h),
            span(j, self.pad.left, self.w),
        );
        if rows.is_empty() || cols.is_empty() {
            return None;
        }
        let mut best = (
            rows.start * self.w + cols.start,
            plane[rows.start * self.w + cols.start],
        );
        for y in rows {
            let row = &plane[y * self.w + cols.start..y * self.w + cols.end];
            for (dx, &v) in row.iter().enumerate() {
                if v > best.1 {
                    best = (y * self.w + cols.start + dx, v);
                }
            }
        }
        Some(best)
    }

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        // -inf where a window holds only border, including every window of an empty plane.
        let mut out = vec![T::of(f64::NEG_INFINITY); self.planes * self.oh * self.ow];
        out.par_chunks_mut((self.oh * self.ow).max(1))
            .zip(x.par_chunks((self.h * self.w).max(1)))
            .for_each(|(out, plane)| {
                for (k, o) in out.iter_mut().enumerate() {
                    let best = self.first_max(plane, k / self.ow, k % self.ow);
                    *o = best.map_or(T::of(f64::NEG_INFINITY), |(_, v)| v);
                }
            });
        out
    }

    /// Each output's gradient added to its window's first maximum. The windows run in reverse
    /// row-major order: an input pixel then sums the windows it tops in the order the tensor-op
    /// path (`untap`, kernel offsets in row-major order) sums them, so for finite inputs and
    /// gradients both paths agree to the bit and a model trained on either is the same model.
    fn grad_input<T: Float>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.planes * self.h * self.w];
        out.par_chunks_mut((self.h * self.w).max(1))
            .zip(x.par_chunks((self.h * self.w).max(1)))
            .zip(grad.par_chunks((self.oh * self.ow).max(1)))
            .for_each(|((gx, plane), g)| {
                for (k, &gv) in g.iter().enumerate().rev() {
                    if let Some((at, _)) = self.first_max(plane, k / self.ow, k % self.ow) {
                        gx[at] += gv;
                    }
                }
            });
        out
    }
}

/// The CPU max-pool on the unpadded input, its border skipped.
struct CpuMaxPool {
    window: Window,
}

impl CustomOp1 for CpuMaxPool {
    fn name(&self) -> &'static str {
        "vulnmap-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.window;
        let out = match storage.dtype() {
            DType::F32 => CpuStorage::F32(w.forward(slice::<f32>(storage, layout, WHAT)?)),
            DType::F64 => CpuStorage::F64(w.forward(slice::<f64>(storage, layout, WHAT)?)),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        };
        let (n, c, _, _) = layout.shape().dims4()?;
        Ok((out, Shape::from((n, c, w.oh, w.ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?.apply_op2_no_bwd(
            &arg.detach(),
            &CpuMaxPoolBackward {
                window: self.window,
            },
        )?;
        Ok(Some(grad))
    }
}

/// `(grad, input) -> d input`: each output's gradient to its window's first maximum.
struct CpuMaxPoolBackward {
    window: Window,
}

impl CustomOp2 for CpuMaxPoolBackward {
    fn name(&self) -> &'static str {
        "vulnmap-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.window;
        let out = match g.dtype() {
            DType::F32 => CpuStorage::F32(w.grad_input(slice(x, xl, WHAT)?, slice(g, gl, WHAT)?)),
            DType::F64 => CpuStorage::F64(w.grad_input(slice(x, xl, WHAT)?, slice(g, gl, WHAT)?)),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// The op's name in errors.
const WHAT: &str = "max-pool";

/// The global average over height and width: `N x C x H x W` to `N x C`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// Unpadded max-pool as a custom op on any device, so that its backward is ours.
struct MaxPool {
    kernel: usize,
    stride: usize,
}

impl MaxPool {
    fn out_shape(&self, shape: &Shape) -> Result<Shape> {
        let (n, c, h, w) = shape.dims4()?;
        let out = |size| crate::windows::output_size(size, self.kernel, self.stride);
        Ok(Shape::from((n, c, out(h)?, out(w)?)))
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "vulnmap-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = (self.kernel, self.kernel);
        let s = (self.stride, self.stride);
        Ok((
            storage.max_pool2d(layout, k, s)?,
            self.out_shape(layout.shape())?,
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = (self.kernel, self.kernel);
        let s = (self.stride, self.stride);
        Ok((
            storage.max_pool2d(layout, k, s)?,
            self.out_shape(layout.shape())?,
        ))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let k = self.kernel;
        let windows = Windows::new(arg, (k, k), self.stride, Pad2d::default(), 0.0)?;
        let res = res.detach();
        let grad_res = grad_res.detach();
        // `free` is 1 where no earlier offset of the window has claimed the maximum yet.
        let mut free = res.ones_like()?;
        let mut routed = Vec::with_capacity(k * k);
        for dy in 0..k {
            for dx in 0..k {
                let is_max = windows
                    .tap(dy, dx)?
                    .detach()
                    .eq(&res)?
                    .to_dtype(res.dtype())?;
                let first = (is_max * &free)?;
                free = (&free - &first)?;
                routed.push(((dy, dx), (&grad_res * first)?));
            }
        }
        let grad = untap(routed, self.stride, windows.output(), windows.padded_size())?;
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use vulnmap_testkit::assert_close;
    use vulnmap_testkit::gradcheck::finite_difference_check;

    /// A direct loop implementation of PyTorch's max-pool, as the independent reference.
    fn naive_max_pool(x: &[f64], (h, w): (usize, usize), k: usize, s: usize, p: usize) -> Vec<f64> {
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let mut out = vec![f64::NEG_INFINITY; ho * wo];
        for i in 0..ho {
            for j in 0..wo {
                for dy in 0..k {
                    for dx in 0..k {
                        let (y, xx) = (
                            (i * s + dy) as isize - p as isize,
                            (j * s + dx) as isize - p as isize,
                        );
                        if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                            let v = x[y as usize * w + xx as usize];
                            if v > out[i * wo + j] {
                                out[i * wo + j] = v;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_a_direct_loop() -> Result<()> {
        let dev = vulnmap_testkit::device();
        for &(h, w, k, s, p) in &[
            (9, 7, 3, 2, 1),
            (8, 8, 2, 2, 0),
            (10, 11, 3, 1, 1),
            (7, 7, 5, 3, 2),
        ] {
            let x = Tensor::randn(0f64, 1.0, (1, 1, h, w), &dev)?;
            let got = max_pool2d(&x, k, s, p)?.flatten_all()?.to_vec1::<f64>()?;
            let want = naive_max_pool(&x.flatten_all()?.to_vec1::<f64>()?, (h, w), k, s, p);
            assert_eq!(got, want, "h={h} w={w} k={k} s={s} p={p}");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = vulnmap_testkit::device();
        // ResNet's stem pool and a few other shapes; random values have no ties.
        for &(h, w, k, s, p) in &[
            (9, 9, 3, 2, 1),
            (8, 7, 3, 2, 1),
            (6, 6, 2, 2, 0),
            (7, 8, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f64, 1.0, (2, 3, h, w), &dev)?;
            finite_difference_check(&x, |x| max_pool2d(x, k, s, p), 1e-6, 1e-6)?;
        }
        Ok(())
    }

    /// The CPU loops against candle's kernel on a padded copy and the tensor-op backward (the
    /// path of other devices), with uneven borders as ONNX's `ceil_mode` makes them.
    #[test]
    fn the_cpu_loops_equal_the_padded_copys_path_in_value_and_gradient() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let uneven = |top, bottom, left, right| Pad2d {
            top,
            bottom,
            left,
            right,
        };
        for &(h, w, k, s, pad) in &[
            (9, 9, 3, 2, Pad2d::uniform(1)),
            (8, 7, 3, 2, uneven(1, 2, 0, 1)),
            (7, 8, 2, 2, uneven(0, 1, 0, 1)),
            (6, 6, 3, 1, uneven(1, 0, 1, 0)),
            (9, 8, 5, 1, Pad2d::uniform(2)),
            (7, 9, 1, 2, Pad2d::default()),
            (8, 8, 2, 3, uneven(1, 0, 0, 1)),
        ] {
            // Rounded inputs tie often; with stride 1 a peak is the maximum of up to k * k
            // windows, whose upstream gradients differ, so the order of their sum shows.
            let mut rng = vulnmap_data::random::rng(h as u64 * 31 + k as u64, "max-pool order");
            let draw = |rng: &mut vulnmap_data::random::SeededRng, shape: &[usize]| {
                vulnmap_data::random::randn(rng, shape, &dev)?.to_dtype(DType::F64)
            };
            let x = draw(&mut rng, &[2, 3, h, w])?;
            let x = candle_core::Var::from_tensor(&((x * 2.0)?.round()? * 0.5)?)?;
            let ours = max_pool2d_padded(x.as_tensor(), k, s, pad)?;
            let theirs = pad2d(x.as_tensor(), pad, f64::NEG_INFINITY)?.apply_op1(MaxPool {
                kernel: k,
                stride: s,
            })?;
            assert_eq!(
                ours.flatten_all()?.to_vec1::<f64>()?,
                theirs.flatten_all()?.to_vec1::<f64>()?,
                "{h}x{w} k {k} s {s} {pad:?}: value"
            );
            // Full f64 mantissas: sums of a few f32 draws would be exact in any order.
            let upstream = (draw(&mut rng, ours.dims())? * std::f64::consts::PI)?.exp()?;
            let grad = |y: &Tensor| -> Result<Vec<f64>> {
                let grads = (y * &upstream)?.sum_all()?.backward()?;
                grads
                    .get(x.as_tensor())
                    .expect("a gradient")
                    .flatten_all()?
                    .to_vec1::<f64>()
            };
            assert_eq!(
                grad(&ours)?,
                grad(&theirs)?,
                "{h}x{w} k {k} s {s} {pad:?}: gradient"
            );
        }
        Ok(())
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum_as_pytorch_does() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let x = Tensor::zeros((1, 1, 4, 4), DType::F64, &dev)?;
        let var = candle_core::Var::from_tensor(&x)?;
        let y = max_pool2d(var.as_tensor(), 3, 2, 1)?; // 2 x 2 outputs
        let grads = y.sum_all()?.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        // Window origins (-1,-1), (-1,1), (1,-1), (1,1); the first real pixel of each wins.
        let mut want = vec![0.0; 16];
        for idx in [0, 1, 4, 5] {
            want[idx] = 1.0;
        }
        assert_close(&g, &want, 0.0);
        Ok(())
    }
}
