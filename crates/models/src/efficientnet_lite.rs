//! EfficientNet-Lite0: MBConv blocks without squeeze-excitation, ReLU6, TF-"SAME" padding and
//! BatchNorm epsilon 1e-3, as Google's TF-Lite release; tensor names as lukemelas'
//! EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`).

use crate::classifier::{unknown_layer, Classes, Classifier, InputSpec};
use crate::conv_bn::{ConvBn, DepthwiseBn, Then};
use crate::resnet::linear_head;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use vulnmap_ops::batch_norm::BatchNorm;
use vulnmap_ops::conv::{Conv2d, DepthwiseConv2d, Padding};
use vulnmap_ops::guided::ReluBackward;
use vulnmap_ops::pool::global_avg_pool;

/// TensorFlow's BatchNorm epsilon, which these weights were trained with.
const BN_EPS: f64 = 1e-3;

/// Stages of Lite0: (repeats, kernel, stride, expand ratio, in, out); the stride applies to a
/// stage's first block.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;

/// A 1x1 convolution and its BatchNorm (expand, project, head).
fn pointwise_bn(cin: usize, cout: usize, vb_conv: VarBuilder, vb_bn: VarBuilder) -> Result<ConvBn> {
    let conv = Conv2d::new(cin, cout, 1, 1, Padding::Uniform(0), false, vb_conv)?;
    Ok(ConvBn::new(conv, BatchNorm::new(cout, BN_EPS, vb_bn)?))
}

/// Inverted residual: [1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 -> 1x1 project, BN.
#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: DepthwiseBn,
    project: ConvBn,
    /// Identity shortcut when the stride is 1 and channels are kept.
    skip: bool,
}

impl MbConv {
    fn new(
        kernel: usize,
        stride: usize,
        expand: usize,
        cin: usize,
        cout: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mid = cin * expand;
        let expand = if expand != 1 {
            Some(pointwise_bn(
                cin,
                mid,
                vb.pp("_expand_conv"),
                vb.pp("_bn0"),
            )?)
        } else {
            None
        };
        let depthwise = DepthwiseConv2d::new(
            mid,
            kernel,
            stride,
            Padding::TfSame,
            vb.pp("_depthwise_conv"),
        )?;
        Ok(Self {
            expand,
            depthwise: DepthwiseBn::new(depthwise, BatchNorm::new(mid, BN_EPS, vb.pp("_bn1"))?),
            project: pointwise_bn(mid, cout, vb.pp("_project_conv"), vb.pp("_bn2"))?,
            skip: stride == 1 && cin == cout,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool, rule: ReluBackward) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward_then(x, train, Then::relu6(rule))?,
            None => x.clone(),
        };
        let y = self.depthwise.forward_then(&y, train, Then::relu6(rule))?;
        let skip = Then {
            residual: self.skip.then_some(x),
            ..Then::default()
        };
        self.project.forward_then(&y, train, skip)
    }
}

/// EfficientNet-Lite0 for ImageNet (or another head), 224 x 224, inputs normalised as
/// `(x - 127/255) / (128/255)` inside the model.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    fc: Linear,
    spec: InputSpec,
    classes: Classes,
    device: Device,
    dtype: DType,
    /// The backward rule of every ReLU6 (guided backpropagation's for [`Classifier::guided`]).
    relu_backward: ReluBackward,
}

