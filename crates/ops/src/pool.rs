//! Max-pooling whose backward pass works for any kernel and stride.
//!
//! candle's own `max_pool2d` backward refuses kernel != stride (candle issues 1593 and 1851), which
//! is exactly ResNet's 3x3 stride-2 stem pool. Here the forward runs candle's kernel on the
//! device and the backward routes each output's gradient to the first maximum of its window in
//! row-major order, as PyTorch does, using only tensor operations (so it runs on every device).

use crate::windows::{pad2d, untap, Pad2d, Windows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `max_pool2d(x, kernel, stride, padding)` as PyTorch's `nn.MaxPool2d`: padding counts as -inf.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if padding * 2 > kernel {
        candle_core::bail!(
            "max-pool padding {padding} must be at most half the kernel {kernel} (as in PyTorch)"
        );
    }
    let x = pad2d(x, Pad2d::uniform(padding), f64::NEG_INFINITY)?;
    x.apply_op1(MaxPool { kernel, stride })
}

/// The global average over height and width: `N x C x H x W` to `N x C`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// Unpadded max-pool as a custom op, so that its backward is ours.
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
