//! An ONNX graph as a [`Classifier`]: pixels in, logits out, any intermediate tensor reachable
//! by name, and a backward pass through every node to the pixels.
//!
//! A run evaluates the nodes in order, freeing each value after its last reader. What depends
//! only on the input's size (the `Shape` arithmetic of exported reshapes) is computed on the
//! first run at each input size and kept in a [`Plan`], so later runs execute only the nodes
//! that read the pixels.

use crate::error::{Error, Result};
use crate::graph::{Graph, Node};
use crate::ops::{
    self, Attrs, Context, FUSED_ATTENTION, FUSED_CONV, FUSED_FEED_FORWARD, FUSED_LINEAR,
    FUSED_NORMALIZED_FEED_FORWARD, FUSED_SELF_ATTENTION,
};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use vulnmap_models::{Classes, Classifier, InputSpec};

/// How pixels in [0, 1] are normalised before they enter the graph; written (in YAML and on
/// the command line) as `none`, `imagenet`, `MEAN,STD` or `M1,M2,M3,S1,S2,S3`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Normalize {
    /// Not at all: the graph normalises inside (the recommended export).
    #[default]
    None,
    /// torchvision's ImageNet mean and standard deviation.
    Imagenet,
    /// `(x - mean) / std` per channel.
    MeanStd {
        /// Subtracted from each channel.
        mean: [f32; 3],
        /// Then each channel is divided by this.
        std: [f32; 3],
    },
}

impl Normalize {
    /// Whether pixels enter the graph as they are.
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }
}

impl std::fmt::Display for Normalize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Imagenet => f.write_str("imagenet"),
            Self::MeanStd { mean, std } => {
                let v: Vec<String> = mean.iter().chain(std).map(f32::to_string).collect();
                f.write_str(&v.join(","))
            }
        }
    }
}

impl TryFrom<String> for Normalize {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Normalize> for String {
    fn from(n: Normalize) -> String {
        n.to_string()
    }
}

impl FromStr for Normalize {
    type Err = String;

    /// `none`, `imagenet`, `MEAN,STD` (all channels) or `M1,M2,M3,S1,S2,S3`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => return Ok(Self::None),
            "imagenet" => return Ok(Self::Imagenet),
            _ => {}
        }
        let numbers: std::result::Result<Vec<f32>, _> =
            s.split(',').map(|v| v.trim().parse::<f32>()).collect();
        let (mean, std) = match numbers.as_deref() {
            Ok([m, s]) => ([*m; 3], [*s; 3]),
            Ok([m1, m2, m3, s1, s2, s3]) => ([*m1, *m2, *m3], [*s1, *s2, *s3]),
            _ => {
                return Err(format!(
                    "normalisation `{s}`: expected none, imagenet, MEAN,STD or M1,M2,M3,S1,S2,S3"
                ))
            }
        };
        if std.iter().any(|&v| !(v.is_finite() && v > 0.0)) || mean.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "normalisation `{s}`: means must be finite and stds positive"
            ));
        }
        Ok(Self::MeanStd { mean, std })
    }
}

/// What the graph itself does not say: how to normalise, the input size of a graph with dynamic
/// height and width, and the class names.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Normalisation applied before the graph (default none: the graph does it).
    pub normalize: Normalize,
    /// Height and width, required when the graph's are dynamic.
    pub input_size: Option<(usize, usize)>,
    /// Class names; default the model's `classes` metadata, else ImageNet's for 1000 classes.
    pub classes: Option<Classes>,
}

/// An intermediate 4-D tensor a layer-based method can use, with its shape for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its shape for one image (`1 x C x H x W`).
    pub shape: Vec<usize>,
}

/// A classifier read from an ONNX file.
#[derive(Clone)]
pub struct OnnxClassifier {
    inner: Arc<Inner>,
    /// Guided backpropagation's rectifiers (the same weights).
    guided: bool,
}

