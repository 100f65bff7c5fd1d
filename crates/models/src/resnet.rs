//! ResNet 18/34/50/101/152 (torchvision v1.5: stride in the 3x3 convolution) and `tiny-resnet`.
//!
//! Tensor names follow torchvision and timm (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, `fc`), so their checkpoints load as they are. Unlike
//! candle-transformers' `Func`, intermediate feature maps are reachable (Grad-CAM), BatchNorm
//! has a train mode, and the head can be replaced for fine-tuning.

use crate::classifier::{unknown_layer, Classes, Classifier, InputSpec};
use crate::conv_bn::{ConvBn, Then};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, Linear, Module, VarBuilder};
use vulnmap_ops::batch_norm::BatchNorm;
use vulnmap_ops::conv::{Conv2d, Padding};
use vulnmap_ops::guided::ReluBackward;
use vulnmap_ops::pool::{global_avg_pool, max_pool2d};

/// PyTorch's BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;

/// The residual block a ResNet is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with expansion 4 (ResNet50/101/152).
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A ResNet's shape: block kind, blocks per stage, stem width and classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetConfig {
    /// The residual block of every stage.
    pub block: BlockKind,
    /// Blocks in `layer1` .. `layer4`.
    pub layers: [usize; 4],
    /// Channels of the stem and of `layer1` (64 in torchvision); doubled at each stage.
    pub width: usize,
    /// Outputs of the classifier head.
    pub num_classes: usize,
}

impl ResNetConfig {
    /// torchvision's ResNet18: basic blocks, [2, 2, 2, 2] per stage.
    pub fn resnet18(num_classes: usize) -> Self {
        Self::new(BlockKind::Basic, [2, 2, 2, 2], 64, num_classes)
    }
    /// torchvision's ResNet34: basic blocks, [3, 4, 6, 3] per stage.
    pub fn resnet34(num_classes: usize) -> Self {
        Self::new(BlockKind::Basic, [3, 4, 6, 3], 64, num_classes)
    }
    /// torchvision's ResNet50: bottleneck blocks, [3, 4, 6, 3] per stage.
    pub fn resnet50(num_classes: usize) -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 6, 3], 64, num_classes)
    }
    /// torchvision's ResNet101: bottleneck blocks, [3, 4, 23, 3] per stage.
    pub fn resnet101(num_classes: usize) -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 23, 3], 64, num_classes)
    }
    /// torchvision's ResNet152: bottleneck blocks, [3, 8, 36, 3] per stage.
    pub fn resnet152(num_classes: usize) -> Self {
        Self::new(BlockKind::Bottleneck, [3, 8, 36, 3], 64, num_classes)
    }
    /// `tiny-resnet`: the same code with one basic block per stage and 16 stem channels
    /// (about 0.3 M parameters), for the synthetic fundus task and tests.
    pub fn tiny(num_classes: usize) -> Self {
        Self::new(BlockKind::Basic, [1, 1, 1, 1], 16, num_classes)
    }

    fn new(block: BlockKind, layers: [usize; 4], width: usize, num_classes: usize) -> Self {
        Self {
            block,
            layers,
            width,
            num_classes,
        }
    }

    /// Channels entering the classifier head.
    pub fn feature_channels(&self) -> usize {
        self.width * 8 * self.block.expansion()
    }
}

/// A ResNet convolution (PyTorch padding `kernel / 2`, no bias) and its BatchNorm.
fn conv_bn(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    vb_conv: VarBuilder,
    vb_bn: VarBuilder,
) -> Result<ConvBn> {
    let conv = Conv2d::new(
        cin,
        cout,
        kernel,
        stride,
        Padding::Uniform(kernel / 2),
        false,
        vb_conv,
    )?;
    Ok(ConvBn::new(conv, BatchNorm::new(cout, BN_EPS, vb_bn)?))
}

