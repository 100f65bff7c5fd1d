//! A transformer's multi-head self-attention block, `softmax(q kᵀ / √d) v` over `H` heads between
//! its input and output projections (`nn.MultiheadAttention`, timm's `Attention`), as one op that
//! keeps only the projected queries, keys and values for its backward pass.
//!
//! Exported to ONNX the block is a dozen reshapes, transposes and gathers around the two
//! products, each a copy of the tokens that candle's graph keeps until the backward pass ends, each
//! with a zeroed gradient of its own. Here the heads are strided views of one `N L x 3E` matrix.

use crate::cpu_kernels::{constant_values, slice, Float};
use crate::feed_forward::Linear;
use crate::linear::{matmul_by_constant, Matrix};
use crate::softmax::{softmax_last_dim, softmax_last_dim_backward, softmax_rows};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Self-attention of `x` (`N x L x E`, `L` tokens of width `E`) with `heads` heads of `d = E /
/// heads` channels, the scores scaled by `scale` (`1 / √d` in every transformer): `input` projects
/// to queries, keys and values (`E x 3E` as `x W`, PyTorch's `in_proj_weight` transposed),
/// `output` back to `E` (`E x E`).
///
/// One op on the CPU (f32, f64) when the projections are constants; candle's tensor ops otherwise
/// ([`by_tensor_ops`]), which give the same value.
pub fn self_attention(
    x: &Tensor,
    input: Linear,
    output: Linear,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (_, _, e) = x.dims3()?;
    if heads == 0 || !e.is_multiple_of(heads) {
        candle_core::bail!("self-attention: {e} channels do not split into {heads} heads");
    }
    let constant = |w: &Tensor, rows: usize, cols: usize| {
        !w.track_op() && w.dims() == [rows, cols] && w.dtype() == x.dtype()
    };
    let constant_bias = |b: Option<&Tensor>, len: usize| {
        b.is_none_or(|b| !b.track_op() && b.elem_count() == len && b.dtype() == x.dtype())
    };
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.elem_count() > 0
        && constant(input.weight, e, 3 * e)
        && constant(output.weight, e, e)
        && constant_bias(input.bias, 3 * e)
        && constant_bias(output.bias, e);
    if !fast {
        return by_tensor_ops(x, input, output, heads, scale);
    }
    let as_matrix = |w: &Tensor| -> Result<Tensor> {
        if w.is_contiguous() || w.t()?.is_contiguous() {
            Ok(w.clone())
        } else {
            w.contiguous()
        }
    };
    let op = SelfAttention {
        heads,
        scale,
        input_bias: input
            .bias
            .map(|b| constant_values(b, 3 * e, WHAT))
            .transpose()?,
        output_bias: output
            .bias
            .map(|b| constant_values(b, e, WHAT))
            .transpose()?,
        saved: Mutex::new(None),
        keep: x.track_op(),
    };
    x.contiguous()?
        .apply_op3(&as_matrix(input.weight)?, &as_matrix(output.weight)?, op)
}

/// The same value from candle's tensor ops (and the attention op), on any device and with
/// trainable projections.
pub fn by_tensor_ops(
    x: &Tensor,
    input: Linear,
    output: Linear,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (n, l, e) = x.dims3()?;
    let d = e / heads.max(1);
    let qkv = matmul_by_constant(x, input.weight, input.bias)?
        .reshape((n, l, 3, heads, d))?
        .permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| qkv.get(i)?.contiguous();
    let q = (part(0)? * scale)?;
    let context = crate::attention::by_tensor_ops(&q, &part(1)?.t()?, &part(2)?)?
        .transpose(1, 2)?
        .reshape((n, l, e))?;
    matmul_by_constant(&context, output.weight, output.bias)
}

const WHAT: &str = "self-attention";

