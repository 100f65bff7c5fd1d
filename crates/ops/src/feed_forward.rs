//! A transformer's or ConvNeXt's feed-forward block, `act(x W1 + b1) W2 + b2` with constant
//! weights, as one op.
//!
//! As three ops, candle's autograd keeps the hidden pre-activation and the activation (each four
//! times the block's width, the largest tensors of such a network) and accumulates a gradient
//! for each through a zeroed tensor and an add. Here the activation lives only inside the
//! forward pass and the backward pass keeps only the pre-activation, as PyTorch does for
//! layers whose weights need no gradient. [`pre_norm_feed_forward`] is a pre-norm transformer
//! block's sublayer around it (see [`crate::pre_norm`]).

use crate::activation::Activation;
use crate::cpu_kernels::{constant_values, slice, Float, SameShapeKernel};
use crate::linear::{matmul_by_constant, Matrix};
use crate::pre_norm::{PreNorm, Residual};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// A linear layer's constant weight (`K x M`, as `x W`) and optional bias (`M` values).
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a> {
    /// The weight, `K x M`.
    pub weight: &'a Tensor,
    /// The bias, `M` values.
    pub bias: Option<&'a Tensor>,
}

/// `activation(x W1 + b1) W2 + b2` for `x` of shape `(..., K)`, batch dimensions kept.
///
/// One op on the CPU (f32, f64) when the weights and biases need no gradient; otherwise (trained
/// weights, other devices) [`matmul_by_constant`] and [`Activation::apply`], which give the same
/// value.
pub fn feed_forward(
    x: &Tensor,
    first: Linear,
    activation: Activation,
    second: Linear,
) -> Result<Tensor> {
    if !has_kernel(x, first, second)? {
        let hidden = activation.apply(&matmul_by_constant(x, first.weight, first.bias)?)?;
        return matmul_by_constant(&hidden, second.weight, second.bias);
    }
    op(x, first, activation, second, None)
}

/// `x + feed_forward(norm(x))`, a pre-norm transformer block's feed-forward sublayer (see
/// [`crate::pre_norm`]): one op where [`feed_forward`] is one and the normalisation has a kernel,
/// else the three steps.
pub fn pre_norm_feed_forward(
    x: &Tensor,
    norm: PreNorm,
    first: Linear,
    activation: Activation,
    second: Linear,
) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)?;
    let residual = match has_kernel(x, first, second)? && second.weight.dim(1)? == width {
        true => norm.residual(x)?,
        false => None,
    };
    match residual {
        Some(residual) => op(x, first, activation, second, Some(residual)),
        None => x + feed_forward(&norm.apply(x)?, first, activation, second)?,
    }
}

/// Whether the op runs for `x` with these layers: constant weights and biases that fit, an f32 or
/// f64 CPU tensor.
fn has_kernel(x: &Tensor, first: Linear, second: Linear) -> Result<bool> {
    let (w1, w2) = (first.weight, second.weight);
    let constant_bias = |b: Option<&Tensor>, w: &Tensor| {
        b.is_none_or(|b| {
            !b.track_op() && b.rank() == 1 && Some(b.elem_count()) == w.dims().get(1).copied()
        })
    };
    Ok(x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.rank() >= 2
        && x.elem_count() > 0
        && [w1, w2].iter().all(|w| {
            !w.track_op() && w.rank() == 2 && w.elem_count() > 0 && w.dtype() == x.dtype()
        })
        && constant_bias(first.bias, w1)
        && constant_bias(second.bias, w2)
        && w1.dim(0)? == x.dim(candle_core::D::Minus1)?
        && w1.dim(1)? == w2.dim(0)?)
}

/// The op, after [`has_kernel`] said yes.
fn op(
    x: &Tensor,
    first: Linear,
    activation: Activation,
    second: Linear,
    residual: Option<Residual>,
) -> Result<Tensor> {
    let as_matrix = |w: &Tensor| -> Result<Tensor> {
        if w.is_contiguous() || w.t()?.is_contiguous() {
            Ok(w.clone())
        } else {
            w.contiguous()
        }
    };
    let values = |b: Option<&Tensor>, w: &Tensor| -> Result<Option<Vec<f64>>> {
        b.map(|b| constant_values(b, w.dim(1)?, WHAT)).transpose()
    };
    let op = FeedForward {
        first_bias: values(first.bias, first.weight)?,
        second_bias: values(second.bias, second.weight)?,
        activation,
        residual,
        pre_activation: Mutex::new(None),
        keep: x.track_op(),
    };
    x.contiguous()?
        .apply_op3(&as_matrix(first.weight)?, &as_matrix(second.weight)?, op)
}

