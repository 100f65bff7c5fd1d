//! Fusion at load time, so that exported graphs take the fast constant-weight path the native
//! models take: a BatchNormalization after a convolution is folded into its weights, and a
//! convolution's following residual Add and Relu become one [`FUSED_CONV`] node (one op, one
//! activation, the backward of `vulnmap_ops::fused_conv`). A `MatMul` by a constant weight and
//! the `Add` of a constant bias after it become one [`FUSED_LINEAR`] node (the bias is added
//! inside the GEMM; neither gets a gradient), and two of them with an activation between become
//! one [`FUSED_FEED_FORWARD`] node, which keeps only the pre-activation. ConvNeXt's transposes,
//! LayerNorm, feed-forward block and layer scale become one [`FUSED_NORMALIZED_FEED_FORWARD`]
//! node on the channels-first layout, and the transposes around any other LayerNorm over the
//! channels disappear into one [`FUSED_CHANNEL_LAYER_NORM`] node. Attention's `MatMul -> Softmax
//! -> MatMul` becomes one [`FUSED_ATTENTION`] node, which keeps neither the scores nor the
//! weights, and the whole self-attention block around it (torchvision's `nn.MultiheadAttention`,
//! timm's `Attention`) one [`FUSED_SELF_ATTENTION`] node, which keeps only the projected queries,
//! keys and values. A pre-norm transformer sublayer's LayerNorm before and residual Add after
//! either of those joins its node ([`PRE_NORM_EPSILON`]).
//!
//! A chain of `Add`, `Sub`, `Mul` and `Div` with constants (an input's normalisation) becomes one
//! [`FUSED_AFFINE`] node, and a zero `Pad` before a convolution that convolution's border.
//!
//! Only values read by exactly one node disappear, so every other tensor a user can name (as a
//! Grad-CAM layer) stays.

use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::ops::{
    batch_norm_affine, Attrs, FUSED_AFFINE, FUSED_ATTENTION, FUSED_BN_RELU,
    FUSED_CHANNEL_LAYER_NORM, FUSED_CONV, FUSED_FEED_FORWARD, FUSED_GELU, FUSED_LINEAR,
    FUSED_NORMALIZED_FEED_FORWARD, FUSED_SELF_ATTENTION, FUSED_SILU, PRE_NORM_EPSILON,
};
use crate::proto::{attribute_type, AttributeProto};
use candle_core::{DType, Tensor};

/// The single node reading `value`, if exactly one does and it is not the graph's output.
fn sole_reader(graph: &Graph, readers: &[usize], value: usize) -> Option<usize> {
    if readers[value] != 1 {
        return None;
    }
    graph
        .nodes
        .iter()
        .position(|n| n.inputs.contains(&Some(value)))
}

/// Folds `Conv -> BatchNormalization` (constant weights and statistics) into the convolution.
pub(crate) fn fold_batch_norms(graph: &mut Graph) -> Result<()> {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let conv = &graph.nodes[i];
        let Some(Some(out)) = conv
            .outputs
            .first()
            .copied()
            .filter(|_| conv.op_type == "Conv")
        else {
            i += 1;
            continue;
        };
        let Some(j) = sole_reader(graph, &readers, out) else {
            i += 1;
            continue;
        };
        let bn = &graph.nodes[j];
        let constant = |v: Option<usize>| v.and_then(|v| graph.constants[v].clone());
        let params: Option<Vec<Tensor>> = (1..5)
            .map(|k| constant(bn.inputs.get(k).copied().flatten()))
            .collect();
        let weight = constant(conv.inputs.get(1).copied().flatten());
        let bias = conv.inputs.get(2).copied().flatten();
        let bias_value = constant(bias);
        let fits = bn.op_type == "BatchNormalization"
            && bn.inputs.first() == Some(&Some(out))
            && bn.output_count() == 1
            && Attrs(&bn.attrs).int("training_mode", 0) == 0
            && (bias.is_none() || bias_value.is_some());
        let (Some(params), Some(weight), true) = (params, weight, fits) else {
            i += 1;
            continue;
        };
        let eps = Attrs(&bn.attrs).float("epsilon", 1e-5) as f64;
        let fold = || -> candle_core::Result<(Tensor, Tensor)> {
            let (scale, shift) =
                batch_norm_affine(&params[0], &params[1], &params[2], &params[3], eps)?;
            let cout = weight.dim(0)?;
            let w = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
            let b = match &bias_value {
                Some(b) => (b.mul(&scale)? + shift)?,
                None => shift,
            };
            Ok((w, b))
        };
        let (w, b) = fold().map_err(|e| graph.node_error(&graph.nodes[j], e))?;
        let bn_outputs = graph.nodes[j].outputs.clone();
        let name = graph.names[out].clone();
        let w = graph.add_constant(format!("{name}.folded_weight"), w);
        let b = graph.add_constant(format!("{name}.folded_bias"), b);
        let conv = &mut graph.nodes[i];
        conv.inputs.resize(3, None);
        conv.inputs[1] = Some(w);
        conv.inputs[2] = Some(b);
        conv.outputs = bn_outputs;
        graph.nodes.remove(j);
    }
    Ok(())
}

/// The upper bound of a `Clip` node that is a clipped ReLU (`min` 0, `max` constant): ReLU6 is
/// `Clip(0, 6)` in exported MobileNets and EfficientNet-Lites.
fn clipped_relu_max(graph: &Graph, node: &Node) -> Option<f32> {
    if node.op_type != "Clip" || node.output_count() != 1 {
        return None;
    }
    let constant = |i: usize| -> Option<f32> {
        let v = (*node.inputs.get(i)?)?;
        graph.constants[v]
            .as_ref()?
            .to_dtype(candle_core::DType::F32)
            .ok()?
            .to_vec0()
            .ok()
    };
    let attr =
        |name: &str| -> Option<f32> { node.attrs.iter().find(|a| a.name == name).map(|a| a.f) };
    // Opset 11 on: inputs; before it: attributes.
    let (min, max) = if node.inputs.len() > 1 {
        (constant(1)?, constant(2)?)
    } else {
        (attr("min")?, attr("max")?)
    };
    (min == 0.0 && max > 0.0).then_some(max)
}

/// Fuses `Conv -> Add(other) -> Relu`, `Conv -> Add(other)`, `Conv -> Relu` and
/// `Conv -> Clip(0, max)` into one node.
pub(crate) fn fuse_epilogues(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let conv = &graph.nodes[i];
        let out = match conv.outputs.first() {
            Some(Some(out)) if conv.op_type == "Conv" && conv.output_count() == 1 => *out,
            _ => {
                i += 1;
                continue;
            }
        };
        let mut absorbed: Vec<usize> = Vec::new();
        let mut residual = None;
        let mut relu = false;
        let mut relu_max = None;
        let mut last_out = out;
        if let Some(j) = sole_reader(graph, &readers, out) {
            let next = &graph.nodes[j];
            if next.op_type == "Add" && next.inputs.len() == 2 && next.output_count() == 1 {
                let other = if next.inputs[0] == Some(out) {
                    next.inputs[1]
                } else {
                    next.inputs[0]
                };
                if other.is_some() && other != Some(out) {
                    residual = other;
                    absorbed.push(j);
                    if let Some(Some(o)) = next.outputs.first() {
                        last_out = *o;
                    }
                }
            } else if next.op_type == "Relu" {
                relu = true;
                absorbed.push(j);
            } else if let Some(max) = clipped_relu_max(graph, next) {
                relu = true;
                relu_max = Some(max);
                absorbed.push(j);
            }
        }
        if residual.is_some() {
            if let Some(k) = sole_reader(graph, &readers, last_out) {
                if graph.nodes[k].op_type == "Relu" {
                    relu = true;
                    absorbed.push(k);
                }
            }
        }
        let Some(&last) = absorbed.last() else {
            i += 1;
            continue;
        };
        let mut fused: Node = graph.nodes[i].clone();
        fused.op_type = FUSED_CONV.to_string();
        fused.inputs.resize(3, None);
        fused.inputs.push(residual);
        fused.attrs.push(AttributeProto {
            name: "relu".into(),
            r#type: attribute_type::INT,
            i: relu as i64,
            ..Default::default()
        });
        if let Some(max) = relu_max {
            fused.attrs.push(AttributeProto {
                name: "relu_max".into(),
                r#type: attribute_type::FLOAT,
                f: max,
                ..Default::default()
            });
        }
        fused.outputs = graph.nodes[last].outputs.clone();
        // The fused node takes the place of the last node it absorbs, where the residual exists.
        graph.nodes[last] = fused;
        let mut gone = absorbed[..absorbed.len() - 1].to_vec();
        gone.push(i);
        gone.sort_unstable();
        for k in gone.into_iter().rev() {
            graph.nodes.remove(k);
        }
    }
}

