//! Operators that move, select or create values without arithmetic: shapes, reshapes,
//! slicing, gathering, concatenation, constants and casts.

use super::{axis, ints_of, Attrs, Context, Inputs};
use crate::proto::attribute_type;
use crate::tensor::{checked_shape, dtype_of, MAX_ELEMENTS};
use candle_core::{bail, DType, Result, Shape, Tensor};
use std::path::Path;

/// Evaluates a shape operator, giving `outputs` tensors.
pub(super) fn eval(
    op: &str,
    inputs: &Inputs,
    attrs: Attrs,
    outputs: usize,
    ctx: Context,
) -> Result<Vec<Tensor>> {
    if op == "Split" {
        return split(inputs, attrs, outputs, ctx);
    }
    match op {
        "Constant" => return Ok(vec![constant(attrs, ctx.device)?]),
        "Range" => return Ok(vec![range(inputs)?]),
        "ScatterND" => return Ok(vec![scatter_nd(inputs, attrs)?]),
        _ => {}
    }
    let x = inputs.req(0)?;
    let y = match op {
        "Shape" => {
            let dims: Vec<i64> = x.dims().iter().map(|&d| d as i64).collect();
            let rank = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
            let start = clampi(attrs.int("start", 0));
            let end = clampi(attrs.int("end", rank));
            let dims = dims[start..end.max(start)].to_vec();
            let n = dims.len();
            Tensor::from_vec(dims, n, x.device())?
        }
        "Reshape" => {
            let target = ints_of(inputs.req(1)?)?;
            x.reshape(reshaped(x.dims(), &target, attrs.int("allowzero", 0) != 0)?)?
        }
        "Flatten" => {
            let rank = x.rank();
            let a = attrs.int("axis", 1);
            let a = if a < 0 { a + rank as i64 } else { a };
            if a < 0 || a > rank as i64 {
                bail!("axis {a} is out of range for rank {rank}");
            }
            let outer: usize = x.dims()[..a as usize].iter().product();
            x.reshape((outer, x.elem_count() / outer.max(1)))?
        }
        "Transpose" => {
            let perm: Vec<usize> = match attrs.ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| axis(a, x.rank()))
                    .collect::<Result<_>>()?,
                None => (0..x.rank()).rev().collect(),
            };
            x.permute(perm)?
        }
        "Squeeze" => {
            let axes = axes_input(inputs, attrs, 13, ctx)?;
            let dims: Vec<usize> = match axes {
                Some(axes) => {
                    let axes: Vec<usize> = axes
                        .iter()
                        .map(|&a| axis(a, x.rank()))
                        .collect::<Result<_>>()?;
                    for &a in &axes {
                        if x.dims()[a] != 1 {
                            bail!("cannot squeeze axis {a} of size {}", x.dims()[a]);
                        }
                    }
                    x.dims()
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, &d)| d)
                        .collect()
                }
                None => x.dims().iter().copied().filter(|&d| d != 1).collect(),
            };
            x.reshape(dims)?
        }
        "Unsqueeze" => {
            let axes = axes_input(inputs, attrs, 13, ctx)?
                .ok_or_else(|| candle_core::Error::Msg("Unsqueeze needs axes".into()))?;
            let rank = x.rank() + axes.len();
            let mut axes: Vec<usize> =
                axes.iter().map(|&a| axis(a, rank)).collect::<Result<_>>()?;
            axes.sort_unstable();
            let mut dims = x.dims().to_vec();
            for a in axes {
                dims.insert(a, 1);
            }
            x.reshape(dims)?
        }
        "Concat" => {
            let parts = inputs.all();
            let rank = parts.first().map_or(0, |t| t.rank());
            let a = axis(attrs.int("axis", 0), rank)?;
            let parts: Vec<&Tensor> = parts.into_iter().filter(|t| t.elem_count() > 0).collect();
            match parts.as_slice() {
                [] => x.clone(),
                [only] => (*only).clone(),
                _ => Tensor::cat(&parts, a)?,
            }
        }
        "Slice" => slice(x, inputs, attrs, ctx)?,
        "CumSum" => {
            if attrs.int("exclusive", 0) != 0 || attrs.int("reverse", 0) != 0 {
                bail!("exclusive or reverse CumSum is not supported");
            }
            let a = axis(
                ints_of(inputs.req(1)?)?.first().copied().unwrap_or(0),
                x.rank(),
            )?;
            if x.dtype() == DType::I64 {
                x.to_dtype(DType::F64)?
                    .cumsum(a)?
                    .round()?
                    .to_dtype(DType::I64)?
            } else {
                x.cumsum(a)?
            }
        }
        "Gather" => gather(x, inputs.req(1)?, attrs.int("axis", 0))?,
        "Expand" => {
            let target: Vec<usize> =
                checked_shape(&ints_of(inputs.req(1)?)?).map_err(candle_core::Error::Msg)?;
            let shape =
                Shape::broadcast_shape_binary_op(x.shape(), &Shape::from(target), "Expand")?;
            if shape.elem_count() > MAX_ELEMENTS {
                bail!("expanding to {shape:?} would make more than {MAX_ELEMENTS} elements");
            }
            x.broadcast_as(shape)?
        }
        "ConstantOfShape" => {
            let shape = checked_shape(&ints_of(x)?).map_err(candle_core::Error::Msg)?;
            let value = match attrs.get("value").and_then(|a| a.t.as_ref()) {
                Some(t) => crate::tensor::decode(t, Path::new(""), x.device())
                    .map_err(candle_core::Error::Msg)?,
                None => Tensor::zeros(1, DType::F32, x.device())?,
            };
            if value.elem_count() != 1 {
                bail!(
                    "value must hold one element, it holds {}",
                    value.elem_count()
                );
            }
            value
                .flatten_all()?
                .reshape(())?
                .broadcast_as(shape)?
                .contiguous()?
        }
        "Cast" => {
            let to = attrs.int("to", 0) as i32;
            match dtype_of(to) {
                Some(DType::U8) if x.dtype() != DType::U8 => {
                    x.ne(&Tensor::zeros((), x.dtype(), x.device())?.broadcast_as(x.shape())?)?
                }
                Some(dtype) => x.to_dtype(dtype)?,
                None => bail!("cast to element type {to} is not supported"),
            }
        }
        other => bail!("operator `{other}` is not a shape operator"),
    };
    Ok(vec![y])
}

