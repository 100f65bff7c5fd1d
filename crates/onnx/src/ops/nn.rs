//! Network layers: convolution, normalisation, pooling, matrix products, softmax, reductions,
//! padding and resizing.
//!
//! Convolutions run on `vulnmap_ops` (the fused constant-weight kernel, the depthwise kernel,
//! the GEMM backward); normalisations and softmax are written from candle primitives so that
//! their backward passes exist.

use super::elementwise::rectify;
use super::{axis, floats_of, ints_of, Attrs, Context, Inputs};
use candle_core::{bail, DType, Result, Tensor};
use vulnmap_ops::activation::Activation;
use vulnmap_ops::windows::{pad2d, Pad2d};
use vulnmap_ops::{
    conv2d_fused, depthwise_conv2d, depthwise_conv2d_fused, DepthwiseConv2d, Epilogue, Padding,
};

/// The two spatial sizes of a 4-D `N x C x H x W` tensor.
fn spatial(x: &Tensor) -> Result<(usize, usize)> {
    match x.dims() {
        [_, _, h, w] => Ok((*h, *w)),
        dims => bail!("expected a 4-D N x C x H x W tensor, got shape {dims:?}"),
    }
}

/// A square kernel's size from `kernel_shape` (or the weight), refusing rectangular ones where
/// the kernel behind the operator needs them square.
fn square(kernel: (usize, usize), what: &str) -> Result<usize> {
    if kernel.0 != kernel.1 {
        bail!(
            "{what} with a {}x{} kernel: only square kernels are supported",
            kernel.0,
            kernel.1
        );
    }
    Ok(kernel.0)
}

/// One stride for both axes, from `strides`.
fn stride(attrs: Attrs) -> Result<usize> {
    match attrs.ints("strides") {
        None => Ok(1),
        Some([s, t]) if s == t && *s > 0 => Ok(*s as usize),
        Some(s) => bail!("strides {s:?}: only equal positive strides are supported"),
    }
}

/// Refuses dilation, which no supported kernel implements.
fn no_dilation(attrs: Attrs) -> Result<()> {
    match attrs.ints("dilations") {
        Some(d) if d.iter().any(|&d| d != 1) => {
            bail!("dilations {d:?}: dilated kernels are not supported")
        }
        _ => Ok(()),
    }
}

/// The padding `auto_pad` and `pads` ask for, for a `kernel` at `stride` over `input`.
fn padding(
    attrs: Attrs,
    input: (usize, usize),
    kernel: (usize, usize),
    stride: usize,
) -> Result<Pad2d> {
    let same = |n: usize, k: usize, upper: bool| {
        let total = ((n.div_ceil(stride) - 1) * stride + k).saturating_sub(n);
        let small = total / 2;
        if upper {
            (small, total - small)
        } else {
            (total - small, small)
        }
    };
    match attrs.string("auto_pad", "NOTSET").as_str() {
        "NOTSET" => match attrs.ints("pads") {
            None => Ok(Pad2d::default()),
            Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => {
                // A pad wider than both the input and the kernel only adds windows that see
                // nothing but padding; from a damaged file it would be an allocation of any size.
                let most = |n: usize, k: usize| n.max(k) as i64;
                let (mh, mw) = (most(input.0, kernel.0), most(input.1, kernel.1));
                if t > mh || b > mh || l > mw || r > mw {
                    bail!(
                        "pads {:?} exceed the input {input:?} and the kernel {kernel:?}",
                        [t, l, b, r]
                    );
                }
                Ok(Pad2d {
                    top: t as usize,
                    left: l as usize,
                    bottom: b as usize,
                    right: r as usize,
                })
            }
            Some(p) => bail!("pads {p:?}: expected four non-negative values"),
        },
        "VALID" => Ok(Pad2d::default()),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let upper = mode == "SAME_UPPER";
            let (top, bottom) = same(input.0, kernel.0, upper);
            let (left, right) = same(input.1, kernel.1, upper);
            Ok(Pad2d {
                top,
                bottom,
                left,
                right,
            })
        }
        other => bail!("auto_pad `{other}` is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"),
    }
}

/// A depthwise convolution of an already padded `x` with `w` (`C x 1 x k x k`): the CPU kernel,
/// or the device-generic tap sum elsewhere.
fn depthwise(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        depthwise_conv2d(x, w, stride)
    } else {
        DepthwiseConv2d::from_weight(w.clone(), stride, Padding::Uniform(0))?.forward(x)
    }
}

/// The spatial border of a 4-D `Pad`'s `pads` (`N C H W` begins, then ends): `None` unless the
/// batch and channels are not padded and every side is at most a kernel wide (as a convolution's
/// own padding is; a wider one, from a damaged file, is left to `Pad`'s own checks).
fn spatial_border(pads: &[i64], (kh, kw): (usize, usize)) -> Option<Pad2d> {
    let &[n0, c0, t, l, n1, c1, b, r] = pads else {
        return None;
    };
    let fits = |v: i64, k: usize| (0..=k as i64).contains(&v);
    (n0 == 0
        && c0 == 0
        && n1 == 0
        && c1 == 0
        && fits(t, kh)
        && fits(b, kh)
        && fits(l, kw)
        && fits(r, kw))
    .then_some(Pad2d {
        top: t as usize,
        bottom: b as usize,
        left: l as usize,
        right: r as usize,
    })
}