/// The op on `(x, W_in, W_out)`; it keeps the projected `q, k, v` (`N L x 3E`, the queries
/// already scaled) for its backward pass, freed with the graph that holds the op.
struct SelfAttention {
    heads: usize,
    scale: f64,
    input_bias: Option<Vec<f64>>,
    output_bias: Option<Vec<f64>>,
    saved: Mutex<Option<Tensor>>,
    /// Whether a backward pass can follow (the input is tracked): else nothing is kept.
    keep: bool,
}

impl SelfAttention {
    fn run<T: Float>(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w_in, w_in_l): (&CpuStorage, &Layout),
        (w_out, w_out_l): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, l, e) = xl.shape().dims3()?;
        let x = slice::<T>(x, xl, WHAT)?;
        let (w_in, w_out) = (
            Matrix::of(w_in, w_in_l, WHAT)?,
            Matrix::of(w_out, w_out_l, WHAT)?,
        );
        let bias = |b: &Option<Vec<f64>>| -> Option<Vec<T>> {
            b.as_ref().map(|b| b.iter().map(|&v| T::of(v)).collect())
        };
        let d = e / self.heads;
        let mut qkv = w_in.times(x, bias(&self.input_bias).as_deref())?;
        let scale = T::of(self.scale);
        for token in qkv.chunks_mut(3 * e) {
            token[..e].iter_mut().for_each(|q| *q = *q * scale);
        }
        let mut context = vec![T::default(); n * l * e];
        let mut scores = vec![T::default(); l * l];
        for i in 0..n {
            let tokens = &qkv[i * l * 3 * e..];
            for h in 0..self.heads {
                let head =
                    |part: usize| Matrix::new(&tokens[part * e + h * d..], (l, d), (3 * e, 1));
                head(0)?.product_into(&head(1)?.t(), &mut scores, (l, 1), false)?;
                let weights = softmax_rows(&scores, l);
                Matrix::new(&weights, (l, l), (l, 1))?.product_into(
                    &head(2)?,
                    &mut context[i * l * e + h * d..],
                    (e, 1),
                    false,
                )?;
            }
        }
        let out = w_out.times(&context, bias(&self.output_bias).as_deref())?;
        if self.keep {
            let shape = (n, l, 3 * e);
            let qkv = match T::storage(qkv) {
                CpuStorage::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
                CpuStorage::F64(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
                other => candle_core::bail!("{WHAT}: f32 or f64, not {:?}", other.dtype()),
            };
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))? =
                Some(qkv);
        }
        Ok((T::storage(out), Shape::from((n, l, e))))
    }
}

