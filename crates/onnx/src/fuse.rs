//! Fusion at load time, so that exported graphs take the fast constant-weight path the native
//! models take: a BatchNormalization after a convolution is folded into its weights, and a
//! convolution's following residual Add and Relu become one [`FUSED_CONV`] node (one op, one
//! activation, the backward of `vulnmap_ops::fused_conv`).
//!
//! Only values read by exactly one node disappear, so every other tensor a user can name (as a
//! Grad-CAM layer) stays.

use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::ops::{batch_norm_affine, Attrs, FUSED_CONV};
use crate::proto::{attribute_type, AttributeProto};
use candle_core::Tensor;

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
