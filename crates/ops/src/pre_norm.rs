//! A pre-norm transformer sublayer, `x + f(LayerNorm(x))` (each ViT block has two: `f` the
//! self-attention, then the feed-forward block), with the normalisation and the residual add
//! done inside `f`'s op.
//!
//! As three ops, candle's graph keeps the normalised tokens (`f`'s input) and `f`'s output (the
//! add's input) until the backward pass ends: two copies of the tokens per sublayer, which
//! PyTorch frees. Inside the op both live only during the forward pass; the backward pass
//! recomputes the normalisation's statistics from `x`, which the graph keeps anyway.

use crate::cpu_kernels::{same_shape_backward, Float, SameShapeKernel};
use crate::layer_norm::{layer_norm, LayerNorm};
use candle_core::{Result, Tensor};

/// The LayerNorm over the last axis that opens a pre-norm sublayer: its scale, shift and `eps`.
#[derive(Debug, Clone, Copy)]
pub struct PreNorm<'a> {
    /// The scale, one value per channel.
    pub weight: &'a Tensor,
    /// The shift, one value per channel.
    pub bias: Option<&'a Tensor>,
    /// Added to the variance.
    pub eps: f64,
}

impl PreNorm<'_> {
    /// `x` normalised (by [`layer_norm`]).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight, self.bias, self.eps)
    }

    /// The residual wrapping for a sublayer op on `x` when the normalisation has a CPU kernel
    /// (constant scale and shift, an f32 or f64 CPU tensor); `None` when candle's ops must run.
    pub(crate) fn residual(&self, x: &Tensor) -> Result<Option<Residual>> {
        Ok(LayerNorm::constant(x, self.weight, self.bias, self.eps)?.map(Residual))
    }
}

/// `x + f(norm(x))` around a sublayer op's kernel `f`, on rows of the last axis.
pub(crate) struct Residual(LayerNorm);

impl Residual {
    /// `f`'s input: `x` normalised.
    pub(crate) fn normalise<T: Float>(&self, x: &[T]) -> Vec<T> {
        self.0.forward(x)
    }