/// The graph and what was learned about it at load time.
struct Inner {
    graph: Graph,
    arch: String,
    spec: InputSpec,
    normalize: bool,
    classes: Classes,
    device: Device,
    last_reads: Vec<usize>,
    plans: Mutex<HashMap<Vec<usize>, Arc<Plan>>>,
    layers: Vec<Layer>,
    default_layer: Option<String>,
    multiply_adds: u64,
}

/// What is fixed for one input shape.
struct Plan {
    /// Values computed from the input's size only, beside the graph's constants.
    statics: Vec<(usize, Tensor)>,
    /// Whether each value is known without running (a constant or a static).
    known: Vec<bool>,
    /// Whether each node reads the pixels (directly or not) and so runs every time.
    dynamic: Vec<bool>,
    /// Each value's shape.
    shapes: Vec<Option<Vec<usize>>>,
}

/// The most input shapes whose plans are kept (batch sizes come and go).
const MAX_PLANS: usize = 16;

/// Reads `path` as a classifier on `device`, with the graph's own size and normalisation.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<OnnxClassifier> {
    load_with(path, &LoadOptions::default(), device)
}

/// Reads `path` as a classifier on `device` with `options`.
pub fn load_with(
    path: impl AsRef<Path>,
    options: &LoadOptions,
    device: &Device,
) -> Result<OnnxClassifier> {
    let path = path.as_ref();
    let mut graph = Graph::read(path, device)?;
    crate::fold::fold_constants(&mut graph, device)?;
    crate::fuse::fold_batch_norms(&mut graph)?;
    crate::fuse::fuse_epilogues(&mut graph);
    crate::fuse::fuse_pads_into_convs(&mut graph);
    crate::fuse::fuse_activations(&mut graph);
    crate::fuse::fuse_linear_biases(&mut graph);
    crate::fuse::fuse_batch_norm_relus(&mut graph);
    crate::fuse::fuse_feed_forward(&mut graph);
    crate::fuse::fuse_normalized_feed_forward(&mut graph)?;
    crate::fuse::fuse_channel_layer_norms(&mut graph);
    crate::fuse::fuse_attention(&mut graph);
    crate::fuse::fuse_self_attention(&mut graph);
    crate::fuse::fuse_pre_norm_residuals(&mut graph);
    crate::fuse::fuse_affine_chains(&mut graph)?;
    crate::fold::drop_unread(&mut graph);
    let not_classifier = |reason: String| Error::NotAClassifier {
        path: path.to_path_buf(),
        reason,
    };
    let input_name = graph.names[graph.input].clone();
    let dims = graph.input_dims.clone();
    if dims.len() != 4 {
        return Err(not_classifier(format!(
            "its input `{input_name}` has {} dimensions; expected N x C x H x W",
            dims.len()
        )));
    }
    let channels = dims[1].unwrap_or(3);
    if channels != 3 && channels != 1 {
        return Err(not_classifier(format!(
            "its input `{input_name}` has {channels} channels; expected 3 (RGB) or 1"
        )));
    }
    let (height, width) = match (options.input_size, dims[2], dims[3]) {
        (Some(size), _, _) => size,
        (None, Some(h), Some(w)) => (h, w),
        _ => {
            return Err(not_classifier(format!(
                "its input `{input_name}` has a dynamic height or width; give the size \
                 (--input-size, LoadOptions::input_size)"
            )))
        }
    };
    if height == 0 || width == 0 || (height * width) as u64 > vulnmap_data::image_io::max_pixels() {
        return Err(Error::InvalidArgument(format!(
            "input size {height}x{width} is not a valid image size"
        )));
    }
    let (mean, std, normalize) = match options.normalize {
        Normalize::None => ([0.0; 3], [1.0; 3], false),
        Normalize::Imagenet => (
            vulnmap_models::classifier::IMAGENET_MEAN,
            vulnmap_models::classifier::IMAGENET_STD,
            true,
        ),
        Normalize::MeanStd { mean, std } => (mean, std, true),
    };
    let spec = InputSpec {
        height,
        width,
        channels,
        mean,
        std,
    };
    let arch = format!(
        "onnx:{}",
        path.file_name()
            .map_or("model".into(), |n| n.to_string_lossy())
    );
    let last_reads = graph.last_reads();
    let mut inner = Inner {
        graph,
        arch,
        spec,
        normalize,
        classes: Classes::numbered(0),
        device: device.clone(),
        last_reads,
        plans: Mutex::new(HashMap::new()),
        layers: Vec::new(),
        default_layer: None,
        multiply_adds: 0,
    };
    let probe = Tensor::zeros((1, channels, height, width), DType::F32, device)?;
    let (logits, plan) = inner.record(&probe)?;
    let output_name = &inner.graph.names[inner.graph.output];
    let num_classes = match logits.dims() {
        [1, k] if *k > 0 => *k,
        other => {
            return Err(not_classifier(format!(
                "its output `{output_name}` has shape {other:?} for one image; expected 1 x K"
            )))
        }
    };
    let classes = match &options.classes {
        Some(c) => c.clone(),
        None => metadata_classes(&inner.graph.metadata)
            .unwrap_or_else(|| Classes::for_head(num_classes)),
    };
    if classes.len() != num_classes {
        return Err(Error::InvalidArgument(format!(
            "{} class names for a model with {num_classes} outputs",
            classes.len()
        )));
    }
    inner.classes = classes;
    inner.layers = inner.find_layers(&plan);
    inner.multiply_adds = inner.count_multiply_adds(&plan);
    inner.default_layer = inner
        .layers
        .iter()
        .rev()
        .filter(|l| l.shape[2] * l.shape[3] > 1)
        .find(|l| inner.cuts(&plan, &l.name))
        .map(|l| l.name.clone());
    inner.store(probe.dims().to_vec(), plan);
    Ok(OnnxClassifier {
        inner: Arc::new(inner),
        guided: false,
    })
}

