//! Element-wise operators with NumPy broadcasting: arithmetic, comparisons, activations.

use super::{floats_of, Attrs, Context, Inputs};
use candle_core::{bail, DType, Result, Shape, Tensor};
use vulnmap_ops::activation::Activation;
use vulnmap_ops::guided::positive_gradient;

/// Evaluates an element-wise operator.
pub(super) fn eval(op: &str, inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let x = inputs.req(0)?;
    if let Some(y) = by_channel_constant(op, x, inputs.opt(1))? {
        return Ok(y);
    }
    match op {
        "Add" => x.broadcast_add(inputs.req(1)?),
        "Sub" => x.broadcast_sub(inputs.req(1)?),
        "Mul" => multiply(x, inputs.req(1)?),
        "Div" => x.broadcast_div(inputs.req(1)?),
        "Pow" => pow(x, inputs.req(1)?),
        "Mod" => modulo(x, inputs.req(1)?, attrs.int("fmod", 0) != 0),
        "Equal" => x.broadcast_eq(inputs.req(1)?),
        "Less" => x.broadcast_lt(inputs.req(1)?),
        "Greater" => x.broadcast_gt(inputs.req(1)?),
        "Not" => x.eq(&Tensor::zeros((), x.dtype(), x.device())?.broadcast_as(x.shape())?),
        "Where" => where_cond(x, inputs.req(1)?, inputs.req(2)?),
        "Max" | "Min" | "Sum" => variadic(op, &inputs.all()),
        "Relu" => rectify(x.relu()?, ctx),
        "LeakyRelu" => {
            let alpha = attrs.float("alpha", 0.01) as f64;
            x.maximum(&(x * alpha)?)
        }
        "Elu" => x.elu(attrs.float("alpha", 1.0) as f64),
        "Sigmoid" => candle_nn::ops::sigmoid(x),
        "HardSigmoid" => Activation::HardSigmoid {
            alpha: attrs.float("alpha", 0.2) as f64,
            beta: attrs.float("beta", 0.5) as f64,
        }
        .apply(x),
        "HardSwish" => Activation::HardSwish.apply(x),
        "Softplus" => (x.exp()? + 1.0)?.log(),
        "Tanh" => x.tanh(),
        "Exp" => x.exp(),
        "Log" => x.log(),
        "Neg" => x.neg(),
        "Abs" => x.abs(),
        "Sqrt" => x.sqrt(),
        "Reciprocal" => x.recip(),
        "Floor" => x.floor(),
        "Ceil" => x.ceil(),
        "Erf" => x.erf(),
        "Sin" => x.sin(),
        "Cos" => x.cos(),
        "Gelu" => match attrs.string("approximate", "none").as_str() {
            "none" => Activation::Gelu.apply(x),
            "tanh" => x.gelu(),
            other => bail!("approximate `{other}` is not one of none, tanh"),
        },
        "Clip" => clip(x, inputs, attrs, ctx),
        other => bail!(
            "operator `{other}` is not supported; supported: {}",
            super::SUPPORTED.join(", ")
        ),
    }
}

/// `Mul`: a feature map times one value per image and channel (a squeeze-and-excitation gate,
/// either way round) as one [`vulnmap_ops::channel_gate`] op, any other product broadcast.
fn multiply(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let gates = |x: &Tensor, g: &Tensor| match (x.dims(), g.dims()) {
        ([n, c, _, _], [gn, gc, 1, 1]) => n == gn && c == gc,
        _ => false,
    };
    if gates(a, b) {
        vulnmap_ops::channel_gate::channel_gate(a, b)
    } else if gates(b, a) {
        vulnmap_ops::channel_gate::channel_gate(b, a)
    } else {
        a.broadcast_mul(b)
    }
}

/// A ReLU's output, with guided backpropagation's rule when asked for.
pub(super) fn rectify(y: Tensor, ctx: Context) -> Result<Tensor> {
    if ctx.guided {
        positive_gradient(&y)
    } else {
        Ok(y)
    }
}

