//! Models by name, as the CLI and pipelines spell them, built from a checkpoint or from a seed.

use crate::checkpoint::Checkpoint;
use crate::classifier::{Classes, Classifier, InputSpec};
use crate::efficientnet_lite::EfficientNetLite0;
use crate::error::{Error, Result};
use crate::hub::HubFile;
use crate::init::seeded_var_builder;
use crate::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::path::{Path, PathBuf};

/// The input size of ImageNet models, and of checkpoints that do not say otherwise.
pub const DEFAULT_INPUT_SIZE: usize = 224;

/// The architectures vulnmap can build. Written as [`Arch::name`] in pipelines and on the
/// command line; parsing ignores case and takes `_` for `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Arch {
    /// `resnet18`: torchvision's ResNet-18, basic blocks `[2, 2, 2, 2]`.
    ResNet18,
    /// `resnet34`: torchvision's ResNet-34, basic blocks `[3, 4, 6, 3]`.
    ResNet34,
    /// `resnet50`: torchvision's ResNet-50, bottleneck blocks `[3, 4, 6, 3]`.
    ResNet50,
    /// `resnet101`: torchvision's ResNet-101, bottleneck blocks `[3, 4, 23, 3]`.
    ResNet101,
    /// `resnet152`: torchvision's ResNet-152, bottleneck blocks `[3, 8, 36, 3]`.
    ResNet152,
    /// A small ResNet for the synthetic fundus task and tests (see [`ResNetConfig::tiny`]).
    TinyResNet,
    /// `efficientnet-lite0`: Google's EfficientNet-Lite0, with TF-Lite input scaling.
    EfficientNetLite0,
}

impl Arch {
    /// Every architecture, in the order help texts list them.
    pub const ALL: [Arch; 7] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
        Arch::EfficientNetLite0,
        Arch::TinyResNet,
    ];

    /// The name the CLI uses (`--model`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
            Arch::TinyResNet => "tiny-resnet",
            Arch::EfficientNetLite0 => "efficientnet-lite0",
        }
    }

    /// The classifier head's weight tensor, whose first dimension is the number of classes.
    pub fn head_weight(self) -> &'static str {
        match self {
            Arch::EfficientNetLite0 => "_fc.weight",
            _ => "fc.weight",
        }
    }

    /// The prefix of the head's tensors, replaced when fine-tuning.
    pub fn head_prefix(self) -> &'static str {
        match self {
            Arch::EfficientNetLite0 => "_fc.",
            _ => "fc.",
        }
    }

    /// The ResNet configuration, for the ResNet architectures.
    pub fn resnet_config(self, num_classes: usize) -> Option<ResNetConfig> {
        Some(match self {
            Arch::ResNet18 => ResNetConfig::resnet18(num_classes),
            Arch::ResNet34 => ResNetConfig::resnet34(num_classes),
            Arch::ResNet50 => ResNetConfig::resnet50(num_classes),
            Arch::ResNet101 => ResNetConfig::resnet101(num_classes),
            Arch::ResNet152 => ResNetConfig::resnet152(num_classes),
            Arch::TinyResNet => ResNetConfig::tiny(num_classes),
            Arch::EfficientNetLite0 => return None,
        })
    }

    /// Builds the network with a head for `classes` and an `input_size` square input from `vb`.
    pub fn build(
        self,
        classes: &Classes,
        input_size: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Box<dyn Classifier>> {
        let n = classes.len();
        Ok(match self.resnet_config(n) {
            Some(config) => Box::new(
                ResNet::new(self.name(), &config, vb)?
                    .with_classes(classes.clone())?
                    .with_input_spec(InputSpec::imagenet(input_size)),
            ),
            None => Box::new(
                EfficientNetLite0::new(n, vb)?
                    .with_classes(classes.clone())?
                    .with_input_spec(InputSpec::tf_lite(input_size)),
            ),
        })
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.to_ascii_lowercase().replace('_', "-");
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown model `{s}`; known models: {}",
                    names.join(", ")
                ))
            })
    }
}

