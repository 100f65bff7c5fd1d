//! A transformer's multi-head self-attention block, `softmax(q kᵀ / √d) v` over `H` heads between
//! its input and output projections (`nn.MultiheadAttention`, timm's `Attention`), as one op that
//! keeps only the projected queries, keys and values for its backward pass.
//!
//! Exported to ONNX the block is a dozen reshapes, transposes and gathers around the two
//! products, each a copy of the tokens that candle's graph keeps until the backward pass ends, each
//! with a zeroed gradient of its own. Here the heads are strided views of one `N L x 3E` matrix.
//! [`pre_norm_self_attention`] is a pre-norm transformer block's sublayer around it (see
//! [`crate::pre_norm`]).

use crate::cpu_kernels::{constant_values, slice, Float};
use crate::feed_forward::Linear;
use crate::linear::{matmul_by_constant, GemmThreads, Matrix};
use crate::pre_norm::{PreNorm, Residual};
use crate::softmax::{softmax_rows, softmax_rows_backward};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
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
    if !has_kernel(x, input, output, heads)? {
        return by_tensor_ops(x, input, output, heads, scale);
    }
    op(x, input, output, heads, scale, None)
}

/// `x + self_attention(norm(x))`, a pre-norm transformer block's attention sublayer (see
/// [`crate::pre_norm`]): one op where [`self_attention`] is one and the normalisation has a
/// kernel, else the three steps.
pub fn pre_norm_self_attention(
    x: &Tensor,
    norm: PreNorm,
    input: Linear,
    output: Linear,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let residual = match has_kernel(x, input, output, heads)? {
        true => norm.residual(x)?,
        false => None,
    };
    match residual {
        Some(residual) => op(x, input, output, heads, scale, Some(residual)),
        None => x + self_attention(&norm.apply(x)?, input, output, heads, scale)?,
    }
}

/// Whether the op runs for `x` (`N x L x E`) with these projections: constants that fit, an f32
/// or f64 CPU tensor; an error when `E` does not split into `heads`.
fn has_kernel(x: &Tensor, input: Linear, output: Linear, heads: usize) -> Result<bool> {
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
    Ok(x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.elem_count() > 0
        && constant(input.weight, e, 3 * e)
        && constant(output.weight, e, e)
        && constant_bias(input.bias, 3 * e)
        && constant_bias(output.bias, e))
}

/// The op, after [`has_kernel`] said yes.
fn op(
    x: &Tensor,
    input: Linear,
    output: Linear,
    heads: usize,
    scale: f64,
    residual: Option<Residual>,
) -> Result<Tensor> {
    let (_, _, e) = x.dims3()?;
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
        residual,
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

/// With at least an image per thread the images run side by side, each one's small GEMMs on its
/// own thread; else one image after another, each GEMM on all threads.
fn gemm_threads(images: usize) -> GemmThreads {
    if images >= rayon::current_num_threads() {
        GemmThreads::This
    } else {
        GemmThreads::All
    }
}

/// `job(image, its rows of out, scratch of scratch_len)` for each image's `rows` elements of
/// `out`: side by side on the threads when the GEMMs run on one each, else in order.
fn for_each_image<T: Float>(
    out: &mut [T],
    rows: usize,
    scratch_len: usize,
    threads: GemmThreads,
    job: impl Fn(usize, &mut [T], &mut [T]) -> Result<()> + Sync + Send,
) -> Result<()> {
    let rows = rows.max(1);
    match threads {
        GemmThreads::This => out.par_chunks_mut(rows).enumerate().try_for_each_init(
            || vec![T::default(); scratch_len],
            |scratch, (i, out)| job(i, out, scratch),
        ),
        GemmThreads::All => {
            let mut scratch = vec![T::default(); scratch_len];
            out.chunks_mut(rows)
                .enumerate()
                .try_for_each(|(i, out)| job(i, out, &mut scratch))
        }
    }
}

/// The op on `(x, W_in, W_out)`; it keeps the projected `q, k, v` (`N L x 3E`, the queries
/// already scaled) for its backward pass, freed with the graph that holds the op.
struct SelfAttention {
    heads: usize,
    scale: f64,
    input_bias: Option<Vec<f64>>,
    output_bias: Option<Vec<f64>>,
    /// The pre-norm sublayer's normalisation and residual add around the block, if fused.
    residual: Option<Residual>,
    saved: Mutex<Option<CpuStorage>>,
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
        let mut qkv = match &self.residual {
            Some(residual) => w_in.times(&residual.normalise(x), bias(&self.input_bias).as_deref()),
            None => w_in.times(x, bias(&self.input_bias).as_deref()),
        }?;
        let scale = T::of(self.scale);
        for token in qkv.chunks_mut(3 * e) {
            token[..e].iter_mut().for_each(|q| *q = *q * scale);
        }
        // Each image's heads write their columns of the `N L x E` context.
        let (heads, threads) = (self.heads, gemm_threads(n));
        let mut context = vec![T::default(); n * l * e];
        for_each_image(&mut context, l * e, l * l, threads, |i, context, scores| {
            let tokens = &qkv[i * l * 3 * e..];
            for h in 0..heads {
                let head =
                    |part: usize| Matrix::new(&tokens[part * e + h * d..], (l, d), (3 * e, 1));
                head(0)?.product_into_on(&head(1)?.t(), scores, (l, 1), false, threads)?;
                let weights = softmax_rows(scores, l);
                Matrix::new(&weights, (l, l), (l, 1))?.product_into_on(
                    &head(2)?,
                    &mut context[h * d..],
                    (e, 1),
                    false,
                    threads,
                )?;
            }
            Ok(())
        })?;
        let mut out = w_out.times(&context, bias(&self.output_bias).as_deref())?;
        if self.residual.is_some() {
            Residual::add_input(&mut out, x);
        }
        if self.keep {
            let qkv = T::storage(qkv);
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
        x: &Tensor,
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
        let backward = InputGradient {
            heads: self.heads,
            scale: self.scale,
            qkv,
            input: x.shape().clone(),
        };
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(&w_in.detach(), &w_out.detach(), &backward)?;
        let dx = match &self.residual {
            Some(residual) => residual.input_gradient(x, grad, &dx)?,
            None => dx,
        };
        Ok((Some(dx), None, None))
    }
}

/// `(grad, W_in, W_out) -> dx` from the saved `q, k, v`: each (image, head) pair's gradients side
/// by side on the threads, as the forward pass.
struct InputGradient<'a> {
    heads: usize,
    scale: f64,
    qkv: &'a CpuStorage,
    input: Shape,
}