/// The target shape of `Reshape`: `0` copies the input's dimension (unless `allowzero`), one
/// `-1` takes what is left.
fn reshaped(dims: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => match dims.get(i) {
                Some(&d) => out.push(d),
                None => bail!("shape {target:?} copies dimension {i} of {dims:?}"),
            },
            t if t >= 0 => out.push(t as usize),
            _ => bail!("shape {target:?} is not a valid reshape target"),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("cannot reshape {dims:?} to {target:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!("cannot reshape {dims:?} ({total} elements) to {target:?}");
    }
    Ok(out)
}

/// Axes from the input `1` (from opset `since`) or the `axes` attribute (before).
fn axes_input(inputs: &Inputs, attrs: Attrs, since: i64, ctx: Context) -> Result<Option<Vec<i64>>> {
    if ctx.opset >= since {
        inputs.opt(1).map(ints_of).transpose()
    } else {
        Ok(attrs.ints("axes").map(<[i64]>::to_vec))
    }
}

/// `Slice`: starts, ends, axes and steps as inputs (opset 10 on) or attributes (before).
fn slice(x: &Tensor, inputs: &Inputs, attrs: Attrs, ctx: Context) -> Result<Tensor> {
    let (starts, ends, axes, steps) = if ctx.opset >= 10 {
        (
            ints_of(inputs.req(1)?)?,
            ints_of(inputs.req(2)?)?,
            inputs.opt(3).map(ints_of).transpose()?,
            inputs.opt(4).map(ints_of).transpose()?,
        )
    } else {
        let get = |n| attrs.ints(n).map(<[i64]>::to_vec);
        (
            get("starts").unwrap_or_default(),
            get("ends").unwrap_or_default(),
            get("axes"),
            None,
        )
    };
    if starts.len() != ends.len() {
        bail!("{} starts for {} ends", starts.len(), ends.len());
    }
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || steps.len() != starts.len() {
        bail!("starts, ends, axes and steps differ in length");
    }
    let mut y = x.clone();
    for i in 0..starts.len() {
        let a = axis(axes[i], x.rank())?;
        let d = x.dims()[a] as i64;
        let step = steps[i];
        if step == 0 {
            bail!("slice step 0 on axis {a}");
        }
        let norm = |v: i64| if v < 0 { v + d } else { v };
        let (start, end) = (norm(starts[i]), norm(ends[i]));
        let indices: Vec<i64> = if step > 0 {
            let (s, e) = (start.clamp(0, d), end.clamp(0, d));
            (s..e).step_by(step as usize).collect()
        } else {
            let (s, e) = (start.clamp(-1, d - 1), end.clamp(-1, d - 1));
            let mut v = Vec::new();
            let mut j = s;
            while j > e {
                v.push(j);
                j += step;
            }
            v
        };
        y = if step == 1 {
            match indices.first() {
                Some(&s) => y.narrow(a, s as usize, indices.len())?,
                None => y.narrow(a, 0, 0)?,
            }
        } else {
            let n = indices.len();
            y.index_select(&Tensor::from_vec(indices, n, x.device())?, a)?
        };
    }
    Ok(y)
}

