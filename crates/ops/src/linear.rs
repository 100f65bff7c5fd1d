//! `x W` with a constant `W` (a pretrained layer's weight) as one op whose backward computes the
//! input's gradient only.
//!
//! candle's matmul backward computes the right operand's gradient too, wanted or not: one GEMM
//! as large as the forward's for every linear layer of a ViT or ConvNeXt, whose weights are
//! constants when a pretrained classifier is explained or attacked.

use crate::cpu_kernels::{constant_values, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// `x W + bias` for `x` of shape `(..., K)`, `W` of shape `K x M` and an optional `bias` of `M`
/// values, batch dimensions of `x` kept.
///
/// One op on the CPU when `W` and `bias` need no gradient (constants, or anything untracked):
/// the bias is where the GEMM accumulates, so it costs no pass of its own either way. candle's
/// `broadcast_matmul` and `broadcast_add` otherwise (trained weights, other devices), which give
/// the same value.
pub fn matmul_by_constant(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let plain_bias = bias.is_some_and(|b| {
        b.track_op() || b.elem_count() != w.dims().get(1).copied().unwrap_or(0) || b.rank() > 1
    });
    let empty = x.elem_count() == 0 || w.elem_count() == 0;
    if !cpu
        || plain_bias
        || empty
        || w.track_op()
        || w.rank() != 2
        || x.rank() < 2
        || x.dtype() != w.dtype()
    {
        let y = x.broadcast_matmul(w)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let k = x.dim(candle_core::D::Minus1)?;
    if w.dim(0)? != k {
        candle_core::bail!(
            "matmul: {:?} times {:?}: inner dimensions differ",
            x.dims(),
            w.dims()
        );
    }
    let row_major = w.is_contiguous();
    let column_major = w.t()?.is_contiguous();
    let w = if row_major || column_major {
        w.clone()
    } else {
        w.contiguous()?
    };
    let bias = match bias {
        Some(b) => Some(constant_values(b, w.dim(1)?, "linear layer's bias")?),
        None => None,
    };
    x.contiguous()?.apply_op2(&w, ByConstant { bias })
}

/// The op: forward `x W + bias` by one GEMM over all of `x`'s rows, backward `G W^T`.
struct ByConstant {
    bias: Option<Vec<f64>>,
}

impl ByConstant {
    fn run<T: Float>(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let what = "matmul by a constant";
        let x = crate::cpu_kernels::slice::<T>(x, xl, what)?;
        let w = Matrix::of(w, wl, what)?;
        let bias: Option<Vec<T>> = self
            .bias
            .as_ref()
            .map(|b| b.iter().map(|&b| T::of(b)).collect());
        let out = w.times(x, bias.as_deref())?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 2") = w.cols;
        Ok((T::storage(out), Shape::from(dims)))
    }
}

/// A `rows x cols` matrix: a slice and its row and column strides (row-major, a transposed view,
/// or one image of an `N x C x H x W` tensor read as `HW x C`).
pub(crate) struct Matrix<'a, T> {
    data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// Where one GEMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GemmThreads {
    /// Split across all threads.
    All,
    /// On the calling thread: for many small products run side by side, where splitting each
    /// across the threads costs more than it saves.
    This,
}

/// The elements a `rows x cols` matrix with these strides spans.
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

impl<'a, T: Float> Matrix<'a, T> {
    /// The matrix in `data`, or an error if its strides reach past the slice's end.
    pub(crate) fn new(
        data: &'a [T],
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Result<Self> {
        let data = data
            .get(..extent(rows, cols, row_stride, col_stride))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "a {rows} x {cols} matrix with strides ({row_stride}, {col_stride}) in {} \
                     elements",
                    data.len()
                ))
            })?;
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The 2-D tensor `(storage, layout)`, whose strides are `(cols, 1)` or `(1, rows)`
    /// ([`matmul_by_constant`] makes them so).
    pub(crate) fn of(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
        let dims = layout.shape().dims2()?;
        let data = T::elements(storage)
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: dtypes differ")))?;
        let [rs, cs] = layout.stride() else {
            candle_core::bail!("{what}: a 2-D weight, got strides {:?}", layout.stride());
        };
        let data = data.get(layout.start_offset()..).unwrap_or_default();
        Self::new(data, dims, (*rs, *cs))
    }

    /// The transpose, a view of the same elements.
    pub(crate) fn t(&self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// `out = self rhs`, or `out += self rhs` when `accumulate`, for `out` a `self.rows x
    /// rhs.cols` matrix with strides `out_strides` in `out` (an error if it does not fit, or the
    /// inner dimensions differ). One GEMM, on all threads.
    pub(crate) fn product_into(
        &self,
        rhs: &Matrix<T>,
        out: &mut [T],
        out_strides: (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        self.product_into_on(rhs, out, out_strides, accumulate, GemmThreads::All)
    }

    /// [`Self::product_into`] on the threads `threads` says.
    pub(crate) fn product_into_on(
        &self,
        rhs: &Matrix<T>,
        out: &mut [T],
        out_strides: (usize, usize),
        accumulate: bool,
        threads: GemmThreads,
    ) -> Result<()> {
        let all = rayon::current_num_threads();
        let parallelism = match threads {
            GemmThreads::All if all > 1 => Parallelism::Rayon(all),
            _ => Parallelism::None,
        };
        self.gemm_into(rhs, out, out_strides, accumulate, parallelism)
    }

    fn gemm_into(
        &self,
        rhs: &Matrix<T>,
        out: &mut [T],
        (out_row_stride, out_col_stride): (usize, usize),
        accumulate: bool,
        parallelism: Parallelism,
    ) -> Result<()> {
        let (m, k, n) = (self.rows, self.cols, rhs.cols);
        if rhs.rows != k {
            candle_core::bail!(
                "a {m} x {k} matrix times a {} x {n} one: inner dimensions differ",
                rhs.rows
            );
        }
        if out.len() < extent(m, n, out_row_stride, out_col_stride) {
            candle_core::bail!("a {m} x {n} product does not fit {} elements", out.len());
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        // SAFETY: both operands lie inside their slices with their strides (checked by `new`),
        // and so does `out` (checked above), which is borrowed mutably, so nothing aliases it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                out_col_stride as isize,
                out_row_stride as isize,
                accumulate,
                self.data.as_ptr(),
                self.col_stride as isize,
                self.row_stride as isize,
                rhs.data.as_ptr(),
                rhs.col_stride as isize,
                rhs.row_stride as isize,
                T::ONE,
                T::ONE,
                false,
                false,
                false,
                parallelism,
            )
        }
        Ok(())
    }

    /// `x M (+ bias)` for `x` row-major with `rows` columns: one GEMM over all of `x`'s rows,
    /// the bias where it accumulates.
    pub(crate) fn times(&self, x: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
        let (k, n) = (self.rows, self.cols);
        let m = x.len() / k.max(1);
        let mut out = vec![T::default(); m * n];
        if let Some(bias) = bias {
            out.chunks_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(bias));
        }
        Matrix::new(x, (m, k), (k, 1))?.product_into(self, &mut out, (n, 1), bias.is_some())?;
        Ok(out)
    }
}