/// Class names from the metadata key `classes`: a JSON list of strings or one name per line.
fn metadata_classes(metadata: &[(String, String)]) -> Option<Classes> {
    let (_, value) = metadata.iter().find(|(k, _)| k == "classes")?;
    let names: Vec<String> = match serde_json::from_str::<Vec<String>>(value) {
        Ok(names) => names,
        Err(_) => value
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
    };
    (!names.is_empty()).then(|| Classes::new(names))
}

/// Where a run starts: the pixels, or a layer's value.
struct Start {
    value: usize,
    tensor: Tensor,
}

impl Inner {
    /// The plan for `dims`, if one was made.
    fn plan(&self, dims: &[usize]) -> Option<Arc<Plan>> {
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dims)
            .cloned()
    }

    /// Keeps `plan` for `dims`.
    fn store(&self, dims: Vec<usize>, plan: Plan) -> Arc<Plan> {
        let plan = Arc::new(plan);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(dims, plan.clone());
        plan
    }

    /// The plan for `dims`, made by a run on zeros when there is none.
    fn plan_for(&self, dims: &[usize]) -> Result<Arc<Plan>> {
        if let Some(plan) = self.plan(dims) {
            return Ok(plan);
        }
        let zeros = Tensor::zeros(dims, DType::F32, &self.device)?;
        let (_, plan) = self.record(&zeros)?;
        Ok(self.store(dims.to_vec(), plan))
    }

    /// Runs the whole graph on `pixels` (normalised), noting what depends on the input's size
    /// only: the logits and the plan for this shape.
    fn record(&self, pixels: &Tensor) -> Result<(Tensor, Plan)> {
        let n = self.graph.names.len();
        let mut plan = Plan {
            statics: Vec::new(),
            known: self.graph.constants.iter().map(Option::is_some).collect(),
            dynamic: vec![false; self.graph.nodes.len()],
            shapes: vec![None; n],
        };
        plan.shapes[self.graph.input] = Some(pixels.dims().to_vec());
        let start = Start {
            value: self.graph.input,
            tensor: pixels.clone(),
        };
        let logits = self.execute(start, self.graph.output, None, false, Some(&mut plan))?;
        Ok((logits, plan))
    }

    /// Evaluates the graph from `start` until `stop` is computed. With a plan, only the nodes
    /// that read the input run; while recording one, every node runs and the plan is filled in.
    fn execute(
        &self,
        start: Start,
        stop: usize,
        plan: Option<&Plan>,
        guided: bool,
        mut record: Option<&mut Plan>,
    ) -> Result<Tensor> {
        let g = &self.graph;
        let mut values: Vec<Option<Tensor>> = g.constants.clone();
        if let Some(plan) = plan {
            for (v, t) in &plan.statics {
                values[*v] = Some(t.clone());
            }
        }
        let from_layer = start.value != g.input;
        let mut live = vec![false; g.names.len()];
        live[start.value] = true;
        values[start.value] = Some(start.tensor);
        if start.value == stop {
            return values[stop]
                .take()
                .ok_or_else(|| Error::InvalidArgument("nothing to compute".into()));
        }
        let ctx = Context {
            opset: g.opset,
            guided,
            device: &self.device,
        };
        for (i, node) in g.nodes.iter().enumerate() {
            if plan.is_some_and(|p| !p.dynamic[i]) {
                continue;
            }
            let reads_live = node.inputs.iter().flatten().any(|&v| live[v]);
            if from_layer && !reads_live {
                continue;
            }
            let mut inputs = Vec::with_capacity(node.inputs.len());
            for v in &node.inputs {
                match v {
                    None => inputs.push(None),
                    Some(v) => match values[*v].as_ref() {
                        Some(t) => inputs.push(Some(t)),
                        None => {
                            return Err(g.node_error(
                                node,
                                format!(
                                    "it reads `{}`, which is computed before `{}`: that layer \
                                     does not separate the input from the output",
                                    g.names[*v], g.names[start.value]
                                ),
                            ))
                        }
                    },
                }
            }
            let outputs = ops::eval(
                &node.op_type,
                Attrs(&node.attrs),
                &inputs,
                node.output_count(),
                ctx,
            )
            .map_err(|e| g.node_error(node, e))?;
            drop(inputs);
            let out_live = reads_live && node.op_type != "Shape";
            if let Some(rec) = record.as_deref_mut() {
                rec.dynamic[i] = out_live;
            }
            let mut done = false;
            for (slot, t) in node.outputs.iter().zip(outputs) {
                let Some(v) = *slot else { continue };
                if let Some(rec) = record.as_deref_mut() {
                    rec.shapes[v] = Some(t.dims().to_vec());
                    if !out_live {
                        rec.known[v] = true;
                        rec.statics.push((v, t.clone()));
                    }
                }
                live[v] = out_live;
                values[v] = Some(t);
                done |= v == stop;
            }
            if done {
                break;
            }
            for v in node.inputs.iter().flatten() {
                if self.last_reads[*v] == i && g.constants[*v].is_none() {
                    values[*v] = None;
                }
            }
        }
        values[stop].take().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "`{}` is not computed from `{}`",
                g.names[stop], g.names[start.value]
            ))
        })
    }

    /// The multiply-adds of the convolutions and matrix products that read the pixels, as
    /// fvcore and thop count them (element-wise operations are left out).
    fn count_multiply_adds(&self, plan: &Plan) -> u64 {
        let g = &self.graph;
        let shape = |v: Option<usize>| -> Option<Vec<usize>> {
            let v = v?;
            match &g.constants[v] {
                Some(t) => Some(t.dims().to_vec()),
                None => plan.shapes[v].clone(),
            }
        };
        let count = |node: &Node| -> Option<u64> {
            let out = shape(*node.outputs.first()?)?;
            let outputs: usize = out.iter().product();
            let per_output = match node.op_type.as_str() {
                // Each output sums C_in / groups x kh x kw products: the weight's size / C_out.
                "Conv" | FUSED_CONV => {
                    let w = shape(*node.inputs.get(1)?)?;
                    w.iter().skip(1).product::<usize>()
                }
                "MatMul" | FUSED_LINEAR => *shape(*node.inputs.first()?)?.last()?,
                // Two products per row (pixel): K x H, then H x M multiply-adds.
                FUSED_FEED_FORWARD | FUSED_NORMALIZED_FEED_FORWARD => {
                    let first = if node.op_type == FUSED_FEED_FORWARD {
                        1
                    } else {
                        3
                    };
                    let w1 = shape(*node.inputs.get(first)?)?;
                    let w2 = shape(*node.inputs.get(first + 2)?)?;
                    let (k, h, m) = (*w1.first()?, *w1.get(1)?, *w2.get(1)?);
                    return Some((outputs / m.max(1) * (k * h + h * m)) as u64);
                }
                // Scores `a b` (d per score) and weights times `v` (M per output).
                FUSED_ATTENTION => {
                    let a = shape(*node.inputs.first()?)?;
                    let b = shape(*node.inputs.get(1)?)?;
                    let (d, m) = (a[a.len().checked_sub(1)?], *b.last()?);
                    let scores: usize = a.iter().product::<usize>() / d.max(1) * m;
                    return Some((scores * d + outputs * m) as u64);
                }
                // Per token: the in-projection (E x 3E), the scores and the weighted values (L d
                // per head each, E per token over the heads), the out-projection (E x E).
                FUSED_SELF_ATTENTION => {
                    let (l, e) = (*out.get(out.len().checked_sub(2)?)?, *out.last()?);
                    return Some((outputs / e.max(1) * (3 * e * e + 2 * l * e + e * e)) as u64);
                }
                "Gemm" => {
                    let a = shape(*node.inputs.first()?)?;
                    a.iter().product::<usize>() / out.first().copied()?.max(1)
                }
                _ => return None,
            };
            Some((outputs * per_output) as u64)
        };
        g.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| plan.dynamic[*i])
            .filter_map(|(_, node)| count(node))
            .sum()
    }

    /// The 4-D values the nodes compute from the pixels, in order, with their shapes.
    fn find_layers(&self, plan: &Plan) -> Vec<Layer> {
        let g = &self.graph;
        g.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| plan.dynamic[*i])
            .flat_map(|(_, n)| n.outputs.iter().flatten())
            .filter_map(|&v| match &plan.shapes[v] {
                Some(shape) if shape.len() == 4 && shape[0] == 1 => Some(Layer {
                    name: g.names[v].clone(),
                    shape: shape.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Whether everything after `layer` is computed from it alone (and constants), so that
    /// `forward_from` can start there.
    fn cuts(&self, plan: &Plan, layer: &str) -> bool {
        let g = &self.graph;
        let Some(start) = g.names.iter().position(|n| n == layer) else {
            return false;
        };
        let mut live = vec![false; g.names.len()];
        live[start] = true;
        for (i, node) in g.nodes.iter().enumerate() {
            if !plan.dynamic[i] || !node.inputs.iter().flatten().any(|&v| live[v]) {
                continue;
            }
            if node
                .inputs
                .iter()
                .flatten()
                .any(|&v| !live[v] && !plan.known[v])
            {
                return false;
            }
            for v in node.outputs.iter().flatten() {
                live[*v] = true;
            }
        }
        live[g.output]
    }

    /// The pixels as the graph takes them: checked, f32, normalised when asked.
    fn prepare(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = self.spec.channels;
        match pixels.dims() {
            [_, ch, _, _] if *ch == c => {}
            dims => {
                return Err(Error::InvalidArgument(format!(
                    "{} expects pixels of shape (N, {c}, H, W) in [0, 1], got {dims:?}",
                    self.arch
                )))
            }
        }
        if self.normalize {
            Ok(self.spec.normalize(pixels, DType::F32)?)
        } else {
            Ok(pixels.to_dtype(DType::F32)?)
        }
    }

    /// The value named `layer`, or an error listing the layers.
    fn layer_value(&self, layer: &str) -> Result<usize> {
        self.graph
            .names
            .iter()
            .position(|n| n == layer)
            .ok_or_else(|| {
                let names: Vec<&str> = self.layers.iter().map(|l| l.name.as_str()).collect();
                Error::InvalidArgument(format!(
                    "{} has no tensor `{layer}`; its 4-D feature maps are: {}",
                    self.arch,
                    names.join(", ")
                ))
            })
    }
}

impl std::fmt::Debug for OnnxClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxClassifier")
            .field("arch", &self.inner.arch)
            .field("nodes", &self.inner.graph.nodes.len())
            .field("classes", &self.inner.classes.len())
            .field("guided", &self.guided)
            .finish()
    }
}

impl OnnxClassifier {
    /// The 4-D feature maps a layer-based method can use, input to output, with their shapes
    /// for one image.
    pub fn feature_maps(&self) -> &[Layer] {
        &self.inner.layers
    }

    /// Multiply-adds of one image's forward pass at the load-time input size (convolutions and
    /// matrix products; twice this is its floating-point operations).
    pub fn multiply_adds(&self) -> u64 {
        self.inner.multiply_adds
    }

    /// Logits from pixels, on the first run at a new input size also noting its plan.
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        let inner = &self.inner;
        let x = inner.prepare(pixels)?;
        let dims = x.dims().to_vec();
        match inner.plan(&dims) {
            Some(plan) => inner.execute(
                Start {
                    value: inner.graph.input,
                    tensor: x,
                },
                inner.graph.output,
                Some(&plan),
                self.guided,
                None,
            ),
            None if !self.guided => {
                let (logits, plan) = inner.record(&x)?;
                inner.store(dims, plan);
                Ok(logits)
            }
            None => {
                let plan = inner.plan_for(&dims)?;
                let start = Start {
                    value: inner.graph.input,
                    tensor: x,
                };
                inner.execute(start, inner.graph.output, Some(&plan), true, None)
            }
        }
    }
}

