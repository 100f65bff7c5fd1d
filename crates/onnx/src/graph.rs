//! An `.onnx` file as a graph of numbered values: initializers decoded onto the device, nodes
//! in topological order reading and writing value numbers, every name resolved once.

use crate::error::{Error, Result};
use crate::ops::SUPPORTED;
use crate::proto::{AttributeProto, ModelProto};
use candle_core::{Device, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `ai.onnx` opsets this crate reads (the exporters of the last years write 13 to 21).
pub(crate) const OPSETS: std::ops::RangeInclusive<i64> = 7..=22;

/// One operator application.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// The node's name, or `#i` for the i-th unnamed node.
    pub name: String,
    /// The operator (`Conv`, `Add`, ... or [`crate::ops::FUSED_CONV`]).
    pub op_type: String,
    /// Its attributes.
    pub attrs: Vec<AttributeProto>,
    /// The values it reads; `None` for an optional input left out.
    pub inputs: Vec<Option<usize>>,
    /// The values it writes; `None` for an optional output left out.
    pub outputs: Vec<Option<usize>>,
}

impl Node {
    /// How many outputs the operator must produce (up to the last one used).
    pub(crate) fn output_count(&self) -> usize {
        self.outputs
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1)
    }
}

/// A classifier graph: one input, one output, values numbered.
#[derive(Debug)]
pub(crate) struct Graph {
    /// The file it came from, for error messages.
    pub path: PathBuf,
    /// The model's `ai.onnx` opset.
    pub opset: i64,
    /// Each value's tensor name.
    pub names: Vec<String>,
    /// The values known without an input: initializers and what is folded from them.
    pub constants: Vec<Option<Tensor>>,
    /// The nodes, in an order where every value is written before it is read.
    pub nodes: Vec<Node>,
    /// The pixels' value.
    pub input: usize,
    /// The input's declared dimensions (`None` where symbolic).
    pub input_dims: Vec<Option<usize>>,
    /// The logits' value.
    pub output: usize,
    /// The model's metadata (`metadata_props`).
    pub metadata: Vec<(String, String)>,
}

impl Graph {
    /// Reads and checks `path`; initializers go onto `device`.
    pub(crate) fn read(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let model = ModelProto::decode(bytes.as_slice())
            .map_err(|e| malformed(format!("the protobuf does not decode ({e})")))?;
        drop(bytes);
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| malformed("it imports no ai.onnx opset".into()))?;
        if !OPSETS.contains(&opset) {
            return Err(malformed(format!(
                "opset {opset} is not supported; supported are {} to {}",
                OPSETS.start(),
                OPSETS.end()
            )));
        }
        let graph = model
            .graph
            .ok_or_else(|| malformed("it has no graph".into()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut g = Graph {
            path: path.to_path_buf(),
            opset,
            names: Vec::new(),
            constants: Vec::new(),
            nodes: Vec::new(),
            input: 0,
            input_dims: Vec::new(),
            output: 0,
            metadata: model
                .metadata_props
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        };
        let mut ids: HashMap<String, usize> = HashMap::new();
        for init in &graph.initializer {
            let t = crate::tensor::decode(init, base, device)
                .map_err(|e| malformed(format!("initializer `{}`: {e}", init.name)))?;
            let id = g.value(&mut ids, &init.name);
            g.constants[id] = Some(t);
        }
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !ids.contains_key(&i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::NotAClassifier {
                path: path.to_path_buf(),
                reason: format!(
                    "it has {} inputs ({names:?}); a classifier has one",
                    names.len()
                ),
            });
        };
        g.input = g.value(&mut ids, &input.name);
        g.input_dims = input
            .r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .and_then(|t| t.shape.as_ref())
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| d.dim_value.filter(|&v| v > 0).map(|v| v as usize))
                    .collect()
            })
            .unwrap_or_default();
        for (index, node) in graph.node.into_iter().enumerate() {
            let name = if node.name.is_empty() {
                format!("#{index}")
            } else {
                node.name.clone()
            };
            let fail = |reason: String| Error::Node {
                path: path.to_path_buf(),
                node: name.clone(),
                op_type: node.op_type.clone(),
                opset,
                reason,
            };
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(fail(format!(
                    "domain `{}` is not supported; only ai.onnx operators run",
                    node.domain
                )));
            }
            if !SUPPORTED.contains(&node.op_type.as_str()) {
                return Err(fail(format!(
                    "operator `{}` is not supported; supported: {}",
                    node.op_type,
                    SUPPORTED.join(", ")
                )));
            }
            let mut reads = Vec::with_capacity(node.input.len());
            for i in &node.input {
                if i.is_empty() {
                    reads.push(None);
                } else {
                    let id = ids.get(i).copied().ok_or_else(|| {
                        fail(format!(
                            "it reads `{i}`, which no initializer, input or earlier node provides"
                        ))
                    })?;
                    reads.push(Some(id));
                }
            }
            let mut writes = Vec::with_capacity(node.output.len());
            for o in &node.output {
                if o.is_empty() {
                    writes.push(None);
                } else if ids.contains_key(o) {
                    return Err(fail(format!("it writes `{o}`, which is already defined")));
                } else {
                    writes.push(Some(g.value(&mut ids, o)));
                }
            }
            g.nodes.push(Node {
                name,
                op_type: node.op_type,
                attrs: node.attribute,
                inputs: reads,
                outputs: writes,
            });
        }
        let output = graph
            .output
            .first()
            .ok_or_else(|| malformed("the graph has no output".into()))?;
        g.output = *ids
            .get(&output.name)
            .ok_or_else(|| malformed(format!("the output `{}` is never computed", output.name)))?;
        Ok(g)
    }

    /// The number of `name`, added when new.
    fn value(&mut self, ids: &mut HashMap<String, usize>, name: &str) -> usize {
        *ids.entry(name.to_string()).or_insert_with(|| {
            self.names.push(name.to_string());
            self.constants.push(None);
            self.names.len() - 1
        })
    }

    /// A new value that no file names (a folded weight), holding `t`.
    pub(crate) fn add_constant(&mut self, name: String, t: Tensor) -> usize {
        self.names.push(name);
        self.constants.push(Some(t));
        self.names.len() - 1
    }

    /// The error for `node` failing with `reason`.
    pub(crate) fn node_error(&self, node: &Node, reason: impl std::fmt::Display) -> Error {
        Error::Node {
            path: self.path.clone(),
            node: node.name.clone(),
            op_type: node.op_type.clone(),
            opset: self.opset,
            reason: reason.to_string(),
        }
    }

    /// How many node inputs read each value (the output counts as one more reader).
    pub(crate) fn readers(&self) -> Vec<usize> {
        let mut count = vec![0; self.names.len()];
        for node in &self.nodes {
            for v in node.inputs.iter().flatten() {
                count[*v] += 1;
            }
        }
        count[self.output] += 1;
        count
    }

    /// The index of the last node that reads each value (`usize::MAX` for the output, which is
    /// read after the last node).
    pub(crate) fn last_reads(&self) -> Vec<usize> {
        let mut last = vec![0; self.names.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for v in node.inputs.iter().flatten() {
                last[*v] = i;
            }
        }
        last[self.output] = usize::MAX;
        last
    }
}