/// The op on `(x, W1, W2)`; it keeps the pre-activation `x W1 + b1` of its forward pass for its
/// backward pass (freed with the graph that holds the op).
struct FeedForward {
    first_bias: Option<Vec<f64>>,
    second_bias: Option<Vec<f64>>,
    activation: Activation,
    /// The pre-norm sublayer's normalisation and residual add around the block, if fused.
    residual: Option<Residual>,
    pre_activation: Mutex<Option<CpuStorage>>,
    /// Whether a backward pass can follow (the input is tracked): else nothing is kept.
    keep: bool,
}

const WHAT: &str = "feed-forward block";

impl FeedForward {
    fn run<T: Float>(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w1, w1l): (&CpuStorage, &Layout),
        (w2, w2l): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(x, xl, WHAT)?;
        let (w1, w2) = (Matrix::of(w1, w1l, WHAT)?, Matrix::of(w2, w2l, WHAT)?);
        let bias = |b: &Option<Vec<f64>>| -> Option<Vec<T>> {
            b.as_ref().map(|b| b.iter().map(|&v| T::of(v)).collect())
        };
        let pre = match &self.residual {
            Some(residual) => w1.times(&residual.normalise(x), bias(&self.first_bias).as_deref()),
            None => w1.times(x, bias(&self.first_bias).as_deref()),
        }?;
        let hidden = self.activation.forward(&pre);
        // Kept for a backward pass, or freed now.
        let pre = self.keep.then_some(pre);
        let mut out = w2.times(&hidden, bias(&self.second_bias).as_deref())?;
        if self.residual.is_some() {
            Residual::add_input(&mut out, x);
        }
        if let Some(pre) = pre {
            *self
                .pre_activation
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))? =
                Some(T::storage(pre));
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 2") = w2.cols;
        Ok((T::storage(out), Shape::from(dims)))
    }
}

impl CustomOp3 for FeedForward {
    fn name(&self) -> &'static str {
        "vulnmap-feed-forward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w1: &CpuStorage,
        w1l: &Layout,
        w2: &CpuStorage,
        w2l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>((x, xl), (w1, w1l), (w2, w2l)),
            DType::F64 => self.run::<f64>((x, xl), (w1, w1l), (w2, w2l)),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w1: &Tensor,
        w2: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .pre_activation
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: a poisoned lock")))?;
        let Some(pre_activation) = saved.as_ref() else {
            candle_core::bail!("{WHAT}: backward before forward");
        };
        let backward = InputGradient {
            activation: self.activation,
            pre_activation,
            input: x.shape().clone(),
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(w1, w2, &backward)?;
        let dx = match &self.residual {
            Some(residual) => residual.input_gradient(x, grad, &dx)?,
            None => dx,
        };
        Ok((Some(dx), None, None))
    }
}

/// `(grad, W1, W2) -> ((grad W2^T) * act'(pre-activation)) W1^T`, the input's gradient.
struct InputGradient<'a> {
    activation: Activation,
    pre_activation: &'a CpuStorage,
    input: Shape,
}

impl InputGradient<'_> {
    fn run<T: Float>(
        &self,
        (g, gl): (&CpuStorage, &Layout),
        (w1, w1l): (&CpuStorage, &Layout),
        (w2, w2l): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice::<T>(g, gl, WHAT)?;
        let (w1, w2) = (Matrix::of(w1, w1l, WHAT)?, Matrix::of(w2, w2l, WHAT)?);
        let pre = T::elements(self.pre_activation)
            .ok_or_else(|| candle_core::Error::Msg(format!("{WHAT}: dtypes differ")))?;
        let mut hidden = w2.t().times(g, None)?;
        if hidden.len() != pre.len() {
            candle_core::bail!(
                "{WHAT} backward: a gradient of {:?} for an input of {:?}",
                gl.dims(),
                self.input.dims()
            );
        }
        self.activation.backward_in_place(&mut hidden, pre);
        Ok((T::storage(w1.t().times(&hidden, None)?), self.input.clone()))
    }
}

