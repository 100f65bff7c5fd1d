//! Constant folding at load time: every node whose inputs are all constants (weights and what
//! is computed from them alone) is evaluated once and becomes a constant.
//!
//! Shape arithmetic on the input (`Shape`, then `Gather`, `Concat`, ...) depends on the input's
//! size, so it is folded per input size instead, by the plans of [`crate::model`].

use crate::error::Result;
use crate::graph::Graph;
use crate::ops::{self, Attrs, Context};
use candle_core::Device;

/// Replaces every node computable from constants by its value.
pub(crate) fn fold_constants(graph: &mut Graph, device: &Device) -> Result<()> {
    let ctx = Context {
        opset: graph.opset,
        guided: false,
        device,
    };
    let mut kept = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        let foldable = node
            .inputs
            .iter()
            .flatten()
            .all(|&v| graph.constants[v].is_some());
        if !foldable {
            kept.push(node);
            continue;
        }
        let inputs: Vec<_> = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| graph.constants[v].as_ref()))
            .collect();
        let values = ops::eval(
            &node.op_type,
            Attrs(&node.attrs),
            &inputs,
            node.output_count(),
            ctx,
        )
        .map_err(|e| graph.node_error(&node, e))?;
        for (v, t) in node.outputs.iter().zip(values) {
            if let Some(v) = v {
                graph.constants[*v] = Some(t);
            }
        }
    }
    graph.nodes = kept;
    Ok(())
}

/// Drops constants no node reads any more (weights folded into others).
pub(crate) fn drop_unread(graph: &mut Graph) {
    let readers = graph.readers();
    for (v, c) in graph.constants.iter_mut().enumerate() {
        if readers[v] == 0 {
            *c = None;
        }
    }
}
