//! Attention's core, `softmax(a b) v` over the last two axes, as one op whose backward pass
//! recomputes the attention weights from `a` and `b` instead of keeping them.
//!
//! Built from two products and a softmax, candle's graph keeps the scores and the weights (two
//! `L x M` matrices per head and image, a vision transformer's largest tensors) until the backward
//! pass ends. Here only the inputs are kept, for one more product `a b` in the backward pass.

use crate::cpu_kernels::{slice, Float};
use crate::linear::{GemmThreads, Matrix};
use crate::softmax::{softmax_last_dim, softmax_last_dim_backward, softmax_rows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `softmax(a b) v`: `a` is `... x L x d`, `b` `... x d x M`, `v` `... x M x e`, with the same
/// leading dimensions (an attention's queries, transposed keys and values, the scale already in
/// `a` or `b`). One op on the CPU (f32, f64); tensor ops elsewhere, or when the leading
/// dimensions differ (broadcast).
pub fn attention(a: &Tensor, b: &Tensor, v: &Tensor) -> Result<Tensor> {
    let batch = |t: &Tensor| t.dims()[..t.rank().saturating_sub(2)].to_vec();
    let fused = a.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && b.dtype() == a.dtype()
        && v.dtype() == a.dtype()
        && a.rank() >= 2
        && b.rank() == a.rank()
        && v.rank() == a.rank()
        && batch(b) == batch(a)
        && batch(v) == batch(a);
    if !fused {
        return by_tensor_ops(a, b, v);
    }
    let last_two =
        |t: &Tensor| -> Result<(usize, usize)> { Ok((t.dim(D::Minus2)?, t.dim(D::Minus1)?)) };
    let (l, d) = last_two(a)?;
    let (d2, m) = last_two(b)?;
    let (m2, _) = last_two(v)?;
    if d2 != d || m2 != m {
        candle_core::bail!(
            "attention: a {:?}, b {:?} and v {:?} do not chain (L x d, d x M, M x e; L = {l})",
            a.dims(),
            b.dims(),
            v.dims()
        );
    }
    a.contiguous()?
        .apply_op3(&b.contiguous()?, &v.contiguous()?, Attention)
}

/// The same value from candle's tensor ops (and the softmax op), on any device.
pub fn by_tensor_ops(a: &Tensor, b: &Tensor, v: &Tensor) -> Result<Tensor> {
    softmax_last_dim(&a.broadcast_matmul(b)?)?.broadcast_matmul(v)
}

/// The attention weights `softmax(a b)`, outside any graph.
fn weights(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    softmax_last_dim(&a.detach().matmul(&b.detach())?)
}

/// `softmax(a b) v` for each of the batch's matrices (`a` is `batch x L x d`, `b` `batch x d x
/// M`, `v` `batch x M x e`, row-major): two GEMMs and a softmax per matrix, on the storages
/// themselves, the matrices side by side on the threads, each thread's scores one matrix at a
/// time.
fn forward<T: Float>(
    (a, b, v): (&[T], &[T], &[T]),
    (l, d, m, e): (usize, usize, usize, usize),
) -> Result<Vec<T>> {
    let batch = a.len().checked_div(l * d).unwrap_or(0);
    let mut out = vec![T::default(); batch * l * e];
    if out.is_empty() {
        return Ok(out);
    }
    out.par_chunks_mut(l * e).enumerate().try_for_each_init(
        || vec![T::default(); l * m],
        |scores, (i, out)| {
            let a = Matrix::new(&a[i * l * d..], (l, d), (d, 1))?;
            a.product_into_on(
                &Matrix::new(&b[i * d * m..], (d, m), (m, 1))?,
                scores,
                (m, 1),
                false,
                GemmThreads::This,
            )?;
            let weights = softmax_rows(scores, m);
            Matrix::new(&weights, (l, m), (m, 1))?.product_into_on(
                &Matrix::new(&v[i * m * e..], (m, e), (e, 1))?,
                out,
                (e, 1),
                false,
                GemmThreads::This,
            )
        },
    )?;
    Ok(out)
}

struct Attention;

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "vulnmap-attention"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "attention";
        let (l, d) = (al.shape().dim(D::Minus2)?, al.shape().dim(D::Minus1)?);
        let (m, e) = (bl.shape().dim(D::Minus1)?, vl.shape().dim(D::Minus1)?);
        let out = match a.dtype() {
            DType::F32 => CpuStorage::F32(forward(
                (
                    slice(a, al, what)?,
                    slice(b, bl, what)?,
                    slice(v, vl, what)?,
                ),
                (l, d, m, e),
            )?),
            DType::F64 => CpuStorage::F64(forward(
                (
                    slice(a, al, what)?,
                    slice(b, bl, what)?,
                    slice(v, vl, what)?,
                ),
                (l, d, m, e),
            )?),
            other => candle_core::bail!("{what}: f32 or f64, not {other:?}"),
        };
        let mut dims = al.dims().to_vec();
        *dims.last_mut().expect("rank >= 2") = e;
        Ok((out, Shape::from(dims)))
    }

    /// With `p = softmax(a b)`: `dv = pᵀ g`, `dp = g vᵀ`, `ds` = softmax's backward of `dp`,
    /// `da = ds bᵀ`, `db = aᵀ ds`.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, v) = (a.detach(), b.detach(), v.detach());
        let grad = grad.detach().contiguous()?;
        let p = weights(&a, &b)?;
        let grad_v = p.t()?.matmul(&grad)?;
        let grad_p = grad.matmul(&v.t()?)?;
        drop(grad);
        let grad_s = softmax_last_dim_backward(&grad_p, &p)?;
        drop((p, grad_p));
        let grad_a = grad_s.matmul(&b.t()?)?;
        let grad_b = a.t()?.matmul(&grad_s)?;
        Ok((Some(grad_a), Some(grad_b), Some(grad_v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    #[test]
    fn equals_its_tensor_ops_with_the_same_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, h, l, d, e) = (2, 3, 7, 5, 4);
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, h, l, d), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, h, d, l), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, h, l, e), &dev)?)?;
        let upstream = Tensor::randn(0f64, 1.0, (n, h, l, e), &dev)?;
        let run = |f: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| -> Result<Vec<Tensor>> {
            let y = f(a.as_tensor(), b.as_tensor(), v.as_tensor())?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for x in [&a, &b, &v] {
                out.push(grads.get(x.as_tensor()).unwrap().clone());
            }
            Ok(out)
        };
        let fused = run(attention)?;
        let plain = run(by_tensor_ops)?;
        for (what, (x, y)) in ["value", "da", "db", "dv"]
            .iter()
            .zip(fused.iter().zip(&plain))
        {
            let diff = max_diff(x, y);
            assert!(diff < 1e-12, "{what}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn its_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (2, 4, 3), &dev)?;
        let b = Tensor::randn(0f64, 1.0, (2, 3, 5), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (2, 5, 2), &dev)?;
        use vulnmap_testkit::gradcheck::finite_difference_check as check;
        check(&a, |a| attention(a, &b, &v), 1e-6, 1e-7)?;
        check(&b, |b| attention(&a, b, &v), 1e-6, 1e-7)?;
        check(&v, |v| attention(&a, &b, v), 1e-6, 1e-7)?;
        Ok(())
    }

    #[test]
    fn operands_that_do_not_chain_are_an_error() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 4, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 2, 5), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((2, 5, 2), DType::F32, &dev).unwrap();
        let err = attention(&a, &b, &v).unwrap_err().to_string();
        assert!(err.contains("do not chain"), "{err}");
    }
}