/// `Gather` along `axis`: the output's shape is the data's with that axis replaced by the
/// indices' shape; negative indices count from the end.
fn gather(x: &Tensor, indices: &Tensor, axis_attr: i64) -> Result<Tensor> {
    let a = axis(axis_attr, x.rank())?;
    let d = x.dims()[a] as i64;
    let idx: Vec<i64> = ints_of(indices)?
        .into_iter()
        .map(|i| if i < 0 { i + d } else { i })
        .collect();
    if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i >= d) {
        bail!("index {bad} is out of range for axis {a} of size {d}");
    }
    let mut dims = x.dims()[..a].to_vec();
    dims.extend_from_slice(indices.dims());
    dims.extend_from_slice(&x.dims()[a + 1..]);
    let y = if idx.len() == 1 {
        x.narrow(a, idx[0] as usize, 1)?
    } else {
        let n = idx.len();
        x.index_select(&Tensor::from_vec(idx, n, x.device())?, a)?
    };
    y.reshape(dims)
}

/// `Split` into `outputs` parts along `axis`: sizes from the input (opset 13 on) or attribute,
/// otherwise equal parts.
fn split(inputs: &Inputs, attrs: Attrs, outputs: usize, ctx: Context) -> Result<Vec<Tensor>> {
    let x = inputs.req(0)?;
    let a = axis(attrs.int("axis", 0), x.rank())?;
    let d = x.dims()[a];
    let given = if ctx.opset >= 13 {
        inputs.opt(1).map(ints_of).transpose()?
    } else {
        attrs.ints("split").map(<[i64]>::to_vec)
    };
    let sizes: Vec<usize> = match given {
        Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
        None => {
            let parts = outputs.max(1);
            let each = d.div_ceil(parts);
            (0..parts)
                .map(|i| each.min(d.saturating_sub(i * each)))
                .collect()
        }
    };
    if sizes.iter().sum::<usize>() != d || sizes.len() != outputs {
        bail!("cannot split axis {a} of size {d} into {sizes:?} for {outputs} outputs");
    }
    let mut start = 0;
    let mut parts = Vec::with_capacity(outputs);
    for s in sizes {
        parts.push(x.narrow(a, start, s)?);
        start += s;
    }
    Ok(parts)
}