/// Fuses a zero `Pad` (opset 11 on: its amounts an input, often computed from the input's
/// shape, as TensorFlow's "SAME" padding is exported) into the convolution reading it, as that
/// convolution's input 4: the padded copy is then not kept for the backward pass (the depthwise
/// kernel adds the border plane by plane). Run after [`fuse_epilogues`].
pub(crate) fn fuse_pads_into_convs(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let node = &graph.nodes[i];
        let zero = |v: Option<&Option<usize>>| {
            v.copied()
                .flatten()
                .is_none_or(|v| scalar(graph, Some(v)) == Some(0.0))
        };
        let found = (node.op_type == "Pad"
            && graph.opset >= 11
            && Attrs(&node.attrs).string("mode", "constant") == "constant"
            && node.inputs.len() <= 3
            && zero(node.inputs.get(2)))
        .then_some(())
        .and_then(|_| {
            let [Some(x), Some(pads), ..] = node.inputs.as_slice() else {
                return None;
            };
            let conv = sole_reader(graph, &readers, only_output(node)?)?;
            let reader = &graph.nodes[conv];
            let is_conv = matches!(reader.op_type.as_str(), "Conv" | FUSED_CONV);
            (is_conv && reader.inputs.first() == Some(&node.outputs[0]) && reader.inputs.len() <= 4)
                .then_some((conv, *x, *pads))
        });
        let Some((conv, x, pads)) = found else {
            i += 1;
            continue;
        };
        let fused = &mut graph.nodes[conv];
        fused.op_type = FUSED_CONV.to_string();
        fused.inputs[0] = Some(x);
        fused.inputs.resize(4, None);
        fused.inputs.push(Some(pads));
        graph.nodes.remove(i);
    }
}

/// The value of a constant scalar (any shape of one element).
fn scalar(graph: &Graph, value: Option<usize>) -> Option<f32> {
    let t = graph.constants[value?].as_ref()?;
    (t.elem_count() == 1)
        .then(|| {
            t.flatten_all()
                .ok()?
                .to_dtype(candle_core::DType::F32)
                .ok()?
                .to_vec1::<f32>()
                .ok()
        })
        .flatten()?
        .first()
        .copied()
}

/// The input of a binary node other than `value`, if `value` is one of its two inputs.
fn other_input(node: &Node, value: usize) -> Option<Option<usize>> {
    match node.inputs.as_slice() {
        [a, b] if *a == Some(value) => Some(*b),
        [a, b] if *b == Some(value) => Some(*a),
        _ => None,
    }
}

/// The single output of `node`.
fn only_output(node: &Node) -> Option<usize> {
    match node.outputs.as_slice() {
        [Some(v)] => Some(*v),
        _ => None,
    }
}

/// `Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)` from node `i` (how
/// `torch.onnx.export` writes `nn.GELU()` before opset 20): `x` and the nodes, last one last.
fn match_gelu(graph: &Graph, readers: &[usize], i: usize) -> Option<(usize, Vec<usize>)> {
    let close = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() < 1e-4);
    let div = &graph.nodes[i];
    if div.op_type != "Div"
        || div.inputs.len() != 2
        || !close(scalar(graph, div.inputs[1]), std::f32::consts::SQRT_2)
    {
        return None;
    }
    let x = div.inputs[0]?;
    let erf = sole_reader(graph, readers, only_output(div)?)?;
    (graph.nodes[erf].op_type == "Erf").then_some(())?;
    let add = sole_reader(graph, readers, only_output(&graph.nodes[erf])?)?;
    let erf_out = only_output(&graph.nodes[erf])?;
    (graph.nodes[add].op_type == "Add"
        && close(scalar(graph, other_input(&graph.nodes[add], erf_out)?), 1.0))
    .then_some(())?;
    let add_out = only_output(&graph.nodes[add])?;
    let times_x = sole_reader(graph, readers, add_out)?;
    (graph.nodes[times_x].op_type == "Mul"
        && other_input(&graph.nodes[times_x], add_out)? == Some(x))
    .then_some(())?;
    let product = only_output(&graph.nodes[times_x])?;
    let half = sole_reader(graph, readers, product)?;
    (graph.nodes[half].op_type == "Mul"
        && close(
            scalar(graph, other_input(&graph.nodes[half], product)?),
            0.5,
        ))
    .then_some(())?;
    only_output(&graph.nodes[half])?;
    Some((x, vec![i, erf, add, times_x, half]))
}

/// `Sigmoid(x) -> Mul(x)` from node `i`: `x` and the two nodes.
fn match_silu(graph: &Graph, readers: &[usize], i: usize) -> Option<(usize, Vec<usize>)> {
    let sigmoid = &graph.nodes[i];
    if sigmoid.op_type != "Sigmoid" {
        return None;
    }
    let x = (*sigmoid.inputs.first()?)?;
    let s = only_output(sigmoid)?;
    let mul = sole_reader(graph, readers, s)?;
    (graph.nodes[mul].op_type == "Mul" && other_input(&graph.nodes[mul], s)? == Some(x))
        .then_some(())?;
    only_output(&graph.nodes[mul])?;
    Some((x, vec![i, mul]))
}

/// Fuses the exported forms of GELU and SiLU into one node each, whose op computes the value in
/// one pass and keeps only its input for the backward pass.
pub(crate) fn fuse_activations(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let found = match_gelu(graph, &readers, i)
            .map(|m| (FUSED_GELU, m))
            .or_else(|| match_silu(graph, &readers, i).map(|m| (FUSED_SILU, m)));
        let Some((op_type, (x, mut nodes))) = found else {
            i += 1;
            continue;
        };
        let last = *nodes.last().unwrap_or(&i);
        let fused = Node {
            name: graph.nodes[last].name.clone(),
            op_type: op_type.to_string(),
            attrs: Vec::new(),
            inputs: vec![Some(x)],
            outputs: graph.nodes[last].outputs.clone(),
        };
        // The fused node takes the last node's place (its readers come after it).
        graph.nodes[last] = fused;
        nodes.pop();
        nodes.sort_unstable();
        for k in nodes.into_iter().rev() {
            graph.nodes.remove(k);
        }
    }
}

/// Fuses `MatMul(x, W) -> Add(bias)` (`W` a 2-D constant, `bias` a 1-D constant of `W`'s column
/// count; how `torch.onnx.export` writes `nn.Linear` on more than two dimensions) into one node.
pub(crate) fn fuse_linear_biases(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let Some((add, x, w, bias)) = match_linear(graph, &readers, i) else {
            i += 1;
            continue;
        };
        let fused = Node {
            name: graph.nodes[add].name.clone(),
            op_type: FUSED_LINEAR.to_string(),
            attrs: Vec::new(),
            inputs: vec![x, Some(w), Some(bias)],
            outputs: graph.nodes[add].outputs.clone(),
        };
        // The fused node takes the Add's place (its readers come after it).
        graph.nodes[add] = fused;
        graph.nodes.remove(i);
    }
}

/// Node `i` as `MatMul(x, W)` read only by `Add(bias)`: the Add's index, `x`, `W` and `bias`.
fn match_linear(
    graph: &Graph,
    readers: &[usize],
    i: usize,
) -> Option<(usize, Option<usize>, usize, usize)> {
    let matmul = &graph.nodes[i];
    let [x, Some(w)] = matmul.inputs.as_slice() else {
        return None;
    };
    let weight = graph.constants[*w].as_ref()?;
    if matmul.op_type != "MatMul" || weight.rank() != 2 {
        return None;
    }
    let out = only_output(matmul)?;
    let add = sole_reader(graph, readers, out)?;
    if graph.nodes[add].op_type != "Add" || only_output(&graph.nodes[add]).is_none() {
        return None;
    }
    let bias = other_input(&graph.nodes[add], out)??;
    let b = graph.constants[bias].as_ref()?;
    (b.rank() == 1 && b.elem_count() == weight.dim(1).ok()?).then_some((add, *x, *w, bias))
}