impl CustomOp3 for SelfAttention {
    fn name(&self) -> &'static str {
        "vulnmap-self-attention"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w_in: &CpuStorage,
        w_in_l: &Layout,
        w_out: &CpuStorage,
        w_out_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>((x, xl), (w_in, w_in_l), (w_out, w_out_l)),
            DType::F64 => self.run::<f64>((x, xl), (w_in, w_in_l), (w_out, w_out_l)),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        }
    }

    /// With `p = softmax(q kᵀ)` per head (`q` scaled) and `g` the context's gradient
    /// (`grad W_outᵀ`): `dv = pᵀ g`, `ds` = softmax's backward of `g vᵀ`, `dq = ds k` (times the
    /// scale, for the unscaled queries), `dk = dsᵀ q`; the input's gradient is `d(qkv) W_inᵀ`.
    fn bwd(
        &self,
        _x: &Tensor,
        w_in: &Tensor,
        w_out: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))?;
        let Some(qkv) = saved.as_ref() else {
            candle_core::bail!("{WHAT}: backward before forward");
        };
        let (n, l, e3) = qkv.dims3()?;
        let (e, h) = (e3 / 3, self.heads);
        let d = e / h;
        let (w_in, w_out) = (w_in.detach(), w_out.detach());
        // `N x H x L x d` each.
        let heads = qkv.reshape((n, l, 3, h, d))?;
        let part = |i: usize| {
            heads
                .narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let grad_context = matmul_by_constant(&grad.detach().contiguous()?, &w_out.t()?, None)?
            .reshape((n, l, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let p = softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let grad_v = p.t()?.matmul(&grad_context)?;
        let grad_p = grad_context.matmul(&v.t()?)?;
        drop(grad_context);
        let grad_s = softmax_last_dim_backward(&grad_p, &p)?;
        drop((p, grad_p));
        let grad_q = (grad_s.matmul(&k)? * self.scale)?;
        let grad_k = grad_s.t()?.matmul(&q)?;
        drop(grad_s);
        // Back to `N x L x 3 x H x d`, as the input projection wrote them.
        let grad_qkv = Tensor::stack(&[grad_q, grad_k, grad_v], 2)?
            .permute((0, 3, 2, 1, 4))?
            .reshape((n, l, e3))?;
        let dx = matmul_by_constant(&grad_qkv, &w_in.t()?, None)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use vulnmap_testkit::max_diff;

    fn randn(shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
    }

    #[test]
    fn equals_its_tensor_ops_with_the_same_input_gradient() -> Result<()> {
        for (heads, biases) in [(1, true), (3, true), (3, false)] {
            let (n, l, e) = (2, 5, 6);
            let x = Var::from_tensor(&randn(&[n, l, e])?)?;
            let (w_in, b_in) = ((randn(&[e, 3 * e])? * 0.5)?, randn(&[3 * e])?);
            let (w_out, b_out) = (randn(&[e, e])?, randn(&[e])?);
            let input = || Linear {
                weight: &w_in,
                bias: biases.then_some(&b_in),
            };
            let output = || Linear {
                weight: &w_out,
                bias: biases.then_some(&b_out),
            };
            let upstream = randn(&[n, l, e])?;
            let run = |fused: bool| -> Result<(Tensor, Tensor)> {
                let y = if fused {
                    self_attention(x.as_tensor(), input(), output(), heads, 0.4)?
                } else {
                    by_tensor_ops(x.as_tensor(), input(), output(), heads, 0.4)?
                };
                let grads = (&y * &upstream)?.sum_all()?.backward()?;
                let dx = grads.get(x.as_tensor()).expect("x's gradient").clone();
                Ok((y, dx))
            };
            let ((y, dx), (y_plain, dx_plain)) = (run(true)?, run(false)?);
            assert!(max_diff(&y, &y_plain) < 1e-12, "heads {heads}: value");
            assert!(max_diff(&dx, &dx_plain) < 1e-10, "heads {heads}: gradient");
        }
        Ok(())
    }

    #[test]
    fn its_input_gradient_matches_finite_differences() -> Result<()> {
        let (w_in, b_in) = ((randn(&[4, 12])? * 0.5)?, randn(&[12])?);
        let (w_out, b_out) = (randn(&[4, 4])?, randn(&[4])?);
        let f = |x: &Tensor| {
            let input = Linear {
                weight: &w_in,
                bias: Some(&b_in),
            };
            let output = Linear {
                weight: &w_out,
                bias: Some(&b_out),
            };
            self_attention(x, input, output, 2, 0.5_f64.sqrt())
        };
        vulnmap_testkit::gradcheck::finite_difference_check(&randn(&[2, 3, 4])?, f, 1e-6, 1e-7)?;
        Ok(())
    }

    #[test]
    fn channels_that_do_not_split_into_the_heads_are_an_error() {
        let x = Tensor::zeros((1, 3, 6), DType::F32, &Device::Cpu).unwrap();
        let w_in = Tensor::zeros((6, 18), DType::F32, &Device::Cpu).unwrap();
        let w_out = Tensor::zeros((6, 6), DType::F32, &Device::Cpu).unwrap();
        let layer = |w| Linear {
            weight: w,
            bias: None,
        };
        let err = self_attention(&x, layer(&w_in), layer(&w_out), 4, 0.5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not split into 4 heads"), "{err}");
    }
}