impl Classifier for OnnxClassifier {
    fn arch(&self) -> &str {
        &self.inner.arch
    }

    fn input_spec(&self) -> &InputSpec {
        &self.inner.spec
    }

    fn classes(&self) -> &Classes {
        &self.inner.classes
    }

    fn device(&self) -> &Device {
        &self.inner.device
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn forward_t(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train {
            candle_core::bail!(
                "{} is an exported (inference) graph; it has no training mode",
                self.inner.arch
            );
        }
        Ok(self.logits(pixels)?)
    }

    fn layers(&self) -> Vec<String> {
        self.inner.layers.iter().map(|l| l.name.clone()).collect()
    }

    fn default_layer(&self) -> String {
        self.inner.default_layer.clone().unwrap_or_default()
    }

    fn features(&self, pixels: &Tensor, layer: &str) -> candle_core::Result<Tensor> {
        let inner = &self.inner;
        let stop = inner.layer_value(layer)?;
        let x = inner.prepare(pixels)?;
        let plan = inner.plan_for(x.dims())?;
        let start = Start {
            value: inner.graph.input,
            tensor: x,
        };
        Ok(inner.execute(start, stop, Some(&plan), self.guided, None)?)
    }

    fn forward_from(&self, features: &Tensor, layer: &str) -> candle_core::Result<Tensor> {
        let inner = &self.inner;
        let value = inner.layer_value(layer)?;
        let spec = &inner.spec;
        let dims = [features.dim(0)?, spec.channels, spec.height, spec.width];
        let plan = inner.plan_for(&dims)?;
        if !inner.cuts(&plan, layer) {
            candle_core::bail!(
                "{}: the graph after `{layer}` also reads tensors computed before it, so it \
                 cannot be run from that layer alone; choose one of the layers `vulnmap layers` \
                 marks",
                inner.arch
            );
        }
        let start = Start {
            value,
            tensor: features.clone(),
        };
        Ok(inner.execute(start, inner.graph.output, Some(&plan), self.guided, None)?)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        Some(Box::new(Self {
            inner: self.inner.clone(),
            guided: true,
        }))
    }
}