/// Fuses a `BatchNormalization` (what is left after [`fold_batch_norms`]: one that follows no
/// convolution, as DenseNet's before each) with the `Relu` that is its only reader.
pub(crate) fn fuse_batch_norm_relus(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let node = &graph.nodes[i];
        let relu = match only_output(node) {
            Some(out) if node.op_type == "BatchNormalization" => {
                sole_reader(graph, &readers, out).filter(|&j| graph.nodes[j].op_type == "Relu")
            }
            _ => None,
        };
        let Some(relu) = relu else {
            i += 1;
            continue;
        };
        let mut fused = graph.nodes[i].clone();
        fused.op_type = FUSED_BN_RELU.to_string();
        fused.outputs = graph.nodes[relu].outputs.clone();
        // The fused node takes the Relu's place (its readers come after it).
        graph.nodes[relu] = fused;
        graph.nodes.remove(i);
    }
}

/// Fuses `MatMul(a, b) -> Softmax(last axis) -> MatMul(weights, v)` (how `torch.onnx.export`
/// writes attention, `a` and `b` the scaled queries and transposed keys) into one node, whose op
/// keeps neither the scores nor the weights for the backward pass.
pub(crate) fn fuse_attention(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let Some((softmax, product, inputs)) = match_attention(graph, &readers, i) else {
            i += 1;
            continue;
        };
        let fused = Node {
            name: graph.nodes[product].name.clone(),
            op_type: FUSED_ATTENTION.to_string(),
            attrs: Vec::new(),
            inputs,
            outputs: graph.nodes[product].outputs.clone(),
        };
        // The fused node takes the second product's place (its readers come after it).
        graph.nodes[product] = fused;
        graph.nodes.remove(softmax);
        graph.nodes.remove(i);
    }
}

/// Node `i` as the first product of an attention: the Softmax's and the second product's
/// indices, and the inputs `a, b, v`.
fn match_attention(
    graph: &Graph,
    readers: &[usize],
    i: usize,
) -> Option<(usize, usize, Vec<Option<usize>>)> {
    let scores = &graph.nodes[i];
    let [Some(a), Some(b)] = scores.inputs.as_slice() else {
        return None;
    };
    let variable = |v: usize| graph.constants[v].is_none();
    (scores.op_type == "MatMul" && variable(*a) && variable(*b)).then_some(())?;
    let s = only_output(scores)?;
    let softmax = sole_reader(graph, readers, s)?;
    let node = &graph.nodes[softmax];
    let default_axis = if graph.opset >= 13 { -1 } else { 1 };
    (node.op_type == "Softmax"
        && Attrs(&node.attrs).int("axis", default_axis) == -1
        && node.inputs.first() == Some(&Some(s)))
    .then_some(())?;
    let p = only_output(node)?;
    let product = sole_reader(graph, readers, p)?;
    let node = &graph.nodes[product];
    let [Some(first), Some(v)] = node.inputs.as_slice() else {
        return None;
    };
    (node.op_type == "MatMul" && *first == p && variable(*v)).then_some(())?;
    only_output(node)?;
    Some((softmax, product, vec![Some(*a), Some(*b), Some(*v)]))
}

/// Fuses an exported self-attention block (torchvision's `nn.MultiheadAttention` with the same
/// input as query, key and value, or timm's `Attention`) into one node: run after
/// [`fuse_linear_biases`] and [`fuse_attention`].
pub(crate) fn fuse_self_attention(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let Some(SelfAttentionMatch {
            absorbed,
            inputs,
            scale,
            output_transposed,
        }) = match_torchvision_self_attention(graph, i)
            .or_else(|| match_timm_self_attention(graph, i))
        else {
            i += 1;
            continue;
        };
        let before = graph.nodes.clone();
        let last = *absorbed.iter().max().expect("the closing transpose");
        let mut vanished: Vec<usize> = absorbed
            .iter()
            .filter(|&&k| k != last)
            .flat_map(|&k| graph.nodes[k].outputs.iter().flatten().copied())
            .collect();
        let mut attrs = vec![AttributeProto {
            name: "transB".into(),
            r#type: attribute_type::INT,
            i: i64::from(output_transposed),
            ..Default::default()
        }];
        attrs.extend(scale.map(|scale| AttributeProto {
            name: "scale".into(),
            r#type: attribute_type::FLOAT,
            f: scale,
            ..Default::default()
        }));
        let fused = Node {
            name: graph.nodes[last].name.clone(),
            op_type: FUSED_SELF_ATTENTION.to_string(),
            attrs,
            inputs,
            outputs: graph.nodes[last].outputs.clone(),
        };
        // The fused node takes the last absorbed node's place (its readers come after it).
        graph.nodes[last] = fused;
        let mut gone: Vec<usize> = absorbed.into_iter().filter(|&k| k != last).collect();
        gone.sort_unstable();
        for k in gone.into_iter().rev() {
            graph.nodes.remove(k);
        }
        // The shape arithmetic that read the block's intermediates (their reshape targets) goes
        // with them; if anything else needed it, the block stays as it was.
        let mut k = 0;
        while k < graph.nodes.len() {
            let node = &graph.nodes[k];
            if node.inputs.iter().flatten().any(|v| vanished.contains(v)) {
                vanished.extend(node.outputs.iter().flatten().copied());
                graph.nodes.remove(k);
            } else {
                k += 1;
            }
        }
        let kept = graph
            .nodes
            .iter()
            .any(|n| n.op_type == FUSED_SELF_ATTENTION && n.outputs == before[last].outputs);
        if !kept || vanished.contains(&graph.output) {
            graph.nodes = before;
            i += 1;
        }
    }
}

/// Fuses a pre-norm transformer sublayer, `LayerNormalization(-1) -> FUSED_FEED_FORWARD or
/// FUSED_SELF_ATTENTION -> Add(the norm's input)`, into the sublayer's node ([`PRE_NORM_EPSILON`]),
/// whose op then keeps neither the normalised tokens nor its own output for the backward pass;
/// run after [`fuse_self_attention`]. `Shape` nodes reading the normalised tokens read the norm's
/// input instead (the same shape).
pub(crate) fn fuse_pre_norm_residuals(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let Some((norm, add)) = match_pre_norm_residual(graph, i) else {
            i += 1;
            continue;
        };
        let normalised = graph.nodes[i].inputs[0];
        let (x, weight, bias, epsilon) = {
            let node = &graph.nodes[norm];
            (
                node.inputs[0],
                node.inputs[1],
                node.inputs.get(2).copied().flatten(),
                Attrs(&node.attrs).float("epsilon", 1e-5),
            )
        };
        let mut fused = graph.nodes[i].clone();
        fused.inputs[0] = x;
        fused.inputs.extend([weight, bias]);
        fused.attrs.push(AttributeProto {
            name: PRE_NORM_EPSILON.into(),
            r#type: attribute_type::FLOAT,
            f: epsilon,
            ..Default::default()
        });
        fused.outputs = graph.nodes[add].outputs.clone();
        for node in graph.nodes.iter_mut().filter(|n| n.op_type == "Shape") {
            if node.inputs.first() == Some(&normalised) {
                node.inputs[0] = x;
            }
        }
        // The fused node takes the Add's place (its readers come after it); the norm comes
        // before the sublayer.
        graph.nodes[add] = fused;
        graph.nodes.remove(i);
        graph.nodes.remove(norm);
        i -= 1;
    }
}

/// Node `i` as a feed-forward or self-attention node with no normalisation fused in yet, reading
/// a `LayerNormalization` over the last axis (constant scale and shift of the sublayer's width,
/// one output read by node `i` and `Shape` nodes only) and read only by an `Add` of the norm's
/// input: the norm's and the Add's indices.
fn match_pre_norm_residual(graph: &Graph, i: usize) -> Option<(usize, usize)> {
    let node = &graph.nodes[i];
    let own_inputs = match node.op_type.as_str() {
        FUSED_FEED_FORWARD => 5,
        FUSED_SELF_ATTENTION => 6,
        _ => return None,
    };
    let fused_before = node.attrs.iter().any(|a| a.name == PRE_NORM_EPSILON);
    (node.inputs.len() == own_inputs && !fused_before).then_some(())?;
    let normalised = (*node.inputs.first()?)?;
    let norm = graph
        .nodes
        .iter()
        .position(|n| n.outputs.contains(&Some(normalised)))?;
    let norm_node = &graph.nodes[norm];
    let constant = |v: Option<usize>| v.and_then(|v| graph.constants[v].as_ref());
    let width = constant(node.inputs[1])?.dims().first().copied()?;
    let of_width = |v: Option<usize>| constant(v).is_some_and(|t| t.elem_count() == width);
    let bias = norm_node.inputs.get(2).copied().flatten();
    (norm_node.op_type == "LayerNormalization"
        && only_output(norm_node) == Some(normalised)
        && Attrs(&norm_node.attrs).int("axis", -1) == -1
        && of_width(norm_node.inputs.get(1).copied().flatten())
        && (bias.is_none() || of_width(bias)))
    .then_some(())?;
    let x = (*norm_node.inputs.first()?)?;
    (data_readers(graph)[normalised] == 1).then_some(())?;
    if node.op_type == FUSED_FEED_FORWARD {
        let out_width = constant(node.inputs[3])?.dims().get(1).copied();
        (out_width == Some(width)).then_some(())?;
    }
    let out = only_output(node)?;
    let add = sole_reader(graph, &graph.readers(), out)?;
    let add_node = &graph.nodes[add];
    (add_node.op_type == "Add"
        && other_input(add_node, out) == Some(Some(x))
        && only_output(add_node).is_some())
    .then_some((norm, add))
}