/// `Constant`: the value from whichever attribute holds it.
fn constant(attrs: Attrs, device: &candle_core::Device) -> Result<Tensor> {
    let attr = attrs
        .0
        .first()
        .ok_or_else(|| candle_core::Error::Msg("Constant without a value".into()))?;
    match (attr.name.as_str(), attr.r#type) {
        ("value", _) => match &attr.t {
            Some(t) => {
                crate::tensor::decode(t, Path::new(""), device).map_err(candle_core::Error::Msg)
            }
            None => bail!("Constant `value` without a tensor"),
        },
        ("value_float", _) => Tensor::new(attr.f, device),
        ("value_floats", _) => Tensor::new(attr.floats.as_slice(), device),
        ("value_int", _) => Tensor::new(attr.i, device),
        ("value_ints", t) if t == attribute_type::INTS || !attr.ints.is_empty() => {
            Tensor::new(attr.ints.as_slice(), device)
        }
        (other, _) => bail!("Constant attribute `{other}` is not supported"),
    }
}

/// `Range(start, limit, delta)`: a 1-D sequence, integer or float as `start` is.
fn range(inputs: &Inputs) -> Result<Tensor> {
    let start = inputs.req(0)?;
    let scalar = |i: usize| -> Result<f64> {
        Ok(super::floats_of(inputs.req(i)?)?
            .first()
            .copied()
            .unwrap_or(0.0))
    };
    let (from, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
    if delta == 0.0 {
        bail!("Range with delta 0");
    }
    let count = ((limit - from) / delta).ceil().max(0.0);
    if count > MAX_ELEMENTS as f64 {
        bail!("Range of {count} elements");
    }
    let values: Vec<f64> = (0..count as usize)
        .map(|i| from + i as f64 * delta)
        .collect();
    let n = values.len();
    Tensor::from_vec(values, n, start.device())?.to_dtype(start.dtype())
}

/// `ScatterND` (no reduction) on values that do not depend on the pixels (attention masks,
/// shape arithmetic): computed on the host, so it has no backward pass.
fn scatter_nd(inputs: &Inputs, attrs: Attrs) -> Result<Tensor> {
    let (data, indices, updates) = (inputs.req(0)?, inputs.req(1)?, inputs.req(2)?);
    if data.track_op() || updates.track_op() {
        bail!("ScatterND on a value computed from the pixels is not supported (no backward pass)");
    }
    if attrs.string("reduction", "none") != "none" {
        bail!("ScatterND with a reduction is not supported");
    }
    let dims = data.dims().to_vec();
    let k = *indices.dims().last().unwrap_or(&0);
    if k == 0 || k > dims.len() {
        bail!(
            "ScatterND indices of depth {k} for data of rank {}",
            dims.len()
        );
    }
    let slice: usize = dims[k..].iter().product();
    let mut values = super::floats_of(data)?;
    let index = ints_of(indices)?;
    let update = super::floats_of(updates)?;
    if update.len() != index.len() / k * slice {
        bail!(
            "ScatterND updates of {} values for {} slices",
            update.len(),
            index.len() / k
        );
    }
    for (n, idx) in index.chunks(k).enumerate() {
        let mut offset = 0usize;
        for (a, &i) in idx.iter().enumerate() {
            let d = dims[a] as i64;
            let i = if i < 0 { i + d } else { i };
            if i < 0 || i >= d {
                bail!("ScatterND index {i} out of range for axis {a} of size {d}");
            }
            offset = offset * dims[a] + i as usize;
        }
        let at = offset * slice;
        values[at..at + slice].copy_from_slice(&update[n * slice..(n + 1) * slice]);
    }
    Tensor::from_vec(values, dims, data.device())?.to_dtype(data.dtype())
}