impl EfficientNetLite0 {
    /// Builds the network with a head of `num_classes` from `vb`.
    pub fn new(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let stem_conv = Conv2d::new(
            3,
            STEM_CHANNELS,
            3,
            2,
            Padding::TfSame,
            false,
            vb.pp("_conv_stem"),
        )?;
        let stem = ConvBn::new(
            stem_conv,
            BatchNorm::new(STEM_CHANNELS, BN_EPS, vb.pp("_bn0"))?,
        );
        let mut blocks = Vec::new();
        for &(repeats, kernel, stride, expand, cin, cout) in &STAGES {
            for r in 0..repeats {
                let (s, ci) = if r == 0 { (stride, cin) } else { (1, cout) };
                let vb_block = vb.pp("_blocks").pp(blocks.len());
                blocks.push(MbConv::new(kernel, s, expand, ci, cout, vb_block)?);
            }
        }
        let last = STAGES[STAGES.len() - 1].5;
        let head = pointwise_bn(last, HEAD_CHANNELS, vb.pp("_conv_head"), vb.pp("_bn1"))?;
        let fc = linear_head(HEAD_CHANNELS, num_classes, vb.pp("_fc"))?;
        let classes = Classes::for_head(num_classes);
        Ok(Self {
            stem,
            blocks,
            head,
            fc,
            spec: InputSpec::tf_lite(224),
            classes,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            relu_backward: ReluBackward::Exact,
        })
    }

    /// Names the output classes (their number must match the head).
    pub fn with_classes(mut self, classes: Classes) -> Result<Self> {
        if classes.len() != self.classes.len() {
            candle_core::bail!(
                "{} classes named for a head of {}",
                classes.len(),
                self.classes.len()
            );
        }
        self.classes = classes;
        Ok(self)
    }

    /// Changes the input size and normalisation the model reports and applies.
    pub fn with_input_spec(mut self, spec: InputSpec) -> Self {
        self.spec = spec;
        self
    }

    /// Position after which a layer's output is taken: 0 after the stem, `i + 1` after block
    /// `i`, `blocks + 1` after the head convolution.
    fn position(&self, layer: &str) -> Result<usize> {
        let n = self.blocks.len();
        let pos = match layer {
            "_conv_stem" => Some(0),
            "_conv_head" => Some(n + 1),
            _ => layer
                .strip_prefix("_blocks.")
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < n)
                .map(|i| i + 1),
        };
        pos.ok_or_else(|| unknown_layer("efficientnet-lite0", layer, &self.layers()))
    }

    /// Runs stages `from..to` of: stem (0), blocks (1..=n), head conv (n+1).
    fn run(&self, mut x: Tensor, from: usize, to: usize, train: bool) -> Result<Tensor> {
        let n = self.blocks.len();
        for stage in from..to {
            x = if stage == 0 {
                let x = self.spec.normalize(&x, self.dtype)?;
                let relu6 = Then::relu6(self.relu_backward);
                self.stem.forward_then(&x, train, relu6)?
            } else if stage <= n {
                self.blocks[stage - 1].forward_t(&x, train, self.relu_backward)?
            } else {
                let relu6 = Then::relu6(self.relu_backward);
                self.head.forward_then(&x, train, relu6)?
            };
        }
        Ok(x)
    }

    fn classify(&self, features: &Tensor) -> Result<Tensor> {
        self.fc.forward(&global_avg_pool(features)?)
    }
}

impl Classifier for EfficientNetLite0 {
    fn arch(&self) -> &str {
        "efficientnet-lite0"
    }

    fn input_spec(&self) -> &InputSpec {
        &self.spec
    }

    fn classes(&self) -> &Classes {
        &self.classes
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.run(pixels.clone(), 0, self.blocks.len() + 2, train)?;
        self.classify(&x)
    }

    /// `_conv_stem`, `_blocks.0` .. `_blocks.15`, `_conv_head` (each after its activation).
    fn layers(&self) -> Vec<String> {
        let mut names = vec!["_conv_stem".to_string()];
        names.extend((0..self.blocks.len()).map(|i| format!("_blocks.{i}")));
        names.push("_conv_head".to_string());
        names
    }

    fn default_layer(&self) -> String {
        "_conv_head".to_string()
    }

    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor> {
        let end = self.position(layer)? + 1;
        self.run(pixels.clone(), 0, end, false)
    }

    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor> {
        let start = self.position(layer)? + 1;
        let x = self.run(features.clone(), start, self.blocks.len() + 2, false)?;
        self.classify(&x)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        let mut guided = self.clone();
        guided.relu_backward = ReluBackward::Guided;
        Some(Box::new(guided))
    }
}