/// How many nodes read each value, not counting `Shape` nodes (which read no elements), and
/// the graph's output as one more.
fn data_readers(graph: &Graph) -> Vec<usize> {
    let mut count = vec![0; graph.names.len()];
    for node in graph.nodes.iter().filter(|n| n.op_type != "Shape") {
        for v in node.inputs.iter().flatten() {
            count[*v] += 1;
        }
    }
    count[graph.output] += 1;
    count
}

/// Whether `value` is computed from constants and the shape of `shaped` only.
fn from_shape_of(graph: &Graph, value: usize, shaped: usize) -> bool {
    if graph.constants[value].is_some() {
        return true;
    }
    let Some(node) = graph
        .nodes
        .iter()
        .find(|n| n.outputs.contains(&Some(value)))
    else {
        return false;
    };
    if node.op_type == "Shape" {
        return node.inputs.first() == Some(&Some(shaped));
    }
    node.inputs
        .iter()
        .flatten()
        .all(|&v| from_shape_of(graph, v, shaped))
}

/// The sole reader of node `i`'s only output, if it is an `op_type` node reading it first.
/// `Shape` nodes reading it are not counted (`readers` from [`data_readers`]).
fn follow(graph: &Graph, readers: &[usize], i: usize, op_type: &str) -> Option<usize> {
    let out = only_output(&graph.nodes[i])?;
    (readers[out] == 1).then_some(())?;
    let j = graph
        .nodes
        .iter()
        .position(|n| n.op_type != "Shape" && n.inputs.contains(&Some(out)))?;
    let node = &graph.nodes[j];
    (node.op_type == op_type && node.inputs.first() == Some(&Some(out))).then_some(j)
}

/// A self-attention block found in a graph.
struct SelfAttentionMatch {
    /// The nodes it absorbs, the last one last in the graph's order.
    absorbed: Vec<usize>,
    /// The fused node's inputs: the tokens, the in-projection's weight (`x W`) and bias, the
    /// out-projection's weight and bias, the queries' reshape target (its last value: `d`).
    inputs: Vec<Option<usize>>,
    /// The scores' scale if the export's was a constant (else `1 / √d`).
    scale: Option<f32>,
    /// Whether the out-projection's weight is stored `out x in` (`Gemm`'s `transB`).
    output_transposed: bool,
}

/// Node `i` as the `Transpose(1, 0, 2)` that opens torchvision's self-attention (tokens first):
/// the block's nodes after it and the fused node's inputs (the transpose's input first). Each
/// intermediate value must have no reader outside the block but `Shape` nodes. The transpose
/// stays: the reshape targets read its shape.
fn match_torchvision_self_attention(graph: &Graph, i: usize) -> Option<SelfAttentionMatch> {
    let readers = &data_readers(graph);
    let open = &graph.nodes[i];
    transpose(open, &[1, 0, 2]).then_some(())?;
    let x = (*open.inputs.first()?)?;
    // The in-projection, then `Reshape -> Unsqueeze(0) -> Transpose -> Squeeze(3)` splitting it
    // into queries, keys and values on a new first axis.
    let projection = follow(graph, readers, i, FUSED_LINEAR)?;
    let [_, Some(w_in), b_in] = graph.nodes[projection].inputs.as_slice() else {
        return None;
    };
    let reshape = follow(graph, readers, projection, "Reshape")?;
    let unsqueeze = follow(graph, readers, reshape, "Unsqueeze")?;
    let split = follow(graph, readers, unsqueeze, "Transpose")?;
    transpose(&graph.nodes[split], &[3, 1, 2, 0, 4]).then_some(())?;
    let squeeze = follow(graph, readers, split, "Squeeze")?;
    let parts = only_output(&graph.nodes[squeeze])?;
    (readers[parts] == 3).then_some(())?;
    let mut gathers = [None; 3];
    for (j, node) in graph.nodes.iter().enumerate() {
        // `Shape` readers are allowed (not counted in `readers`); they go with the block.
        if node.op_type == "Shape" || node.inputs.first() != Some(&Some(parts)) {
            continue;
        }
        let index = scalar(graph, node.inputs.get(1).copied().flatten())?;
        let slot = gathers
            .get_mut(index as usize)
            .filter(|_| index.fract() == 0.0)?;
        (node.op_type == "Gather" && Attrs(&node.attrs).int("axis", 0) == 0 && slot.is_none())
            .then_some(())?;
        *slot = Some(j);
    }
    let [Some(gq), Some(gk), Some(gv)] = gathers else {
        return None;
    };
    // Each of them `Reshape(L, N H, d) -> Transpose(1, 0, 2) -> Reshape(N, H, L, d)`.
    let heads = |g: usize| -> Option<[usize; 3]> {
        let first = follow(graph, readers, g, "Reshape")?;
        let swap = follow(graph, readers, first, "Transpose")?;
        transpose(&graph.nodes[swap], &[1, 0, 2]).then_some(())?;
        Some([first, swap, follow(graph, readers, swap, "Reshape")?])
    };
    let (q, k, v) = (heads(gq)?, heads(gk)?, heads(gv)?);
    let (scaled, scale) = match_scaled_attention(graph, readers, [q[2], k[2], v[2]])?;
    let attention = scaled[3];
    // `Transpose(2, 0, 1, 3) -> Reshape(L N, E) -> Gemm(W_out transposed) -> Reshape(L, N, E) ->
    // Transpose(1, 0, 2)` back to batch first.
    let merge = follow(graph, readers, attention, "Transpose")?;
    transpose(&graph.nodes[merge], &[2, 0, 1, 3]).then_some(())?;
    let rows = follow(graph, readers, merge, "Reshape")?;
    let gemm = follow(graph, readers, rows, "Gemm")?;
    let node = &graph.nodes[gemm];
    let attrs = Attrs(&node.attrs);
    let plain = attrs.int("transA", 0) == 0
        && attrs.int("transB", 0) == 1
        && attrs.float("alpha", 1.0) == 1.0
        && attrs.float("beta", 1.0) == 1.0;
    let w_out = (*node.inputs.get(1)?)?;
    let b_out = node.inputs.get(2).copied().flatten();
    let constant_of_rank = |v: usize, rank: usize| {
        graph.constants[v]
            .as_ref()
            .is_some_and(|t| t.rank() == rank)
    };
    (plain && constant_of_rank(w_out, 2) && b_out.is_none_or(|b| constant_of_rank(b, 1)))
        .then_some(())?;
    let unrows = follow(graph, readers, gemm, "Reshape")?;
    let close = follow(graph, readers, unrows, "Transpose")?;
    transpose(&graph.nodes[close], &[1, 0, 2]).then_some(())?;
    let q_target = graph.nodes[q[0]].inputs.get(1).copied().flatten()?;
    let mut absorbed = vec![
        projection, reshape, unsqueeze, split, squeeze, gq, gk, gv, merge, rows, gemm, unrows,
        close,
    ];
    absorbed.extend(q.into_iter().chain(k).chain(v).chain(scaled));
    Some(SelfAttentionMatch {
        absorbed,
        inputs: vec![
            Some(x),
            Some(*w_in),
            *b_in,
            Some(w_out),
            b_out,
            Some(q_target),
        ],
        scale,
        output_transposed: true,
    })
}