impl TryFrom<String> for Arch {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        name.parse()
    }
}

impl From<Arch> for String {
    fn from(arch: Arch) -> String {
        arch.name().to_string()
    }
}

/// Loads `arch` with constant weights from `weights` (a local file, or `hf://owner/name[/file]`
/// for the Hugging Face hub), or from the hub default when `None`.
/// The number of classes comes from the checkpoint's head, their names from its metadata (or
/// ImageNet's for 1000-class heads).
pub fn load(
    arch: Arch,
    weights: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let checkpoint = Checkpoint::open(weights_path(arch, weights)?)?;
    from_checkpoint(arch, &checkpoint, dtype, device)
}

/// The local file `weights` names for `arch`: the path itself, a hub file (`hf://...`) fetched
/// into the local cache, or, when `None`, the hub's default weights for `arch`.
pub fn weights_path(arch: Arch, weights: Option<&Path>) -> Result<PathBuf> {
    let hub_uri = weights.and_then(|p| p.to_str()).and_then(HubFile::from_uri);
    match (hub_uri, weights) {
        (Some(hub), _) => hub?.resolve(),
        (None, Some(p)) => Ok(p.to_path_buf()),
        (None, None) => HubFile::default_for(arch.name())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{arch} has no default weights on the Hugging Face hub; pass a checkpoint with --weights PATH (or train from scratch)"
                ))
            })?
            .resolve(),
    }
}

/// Builds `arch` from an opened checkpoint (strictly: see [`Checkpoint::build`]).
pub fn from_checkpoint(
    arch: Arch,
    checkpoint: &Checkpoint,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let num_classes = checkpoint
        .shape(arch.head_weight())
        .and_then(|s| s.first().copied())
        .unwrap_or(1000);
    let classes = match checkpoint.class_names()? {
        Some(names) if names.len() != num_classes => {
            return Err(Error::invalid(
                checkpoint.path(),
                format!(
                    "metadata names {} classes but the head has {num_classes}",
                    names.len()
                ),
            ))
        }
        Some(names) => Classes::new(names),
        None => Classes::for_head(num_classes),
    };
    let input_size = checkpoint.input_size()?.unwrap_or(DEFAULT_INPUT_SIZE);
    checkpoint.build(arch.name(), dtype, device, |vb| {
        arch.build(&classes, input_size, vb)
    })
}

/// `arch` from `checkpoint` with the tensors under `prefixes` (e.g. `["fc.", "layer4."]`)
/// re-initialised from `seed`, for the model-randomisation sanity check.
pub fn randomized(
    arch: Arch,
    checkpoint: &Checkpoint,
    prefixes: &[&str],
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let num_classes = checkpoint
        .shape(arch.head_weight())
        .and_then(|s| s.first().copied())
        .unwrap_or(1000);
    let classes = match checkpoint.class_names()? {
        Some(names) if names.len() == num_classes => Classes::new(names),
        _ => Classes::for_head(num_classes),
    };
    let input_size = checkpoint.input_size()?.unwrap_or(DEFAULT_INPUT_SIZE);
    checkpoint.build_randomized(arch.name(), prefixes, seed, dtype, device, |vb| {
        arch.build(&classes, input_size, vb)
    })
}

/// A freshly initialised, trainable `arch` with a head for `classes`: weights drawn from `seed`
/// into the returned `VarMap` (hand its variables to an optimiser).
pub fn fresh(
    arch: Arch,
    classes: &Classes,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(Box<dyn Classifier>, VarMap)> {
    let varmap = VarMap::new();
    let model = arch.build(
        classes,
        DEFAULT_INPUT_SIZE,
        seeded_var_builder(&varmap, seed, dtype, device),
    )?;
    Ok((model, varmap))
}