/// `Conv` (and the fused convolution): 2-D, any groups, followed by `+ residual` and a ReLU
/// (`Some(max)`: clipped at `max`) when fused; input 4, when fused, is a zero `Pad`'s `pads`.
pub(super) fn conv(
    inputs: &Inputs,
    attrs: Attrs,
    residual: Option<&Tensor>,
    relu: Option<Option<f64>>,
    ctx: Context,
) -> Result<Tensor> {
    let w = inputs.req(1)?;
    let bias = inputs.opt(2);
    let (cout, cin_per_group, kh, kw) = w.dims4()?;
    // A zero `Pad` before the convolution, fused at load time: its border joins the convolution's
    // own where it is a plain spatial one, or it is applied as the `Pad` node would.
    let fused_border = match inputs.opt(4) {
        Some(pads) => Some((pads, spatial_border(&ints_of(pads)?, (kh, kw)))),
        None => None,
    };
    let padded;
    let (x, extra) = match fused_border {
        Some((_, Some(border))) if attrs.string("auto_pad", "NOTSET") == "NOTSET" => {
            (inputs.req(0)?, border)
        }
        Some((pads, _)) => {
            padded = pad(&Inputs(&[inputs.opt(0), Some(pads)]), Attrs(&[]), ctx)?;
            (&padded, Pad2d::default())
        }
        None => (inputs.req(0)?, Pad2d::default()),
    };
    let (h, wd) = spatial(x)?;
    let cin = x.dim(1)?;
    let groups = attrs.int("group", 1).max(1) as usize;
    if cin != cin_per_group * groups || cout % groups != 0 {
        bail!(
            "weight {:?} with {groups} groups does not fit an input of {cin} channels",
            w.dims()
        );
    }
    no_dilation(attrs)?;
    let stride = stride(attrs)?;
    let own = padding(attrs, (h, wd), (kh, kw), stride)?;
    let pad = Pad2d {
        top: own.top + extra.top,
        bottom: own.bottom + extra.bottom,
        left: own.left + extra.left,
        right: own.right + extra.right,
    };
    let out_h = (h + pad.top + pad.bottom)
        .checked_sub(kh)
        .map(|v| v / stride + 1);
    let out_w = (wd + pad.left + pad.right)
        .checked_sub(kw)
        .map(|v| v / stride + 1);
    let (Some(out_h), Some(out_w)) = (out_h, out_w) else {
        bail!("a {kh}x{kw} kernel does not fit the padded {h}x{wd} input");
    };
    let out_dims = [x.dim(0)?, cout, out_h, out_w];
    let fits = residual.is_none_or(|r| r.dims() == out_dims);
    let epilogue = Epilogue {
        bias,
        residual,
        relu: relu.is_some(),
        relu_max: relu.flatten(),
        relu_backward: if ctx.guided {
            vulnmap_ops::guided::ReluBackward::Guided
        } else {
            vulnmap_ops::guided::ReluBackward::Exact
        },
    };
    let depthwise_kernel = groups == cin && cin_per_group == 1 && cout == cin && kh == kw;
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if depthwise_kernel && cpu && residual.is_none() {
        return depthwise_conv2d_fused(x, w, epilogue, stride, pad);
    }
    if groups == 1 && kh == kw && fits {
        return if pad.is_uniform() {
            conv2d_fused(x, w, epilogue, stride, pad.top)
        } else {
            conv2d_fused(&pad2d(x, pad, 0.0)?, w, epilogue, stride, 0)
        };
    }
    let padded = pad2d(x, pad, 0.0)?;
    let mut y = if depthwise_kernel {
        depthwise(&padded, w, stride)?
    } else if groups == 1 {
        plain_conv(&padded, w, stride)?
    } else {
        let (xs, ws) = (cin / groups, cout / groups);
        let parts = (0..groups)
            .map(|g| {
                plain_conv(
                    &padded.narrow(1, g * xs, xs)?,
                    &w.narrow(0, g * ws, ws)?,
                    stride,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)?
    };
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
    }
    if let Some(r) = residual {
        y = y.broadcast_add(r)?;
    }
    if let Some(max) = relu {
        y = y.relu()?;
        if let Some(max) = max {
            y = y.minimum(max)?;
        }
        y = rectify(y, ctx)?;
    }
    Ok(y)
}

/// An unpadded, ungrouped convolution: the fast-backward one for square kernels, candle's
/// otherwise.
fn plain_conv(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    if w.dim(2)? == w.dim(3)? {
        conv2d_fused(x, w, Epilogue::default(), stride, 0)
    } else {
        x.conv2d(w, 0, stride, 1, 1)
    }
}

/// The shape that broadcasts a per-channel vector over an `N x C x ...` tensor of `rank`.
fn channel_shape(c: usize, rank: usize) -> Vec<usize> {
    let mut shape = vec![1; rank.max(2)];
    shape[1] = c;
    shape
}

/// `BatchNormalization` in inference mode: `x * scale / sqrt(var + eps) + (B - mean * ...)`,
/// then ReLU if `relu` (a following Relu fused at load time, [`super::FUSED_BN_RELU`]).
pub(super) fn batch_norm(
    inputs: &Inputs,
    attrs: Attrs,
    outputs: usize,
    relu: bool,
) -> Result<Tensor> {
    if attrs.int("training_mode", 0) != 0 || outputs > 1 {
        bail!("training-mode BatchNormalization is not supported (export the model in eval mode)");
    }
    let x = inputs.req(0)?;
    let (scale, shift) = batch_norm_affine(
        inputs.req(1)?,
        inputs.req(2)?,
        inputs.req(3)?,
        inputs.req(4)?,
        attrs.float("epsilon", 1e-5) as f64,
    )?;
    if x.device().is_cpu() && !scale.track_op() && !shift.track_op() && x.rank() >= 2 {
        // Constant statistics (every exported model): one op, see `vulnmap_ops::channel_affine`.
        let values = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        return vulnmap_ops::channel_affine::channel_affine(
            x,
            &values(&scale)?,
            &values(&shift)?,
            relu,
        );
    }
    let shape = channel_shape(x.dim(1)?, x.rank());
    let y = x
        .broadcast_mul(&scale.reshape(shape.clone())?)?
        .broadcast_add(&shift.reshape(shape)?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Inference BatchNorm as a per-channel `(scale, shift)`.
pub(crate) fn batch_norm_affine(
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    let shift = beta.sub(&mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// Normalises `x` (`outer x inner`) over its last dimension: `(x - mean) / sqrt(var + eps)`,
/// with the biased variance, as every ONNX normalisation does.
fn standardise(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let mean = x.mean_keepdim(1)?;
    let centred = x.broadcast_sub(&mean)?;
    let inv_std = (centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    Ok((centred.broadcast_mul(&inv_std)?, mean, inv_std))
}

/// `InstanceNormalization`: each image's channel over its spatial positions.
pub(super) fn instance_norm(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let (y, _, _) = standardise(
        &x.reshape((n * c, ()))?,
        attrs.float("epsilon", 1e-5) as f64,
    )?;
    let shape = channel_shape(c, x.rank());
    y.reshape(x.shape())?
        .broadcast_mul(&inputs.req(1)?.reshape(shape.clone())?)?
        .broadcast_add(&inputs.req(2)?.reshape(shape)?)
}

/// `GroupNormalization`: each image's channel groups; scale and bias per channel (opset 21) or
/// per group (opset 18).
pub(super) fn group_norm(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let groups = attrs.int("num_groups", 0);
    if groups <= 0 || c % groups as usize != 0 {
        bail!("num_groups {groups} does not divide {c} channels");
    }
    let g = groups as usize;
    let (y, _, _) = standardise(
        &x.reshape((n * g, ()))?,
        attrs.float("epsilon", 1e-5) as f64,
    )?;
    let per_channel = |t: &Tensor| -> Result<Tensor> {
        let t = t.flatten_all()?;
        let t = if t.elem_count() == g && g != c {
            let idx: Vec<u32> = (0..c).map(|ch| (ch / (c / g)) as u32).collect();
            t.index_select(&Tensor::from_vec(idx, c, t.device())?, 0)?
        } else {
            t
        };
        t.reshape(channel_shape(c, x.rank()))
    };
    y.reshape(x.shape())?
        .broadcast_mul(&per_channel(inputs.req(1)?)?)?
        .broadcast_add(&per_channel(inputs.req(2)?)?)
}

/// `LayerNormalization` over the dimensions from `axis` on; the optional mean and inverse
/// standard deviation outputs too.
pub(super) fn layer_norm(inputs: &Inputs, attrs: Attrs, outputs: usize) -> Result<Vec<Tensor>> {
    let x = inputs.req(0)?;
    let a = axis(attrs.int("axis", -1), x.rank())?;
    let inner: usize = x.dims()[a..].iter().product();
    let outer = x.elem_count() / inner.max(1);
    let eps = attrs.float("epsilon", 1e-5) as f64;
    let scale = inputs.req(1)?;
    let (scale_all, bias_all) = (
        scale.elem_count() == inner,
        inputs.opt(2).is_none_or(|b| b.elem_count() == inner),
    );
    if outputs <= 1 && scale_all && bias_all {
        // The usual case: one output, scale and shift over the whole normalised part.
        let rows = x.reshape((outer, inner))?;
        let bias = inputs.opt(2).map(|b| b.flatten_all()).transpose()?;
        let y =
            vulnmap_ops::layer_norm::layer_norm(&rows, &scale.flatten_all()?, bias.as_ref(), eps)?;
        return Ok(vec![y.reshape(x.shape())?]);
    }
    let (y, mean, inv_std) = standardise(&x.reshape((outer, inner))?, eps)?;
    let mut y = y.reshape(x.shape())?.broadcast_mul(inputs.req(1)?)?;
    if let Some(b) = inputs.opt(2) {
        y = y.broadcast_add(b)?;
    }
    let mut stats_shape = x.dims()[..a].to_vec();
    stats_shape.extend(std::iter::repeat_n(1, x.rank() - a));
    let mut out = vec![
        y,
        mean.reshape(stats_shape.clone())?,
        inv_std.reshape(stats_shape)?,
    ];
    out.truncate(outputs.max(1));
    Ok(out)
}

/// Extra bottom and right padding that `ceil_mode` needs: enough for one more window where one
/// would start inside the input or its leading padding (PyTorch's rule).
fn ceil_extra(size: usize, before: usize, after: usize, k: usize, stride: usize) -> usize {
    let padded = size + before + after;
    if padded < k {
        return 0;
    }
    let mut out = (padded - k).div_ceil(stride) + 1;
    if (out - 1) * stride >= size + before {
        out -= 1;
    }
    ((out - 1) * stride + k).saturating_sub(padded)
}

/// The pooling geometry: square kernel, stride and the total padding (with `ceil_mode`'s extra).
fn pool_geometry(x: &Tensor, attrs: Attrs) -> Result<(usize, usize, Pad2d, Pad2d)> {
    let (h, w) = spatial(x)?;
    let kernel = match attrs.ints("kernel_shape") {
        Some(&[a, b]) if a > 0 && b > 0 => (a as usize, b as usize),
        other => bail!("kernel_shape {other:?}: expected two positive sizes"),
    };
    let k = square(kernel, "pooling")?;
    no_dilation(attrs)?;
    let s = stride(attrs)?;
    let pad = padding(attrs, (h, w), kernel, s)?;
    let mut extra = Pad2d::default();
    if attrs.int("ceil_mode", 0) != 0 {
        extra.bottom = ceil_extra(h, pad.top, pad.bottom, k, s);
        extra.right = ceil_extra(w, pad.left, pad.right, k, s);
    }
    Ok((k, s, pad, extra))
}

/// `MaxPool` (the values only): padding counts as -inf.
pub(super) fn max_pool(inputs: &Inputs, attrs: Attrs, outputs: usize) -> Result<Tensor> {
    if outputs > 1 {
        bail!("MaxPool's indices output is not supported");
    }
    let x = inputs.req(0)?;
    let (k, s, pad, extra) = pool_geometry(x, attrs)?;
    if pad.is_uniform() && extra == Pad2d::default() && pad.top * 2 <= k {
        return vulnmap_ops::pool::max_pool2d(x, k, s, pad.top);
    }
    let total = Pad2d {
        top: pad.top,
        left: pad.left,
        bottom: pad.bottom + extra.bottom,
        right: pad.right + extra.right,
    };
    vulnmap_ops::pool::max_pool2d_padded(x, k, s, total)
}

/// `AveragePool`: window sums by a depthwise convolution of ones, divided by the window's
/// count of pixels (padding counted when `count_include_pad`; `ceil_mode`'s extra never).
pub(super) fn average_pool(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let (k, s, pad, extra) = pool_geometry(x, attrs)?;
    let (n, c, h, w) = x.dims4()?;
    let _ = n;
    let pad_all = |t: &Tensor, pad_value: f64| -> Result<Tensor> {
        pad2d(&pad2d(t, pad, pad_value)?, extra, 0.0)
    };
    let ones_c = Tensor::ones((c, 1, k, k), x.dtype(), x.device())?;
    let sums = depthwise(&pad_all(x, 0.0)?, &ones_c, s)?;
    let include = attrs.int("count_include_pad", 0) != 0;
    let mask = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
    let counts = depthwise(
        &pad_all(&mask, if include { 1.0 } else { 0.0 })?,
        &Tensor::ones((1, 1, k, k), x.dtype(), x.device())?,
        s,
    )?;
    sums.broadcast_div(&counts)
}

/// `Gemm`: `alpha * op(A) op(B) + beta * C`.
pub(super) fn gemm(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let mut a = inputs.req(0)?.clone();
    let mut b = inputs.req(1)?.clone();
    if attrs.int("transA", 0) != 0 {
        a = a.t()?;
    }
    if attrs.int("transB", 0) != 0 {
        b = b.t()?;
    }
    let alpha = attrs.float("alpha", 1.0) as f64;
    let beta = attrs.float("beta", 1.0) as f64;
    let c = inputs.opt(2);
    // A layer's bias (C of N values, beta 1) goes into the product: see `vulnmap_ops::linear`.
    let n = b.dim(1)?;
    let bias = c.filter(|c| {
        alpha == 1.0 && beta == 1.0 && c.elem_count() == n && (c.rank() <= 1 || c.dims() == [1, n])
    });
    if let Some(bias) = bias {
        return vulnmap_ops::linear::matmul_by_constant(&a, &b, Some(&bias.flatten_all()?));
    }
    let mut y = vulnmap_ops::linear::matmul_by_constant(&a, &b, None)?;
    if alpha != 1.0 {
        y = (y * alpha)?;
    }
    if let Some(c) = c {
        let c = if beta != 1.0 { (c * beta)? } else { c.clone() };
        y = y.broadcast_add(&c)?;
    }
    Ok(y)
}

/// `MatMul(x, W)` then `Add(bias)` fused at load time ([`super::FUSED_LINEAR`]).
pub(super) fn linear(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.rank() < 2 || w.rank() != 2 {
        return matmul(x, w)?.broadcast_add(bias);
    }
    vulnmap_ops::linear::matmul_by_constant(x, w, Some(bias))
}

/// `Linear -> activation -> Linear` fused at load time ([`super::FUSED_FEED_FORWARD`]): inputs
/// `x, W1, b1, W2, b2`, the activation named by the `activation` attribute; with a pre-norm
/// sublayer's normalisation fused in, `x + ` the block of `x` normalised.
pub(super) fn feed_forward(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let activation = feed_forward_activation(attrs)?;
    let x = inputs.req(0)?;
    let (w1, b1, w2, b2) = (
        inputs.req(1)?,
        inputs.req(2)?,
        inputs.req(3)?,
        inputs.req(4)?,
    );
    let pre_norm = PreNormInputs::of(inputs, attrs, 5)?;
    if x.rank() < 2 || w1.rank() != 2 || w2.rank() != 2 {
        let block = |x: &Tensor| linear(&activation.apply(&linear(x, w1, b1)?)?, w2, b2);
        return match &pre_norm {
            Some(norm) => x + block(&norm.as_pre_norm().apply(x)?)?,
            None => block(x),
        };
    }
    let layer = |weight, bias| vulnmap_ops::feed_forward::Linear {
        weight,
        bias: Some(bias),
    };
    let (first, second) = (layer(w1, b1), layer(w2, b2));
    match &pre_norm {
        Some(norm) => vulnmap_ops::feed_forward::pre_norm_feed_forward(
            x,
            norm.as_pre_norm(),
            first,
            activation,
            second,
        ),
        None => vulnmap_ops::feed_forward::feed_forward(x, first, activation, second),
    }
}

/// A pre-norm sublayer's LayerNorm fused into a feed-forward or self-attention node
/// ([`super::PRE_NORM_EPSILON`]): its scale and shift, flattened.
struct PreNormInputs {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl PreNormInputs {
    /// The normalisation whose scale and shift are inputs `first` and `first + 1`, if the node
    /// has one.
    fn of(inputs: &Inputs, attrs: Attrs, first: usize) -> Result<Option<Self>> {
        if !attrs.0.iter().any(|a| a.name == super::PRE_NORM_EPSILON) {
            return Ok(None);
        }
        Ok(Some(PreNormInputs {
            weight: inputs.req(first)?.flatten_all()?,
            bias: inputs.opt(first + 1).map(|b| b.flatten_all()).transpose()?,
            eps: attrs.float(super::PRE_NORM_EPSILON, 1e-5) as f64,
        }))
    }

    fn as_pre_norm(&self) -> vulnmap_ops::pre_norm::PreNorm<'_> {
        vulnmap_ops::pre_norm::PreNorm {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            eps: self.eps,
        }
    }
}

/// The activation a fused feed-forward node names.
fn feed_forward_activation(attrs: Attrs) -> Result<Activation> {
    Ok(match attrs.string("activation", "").as_str() {
        "gelu" => Activation::Gelu,
        "silu" => Activation::Silu,
        "hardswish" => Activation::HardSwish,
        other => bail!("activation `{other}` is not one of gelu, silu, hardswish"),
    })
}

/// ConvNeXt's LayerNorm over the channels, feed-forward block and layer scale, fused at load
/// time ([`super::FUSED_NORMALIZED_FEED_FORWARD`]) from the exported transposes around them.
pub(super) fn normalized_feed_forward(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    use vulnmap_ops::channel_feed_forward::{normalized_feed_forward, ChannelNorm};
    use vulnmap_ops::feed_forward::Linear;
    let flat = |i: usize| inputs.opt(i).map(|t| t.flatten_all()).transpose();
    let (norm_weight, norm_bias, scale) = (inputs.req(1)?.flatten_all()?, flat(2)?, flat(7)?);
    let norm = ChannelNorm {
        weight: &norm_weight,
        bias: norm_bias.as_ref(),
        eps: attrs.float("epsilon", 1e-5) as f64,
    };
    let layer = |w: usize| -> Result<Linear> {
        Ok(Linear {
            weight: inputs.req(w)?,
            bias: inputs.opt(w + 1),
        })
    };
    normalized_feed_forward(
        inputs.req(0)?,
        norm,
        layer(3)?,
        feed_forward_activation(attrs)?,
        layer(5)?,
        scale.as_ref(),
    )
}

/// A self-attention block fused at load time ([`super::FUSED_SELF_ATTENTION`]): the heads' width
/// `d` is the last value of the queries' reshape target, the scale the `scale` attribute or `1 /
/// √d`; `transB` says the out-projection's weight is stored `out x in`, as `Gemm`'s.
pub(super) fn self_attention(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let width = x.dim(candle_core::D::Minus1)?;
    let target = ints_of(inputs.req(5)?)?;
    let d = match target.last() {
        Some(&d) if d > 0 && width % d as usize == 0 => d as usize,
        _ => bail!(
            "the queries' reshape target {target:?} does not split {width} channels into heads"
        ),
    };
    let scale = match attrs.0.iter().any(|a| a.name == "scale") {
        true => attrs.float("scale", 1.0) as f64,
        false => 1.0 / (d as f64).sqrt(),
    };
    let output_weight = match attrs.int("transB", 0) {
        0 => inputs.req(3)?.clone(),
        _ => inputs.req(3)?.t()?,
    };
    let input = vulnmap_ops::feed_forward::Linear {
        weight: inputs.req(1)?,
        bias: inputs.opt(2),
    };
    let output = vulnmap_ops::feed_forward::Linear {
        weight: &output_weight,
        bias: inputs.opt(4),
    };
    let heads = width / d;
    match PreNormInputs::of(inputs, attrs, 6)? {
        Some(norm) => vulnmap_ops::self_attention::pre_norm_self_attention(
            x,
            norm.as_pre_norm(),
            input,
            output,
            heads,
            scale,
        ),
        None => vulnmap_ops::self_attention::self_attention(x, input, output, heads, scale),
    }
}

/// `MatMul(Softmax(MatMul(a, b)), v)`, the softmax over the last axis (attention, fused at load
/// time): one op for batches of matrices (see `vulnmap_ops::attention`), `MatMul`'s rules for
/// vectors.
pub(super) fn attention(a: &Tensor, b: &Tensor, v: &Tensor) -> Result<Tensor> {
    if a.rank() >= 2 && b.rank() == a.rank() && v.rank() == a.rank() {
        return vulnmap_ops::attention::attention(a, b, v);
    }
    matmul(&vulnmap_ops::softmax::softmax_last_dim(&matmul(a, b)?)?, v)
}

/// `MatMul` with NumPy's rules: batch dimensions broadcast, 1-D operands promoted and removed.
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a = if a1 { a.unsqueeze(0)? } else { a.clone() };
    let b = if b1 { b.unsqueeze(1)? } else { b.clone() };
    let a = if a.is_contiguous() {
        a
    } else {
        a.contiguous()?
    };
    let y = if b.rank() == 2 {
        // Rank-2 B, a linear layer's weight when it is constant: see `vulnmap_ops::linear`.
        vulnmap_ops::linear::matmul_by_constant(&a, &b, None)?
    } else {
        let b = if b.is_contiguous() {
            b
        } else {
            b.contiguous()?
        };
        a.broadcast_matmul(&b)?
    };
    let y = if b1 { y.squeeze(y.rank() - 1)? } else { y };
    if a1 {
        y.squeeze(y.rank().saturating_sub(2))
    } else {
        Ok(y)
    }
}

/// `Einsum` of one or two operands with an explicit output (`bhid,bhjd->bhij`): labels only in
/// one operand are summed out, shared ones kept (batch) or contracted by one batched product.
pub(super) fn einsum(equation: &str, operands: &[&Tensor]) -> Result<Tensor> {
    let equation: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let Some((lhs, out)) = equation.split_once("->") else {
        bail!("einsum `{equation}` needs an explicit output (`->`)");
    };
    let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.chars().collect()).collect();
    let out: Vec<char> = out.chars().collect();
    let valid = |t: &[char]| {
        t.iter().all(|c| c.is_ascii_alphabetic())
            && t.iter().enumerate().all(|(i, c)| !t[..i].contains(c))
    };
    if terms.len() != operands.len() || !terms.iter().chain([&out]).all(|t| valid(t)) {
        bail!("einsum `{equation}`: only one or two operands with distinct letters are supported");
    }
    for (t, x) in terms.iter().zip(operands) {
        if t.len() != x.rank() {
            bail!(
                "einsum `{equation}`: `{}` for an operand of rank {}",
                t.iter().collect::<String>(),
                x.rank()
            );
        }
    }
    // Sum out each operand's labels that appear nowhere else.
    let mut reduced: Vec<(Vec<char>, Tensor)> = Vec::new();
    for (k, (t, x)) in terms.iter().zip(operands).enumerate() {
        let elsewhere = |c: &char| {
            out.contains(c)
                || terms
                    .iter()
                    .enumerate()
                    .any(|(j, u)| j != k && u.contains(c))
        };
        let mut labels = t.clone();
        let mut x = (*x).clone();
        for i in (0..labels.len()).rev() {
            if !elsewhere(&labels[i]) {
                x = x.sum(i)?;
                labels.remove(i);
            }
        }
        reduced.push((labels, x));
    }
    let size = |labels: &[char], x: &Tensor, c: char| {
        labels.iter().position(|&l| l == c).map(|i| x.dims()[i])
    };
    let (labels, y) = match reduced.as_slice() {
        [(la, a)] => (la.clone(), a.clone()),
        [(la, a), (lb, b)] => {
            let batch: Vec<char> = la
                .iter()
                .copied()
                .filter(|c| lb.contains(c) && out.contains(c))
                .collect();
            let inner: Vec<char> = la
                .iter()
                .copied()
                .filter(|c| lb.contains(c) && !out.contains(c))
                .collect();
            let a_only: Vec<char> = la.iter().copied().filter(|c| !lb.contains(c)).collect();
            let b_only: Vec<char> = lb.iter().copied().filter(|c| !la.contains(c)).collect();
            let prod = |labels: &[char], x: &Tensor, group: &[char]| -> usize {
                group.iter().filter_map(|&c| size(labels, x, c)).product()
            };
            let (nb, m, k, n) = (
                prod(la, a, &batch),
                prod(la, a, &a_only),
                prod(la, a, &inner),
                prod(lb, b, &b_only),
            );
            for &c in &inner {
                if size(la, a, c) != size(lb, b, c) {
                    bail!("einsum `{equation}`: label `{c}` has two sizes");
                }
            }
            let order = |labels: &[char], groups: &[&[char]]| -> Vec<usize> {
                groups
                    .iter()
                    .flat_map(|g| g.iter())
                    .filter_map(|c| labels.iter().position(|l| l == c))
                    .collect()
            };
            let a2 = a
                .permute(order(la, &[&batch, &a_only, &inner]))?
                .contiguous()?
                .reshape((nb, m, k))?;
            let b2 = b
                .permute(order(lb, &[&batch, &inner, &b_only]))?
                .contiguous()?
                .reshape((nb, k, n))?;
            let mut dims: Vec<usize> = Vec::new();
            for &c in batch.iter().chain(&a_only) {
                dims.extend(size(la, a, c));
            }
            for &c in &b_only {
                dims.extend(size(lb, b, c));
            }
            let labels: Vec<char> = batch
                .iter()
                .chain(&a_only)
                .chain(&b_only)
                .copied()
                .collect();
            (labels, a2.matmul(&b2)?.reshape(dims)?)
        }
        _ => bail!("einsum `{equation}`: only one or two operands are supported"),
    };
    if labels.len() != out.len() || !out.iter().all(|c| labels.contains(c)) {
        bail!("einsum `{equation}`: the output's labels must be those that remain");
    }
    let perm: Vec<usize> = out
        .iter()
        .filter_map(|c| labels.iter().position(|l| l == c))
        .collect();
    y.permute(perm)
}

/// `Softmax` and `LogSoftmax` along `axis` (before opset 13: over everything from `axis` on).
pub(super) fn softmax(x: &Tensor, attrs: Attrs, ctx: Context, log: bool) -> Result<Tensor> {
    let (input, a) = if ctx.opset >= 13 {
        (x.clone(), axis(attrs.int("axis", -1), x.rank())?)
    } else {
        let a = axis(attrs.int("axis", 1), x.rank())?;
        let outer: usize = x.dims()[..a].iter().product();
        (x.reshape((outer, ()))?, 1)
    };
    if !log && a + 1 == input.rank() {
        return vulnmap_ops::softmax::softmax_last_dim(&input)?.reshape(x.shape());
    }
    // Subtracting the (constant) maximum changes no gradient and keeps exp finite.
    let max = input.max_keepdim(a)?.detach();
    let shifted = input.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(a)?;
    let y = if log {
        shifted.broadcast_sub(&sum.log()?)?
    } else {
        exp.broadcast_div(&sum)?
    };
    y.reshape(x.shape())
}

/// `ReduceMean`, `ReduceSum`, `ReduceMax`, `ReduceL2`: axes from the input (opset 13 for sums,
/// 18 for the others) or the attribute; all axes when none are given.
pub(super) fn reduce(op: &str, inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let since = if op == "ReduceSum" { 13 } else { 18 };
    let axes = if ctx.opset >= since {
        inputs.opt(1).map(ints_of).transpose()?
    } else {
        attrs.ints("axes").map(<[i64]>::to_vec)
    };
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| axis(v, x.rank()))
            .collect::<Result<_>>()?,
        _ if attrs.int("noop_with_empty_axes", 0) != 0 => return Ok(x.clone()),
        _ => (0..x.rank()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    let mut y = if op == "ReduceL2" {
        x.sqr()?
    } else {
        x.clone()
    };
    // Sums and means over all axes at once (candle's fast path when they are the trailing ones).
    y = match op {
        "ReduceMean" => y.mean_keepdim(axes.clone())?,
        "ReduceSum" | "ReduceL2" => y.sum_keepdim(axes.clone())?,
        _ => {
            for &a in axes.iter().rev() {
                y = y.max_keepdim(a)?;
            }
            y
        }
    };
    if op == "ReduceL2" {
        y = y.sqrt()?;
    }
    if attrs.int("keepdims", 1) == 0 {
        for &a in axes.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

/// `Pad`: constant, edge or reflect padding (negative pads crop).
pub(super) fn pad(inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let (pads, value, axes) = if ctx.opset >= 11 {
        let value = match inputs.opt(2) {
            Some(v) if v.elem_count() > 0 => floats_of(v)?[0],
            _ => 0.0,
        };
        let axes = inputs.opt(3).map(ints_of).transpose()?;
        (ints_of(inputs.req(1)?)?, value, axes)
    } else {
        let pads = attrs.ints("pads").map(<[i64]>::to_vec).unwrap_or_default();
        (pads, attrs.float("value", 0.0) as f64, None)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a
            .iter()
            .map(|&v| axis(v, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..x.rank()).collect(),
    };
    if pads.len() != 2 * axes.len() {
        bail!("{} pads for {} axes", pads.len(), axes.len());
    }
    // The pads come from the file: refuse an output too large to allocate before making it.
    let mut out_dims: Vec<i64> = x.dims().iter().map(|&d| d as i64).collect();
    for (i, &a) in axes.iter().enumerate() {
        let grown = out_dims[a]
            .saturating_add(pads[i])
            .saturating_add(pads[i + axes.len()]);
        out_dims[a] = grown.max(0);
    }
    crate::tensor::checked_shape(&out_dims)
        .map_err(|e| candle_core::Error::Msg(format!("padding to {e}")))?;
    let mode = attrs.string("mode", "constant");
    let mut y = x.clone();
    for (i, &a) in axes.iter().enumerate() {
        let (mut before, mut after) = (pads[i], pads[i + axes.len()]);
        if before < 0 {
            let d = y.dim(a)?;
            y = y.narrow(a, (-before) as usize, d.saturating_sub((-before) as usize))?;
            before = 0;
        }
        if after < 0 {
            let d = y.dim(a)?;
            y = y.narrow(a, 0, d.saturating_sub((-after) as usize))?;
            after = 0;
        }
        let (b, e) = (before as usize, after as usize);
        if b == 0 && e == 0 {
            continue;
        }
        y = match mode.as_str() {
            "constant" if value == 0.0 => y.pad_with_zeros(a, b, e)?,
            "constant" => {
                let side = |n: usize| -> Result<Tensor> {
                    let mut dims = y.dims().to_vec();
                    dims[a] = n;
                    Tensor::ones(dims, y.dtype(), y.device())? * value
                };
                let (lo, hi) = (side(b)?, side(e)?);
                Tensor::cat(&[&lo, &y, &hi], a)?
            }
            "edge" => y.pad_with_same(a, b, e)?,
            "reflect" => {
                let d = y.dim(a)? as i64;
                if b as i64 >= d || e as i64 >= d {
                    bail!("reflect padding of {b}/{e} on an axis of size {d}");
                }
                let idx: Vec<i64> = (-(b as i64)..d + e as i64)
                    .map(|i| {
                        let i = i.abs();
                        if i >= d {
                            2 * (d - 1) - i
                        } else {
                            i
                        }
                    })
                    .collect();
                let n = idx.len();
                y.index_select(&Tensor::from_vec(idx, n, y.device())?, a)?
            }
            other => bail!("pad mode `{other}` is not one of constant, edge, reflect"),
        };
    }
    Ok(y)
}

/// `Resize` of the two spatial axes: bilinear (half-pixel or align-corners) or nearest.
pub(super) fn resize(inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let x = inputs.req(0)?;
    let (h, w) = spatial(x)?;
    let (scales_at, sizes_at) = if ctx.opset >= 11 {
        (2, 3)
    } else {
        (1, usize::MAX)
    };
    let sizes = inputs.opt(sizes_at).filter(|t| t.elem_count() > 0);
    let scales = inputs.opt(scales_at).filter(|t| t.elem_count() > 0);
    let ((oh, ow), (sh, sw)) = match (sizes, scales) {
        (Some(sizes), _) => {
            let s = ints_of(sizes)?;
            let (oh, ow) = match s.as_slice() {
                [n, c, oh, ow] if *n == x.dim(0)? as i64 && *c == x.dim(1)? as i64 => (*oh, *ow),
                [oh, ow] => (*oh, *ow),
                other => bail!("sizes {other:?}: only the two spatial axes can be resized"),
            };
            if oh <= 0 || ow <= 0 {
                bail!("sizes {s:?} must be positive");
            }
            let (oh, ow) = (oh as usize, ow as usize);
            ((oh, ow), (oh as f64 / h as f64, ow as f64 / w as f64))
        }
        (None, Some(scales)) => {
            let s = floats_of(scales)?;
            let (sh, sw) = match s.as_slice() {
                [1.0, 1.0, sh, sw] | [sh, sw] => (*sh, *sw),
                other => bail!("scales {other:?}: only the two spatial axes can be resized"),
            };
            if !(sh > 0.0 && sw > 0.0 && sh.is_finite() && sw.is_finite()) {
                bail!("scales {s:?} are not a valid resize");
            }
            // Saturating: a huge scale makes a huge size, refused below.
            let out = |n: usize, s: f64| (n as f64 * s).floor() as usize;
            ((out(h, sh), out(w, sw)), (sh, sw))
        }
        (None, None) => bail!("Resize needs scales or sizes"),
    };
    // The sizes and scales come from the file: refuse an output, or an interpolation matrix,
    // too large to allocate before making it.
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let elements = [n, c, oh, ow]
        .iter()
        .try_fold(1usize, |total, &d| total.checked_mul(d));
    let too_large = |e: Option<usize>| e.is_none_or(|e| e > crate::tensor::MAX_ELEMENTS);
    if oh == 0
        || ow == 0
        || too_large(elements)
        || too_large(oh.checked_mul(h))
        || too_large(ow.checked_mul(w))
    {
        bail!(
            "resizing {h}x{w} to {oh}x{ow} is not a valid resize (at most {} elements)",
            crate::tensor::MAX_ELEMENTS
        );
    }
    if attrs.int("antialias", 0) != 0 {
        bail!("antialiased Resize is not supported");
    }
    let default_ctm = if ctx.opset >= 11 {
        "half_pixel"
    } else {
        "asymmetric"
    };
    let ctm = attrs.string("coordinate_transformation_mode", default_ctm);
    match attrs.string("mode", "nearest").as_str() {
        "linear" => match ctm.as_str() {
            "half_pixel" | "pytorch_half_pixel" => {
                vulnmap_ops::resize::bilinear(x, (oh, ow), false)
            }
            "align_corners" => vulnmap_ops::resize::bilinear(x, (oh, ow), true),
            other => bail!(
                "linear Resize with coordinate_transformation_mode `{other}`: supported are \
                 half_pixel, pytorch_half_pixel, align_corners"
            ),
        },
        "nearest" => {
            let rounding = attrs.string("nearest_mode", "round_prefer_floor");
            let rows = nearest_indices(h, oh, sh, &ctm, &rounding)?;
            let cols = nearest_indices(w, ow, sw, &ctm, &rounding)?;
            let device = x.device();
            x.index_select(&Tensor::from_vec(rows, oh, device)?, 2)?
                .index_select(&Tensor::from_vec(cols, ow, device)?, 3)
        }
        other => bail!("Resize mode `{other}`: supported are linear and nearest"),
    }
}

/// The source index of each of `out` positions for nearest-neighbour resizing.
fn nearest_indices(
    input: usize,
    out: usize,
    scale: f64,
    ctm: &str,
    rounding: &str,
) -> Result<Vec<i64>> {
    (0..out)
        .map(|i| {
            let i = i as f64;
            let x = match ctm {
                "half_pixel" => (i + 0.5) / scale - 0.5,
                "pytorch_half_pixel" if out > 1 => (i + 0.5) / scale - 0.5,
                "pytorch_half_pixel" => 0.0,
                // In f32 with the input-to-output ratio, as PyTorch and onnxruntime compute it, so
                // that a source index on an integer boundary rounds the same way.
                "asymmetric" => (i as f32 * (1.0 / scale) as f32) as f64,
                "tf_half_pixel_for_nn" => (i + 0.5) / scale,
                "align_corners" if out > 1 => i * (input as f64 - 1.0) / (out as f64 - 1.0),
                "align_corners" => 0.0,
                other => bail!("coordinate_transformation_mode `{other}` is not supported"),
            };
            let r = match rounding {
                "floor" => x.floor(),
                "ceil" => x.ceil(),
                "round_prefer_ceil" => (x + 0.5).floor(),
                "round_prefer_floor" => (x - 0.5).ceil(),
                other => bail!("nearest_mode `{other}` is not supported"),
            };
            Ok(r.clamp(0.0, input as f64 - 1.0) as i64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AttributeProto;
    use candle_core::Device;

    fn attr_int(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: crate::proto::attribute_type::INT,
            i,
            ..Default::default()
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// GroupNormalization with one group per channel is InstanceNormalization; with one group,
    /// each image standardised over all its values.
    #[test]
    fn group_norm_matches_instance_norm_and_whole_image_statistics() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 2.0, (2, 4, 3, 5), &dev).unwrap();
        let scale = Tensor::randn(1f64, 0.5, 4, &dev).unwrap();
        let bias = Tensor::randn(0f64, 0.5, 4, &dev).unwrap();
        let inputs = [Some(&x), Some(&scale), Some(&bias)];
        let per_channel = [attr_int("num_groups", 4)];
        let g = group_norm(&Inputs(&inputs), Attrs(&per_channel)).unwrap();
        let i = instance_norm(&Inputs(&inputs), Attrs(&[])).unwrap();
        assert!(max_diff(&g, &i) < 1e-12);

        let one = [attr_int("num_groups", 1)];
        let g = group_norm(&Inputs(&inputs), Attrs(&one)).unwrap();
        let flat = x.reshape((2, 60)).unwrap();
        let mean = flat.mean_keepdim(1).unwrap();
        let var = flat
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap();
        let want = flat
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((2, 4, 3, 5))
            .unwrap()
            .broadcast_mul(&scale.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&g, &want) < 1e-10);
    }

    /// Einsum's attention product, a transpose and a sum, against the plain operations.
    #[test]
    fn einsum_equals_the_products_it_names() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (2, 3, 5, 4), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (2, 3, 6, 4), &dev).unwrap();
        let got = einsum("bhid,bhjd->bhij", &[&a, &b]).unwrap();
        let want = a.matmul(&b.transpose(2, 3).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        let m = Tensor::randn(0f64, 1.0, (3, 4, 5), &dev).unwrap();
        let got = einsum("ijk->ki", &[&m]).unwrap();
        let want = m.sum(1).unwrap().t().unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        assert!(
            einsum("ii->i", &[&m.get(0).unwrap()]).is_err(),
            "repeated labels are refused"
        );
    }

    /// Pads read from a damaged file must not make a tensor too large to allocate (a fuzzed
    /// model asked Pad for 26 GB and aborted the process).
    #[test]
    fn only_a_plain_spatial_border_joins_a_convolutions_own() {
        let border = |pads: &[i64]| spatial_border(pads, (3, 3));
        assert_eq!(
            border(&[0, 0, 0, 1, 0, 0, 1, 2]),
            Some(Pad2d {
                top: 0,
                left: 1,
                bottom: 1,
                right: 2
            })
        );
        // Batch or channel padding, cropping, a border wider than the kernel, not 4-D.
        assert_eq!(border(&[0, 1, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(border(&[0, 0, -1, 0, 0, 0, 0, 0]), None);
        assert_eq!(border(&[0, 0, 4, 0, 0, 0, 0, 0]), None);
        assert_eq!(border(&[0, 0, 1, 1, 0, 0]), None);
    }

    #[test]
    fn huge_pads_are_an_error_not_an_allocation() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let pads = Tensor::new(&[0i64, 0, 0, 0, 0, 0, 1 << 40, 0], &dev).unwrap();
        let inputs = [Some(&x), Some(&pads)];
        let ctx = Context {
            opset: 17,
            guided: false,
            device: &dev,
        };
        for mode in ["constant", "edge", "reflect"] {
            let attr = AttributeProto {
                name: "mode".into(),
                r#type: 3, // STRING
                s: mode.as_bytes().to_vec(),
                ..Default::default()
            };
            let err = pad(&Inputs(&inputs), Attrs(&[attr]), ctx).unwrap_err();
            assert!(err.to_string().contains("elements"), "{mode}: {err}");
        }
    }

    /// Resize's sizes and scales read from a damaged file must not make a tensor or an
    /// interpolation matrix too large to allocate (a fuzzed model's scales made one side 0 and
    /// the other 10^15 rows, and the process aborted asking for 21 PB).
    #[test]
    fn huge_resizes_are_an_error_not_an_allocation() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let ctx = Context {
            opset: 17,
            guided: false,
            device: &dev,
        };
        let empty = Tensor::zeros(0, DType::F32, &dev).unwrap();
        let huge_scales = Tensor::new(&[1f32, 1.0, 1e15, 1e-3], &dev).unwrap();
        let huge_sizes = Tensor::new(&[1i64, 3, 1 << 40, 1], &dev).unwrap();
        let fine_sizes = Tensor::new(&[1i64, 3, 8, 2], &dev).unwrap();
        for (scales, sizes) in [
            (Some(&huge_scales), None),
            (Some(&empty), Some(&huge_sizes)),
        ] {
            let inputs = [Some(&x), None, scales, sizes];
            let err = resize(&Inputs(&inputs), Attrs(&[]), ctx).unwrap_err();
            assert!(err.to_string().contains("not a valid resize"), "{err}");
        }
        let inputs = [Some(&x), None, Some(&empty), Some(&fine_sizes)];
        let y = resize(&Inputs(&inputs), Attrs(&[]), ctx).unwrap();
        assert_eq!(y.dims(), &[1, 3, 8, 2]);
    }

    /// The global pools and reductions over several axes at once equal those axes reduced one at
    /// a time.
    #[test]
    fn global_pools_and_reductions_equal_one_axis_at_a_time() {
        let dev = Device::Cpu;
        let ctx = Context {
            opset: 18,
            guided: false,
            device: &dev,
        };
        let x = Tensor::randn(0f64, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let eval = |op: &str, inputs: &[Option<&Tensor>], attrs: &[AttributeProto]| {
            super::super::eval(op, Attrs(attrs), inputs, 1, ctx)
                .unwrap()
                .remove(0)
        };
        let axes = Tensor::new(&[2i64, 3], &dev).unwrap();
        let mean = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
        let sum = x.sum_keepdim(3).unwrap().sum_keepdim(2).unwrap();
        let max = x.max_keepdim(3).unwrap().max_keepdim(2).unwrap();
        let cases = [
            (eval("GlobalAveragePool", &[Some(&x)], &[]), &mean),
            (eval("GlobalMaxPool", &[Some(&x)], &[]), &max),
            (eval("ReduceMean", &[Some(&x), Some(&axes)], &[]), &mean),
            (eval("ReduceSum", &[Some(&x), Some(&axes)], &[]), &sum),
        ];
        for (got, want) in cases {
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, want) < 1e-12);
        }
        let kept = eval(
            "ReduceMean",
            &[Some(&x), Some(&axes)],
            &[attr_int("keepdims", 0)],
        );
        assert_eq!(kept.dims(), &[2, 3]);
    }
}