    /// Adds the sublayer's input `x` to `f`'s output `out`.
    pub(crate) fn add_input<T: Float>(out: &mut [T], x: &[T]) {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o += v);
    }

    /// The gradient of `x + f(norm(x))` with respect to `x`: the output's gradient `grad` plus
    /// the normalisation's backward of `f`'s input gradient `grad_normalised`.
    pub(crate) fn input_gradient(
        &self,
        x: &Tensor,
        grad: &Tensor,
        grad_normalised: &Tensor,
    ) -> Result<Tensor> {
        same_shape_backward(&self.0, grad_normalised, x)? + grad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::feed_forward::{feed_forward, pre_norm_feed_forward, Linear};
    use crate::self_attention::{pre_norm_self_attention, self_attention};
    use candle_core::{DType, Device, Var};
    use vulnmap_testkit::max_diff;

    /// A sublayer's output from the fused op and from its three steps.
    type OursAndTheirs<'a> = Box<dyn Fn(&Tensor) -> Result<(Tensor, Tensor)> + 'a>;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = vulnmap_data::random::rng(seed, "pre-norm test");
        vulnmap_data::random::randn(&mut rng, shape, &Device::Cpu)?.to_dtype(DType::F64)
    }

    /// Both sublayers, each against its three steps on candle's ops (the normalisation by
    /// `layer_norm::by_tensor_ops`, the add by candle): the same value and input gradient (f64),
    /// with and without the norm's shift; a second backward pass gives the same gradient.
    #[test]
    fn both_sublayers_equal_their_three_steps_in_value_and_input_gradient() -> Result<()> {
        let (n, l, e) = (2, 5, 6);
        let x = Var::from_tensor(&randn(&[n, l, e], 1)?)?;
        let (scale, shift) = ((randn(&[e], 2)? + 1.0)?, randn(&[e], 3)?);
        let (w1, b1, w2, b2) = (
            randn(&[e, 10], 4)?,
            randn(&[10], 5)?,
            randn(&[10, e], 6)?,
            randn(&[e], 7)?,
        );
        let (w_in, b_in) = ((randn(&[e, 3 * e], 8)? * 0.5)?, randn(&[3 * e], 9)?);
        let (w_out, b_out) = (randn(&[e, e], 10)?, randn(&[e], 11)?);
        let layer = |weight, bias| Linear {
            weight,
            bias: Some(bias),
        };
        let probe = randn(&[n, l, e], 12)?;
        for shift in [Some(&shift), None] {
            let norm = PreNorm {
                weight: &scale,
                bias: shift,
                eps: 1e-5,
            };
            let normalised =
                |x: &Tensor| crate::layer_norm::by_tensor_ops(x, norm.weight, norm.bias, norm.eps);
            let pairs: [(&str, OursAndTheirs); 2] = [
                (
                    "feed-forward",
                    Box::new(|x: &Tensor| {
                        let (first, second) = (layer(&w1, &b1), layer(&w2, &b2));
                        let ours = pre_norm_feed_forward(x, norm, first, Activation::Gelu, second)?;
                        let theirs =
                            (x + feed_forward(&normalised(x)?, first, Activation::Gelu, second)?)?;
                        Ok((ours, theirs))
                    }),
                ),
                (
                    "self-attention",
                    Box::new(|x: &Tensor| {
                        let (input, output) = (layer(&w_in, &b_in), layer(&w_out, &b_out));
                        let ours = pre_norm_self_attention(x, norm, input, output, 3, 0.4)?;
                        let theirs = (x + self_attention(&normalised(x)?, input, output, 3, 0.4)?)?;
                        Ok((ours, theirs))
                    }),
                ),
            ];
            for (what, pair) in pairs {
                let (ours, theirs) = pair(x.as_tensor())?;
                assert!(max_diff(&ours, &theirs) < 1e-12, "{what}: value");
                let loss = (&ours * &probe)?.sum_all()?;
                let get = |g: candle_core::backprop::GradStore| {
                    g.get(x.as_tensor()).cloned().expect("an input gradient")
                };
                let (g_ours, g_again) = (get(loss.backward()?), get(loss.backward()?));
                let g_theirs = get((&theirs * &probe)?.sum_all()?.backward()?);
                let d = max_diff(&g_ours, &g_theirs);
                assert!(d < 1e-10, "{what}: gradient differs by {d}");
                assert_eq!(max_diff(&g_ours, &g_again), 0.0, "{what}: second pass");
            }
        }
        Ok(())
    }

    #[test]
    fn both_sublayers_input_gradients_match_finite_differences() -> Result<()> {
        let e = 4;
        let (scale, shift) = ((randn(&[e], 13)? + 1.0)?, randn(&[e], 14)?);
        let norm = PreNorm {
            weight: &scale,
            bias: Some(&shift),
            eps: 1e-5,
        };
        let (w1, w2) = (randn(&[e, 6], 15)?, randn(&[6, e], 16)?);
        let (w_in, w_out) = ((randn(&[e, 3 * e], 17)? * 0.5)?, randn(&[e, e], 18)?);
        let plain = |weight| Linear { weight, bias: None };
        let x = randn(&[2, 3, e], 19)?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| pre_norm_feed_forward(x, norm, plain(&w1), Activation::Silu, plain(&w2)),
            1e-6,
            1e-7,
        )?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &x,
            |x| pre_norm_self_attention(x, norm, plain(&w_in), plain(&w_out), 2, 0.5),
            1e-6,
            1e-7,
        )?;
        Ok(())
    }

    /// A trained scale takes candle's ops, so its gradient still arrives.
    #[test]
    fn a_trained_scale_still_gets_its_gradient() -> Result<()> {
        let e = 4;
        let scale = Var::from_tensor(&randn(&[e], 20)?)?;
        let norm = PreNorm {
            weight: scale.as_tensor(),
            bias: None,
            eps: 1e-5,
        };
        let (w1, w2) = (randn(&[e, 6], 21)?, randn(&[6, e], 22)?);
        let plain = |weight| Linear { weight, bias: None };
        let y = pre_norm_feed_forward(
            &randn(&[3, e], 23)?,
            norm,
            plain(&w1),
            Activation::Gelu,
            plain(&w2),
        )?;
        assert!(y.sum_all()?.backward()?.get(scale.as_tensor()).is_some());
        Ok(())
    }
}