/// Node `i` as the in-projection of timm's `Attention` (tokens batch first): `Reshape(N, L, 3,
/// H, d) -> Transpose(2, 0, 3, 1, 4) -> Split -> Squeeze(0)` into queries, keys and values, the
/// scaled attention, `Transpose(0, 2, 1, 3) -> Reshape(N, L, E)` and the out-projection. Each
/// intermediate value must have no reader outside the block but `Shape` nodes.
fn match_timm_self_attention(graph: &Graph, i: usize) -> Option<SelfAttentionMatch> {
    let readers = &data_readers(graph);
    let projection = &graph.nodes[i];
    let [Some(x), Some(w_in), b_in] = projection.inputs.as_slice() else {
        return None;
    };
    (projection.op_type == FUSED_LINEAR).then_some(())?;
    let reshape = follow(graph, readers, i, "Reshape")?;
    let q_target = graph.nodes[reshape].inputs.get(1).copied().flatten()?;
    let heads = follow(graph, readers, reshape, "Transpose")?;
    transpose(&graph.nodes[heads], &[2, 0, 3, 1, 4]).then_some(())?;
    let split = follow(graph, readers, heads, "Split")?;
    let node = &graph.nodes[split];
    let sizes = node.inputs.get(1).copied().flatten();
    let ones = sizes.is_none_or(|v| constant_ints(graph, v).is_some_and(|s| s == [1, 1, 1]))
        && Attrs(&node.attrs)
            .ints("split")
            .is_none_or(|s| s == [1, 1, 1]);
    (Attrs(&node.attrs).int("axis", 0) == 0 && node.outputs.len() == 3 && ones).then_some(())?;
    let mut parts = [0; 3];
    for (part, out) in parts.iter_mut().zip(&node.outputs) {
        let out = (*out)?;
        (readers[out] == 1).then_some(())?;
        let j = graph
            .nodes
            .iter()
            .position(|n| n.op_type != "Shape" && n.inputs.contains(&Some(out)))?;
        let squeeze = &graph.nodes[j];
        let axes = match squeeze.inputs.get(1).copied().flatten() {
            Some(v) => constant_ints(graph, v)?,
            None => Attrs(&squeeze.attrs).ints("axes")?.to_vec(),
        };
        (squeeze.op_type == "Squeeze" && squeeze.inputs.first() == Some(&Some(out)) && axes == [0])
            .then_some(())?;
        *part = j;
    }
    let (scaled, scale) = match_scaled_attention(graph, readers, parts)?;
    let merge = follow(graph, readers, scaled[3], "Transpose")?;
    transpose(&graph.nodes[merge], &[0, 2, 1, 3]).then_some(())?;
    let rows = follow(graph, readers, merge, "Reshape")?;
    let output = follow(graph, readers, rows, FUSED_LINEAR)?;
    let [_, Some(w_out), b_out] = graph.nodes[output].inputs.as_slice() else {
        return None;
    };
    let mut absorbed = vec![i, reshape, heads, split, merge, rows, output];
    absorbed.extend(parts.into_iter().chain(scaled));
    Some(SelfAttentionMatch {
        absorbed,
        inputs: vec![
            Some(*x),
            Some(*w_in),
            *b_in,
            Some(*w_out),
            *b_out,
            Some(q_target),
        ],
        scale,
        output_transposed: false,
    })
}

/// From the nodes computing the queries, keys and values (`N x H x L x d` each): the queries
/// and the transposed keys scaled, then the fused attention of them. Returns those four nodes
/// (the attention last) and the scale if it was constant; else the factors must be the
/// exporter's default, `1 / √d` split between the two, computed from the queries' shape.
fn match_scaled_attention(
    graph: &Graph,
    readers: &[usize],
    [q, k, v]: [usize; 3],
) -> Option<([usize; 4], Option<f32>)> {
    let q_scale = follow(graph, readers, q, "Mul")?;
    let k_swap = follow(graph, readers, k, "Transpose")?;
    transpose(&graph.nodes[k_swap], &[0, 1, 3, 2]).then_some(())?;
    let k_scale = follow(graph, readers, k_swap, "Mul")?;
    let factor =
        |m: usize, from: usize| other_input(&graph.nodes[m], only_output(&graph.nodes[from])?)?;
    let (q_factor, k_factor) = (factor(q_scale, q)?, factor(k_scale, k_swap)?);
    let scale = match (scalar(graph, Some(q_factor)), scalar(graph, Some(k_factor))) {
        (Some(a), Some(b)) => Some(a * b),
        _ => {
            let queries = only_output(&graph.nodes[q])?;
            (from_shape_of(graph, q_factor, queries) && from_shape_of(graph, k_factor, queries))
                .then_some(None)?
        }
    };
    let attention = follow(graph, readers, q_scale, FUSED_ATTENTION)?;
    let operands = [q_scale, k_scale, v].map(|n| only_output(&graph.nodes[n]).map(Some));
    (graph.nodes[attention]
        .inputs
        .iter()
        .copied()
        .map(Some)
        .collect::<Vec<_>>()
        == operands)
        .then_some(())?;
    Some(([q_scale, k_swap, k_scale, attention], scale))
}

/// The values of a constant integer tensor.
fn constant_ints(graph: &Graph, value: usize) -> Option<Vec<i64>> {
    crate::ops::ints_of(graph.constants[value].as_ref()?).ok()
}

/// Fuses `Linear -> activation -> Linear` (two [`FUSED_LINEAR`] nodes, a transformer's or
/// ConvNeXt's feed-forward block) into one node; run after [`fuse_linear_biases`].
pub(crate) fn fuse_feed_forward(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let Some((activation, name, second)) = match_feed_forward(graph, &readers, i) else {
            i += 1;
            continue;
        };
        let (first, last) = (&graph.nodes[i], &graph.nodes[second]);
        let mut inputs = first.inputs.clone();
        inputs.extend_from_slice(&last.inputs[1..]);
        let fused = Node {
            name: last.name.clone(),
            op_type: FUSED_FEED_FORWARD.to_string(),
            attrs: vec![AttributeProto {
                name: "activation".into(),
                r#type: attribute_type::STRING,
                s: name.as_bytes().to_vec(),
                ..Default::default()
            }],
            inputs,
            outputs: last.outputs.clone(),
        };
        // The fused node takes the second layer's place (its readers come after it).
        graph.nodes[second] = fused;
        graph.nodes.remove(activation);
        graph.nodes.remove(i);
    }
}

/// Node `i` as the first linear layer of a feed-forward block: the activation's index and name
/// (as [`FUSED_FEED_FORWARD`]'s attribute says it) and the second layer's index.
fn match_feed_forward(
    graph: &Graph,
    readers: &[usize],
    i: usize,
) -> Option<(usize, &'static str, usize)> {
    let first = &graph.nodes[i];
    (first.op_type == FUSED_LINEAR && first.inputs.len() == 3).then_some(())?;
    let hidden = only_output(first)?;
    let activation = sole_reader(graph, readers, hidden)?;
    let node = &graph.nodes[activation];
    (node.inputs.first() == Some(&Some(hidden))).then_some(())?;
    let name = match node.op_type.as_str() {
        FUSED_GELU => "gelu",
        "Gelu" if Attrs(&node.attrs).string("approximate", "none") == "none" => "gelu",
        FUSED_SILU => "silu",
        "HardSwish" => "hardswish",
        _ => return None,
    };
    let activated = only_output(node)?;
    let second = sole_reader(graph, readers, activated)?;
    let node = &graph.nodes[second];
    (node.op_type == FUSED_LINEAR && node.inputs.len() == 3 && node.inputs[0] == Some(activated))
        .then_some(())?;
    only_output(node)?;
    Some((activation, name, second))
}

/// Whether `node` is a `Transpose` by `perm`.
fn transpose(node: &Node, perm: &[i64]) -> bool {
    node.op_type == "Transpose" && Attrs(&node.attrs).ints("perm") == Some(perm)
}

/// Node `i` as `Transpose(0, 2, 3, 1)` read only by a `LayerNormalization` over the last axis
/// with constant scale (and shift): the LayerNormalization's index.
fn channels_last_layer_norm(graph: &Graph, readers: &[usize], i: usize) -> Option<usize> {
    let open = &graph.nodes[i];
    (transpose(open, &[0, 2, 3, 1]) && matches!(open.inputs.first(), Some(Some(_))))
        .then_some(())?;
    let norm = sole_reader(graph, readers, only_output(open)?)?;
    let node = &graph.nodes[norm];
    let constant = |v: Option<usize>| v.is_none_or(|v| graph.constants[v].is_some());
    (node.op_type == "LayerNormalization"
        && node.inputs.first() == Some(&open.outputs[0])
        && node
            .inputs
            .get(1)
            .is_some_and(|w| w.is_some() && constant(*w))
        && constant(node.inputs.get(2).copied().flatten())
        && Attrs(&node.attrs).int("axis", -1) == -1)
        .then_some(norm)
}

