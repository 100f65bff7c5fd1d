//! ONNX operators on candle tensors, each differentiable where a gradient can flow.
//!
//! A node is evaluated by [`eval`] from its operator name, attributes and input tensors. The
//! convolutions, pooling and resizing run on vulnmap's own ops (fast CPU kernels with backward
//! passes); everything else is candle tensor arithmetic, whose autograd gives the backward pass.
//! Softmax and the normalisations are written from primitives because candle-nn's fused
//! versions have no backward pass.

mod elementwise;
mod nn;
mod shape;

pub(crate) use nn::batch_norm_affine;

use crate::proto::{attribute_type, AttributeProto};
use candle_core::{bail, DType, Result, Tensor};
use vulnmap_ops::activation::Activation;

/// The operators of the default (`ai.onnx`) domain this crate runs.
pub(crate) const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "ScatterND",
    "Shape",
    "Sigmoid",
    "Sin",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// The operator a convolution and the Add and Relu after it become when they are fused (see
/// [`crate::fuse`]); not an ONNX operator.
pub(crate) const FUSED_CONV: &str = "vulnmap.FusedConv";

/// What the exported form of GELU (`x / sqrt 2 -> Erf -> + 1 -> x * -> * 0.5`) becomes when fused.
pub(crate) const FUSED_GELU: &str = "vulnmap.Gelu";

/// What `x * Sigmoid(x)` (SiLU, swish) becomes when fused.
pub(crate) const FUSED_SILU: &str = "vulnmap.Silu";

/// What a `BatchNormalization` and the `Relu` after it become when fused (the BatchNorm's inputs).
pub(crate) const FUSED_BN_RELU: &str = "vulnmap.BatchNormRelu";

/// What `MatMul(x, W)` and the `Add` of a constant bias after it become when fused: inputs
/// `x, W, bias`.
pub(crate) const FUSED_LINEAR: &str = "vulnmap.Linear";

/// What a feed-forward block, [`FUSED_LINEAR`] -> GELU, SiLU or HardSwish -> [`FUSED_LINEAR`],
/// becomes when fused: inputs `x, W1, b1, W2, b2`, attribute `activation`.
pub(crate) const FUSED_FEED_FORWARD: &str = "vulnmap.FeedForward";

/// What ConvNeXt's `Transpose(0, 2, 3, 1) -> LayerNormalization -> FUSED_FEED_FORWARD ->
/// Transpose(0, 3, 1, 2) [-> Mul(scale)]` becomes when fused: inputs `x, norm scale, norm bias,
/// W1, b1, W2, b2, scale` (the biases and the scale optional), attributes `activation`, `epsilon`.
pub(crate) const FUSED_NORMALIZED_FEED_FORWARD: &str = "vulnmap.NormalizedFeedForward";

/// What `Transpose(0, 2, 3, 1) -> LayerNormalization(-1) -> Transpose(0, 3, 1, 2)` (a LayerNorm
/// over the channels, ConvNeXt's `LayerNorm2d`) becomes when fused: the LayerNormalization's
/// inputs and `epsilon`.
pub(crate) const FUSED_CHANNEL_LAYER_NORM: &str = "vulnmap.ChannelLayerNorm";

/// What `MatMul(a, b) -> Softmax -> MatMul(weights, v)` (attention) becomes when fused: inputs
/// `a, b, v`.
pub(crate) const FUSED_ATTENTION: &str = "vulnmap.Attention";

/// What an exported self-attention block (torchvision's `nn.MultiheadAttention` from the
/// in-projection through the heads' reshapes, transposes and gathers, the scaled attention and
/// the out-projection `Gemm` to the closing `Transpose`; timm's `Attention` from its qkv layer to
/// its out-projection) becomes when fused: inputs `x, W_in, b_in, W_out, b_out` and the queries'
/// reshape target, whose last value is `d` (computed from the input's size, once per plan);
/// attribute `transB` when `W_out` is stored `out x in` (torchvision's `Gemm`), `scale` when the
/// export's was a constant, else `1 / √d`.
pub(crate) const FUSED_SELF_ATTENTION: &str = "vulnmap.SelfAttention";