/// One residual block: a chain of conv-BN units with ReLUs between, plus the shortcut.
#[derive(Debug, Clone)]
struct Block {
    /// `conv1/bn1`, `conv2/bn2` (and `conv3/bn3` for bottlenecks).
    units: Vec<ConvBn>,
    /// `downsample.0/1`, where the shape changes.
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        kind: BlockKind,
        cin: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cout = planes * kind.expansion();
        // (in, out, kernel, stride) of each unit; torchvision v1.5 strides the 3x3 convolution.
        let shapes = match kind {
            BlockKind::Basic => vec![(cin, planes, 3, stride), (planes, planes, 3, 1)],
            BlockKind::Bottleneck => vec![
                (cin, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, cout, 1, 1),
            ],
        };
        let units = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                conv_bn(
                    ci,
                    co,
                    k,
                    s,
                    vb.pp(format!("conv{}", i + 1)),
                    vb.pp(format!("bn{}", i + 1)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || cin != cout {
            let vb = vb.pp("downsample");
            Some(conv_bn(cin, cout, 1, stride, vb.pp("0"), vb.pp("1"))?)
        } else {
            None
        };
        Ok(Self { units, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool, rule: ReluBackward) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward_then(x, train, Then::default())?,
            None => x.clone(),
        };
        let mut y = x.clone();
        let last = self.units.len() - 1;
        for (i, unit) in self.units.iter().enumerate() {
            // ReLU after every unit; the last adds the shortcut first.
            let residual = (i == last).then_some(&shortcut);
            let then = Then {
                residual,
                relu: Some(rule),
                max: None,
            };
            y = unit.forward_then(&y, train, then)?;
        }
        Ok(y)
    }
}

/// A torchvision-compatible ResNet classifier.
#[derive(Debug, Clone)]
pub struct ResNet {
    arch: String,
    config: ResNetConfig,
    stem: ConvBn,
    /// Every block in order, with its name `layerI.J`.
    blocks: Vec<(String, Block)>,
    fc: Linear,
    spec: InputSpec,
    classes: Classes,
    device: Device,
    dtype: DType,
    /// The backward rule of every ReLU (guided backpropagation's for [`Classifier::guided`]).
    relu_backward: ReluBackward,
}

impl ResNet {
    /// Builds the network from `vb` (a checkpoint, or fresh variables for training).
    /// `arch` is the name reported by [`Classifier::arch`].
    pub fn new(arch: &str, config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let width = config.width;
        let stem = conv_bn(3, width, 7, 2, vb.pp("conv1"), vb.pp("bn1"))?;
        let mut blocks = Vec::new();
        let mut cin = width;
        for (stage, &count) in config.layers.iter().enumerate() {
            let planes = width << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            for j in 0..count {
                let block = Block::new(
                    config.block,
                    cin,
                    planes,
                    if j == 0 { stride } else { 1 },
                    vb_stage.pp(j),
                )?;
                blocks.push((format!("layer{}.{j}", stage + 1), block));
                cin = planes * config.block.expansion();
            }
        }
        let fc = linear_head(cin, config.num_classes, vb.pp("fc"))?;
        let classes = Classes::for_head(config.num_classes);
        Ok(Self {
            arch: arch.to_string(),
            config: config.clone(),
            stem,
            blocks,
            fc,
            spec: InputSpec::imagenet(224),
            classes,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            relu_backward: ReluBackward::Exact,
        })
    }

    /// The shape this network was built with.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Names the output classes (their number must match the head).
    pub fn with_classes(mut self, classes: Classes) -> Result<Self> {
        if classes.len() != self.config.num_classes {
            candle_core::bail!(
                "{} classes named for a head of {}",
                classes.len(),
                self.config.num_classes
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

    /// Replaces `fc` with a fresh head for `classes` built from `vb` (fine-tuning).
    pub fn replace_head(&mut self, classes: Classes, vb: VarBuilder) -> Result<()> {
        self.fc = linear_head(self.config.feature_channels(), classes.len(), vb)?;
        self.config.num_classes = classes.len();
        self.classes = classes;
        Ok(())
    }

    /// The position after which `layer`'s output is taken: 0 is the stem (`maxpool`), `k` is
    /// after the k-th block. Stage names (`layer3`) mean their last block.
    fn position(&self, layer: &str) -> Result<usize> {
        if layer == "maxpool" {
            return Ok(0);
        }
        let found = self
            .blocks
            .iter()
            .rposition(|(name, _)| name == layer || name.split('.').next() == Some(layer));
        match found {
            Some(i) => Ok(i + 1),
            None => Err(unknown_layer(&self.arch, layer, &self.layers())),
        }
    }

    fn stem_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.spec.normalize(pixels, self.dtype)?;
        let relu = Then {
            relu: Some(self.relu_backward),
            ..Then::default()
        };
        let x = self.stem.forward_then(&x, train, relu)?;
        max_pool2d(&x, 3, 2, 1)
    }

    fn blocks_t(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Result<Tensor> {
        for (_, block) in &self.blocks[range] {
            x = block.forward_t(&x, train, self.relu_backward)?;
        }
        Ok(x)
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.fc.forward(&global_avg_pool(x)?)
    }
}

/// `nn.Linear` with PyTorch's default initialisation, U(-1/sqrt(in), 1/sqrt(in)).
pub(crate) fn linear_head(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (cin as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((cout, cin), "weight", init)?;
    let bias = vb.get_with_hints(cout, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Classifier for ResNet {
    fn arch(&self) -> &str {
        &self.arch
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
        let x = self.stem_t(pixels, train)?;
        let x = self.blocks_t(x, 0..self.blocks.len(), train)?;
        self.head(&x)
    }

    /// `maxpool` (the stem's output) and `layer1` .. `layer4`; block names such as `layer4.2`
    /// are accepted too.
    fn layers(&self) -> Vec<String> {
        let mut names = vec!["maxpool".to_string()];
        names.extend((1..=4).map(|i| format!("layer{i}")));
        names
    }

    fn default_layer(&self) -> String {
        "layer4".to_string()
    }

    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor> {
        let end = self.position(layer)?;
        let x = self.stem_t(pixels, false)?;
        self.blocks_t(x, 0..end, false)
    }

    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor> {
        let start = self.position(layer)?;
        let x = self.blocks_t(features.clone(), start..self.blocks.len(), false)?;
        self.head(&x)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        let mut guided = self.clone();
        guided.relu_backward = ReluBackward::Guided;
        Some(Box::new(guided))
    }
}