/// `node` as `x * scale + shift` when it adds, subtracts, multiplies or divides (by) a constant
/// and a computed value `x`: `(x, scale, shift)`, the constants as stored (broadcast shapes).
fn affine_of_constant(graph: &Graph, node: &Node) -> Option<(usize, Tensor, Tensor)> {
    let [Some(a), Some(b)] = node.inputs.as_slice() else {
        return None;
    };
    let constant = |v: usize| graph.constants[v].as_ref();
    let (x, c, x_first) = match (constant(*a), constant(*b)) {
        (None, Some(c)) => (*a, c, true),
        (Some(c), None) => (*b, c, false),
        _ => return None,
    };
    let float = matches!(c.dtype(), DType::F32 | DType::F64);
    float.then_some(())?;
    let (ones, zeros) = (c.ones_like().ok()?, c.zeros_like().ok()?);
    let (scale, shift) = match (node.op_type.as_str(), x_first) {
        ("Add", _) => (ones, c.clone()),
        ("Sub", true) => (ones, c.neg().ok()?),
        ("Sub", false) => (ones.neg().ok()?, c.clone()),
        ("Mul", _) => (c.clone(), zeros),
        // `c / x` is not affine in x.
        ("Div", true) => (c.recip().ok()?, zeros),
        _ => return None,
    };
    // A division by zero stays a division (`x * inf` would turn a zero shift into NaN).
    let finite = scale
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .is_ok_and(|v| v.iter().all(|v| v.is_finite()));
    finite.then_some((x, scale, shift))
}

/// Fuses chains of `Add`, `Sub`, `Mul` and `Div` with a constant (an input's `(x - mean) / std`)
/// into one [`FUSED_AFFINE`] node `x * scale + shift`, the constants combined at load time: each
/// step's output would be a copy of the input kept until the backward pass ends.
pub(crate) fn fuse_affine_chains(graph: &mut Graph) -> Result<()> {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let first = &graph.nodes[i];
        let found = matches!(
            first.op_type.as_str(),
            "Add" | "Sub" | "Mul" | "Div" | FUSED_AFFINE
        )
        .then_some(())
        .and_then(|_| {
            let next = sole_reader(graph, &readers, only_output(first)?)?;
            let (_, scale, shift) = affine_of_constant(graph, &graph.nodes[next])?;
            let (x, first_scale, first_shift) = match first.op_type.as_str() {
                FUSED_AFFINE => {
                    let [Some(x), Some(a), Some(b)] = first.inputs.as_slice() else {
                        return None;
                    };
                    let constant = |v: usize| graph.constants[v].clone();
                    (*x, constant(*a)?, constant(*b)?)
                }
                _ => affine_of_constant(graph, first)?,
            };
            Some((next, x, first_scale, first_shift, scale, shift))
        });
        let Some((next, x, a1, b1, a2, b2)) = found else {
            i += 1;
            continue;
        };
        // (x a1 + b1) a2 + b2 = x (a1 a2) + (b1 a2 + b2), in the constants' broadcast shapes.
        let combined = || -> candle_core::Result<(Tensor, Tensor)> {
            let a2 = a2.to_dtype(a1.dtype())?;
            let b2 = b2.to_dtype(a1.dtype())?;
            Ok((
                a1.broadcast_mul(&a2)?,
                b1.broadcast_mul(&a2)?.broadcast_add(&b2)?,
            ))
        };
        let Ok((scale, shift)) = combined() else {
            i += 1;
            continue;
        };
        let name = graph.nodes[next].name.clone();
        let scale = graph.add_constant(format!("{name}.affine_scale"), scale);
        let shift = graph.add_constant(format!("{name}.affine_shift"), shift);
        let fused = Node {
            name,
            op_type: FUSED_AFFINE.to_string(),
            attrs: Vec::new(),
            inputs: vec![Some(x), Some(scale), Some(shift)],
            outputs: graph.nodes[next].outputs.clone(),
        };
        // The fused node takes the second node's place (its readers come after it); a longer
        // chain is fused again from there.
        graph.nodes[next] = fused;
        graph.nodes.remove(i);
    }
    Ok(())
}

/// Fuses `Transpose(0, 2, 3, 1) -> LayerNormalization(-1) -> Transpose(0, 3, 1, 2)` into one
/// node; run after [`fuse_normalized_feed_forward`], which takes ConvNeXt's blocks' LayerNorms.
pub(crate) fn fuse_channel_layer_norms(graph: &mut Graph) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let found = channels_last_layer_norm(graph, &readers, i).and_then(|norm| {
            let close = sole_reader(graph, &readers, only_output(&graph.nodes[norm])?)?;
            transpose(&graph.nodes[close], &[0, 3, 1, 2]).then_some((norm, close))
        });
        let Some((norm, close)) = found else {
            i += 1;
            continue;
        };
        let mut fused = graph.nodes[norm].clone();
        fused.op_type = FUSED_CHANNEL_LAYER_NORM.to_string();
        fused.inputs[0] = graph.nodes[i].inputs[0];
        fused.outputs = graph.nodes[close].outputs.clone();
        // The fused node takes the closing transpose's place (its readers come after it).
        graph.nodes[close] = fused;
        graph.nodes.remove(norm);
        graph.nodes.remove(i);
    }
}

/// Fuses ConvNeXt's `Transpose(0, 2, 3, 1) -> LayerNormalization(-1) -> feed-forward ->
/// Transpose(0, 3, 1, 2)`, and the `Mul` by a constant per-channel scale after it if there is
/// one (folded into the second layer), into one node; run after [`fuse_feed_forward`].
pub(crate) fn fuse_normalized_feed_forward(graph: &mut Graph) -> Result<()> {
    let mut i = 0;
    while i < graph.nodes.len() {
        let readers = graph.readers();
        let Some((absorbed, mut inputs)) = match_normalized_feed_forward(graph, &readers, i) else {
            i += 1;
            continue;
        };
        fold_layer_scale(graph, &mut inputs)
            .map_err(|e| graph.node_error(&graph.nodes[absorbed[absorbed.len() - 1]], e))?;
        let (norm, ff) = (&graph.nodes[absorbed[0]], &graph.nodes[absorbed[1]]);
        let epsilon = Attrs(&norm.attrs).float("epsilon", 1e-5);
        let mut attrs = ff.attrs.clone();
        attrs.push(AttributeProto {
            name: "epsilon".into(),
            r#type: attribute_type::FLOAT,
            f: epsilon,
            ..Default::default()
        });
        let last = *absorbed.last().expect("at least the closing transpose");
        let fused = Node {
            name: graph.nodes[last].name.clone(),
            op_type: FUSED_NORMALIZED_FEED_FORWARD.to_string(),
            attrs,
            inputs,
            outputs: graph.nodes[last].outputs.clone(),
        };
        // The fused node takes the last absorbed node's place (its readers come after it).
        graph.nodes[last] = fused;
        let mut gone: Vec<usize> = absorbed[..absorbed.len() - 1].to_vec();
        gone.push(i);
        gone.sort_unstable();
        for k in gone.into_iter().rev() {
            graph.nodes.remove(k);
        }
    }
    Ok(())
}

/// Folds a fused ConvNeXt block's constant layer scale `s` (its last input) into its second
/// layer, `(h W2 + b2) s = h (W2 s) + b2 s`, as new constants, once here rather than on every
/// call; a block whose second layer is not constant keeps its scale.
fn fold_layer_scale(graph: &mut Graph, inputs: &mut Vec<Option<usize>>) -> candle_core::Result<()> {
    let constant = |v: Option<usize>| v.and_then(|v| graph.constants[v].clone());
    let Some(weight_index) = inputs[5] else {
        return Ok(());
    };
    let (Some(scale), Some(weight)) = (
        constant(inputs.get(7).copied().flatten()),
        constant(Some(weight_index)),
    ) else {
        return Ok(());
    };
    let bias = inputs[6];
    let bias_value = constant(bias);
    if bias.is_some() && bias_value.is_none() {
        return Ok(());
    }
    let scale = scale.flatten_all()?;
    let m = scale.dim(0)?;
    let folded_weight = weight.broadcast_mul(&scale.reshape((1, m))?)?;
    let folded_bias = bias_value
        .map(|b| b.flatten_all()?.mul(&scale))
        .transpose()?;
    let name = graph.names[weight_index].clone();
    inputs[5] = Some(graph.add_constant(format!("{name}.layer_scaled"), folded_weight));
    if let Some(b) = folded_bias {
        inputs[6] = Some(graph.add_constant(format!("{name}.layer_scaled_bias"), b));
    }
    inputs.truncate(7);
    Ok(())
}