/// `Add`, `Sub`, `Mul` or `Div` of a tensor and a constant that is one value, or one per channel
/// (axis 1), as one [`vulnmap_ops::channel_affine`] op: candle's broadcast ops would also compute
/// the constant's gradient, at the tensor's size (an input's normalisation, a layer scale, a
/// transformer's attention scale). `None` when the operands are anything else.
fn by_channel_constant(op: &str, a: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(b) = b else { return Ok(None) };
    if !matches!(op, "Add" | "Sub" | "Mul" | "Div") {
        return Ok(None);
    }
    // Which operand is the tensor and which the constant.
    let (x, c, x_first) = match (a.track_op(), b.track_op()) {
        (true, false) => (a, b, true),
        (false, true) => (b, a, false),
        _ => return Ok(None),
    };
    let Some(values) = per_channel_values(x, c)? else {
        return Ok(None);
    };
    let channels = values.len();
    let (mut scale, mut shift) = (vec![1.0; channels], vec![0.0; channels]);
    for (k, &v) in values.iter().enumerate() {
        match (op, x_first) {
            ("Add", _) => shift[k] = v,
            ("Sub", true) => shift[k] = -v,
            ("Sub", false) => (scale[k], shift[k]) = (-1.0, v),
            ("Mul", _) => scale[k] = v,
            // x * (1/c): within an ulp of x / c, where 1/c is finite in the tensor's type.
            ("Div", true) if ((1.0 / v) as f32).is_finite() => scale[k] = 1.0 / v,
            // `c / x` is not affine in x.
            _ => return Ok(None),
        }
    }
    vulnmap_ops::channel_affine::channel_affine(x, &scale, &shift, false).map(Some)
}

/// The constant `c` as one value per channel of `x` (axis 1), if `c` broadcasts to `x` that way
/// (one value, or one per channel), `x` is a float tensor on the CPU and `c` of its type: where
/// [`vulnmap_ops::channel_affine`] applies.
fn per_channel_values(x: &Tensor, c: &Tensor) -> Result<Option<Vec<f64>>> {
    let float = matches!(x.dtype(), DType::F32 | DType::F64) && c.dtype() == x.dtype();
    if !float || !x.device().is_cpu() || x.rank() < 2 || c.rank() > x.rank() {
        return Ok(None);
    }
    let channels = x.dim(1)?;
    // The constant's dimensions, right-aligned to x's: all 1 but perhaps axis 1.
    let offset = x.rank() - c.rank();
    let per_channel = c
        .dims()
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (i + offset == 1 && d == channels));
    if !per_channel {
        return Ok(None);
    }
    let values = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Some(match values.as_slice() {
        [one] => vec![*one; channels],
        _ => values,
    }))
}

/// `x * scale + shift` for constants `scale` and `shift` (a fused chain of arithmetic with
/// constants): one [`vulnmap_ops::channel_affine`] op when both are per channel, else candle's
/// broadcast ops.
pub(super) fn affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    if let (Some(a), Some(b)) = (per_channel_values(x, scale)?, per_channel_values(x, shift)?) {
        return vulnmap_ops::channel_affine::channel_affine(x, &a, &b, false);
    }
    x.broadcast_mul(&scale.to_dtype(x.dtype())?)?
        .broadcast_add(&shift.to_dtype(x.dtype())?)
}

/// `Clip`: bounds from inputs (opset 11 on) or attributes; a ReLU6 (`min = 0`) is rectified
/// like a ReLU for guided backpropagation.
fn clip(x: &Tensor, inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let bound = |i: usize, name: &str| -> Result<Option<f64>> {
        if ctx.opset >= 11 {
            match inputs.opt(i) {
                Some(t) => Ok(floats_of(t)?.first().copied()),
                None => Ok(None),
            }
        } else {
            Ok(attrs.get(name).map(|a| a.f as f64))
        }
    };
    let (lo, hi) = (bound(1, "min")?, bound(2, "max")?);
    let mut y = x.clone();
    if let Some(lo) = lo {
        y = y.maximum(lo)?;
    }
    if let Some(hi) = hi {
        y = y.minimum(hi)?;
    }
    if lo == Some(0.0) {
        rectify(y, ctx)
    } else {
        Ok(y)
    }
}

/// `x ^ y`; small integer and half exponents as products and square roots, which are exact and
/// differentiable at negative bases.
fn pow(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if y.elem_count() == 1 {
        let e = floats_of(y)?[0];
        if x.dtype() == DType::I64 {
            return x
                .to_dtype(DType::F64)?
                .powf(e)?
                .round()?
                .to_dtype(DType::I64);
        }
        return match e {
            1.0 => Ok(x.clone()),
            2.0 => x.sqr(),
            3.0 => x.sqr()?.mul(x),
            0.5 => x.sqrt(),
            _ => x.powf(e),
        };
    }
    x.log()?.broadcast_mul(&y.to_dtype(x.dtype())?)?.exp()
}