/// The attribute of a [`FUSED_FEED_FORWARD`] or [`FUSED_SELF_ATTENTION`] node into which a
/// pre-norm transformer sublayer's `LayerNormalization` before it and residual `Add` after it
/// were fused: the norm's epsilon. Its scale and shift follow the node's own inputs (at 5 and 6
/// for the feed-forward block, 6 and 7 for the self-attention), and the node computes
/// `x + f(LayerNorm(x))`.
pub(crate) const PRE_NORM_EPSILON: &str = "pre_norm_epsilon";

/// What a chain of `Add`, `Sub`, `Mul` and `Div` with constants (an input's normalisation)
/// becomes when fused: `x * scale + shift`, inputs `x, scale, shift` (constants of broadcast
/// shapes).
pub(crate) const FUSED_AFFINE: &str = "vulnmap.Affine";

/// What an evaluation needs beyond the node: the opset (attribute meanings changed over
/// versions) and whether rectifiers backpropagate guided gradients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    /// The model's `ai.onnx` opset.
    pub opset: i64,
    /// Guided backpropagation: ReLUs pass only positive gradients back.
    pub guided: bool,
    /// Where nodes without inputs (constants) put their values.
    pub device: &'a candle_core::Device,
}

/// A node's attributes, looked up by name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attrs<'a>(pub &'a [AttributeProto]);

impl<'a> Attrs<'a> {
    fn find(&self, name: &str) -> Option<&'a AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }

    /// An integer attribute, or `default`.
    pub(crate) fn int(&self, name: &str, default: i64) -> i64 {
        self.find(name).map_or(default, |a| a.i)
    }

    /// A float attribute, or `default`.
    pub(crate) fn float(&self, name: &str, default: f32) -> f32 {
        self.find(name).map_or(default, |a| a.f)
    }

    /// An integer-list attribute, if present.
    pub(crate) fn ints(&self, name: &str) -> Option<&'a [i64]> {
        self.find(name)
            .filter(|a| a.r#type == attribute_type::INTS || !a.ints.is_empty())
            .map(|a| a.ints.as_slice())
    }

    /// A string attribute, or `default`.
    pub(crate) fn string(&self, name: &str, default: &str) -> String {
        self.find(name).map_or(default.to_string(), |a| {
            String::from_utf8_lossy(&a.s).into_owned()
        })
    }

    /// The attribute itself, for the kinds an operator reads directly (tensors, float lists).
    pub(crate) fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.find(name)
    }
}

/// The inputs of one node: `None` where an optional input is left out.
pub(crate) struct Inputs<'a>(pub &'a [Option<&'a Tensor>]);

impl<'a> Inputs<'a> {
    /// Input `i`, which the operator requires.
    pub(crate) fn req(&self, i: usize) -> Result<&'a Tensor> {
        match self.0.get(i) {
            Some(Some(t)) => Ok(t),
            _ => bail!("input {i} is required"),
        }
    }

    /// Input `i`, if given.
    pub(crate) fn opt(&self, i: usize) -> Option<&'a Tensor> {
        self.0.get(i).copied().flatten()
    }

    /// All given inputs, in order.
    pub(crate) fn all(&self) -> Vec<&'a Tensor> {
        self.0.iter().copied().flatten().collect()
    }
}

/// The integer values of a (shape, axes, indices) tensor.
pub(crate) fn ints_of(t: &Tensor) -> Result<Vec<i64>> {
    if t.dtype() == DType::I64 {
        t.flatten_all()?.to_vec1::<i64>()
    } else {
        t.to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
            .map(|v| v.into_iter().map(|x| x as i64).collect())
    }
}