/// Node `i` as the opening transpose of ConvNeXt's block: the absorbed nodes after it (the
/// LayerNormalization, the feed-forward node, the closing transpose, the scale's Mul if any) and
/// the fused node's inputs.
fn match_normalized_feed_forward(
    graph: &Graph,
    readers: &[usize],
    i: usize,
) -> Option<(Vec<usize>, Vec<Option<usize>>)> {
    let open = &graph.nodes[i];
    let x = (*open.inputs.first()?)?;
    let norm = channels_last_layer_norm(graph, readers, i)?;
    let node = &graph.nodes[norm];
    let weight = node.inputs[1];
    let bias = node.inputs.get(2).copied().flatten();
    let normalised = only_output(node)?;
    let ff = sole_reader(graph, readers, normalised)?;
    (graph.nodes[ff].op_type == FUSED_FEED_FORWARD
        && graph.nodes[ff].inputs.first() == Some(&Some(normalised)))
    .then_some(())?;
    let layers = &graph.nodes[ff].inputs;
    let close = sole_reader(graph, readers, only_output(&graph.nodes[ff])?)?;
    transpose(&graph.nodes[close], &[0, 3, 1, 2]).then_some(())?;
    let mut absorbed = vec![norm, ff, close];
    let mut inputs = vec![Some(x), weight, bias];
    inputs.extend_from_slice(&layers[1..]);
    let closed = only_output(&graph.nodes[close])?;
    let width = graph.constants[(*layers.get(3)?)?].as_ref()?.dim(1).ok()?;
    let scale = sole_reader(graph, readers, closed).and_then(|j| {
        let node = &graph.nodes[j];
        let s = other_input(node, closed)??;
        let t = graph.constants[s].as_ref()?;
        let per_channel = matches!(t.dims(), [m, 1, 1] | [1, m, 1, 1] if *m == width);
        (node.op_type == "Mul" && per_channel && only_output(node).is_some()).then_some((j, s))
    });
    if let Some((j, s)) = scale {
        absorbed.push(j);
        inputs.push(Some(s));
    }
    Some((absorbed, inputs))
}

#[cfg(test)]
mod tests {
    use crate::graph::{Graph, Node};
    use crate::ops::{Attrs, FUSED_AFFINE, PRE_NORM_EPSILON};
    use candle_core::{Device, Tensor};
    use vulnmap_testkit::test_asset;

    /// The op types of a shared fixture's graph after folding and fusion.
    fn fused_ops(name: &str) -> Option<Vec<String>> {
        let graph = fused_graph(name)?;
        Some(graph.nodes.iter().map(|n| n.op_type.clone()).collect())
    }

    /// A shared fixture's graph after folding and fusion.
    fn fused_graph(name: &str) -> Option<Graph> {
        Some(fused_graph_at(&test_asset(&format!(
            "fixtures/onnx/{name}.onnx"
        ))?))
    }

    /// The graph at `path` after folding and fusion.
    fn fused_graph_at(path: &std::path::Path) -> Graph {
        let device = Device::Cpu;
        let mut graph = Graph::read(path, &device).unwrap();
        crate::fold::fold_constants(&mut graph, &device).unwrap();
        super::fold_batch_norms(&mut graph).unwrap();
        super::fuse_epilogues(&mut graph);
        super::fuse_pads_into_convs(&mut graph);
        super::fuse_activations(&mut graph);
        super::fuse_linear_biases(&mut graph);
        super::fuse_batch_norm_relus(&mut graph);
        super::fuse_feed_forward(&mut graph);
        super::fuse_normalized_feed_forward(&mut graph).unwrap();
        super::fuse_channel_layer_norms(&mut graph);
        super::fuse_attention(&mut graph);
        super::fuse_self_attention(&mut graph);
        super::fuse_pre_norm_residuals(&mut graph);
        super::fuse_affine_chains(&mut graph).unwrap();
        graph
    }

    #[test]
    fn exported_gelu_silu_and_relu6_become_single_nodes() {
        // ConvNeXt: GELU as Div, Erf, Add, Mul, Mul (fused, then part of each block);
        // EfficientNet-B0: SiLU as Sigmoid, Mul (its
        // squeeze-excitation gates keep a Sigmoid of their own); Lite0: Conv -> Clip(0, 6).
        let cases = [
            (
                "convnext_small_config",
                super::FUSED_NORMALIZED_FEED_FORWARD,
                "Erf",
            ),
            ("efficientnet_lite0_imagenet", super::FUSED_CONV, "Clip"),
        ];
        for (name, fused, gone) in cases {
            let Some(ops) = fused_ops(name) else { return };
            assert!(
                ops.iter().any(|o| o == fused),
                "{name}: no {fused} in {ops:?}"
            );
            assert!(
                !ops.iter().any(|o| o == gone),
                "{name}: {gone} left in {ops:?}"
            );
        }
        if let Some(ops) = fused_ops("efficientnet_b0_half") {
            let silu = ops.iter().filter(|o| *o == super::FUSED_SILU).count();
            let sigmoid = ops.iter().filter(|o| *o == "Sigmoid").count();
            assert!(silu > sigmoid, "{silu} SiLU, {sigmoid} Sigmoid left");
        }
    }

    #[test]
    fn linear_layers_with_a_bias_and_feed_forward_blocks_become_single_nodes() {
        // Counted in the exported graphs with the onnx package: MatMuls by an initializer whose
        // only reader is an Add of another initializer (ViT: the in-projection and the MLP's two
        // layers of 4 encoder layers; its attention's 8 MatMuls multiply activations, and are
        // fused with their Softmax). Each MLP (ViT's 4) is one node, each in-projection part of
        // its self-attention node.
        let Some(ops) = fused_ops("vit_small_config") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(count(super::FUSED_LINEAR), 0, "{ops:?}");
        assert_eq!(count(super::FUSED_FEED_FORWARD), 4, "{ops:?}");
        assert_eq!(count("MatMul"), 0, "{ops:?}");
    }

    #[test]
    fn convnexts_blocks_become_one_node_each_with_their_transposes_and_scale() {
        // 5 blocks, each Transpose -> LayerNorm -> Linear -> GELU -> Linear -> Transpose -> Mul;
        // the other LayerNorms (Transpose -> LayerNorm -> Transpose: the stem's, the three
        // downsampling layers', the classifier's) become one node each.
        let Some(ops) = fused_ops("convnext_small_config") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(count(super::FUSED_NORMALIZED_FEED_FORWARD), 5, "{ops:?}");
        assert_eq!(count(super::FUSED_FEED_FORWARD), 0, "{ops:?}");
        assert_eq!(count(super::FUSED_CHANNEL_LAYER_NORM), 5, "{ops:?}");
        assert_eq!(count("LayerNormalization"), 0, "{ops:?}");
        assert_eq!(count("Transpose"), 0, "{ops:?}");
        assert_eq!(count("Mul"), 0, "{ops:?}");
    }

    #[test]
    fn convnexts_layer_scales_are_folded_into_the_second_layers() {
        // Whether the folded values are right, the fixture test's logits say (within 1e-4 of
        // PyTorch's); here, that no block multiplies by its scale on each call.
        let Some(graph) = fused_graph("convnext_small_config") else {
            return;
        };
        let blocks: Vec<_> = graph
            .nodes
            .iter()
            .filter(|n| n.op_type == super::FUSED_NORMALIZED_FEED_FORWARD)
            .collect();
        assert_eq!(blocks.len(), 5);
        for block in blocks {
            // x, the LayerNorm's weight and bias, the two layers' weights and biases: no scale.
            assert_eq!(block.inputs.len(), 7, "{}", block.name);
            for k in [5, 6] {
                let name = &graph.names[block.inputs[k].unwrap()];
                assert!(
                    name.contains(".layer_scaled"),
                    "{}: input {k} is {name}",
                    block.name
                );
            }
        }
    }

    #[test]
    fn attention_becomes_one_node_per_encoder_layer() {
        // ViT: 4 encoder layers, each MatMul(q, kᵀ) -> Softmax -> MatMul(weights, v).
        let Some(ops) = fused_ops("vit_small_config") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(
            count(super::FUSED_ATTENTION) + count(super::FUSED_SELF_ATTENTION),
            4,
            "{ops:?}"
        );
        assert_eq!(count("Softmax"), 0, "{ops:?}");
    }