/// `Mod`: integer remainder with the divisor's sign (Python's `%`), or C's `fmod` for floats
/// and when `fmod = 1`.
fn modulo(x: &Tensor, y: &Tensor, fmod: bool) -> Result<Tensor> {
    let shape = Shape::broadcast_shape_binary_op(x.shape(), y.shape(), "Mod")?;
    let (a, b) = (x.broadcast_as(&shape)?, y.broadcast_as(&shape)?);
    let (a, b) = (floats_of(&a)?, floats_of(&b)?);
    let values: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&a, &b)| {
            let r = a % b;
            if !fmod && r != 0.0 && (r < 0.0) != (b < 0.0) {
                r + b
            } else {
                r
            }
        })
        .collect();
    Tensor::from_vec(values, shape, x.device())?.to_dtype(x.dtype())
}

/// `Where(condition, x, y)`, all three broadcast together.
fn where_cond(cond: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let shape = Shape::broadcast_shape_binary_op(cond.shape(), x.shape(), "Where")?;
    let shape = Shape::broadcast_shape_binary_op(&shape, y.shape(), "Where")?;
    cond.broadcast_as(&shape)?.contiguous()?.where_cond(
        &x.broadcast_as(&shape)?.contiguous()?,
        &y.broadcast_as(&shape)?.contiguous()?,
    )
}

/// `Max`, `Min`, `Sum` of any number of inputs.
fn variadic(op: &str, inputs: &[&Tensor]) -> Result<Tensor> {
    let (first, rest) = match inputs.split_first() {
        Some(split) => split,
        None => bail!("{op} needs at least one input"),
    };
    let mut acc = (*first).clone();
    for t in rest {
        acc = match op {
            "Max" => acc.broadcast_maximum(t)?,
            "Min" => acc.broadcast_minimum(t)?,
            _ => acc.broadcast_add(t)?,
        };
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    /// Every arithmetic operator with a constant of one value or one per channel, on either side,
    /// against candle's broadcast ops: the same value and the same input gradient.
    #[test]
    fn a_per_channel_constant_gives_what_broadcasting_gives() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 4, 5), &device)?)?;
        let probe = Tensor::randn(0f32, 1., (2, 3, 4, 5), &device)?;
        let constants = [
            Tensor::new(&[0.5f32, -2.0, 1.5], &device)?.reshape((3, 1, 1))?,
            Tensor::new(&[0.5f32, -2.0, 1.5], &device)?.reshape((1, 3, 1, 1))?,
            Tensor::new(&[-0.75f32], &device)?,
            Tensor::new(1.25f32, &device)?,
        ];
        for c in &constants {
            for op in ["Add", "Sub", "Mul", "Div"] {
                for x_first in [true, false] {
                    let (a, b) = if x_first {
                        (x.as_tensor(), c)
                    } else {
                        (c, x.as_tensor())
                    };
                    let Some(ours) = by_channel_constant(op, a, Some(b))? else {
                        assert!(op == "Div" && !x_first, "{op} of {:?}", c.dims());
                        continue;
                    };
                    let theirs = match op {
                        "Add" => a.broadcast_add(b)?,
                        "Sub" => a.broadcast_sub(b)?,
                        "Mul" => a.broadcast_mul(b)?,
                        _ => a.broadcast_div(b)?,
                    };
                    let what = format!("{op}, x first {x_first}, constant {:?}", c.dims());
                    assert_eq!(ours.dims(), theirs.dims(), "{what}");
                    assert!(max_diff(&ours, &theirs) < 1e-6, "{what}");
                    let g_ours = (ours * &probe)?.sum_all()?.backward()?;
                    let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
                    let (g1, g2) = (
                        g_ours.get(x.as_tensor()).expect("a gradient"),
                        g_theirs.get(x.as_tensor()).expect("a gradient"),
                    );
                    assert!(max_diff(g1, g2) < 1e-6, "{what}");
                }
            }
        }
        // Dividing by a constant whose reciprocal overflows f32 is left to broadcasting too.
        let tiny = Tensor::new(1e-39f32, &device)?;
        assert!(by_channel_constant("Div", x.as_tensor(), Some(&tiny))?.is_none());
        // A constant along another axis is broadcasting's business.
        let rows = Tensor::new(&[1f32, 2., 3., 4., 5.], &device)?;
        assert!(by_channel_constant("Mul", x.as_tensor(), Some(&rows))?.is_none());
        Ok(())
    }
}