impl CustomOp3 for InputGradient<'_> {
    fn name(&self) -> &'static str {
        "vulnmap-feed-forward-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        w1: &CpuStorage,
        w1l: &Layout,
        w2: &CpuStorage,
        w2l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match g.dtype() {
            DType::F32 => self.run::<f32>((g, gl), (w1, w1l), (w2, w2l)),
            DType::F64 => self.run::<f64>((g, gl), (w1, w1l), (w2, w2l)),
            other => candle_core::bail!("{WHAT} backward: f32 or f64, not {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = vulnmap_data::random::rng(seed, "feed-forward test");
        vulnmap_data::random::randn(&mut rng, shape, &Device::Cpu)?.to_dtype(DType::F64)
    }

    /// Value and input gradient equal to the three ops' (candle's products around the
    /// activation op, whose own gradient is checked in `activation`; f64), for every activation,
    /// a transposed weight, biases or none, and a batched `x`; a second backward pass over the
    /// same graph gives the same gradient.
    #[test]
    fn equals_its_three_ops_in_value_and_input_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 5, 7], 1)?)?;
        let w1 = randn(&[7, 12], 2)?;
        let w1_cols = randn(&[12, 7], 3)?.t()?;
        let (b1, w2, b2) = (randn(&[12], 4)?, randn(&[12, 3], 5)?, randn(&[3], 6)?);
        let probe = randn(&[2, 5, 3], 7)?;
        let activations = [
            Activation::Gelu,
            Activation::Silu,
            Activation::HardSwish,
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
        ];
        for act in activations {
            for (w1, b1, b2) in [
                (&w1, Some(&b1), Some(&b2)),
                (&w1_cols, None, Some(&b2)),
                (&w1, Some(&b1), None),
            ] {
                let first = Linear {
                    weight: w1,
                    bias: b1,
                };
                let second = Linear {
                    weight: &w2,
                    bias: b2,
                };
                let ours = feed_forward(x.as_tensor(), first, act, second)?;
                let mut pre = x.as_tensor().broadcast_matmul(w1)?;
                if let Some(b) = b1 {
                    pre = pre.broadcast_add(b)?;
                }
                let hidden = act.apply(&pre)?;
                let mut theirs = hidden.broadcast_matmul(&w2)?;
                if let Some(b) = b2 {
                    theirs = theirs.broadcast_add(b)?;
                }
                assert!(max_diff(&ours, &theirs) < 1e-12, "{act:?} value");
                let loss = (&ours * &probe)?.sum_all()?;
                let g_ours = loss.backward()?;
                let g_again = loss.backward()?;
                let g_theirs = (&theirs * &probe)?.sum_all()?.backward()?;
                let get = |g: &candle_core::backprop::GradStore| {
                    g.get(x.as_tensor()).cloned().expect("an input gradient")
                };
                let d = max_diff(&get(&g_ours), &get(&g_theirs));
                assert!(d < 1e-10, "{act:?} gradient differs by {d}");
                assert_eq!(max_diff(&get(&g_ours), &get(&g_again)), 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn its_gradient_matches_finite_differences() -> Result<()> {
        let (w1, b1) = (randn(&[4, 6], 8)?, randn(&[6], 9)?);
        let (w2, b2) = (randn(&[6, 3], 10)?, randn(&[3], 11)?);
        let x = randn(&[2, 3, 4], 12)?;
        let first = Linear {
            weight: &w1,
            bias: Some(&b1),
        };
        let second = Linear {
            weight: &w2,
            bias: Some(&b2),
        };
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| feed_forward(x, first, Activation::Gelu, second),
            1e-6,
            1e-7,
        )?;
        Ok(())
    }

    /// Weights that are trained get candle's ops, so their gradients still arrive.
    #[test]
    fn a_tracked_weight_still_gets_its_gradient() -> Result<()> {
        let x = randn(&[4, 3], 13)?;
        let w1 = Var::from_tensor(&randn(&[3, 5], 14)?)?;
        let w2 = randn(&[5, 2], 15)?;
        let first = Linear {
            weight: w1.as_tensor(),
            bias: None,
        };
        let second = Linear {
            weight: &w2,
            bias: None,
        };
        let grads = feed_forward(&x, first, Activation::Silu, second)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(w1.as_tensor()).is_some());
        Ok(())
    }
}