impl CustomOp2 for ByConstant {
    fn name(&self) -> &'static str {
        "vulnmap-matmul-by-constant"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>((x, xl), (w, wl)),
            DType::F64 => self.run::<f64>((x, xl), (w, wl)),
            other => candle_core::bail!("matmul by a constant: f32 or f64, not {other:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (k, n) = w.dims2()?;
        let rows = grad.elem_count() / n.max(1);
        let dx = grad.reshape((rows, n))?.matmul(&w.t()?)?;
        debug_assert_eq!(dx.dim(1)?, k);
        Ok((Some(dx.reshape(x.shape())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    /// Value and input gradient against candle's own matmul, for a row-major and a transposed
    /// weight, with and without a bias, a batched `x`, f32 and f64.
    #[test]
    fn matches_candles_matmul_and_its_input_gradient() -> Result<()> {
        let device = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 7), &device)?.to_dtype(dtype)?)?;
            let w_rows = Tensor::randn(0f32, 1., (7, 3), &device)?.to_dtype(dtype)?;
            let w_cols = Tensor::randn(0f32, 1., (3, 7), &device)?
                .to_dtype(dtype)?
                .t()?;
            let probe = Tensor::randn(0f32, 1., (2, 5, 3), &device)?.to_dtype(dtype)?;
            let bias = Tensor::randn(0f32, 1., 3, &device)?.to_dtype(dtype)?;
            for (w, b) in [(&w_rows, None), (&w_cols, None), (&w_rows, Some(&bias))] {
                let ours = matmul_by_constant(x.as_tensor(), w, b)?;
                let mut theirs = x.as_tensor().broadcast_matmul(w)?;
                if let Some(b) = b {
                    theirs = theirs.broadcast_add(b)?;
                }
                assert!(max_diff(&ours, &theirs) < 1e-5);
                let g_ours = (ours * &probe)?.sum_all()?.backward()?;
                let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
                let (a, b) = (
                    g_ours.get(x.as_tensor()).expect("a gradient"),
                    g_theirs.get(x.as_tensor()).expect("a gradient"),
                );
                assert!(max_diff(a, b) < 1e-5);
            }
        }
        Ok(())
    }

    /// Empty operands (an untrusted model's zero-width layer) give candle's empty or zero
    /// product, not an out-of-bounds slice.
    #[test]
    fn empty_operands_are_candles_business() -> Result<()> {
        let device = Device::Cpu;
        let y = matmul_by_constant(
            &Tensor::zeros((2, 0), DType::F32, &device)?,
            &Tensor::zeros((0, 3), DType::F32, &device)?,
            None,
        )?;
        assert_eq!(y.dims(), &[2, 3]);
        assert_eq!(y.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let y = matmul_by_constant(
            &Tensor::ones((2, 3), DType::F32, &device)?,
            &Tensor::zeros((3, 0), DType::F32, &device)?,
            None,
        )?;
        assert_eq!(y.dims(), &[2, 0]);
        Ok(())
    }

    /// A tracked weight keeps candle's matmul, so its gradient still arrives.
    #[test]
    fn a_tracked_weight_still_gets_its_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (4, 3), &device)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 2), &device)?)?;
        let grads = matmul_by_constant(&x, w.as_tensor(), None)?
            .sum_all()?
            .backward()?;
        let g = grads.get(w.as_tensor()).expect("the weight's gradient");
        let want = x.sum_keepdim(0)?.t()?.broadcast_as((3, 2))?;
        let diff = (g - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