impl InputGradient<'_> {
    fn run<T: Float>(
        &self,
        (g, gl): (&CpuStorage, &Layout),
        (w_in, w_in_l): (&CpuStorage, &Layout),
        (w_out, w_out_l): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, l, e) = self.input.dims3()?;
        let g = slice::<T>(g, gl, WHAT)?;
        let (w_in, w_out) = (
            Matrix::of(w_in, w_in_l, WHAT)?,
            Matrix::of(w_out, w_out_l, WHAT)?,
        );
        let qkv = T::elements(self.qkv)
            .ok_or_else(|| candle_core::Error::Msg(format!("{WHAT}: dtypes differ")))?;
        if g.len() != n * l * e || qkv.len() != n * l * 3 * e {
            candle_core::bail!(
                "{WHAT} backward: a gradient of {:?} for an input of {:?}",
                gl.dims(),
                self.input.dims()
            );
        }
        let grad_context = w_out.t().times(g, None)?;
        let (heads, d) = (self.heads, e / self.heads);
        let scale = T::of(self.scale);
        // Each image's heads write their `dq`, `dk`, `dv` columns of `N L x 3E`, as the input
        // projection wrote `q, k, v`.
        let threads = gemm_threads(n);
        let mut grad_qkv = vec![T::default(); n * l * 3 * e];
        for_each_image(
            &mut grad_qkv,
            l * 3 * e,
            l * l,
            threads,
            |i, out, scores| {
                let tokens = &qkv[i * l * 3 * e..];
                for h in 0..heads {
                    let head =
                        |part: usize| Matrix::new(&tokens[part * e + h * d..], (l, d), (3 * e, 1));
                    let g = Matrix::new(&grad_context[i * l * e + h * d..], (l, d), (e, 1))?;
                    let column = |part: usize| part * e + h * d;
                    head(0)?.product_into_on(&head(1)?.t(), scores, (l, 1), false, threads)?;
                    let p = softmax_rows(scores, l);
                    Matrix::new(&p, (l, l), (l, 1))?.t().product_into_on(
                        &g,
                        &mut out[column(2)..],
                        (3 * e, 1),
                        false,
                        threads,
                    )?;
                    g.product_into_on(&head(2)?.t(), scores, (l, 1), false, threads)?;
                    let ds = softmax_rows_backward(scores, &p, l);
                    let ds = Matrix::new(&ds, (l, l), (l, 1))?;
                    ds.t().product_into_on(
                        &head(0)?,
                        &mut out[column(1)..],
                        (3 * e, 1),
                        false,
                        threads,
                    )?;
                    ds.product_into_on(
                        &head(1)?,
                        &mut out[column(0)..],
                        (3 * e, 1),
                        false,
                        threads,
                    )?;
                    for row in out.chunks_mut(3 * e) {
                        row[column(0)..column(0) + d]
                            .iter_mut()
                            .for_each(|v| *v = *v * scale);
                    }
                }
                Ok(())
            },
        )?;
        Ok((
            T::storage(w_in.t().times(&grad_qkv, None)?),
            self.input.clone(),
        ))
    }
}

impl CustomOp3 for InputGradient<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-self-attention-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        w_in: &CpuStorage,
        w_in_l: &Layout,
        w_out: &CpuStorage,
        w_out_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match g.dtype() {
            DType::F32 => self.run::<f32>((g, gl), (w_in, w_in_l), (w_out, w_out_l)),
            DType::F64 => self.run::<f64>((g, gl), (w_in, w_in_l), (w_out, w_out_l)),
            other => candle_core::bail!("{WHAT} backward: f32 or f64, not {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    fn randn(shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
    }

    #[test]
    fn equals_its_tensor_ops_with_the_same_input_gradient() -> Result<()> {
        // One image takes the path where each GEMM runs on all threads, two (on two threads) the
        // one where the images run side by side.
        for (n, heads, biases) in [(2, 1, true), (2, 3, true), (2, 3, false), (1, 3, true)] {
            let (l, e) = (5, 6);
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