    #[test]
    fn torchvisions_self_attention_becomes_one_node_per_encoder_layer() {
        // ViT: 4 encoder layers, each Transpose -> in-projection -> Reshape, Unsqueeze, Transpose,
        // Squeeze -> 3 Gathers -> 3 x (Reshape, Transpose, Reshape) -> scaled attention ->
        // Transpose -> Reshape -> Gemm -> Reshape -> Transpose. What is left of them: the opening
        // Transpose (the reshape targets read its shape) and the shape arithmetic; of the other
        // data ops, the patch embedding's Transpose and the head's Gemm.
        let Some(ops) = fused_ops("vit_small_config") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(count(super::FUSED_SELF_ATTENTION), 4, "{ops:?}");
        assert_eq!(count(super::FUSED_ATTENTION), 0, "{ops:?}");
        assert_eq!(count("Transpose"), 5, "{ops:?}");
        assert_eq!(count("Gemm"), 1, "{ops:?}");
    }

    #[test]
    fn timms_self_attention_becomes_one_node_per_block() {
        // timm's VisionTransformer (this crate's fixture), 2 blocks, each qkv Linear -> Reshape ->
        // Transpose -> Split -> 3 Squeezes -> scaled attention -> Transpose -> Reshape -> proj
        // Linear. What is left of the data ops' transposes: the patch embedding's.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/timm_vit_small_config.onnx");
        let graph = fused_graph_at(&path);
        let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        let count = |op: &str| ops.iter().filter(|o| **o == op).count();
        assert_eq!(count(super::FUSED_SELF_ATTENTION), 2, "{ops:?}");
        for gone in [super::FUSED_ATTENTION, "Split", "Squeeze", "Softmax"] {
            assert_eq!(count(gone), 0, "{gone} in {ops:?}");
        }
        assert_eq!(count("Transpose"), 1, "{ops:?}");
    }

    #[test]
    fn pre_norm_sublayers_take_in_their_layer_norm_and_residual_add() {
        // timm's blocks (this crate's fixture, 2 blocks): x + attn(norm1(x)), then
        // x + mlp(norm2(x)); left over: the final norm. torchvision's (4 encoder layers): its
        // feed-forward sublayers only, as its attention opens with a transpose of the normalised
        // tokens; left over: each layer's first norm and the final one.
        let timm = fused_graph_at(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/timm_vit_small_config.onnx"),
        );
        let torchvision = fused_graph("vit_small_config");
        for (graph, attention, feed_forward, norms) in
            [(Some(timm), 2, 2, 1), (torchvision, 0, 4, 5)]
        {
            let Some(graph) = graph else {
                continue;
            };
            let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
            let fused = |op: &str| {
                let with_norm = |n: &&Node| n.attrs.iter().any(|a| a.name == PRE_NORM_EPSILON);
                graph
                    .nodes
                    .iter()
                    .filter(|n| n.op_type == op)
                    .filter(with_norm)
                    .count()
            };
            assert_eq!(fused(super::FUSED_SELF_ATTENTION), attention, "{ops:?}");
            assert_eq!(fused(super::FUSED_FEED_FORWARD), feed_forward, "{ops:?}");
            let count = |op: &str| ops.iter().filter(|o| **o == op).count();
            assert_eq!(count("LayerNormalization"), norms, "{ops:?}");
        }
    }

    #[test]
    fn arithmetic_with_constants_becomes_one_affine_node() -> candle_core::Result<()> {
        // y = (c - x) / 4 * 2 + 1, c per channel: Sub(c, x) -> Div(4) -> Mul(2) -> Add(1),
        // the constant first or second as exporters write them.
        let device = Device::Cpu;
        let c = Tensor::new(&[0.5f32, -1.0, 2.0], &device)?.reshape((1, 3, 1, 1))?;
        let scalar = |v: f32| Tensor::new(&[v], &device);
        let node = |op: &str, inputs: [usize; 2], output: usize| Node {
            name: format!("{op}{output}"),
            op_type: op.to_string(),
            attrs: Vec::new(),
            inputs: inputs.map(Some).to_vec(),
            outputs: vec![Some(output)],
        };
        let mut graph = Graph {
            path: "chain.onnx".into(),
            opset: 17,
            names: (0..9).map(|v| format!("v{v}")).collect(),
            constants: vec![
                None,
                Some(c.clone()),
                None,
                Some(scalar(4.0)?),
                None,
                Some(scalar(2.0)?),
                None,
                Some(scalar(1.0)?),
                None,
            ],
            nodes: vec![
                node("Sub", [1, 0], 2),
                node("Div", [2, 3], 4),
                node("Mul", [5, 4], 6),
                node("Add", [6, 7], 8),
            ],
            input: 0,
            input_dims: vec![None, Some(3), Some(4), Some(4)],
            output: 8,
            metadata: Vec::new(),
        };
        super::fuse_affine_chains(&mut graph).unwrap();
        let [fused] = graph.nodes.as_slice() else {
            panic!("one node, not {:?}", graph.nodes);
        };
        assert_eq!(fused.op_type, FUSED_AFFINE);
        assert_eq!(fused.outputs, vec![Some(8)]);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &device)?;
        let inputs: Vec<Option<&Tensor>> = fused
            .inputs
            .iter()
            .map(|v| match v {
                Some(0) => Some(&x),
                v => graph.constants[v.unwrap()].as_ref(),
            })
            .collect();
        let context = crate::ops::Context {
            opset: 17,
            guided: false,
            device: &device,
        };
        let got = crate::ops::eval(FUSED_AFFINE, Attrs(&[]), &inputs, 1, context).unwrap();
        let want = (((c.broadcast_sub(&x)? / 4.0)? * 2.0)? + 1.0)?;
        assert!(vulnmap_testkit::max_diff(&got[0], &want) < 1e-6);
        Ok(())
    }

    #[test]
    fn explicit_zero_pads_join_the_convolutions_reading_them() {
        // The Lite0 fixture's TensorFlow "SAME" padding: a Pad before the stem and before each of
        // the 16 depthwise convolutions, its amounts computed from the input's shape.
        let Some(graph) = fused_graph("efficientnet_lite0_imagenet") else {
            return;
        };
        let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "Pad").count(), 0, "{ops:?}");
        let bordered = graph
            .nodes
            .iter()
            .filter(|n| {
                n.op_type == super::FUSED_CONV && n.inputs.get(4).is_some_and(|v| v.is_some())
            })
            .count();
        assert_eq!(bordered, 17);
    }

    #[test]
    fn a_division_by_zero_is_not_fused() -> candle_core::Result<()> {
        // (x - 1) / 0 fused would be x * inf - inf: NaN wherever the division gives +inf (x >
        // 1); it stays two nodes.
        let device = Device::Cpu;
        let node = |op: &str, inputs: [usize; 2], output: usize| Node {
            name: format!("{op}{output}"),
            op_type: op.to_string(),
            attrs: Vec::new(),
            inputs: inputs.map(Some).to_vec(),
            outputs: vec![Some(output)],
        };
        let mut graph = Graph {
            path: "zero.onnx".into(),
            opset: 17,
            names: (0..5).map(|v| format!("v{v}")).collect(),
            constants: vec![
                None,
                Some(Tensor::new(&[1f32], &device)?),
                None,
                Some(Tensor::new(&[0f32], &device)?),
                None,
            ],
            nodes: vec![node("Sub", [0, 1], 2), node("Div", [2, 3], 4)],
            input: 0,
            input_dims: vec![None, Some(3), Some(4), Some(4)],
            output: 4,
            metadata: Vec::new(),
        };
        super::fuse_affine_chains(&mut graph).unwrap();
        let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Sub", "Div"]);
        Ok(())
    }

    #[test]
    fn an_inputs_normalisation_becomes_one_affine_node() {
        // The fixtures' `(x - mean) / std` (Sub, Div), exported inside the model.
        let Some(ops) = fused_ops("resnet_basic_1111") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(count(FUSED_AFFINE), 1, "{ops:?}");
        assert_eq!(count("Sub") + count("Div"), 0, "{ops:?}");
    }

    #[test]
    fn densenets_batch_norms_and_relus_become_single_nodes() {
        // DenseNet's BatchNorm -> ReLU -> Conv: counted in the exported graph with the onnx
        // package, 16 BatchNormalizations, each read by one Relu only (the exporter already
        // folded the stem's into its convolution).
        let Some(ops) = fused_ops("densenet_small_config") else {
            return;
        };
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(count(super::FUSED_BN_RELU), 16, "{ops:?}");
        assert_eq!(count("BatchNormalization"), 0, "{ops:?}");
    }
}