/// The float values of a small tensor (a clip bound, a scale).
pub(crate) fn floats_of(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// `axis` (negative counts from the end) as an index into `rank` dimensions.
pub(crate) fn axis(axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Evaluates one node: `op_type` with `attrs` on `inputs`, giving `outputs` tensors.
pub(crate) fn eval(
    op_type: &str,
    attrs: Attrs,
    inputs: &[Option<&Tensor>],
    outputs: usize,
    ctx: Context,
) -> Result<Vec<Tensor>> {
    let inputs = Inputs(inputs);
    let one = |t: Tensor| Ok(vec![t]);
    match op_type {
        "Identity" | "Dropout" => {
            if outputs > 1 {
                bail!("Dropout's mask output is not supported (inference only)");
            }
            one(inputs.req(0)?.clone())
        }
        "Conv" => one(nn::conv(&inputs, attrs, None, None, ctx)?),
        FUSED_GELU => one(Activation::Gelu.apply(inputs.req(0)?)?),
        FUSED_SILU => one(Activation::Silu.apply(inputs.req(0)?)?),
        FUSED_LINEAR => one(nn::linear(inputs.req(0)?, inputs.req(1)?, inputs.req(2)?)?),
        FUSED_FEED_FORWARD => one(nn::feed_forward(&inputs, attrs)?),
        FUSED_NORMALIZED_FEED_FORWARD => one(nn::normalized_feed_forward(&inputs, attrs)?),
        FUSED_ATTENTION => one(nn::attention(
            inputs.req(0)?,
            inputs.req(1)?,
            inputs.req(2)?,
        )?),
        FUSED_SELF_ATTENTION => one(nn::self_attention(&inputs, attrs)?),
        FUSED_AFFINE => one(elementwise::affine(
            inputs.req(0)?,
            inputs.req(1)?,
            inputs.req(2)?,
        )?),
        FUSED_CONV => {
            let relu = (attrs.int("relu", 0) != 0).then(|| {
                let max = attrs.float("relu_max", f32::INFINITY);
                max.is_finite().then_some(max as f64)
            });
            one(nn::conv(&inputs, attrs, inputs.opt(3), relu, ctx)?)
        }
        "BatchNormalization" => one(nn::batch_norm(&inputs, attrs, outputs, false)?),
        FUSED_BN_RELU => one(elementwise::rectify(
            nn::batch_norm(&inputs, attrs, outputs, true)?,
            ctx,
        )?),
        "InstanceNormalization" => one(nn::instance_norm(&inputs, attrs)?),
        "GroupNormalization" => one(nn::group_norm(&inputs, attrs)?),
        "LayerNormalization" => nn::layer_norm(&inputs, attrs, outputs),
        FUSED_CHANNEL_LAYER_NORM => one(vulnmap_ops::layer_norm::layer_norm_channels(
            inputs.req(0)?,
            &inputs.req(1)?.flatten_all()?,
            inputs.opt(2).map(|b| b.flatten_all()).transpose()?.as_ref(),
            attrs.float("epsilon", 1e-5) as f64,
        )?),
        "MaxPool" => one(nn::max_pool(&inputs, attrs, outputs)?),
        "AveragePool" => one(nn::average_pool(&inputs, attrs)?),
        // Both axes in one reduction: candle sums trailing contiguous axes as rows, fast; one
        // axis at a time took its strided path, an index computation per element.
        "GlobalAveragePool" => one(inputs.req(0)?.mean_keepdim((2, 3))?),
        "GlobalMaxPool" => {
            let x = inputs.req(0)?;
            let (n, c, _, _) = x.dims4()?;
            one(x.flatten_from(2)?.max_keepdim(2)?.reshape((n, c, 1, 1))?)
        }
        "Gemm" => one(nn::gemm(&inputs, attrs)?),
        "MatMul" => one(nn::matmul(inputs.req(0)?, inputs.req(1)?)?),
        "Einsum" => one(nn::einsum(&attrs.string("equation", ""), &inputs.all())?),
        "Softmax" => one(nn::softmax(inputs.req(0)?, attrs, ctx, false)?),
        "LogSoftmax" => one(nn::softmax(inputs.req(0)?, attrs, ctx, true)?),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceL2" => {
            one(nn::reduce(op_type, &inputs, attrs, ctx)?)
        }
        "Pad" => one(nn::pad(&inputs, attrs, ctx)?),
        "Resize" => one(nn::resize(&inputs, attrs, ctx)?),
        "Shape" | "Reshape" | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" | "Concat"
        | "Split" | "Slice" | "Gather" | "Expand" | "ConstantOfShape" | "Constant" | "Cast"
        | "Range" | "ScatterND" | "CumSum" => shape::eval(op_type, &inputs, attrs, outputs, ctx),
        _ => one(elementwise::eval(op_type, &inputs, attrs, ctx)?),
    }
}
