//! Training and fine-tuning a classifier on a dataset: Adam with PyTorch's semantics,
//! cross-entropy, BatchNorm in train mode, batches shuffled by seed; per-epoch accuracy and loss
//! on the training and validation splits, test accuracy of the best epoch at the end, the best
//! checkpoint saved as safetensors.

use crate::optim::{Adam, AdamConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vulnmap_data::loader::Loader;
use vulnmap_data::{random, Dataset, Preprocess, Splits};
use vulnmap_models::checkpoint::{
    save_safetensors, Checkpoint, META_ARCH, META_CLASSES, META_INPUT_SIZE,
};
use vulnmap_models::init::seeded_var_builder;
use vulnmap_models::zoo::Arch;
use vulnmap_models::{Classes, Classifier};
use vulnmap_models::{Error, Result};

/// A classifier whose weights are variables in a `VarMap`, ready to train.
pub struct TrainableModel {
    /// The architecture, written into saved checkpoints so that `zoo::load` rebuilds it.
    pub arch: Arch,
    /// The classifier, built on the variables of `varmap`.
    pub model: Box<dyn Classifier>,
    /// The trainable weights, by name.
    pub varmap: VarMap,
}

impl TrainableModel {
    /// Fresh weights drawn from `seed` (training from scratch).
    pub fn fresh(
        arch: Arch,
        classes: &Classes,
        input_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let model = arch.build(
            classes,
            input_size,
            seeded_var_builder(&varmap, seed, DType::F32, device),
        )?;
        Ok(Self {
            arch,
            model,
            varmap,
        })
    }

    /// The checkpoint's weights with a fresh head for `classes` (fine-tuning). Strict: every
    /// backbone tensor must be there with its shape, and none may be left over.
    pub fn finetune(
        arch: Arch,
        checkpoint: &Checkpoint,
        classes: &Classes,
        input_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let model = checkpoint.build_trainable(
            arch.name(),
            &varmap,
            Some(arch.head_prefix()),
            seed,
            DType::F32,
            device,
            |vb| arch.build(classes, input_size, vb),
        )?;
        Ok(Self {
            arch,
            model,
            varmap,
        })
    }

    /// The head's variables (all that moves when the backbone is frozen).
    pub fn head_vars(&self) -> Vec<Var> {
        let prefix = self.arch.head_prefix();
        let data = self.varmap.data().lock().expect("variable map lock");
        let mut vars: Vec<(&String, &Var)> =
            data.iter().filter(|(k, _)| k.starts_with(prefix)).collect();
        vars.sort_by_key(|(k, _)| k.as_str());
        vars.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Every variable, sorted by name (so the optimiser state is deterministic).
    pub fn vars(&self) -> Vec<Var> {
        let data = self.varmap.data().lock().expect("variable map lock");
        let mut vars: Vec<(&String, &Var)> = data.iter().collect();
        vars.sort_by_key(|(k, _)| k.as_str());
        vars.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// A copy of every tensor, by name.
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        let data = self.varmap.data().lock().map_err(|_| lock_error())?;
        data.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Puts a snapshot's values back into the variables.
    pub fn restore(&self, snapshot: &BTreeMap<String, Tensor>) -> Result<()> {
        let data = self.varmap.data().lock().map_err(|_| lock_error())?;
        for (k, v) in data.iter() {
            if let Some(t) = snapshot.get(k) {
                v.set(t)?;
            }
        }
        Ok(())
    }

    /// Saves the weights as safetensors, with the architecture, class names and input size in the
    /// metadata so that `zoo::load` rebuilds the same classifier.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_model(self.arch, self.model.as_ref(), &self.snapshot()?, path)
    }

    /// A constant (non-trainable) copy: what attacks and saliency methods should be given.
    pub fn to_classifier(&self) -> Result<Box<dyn Classifier>> {
        let tensors: HashMap<String, Tensor> = self.snapshot()?.into_iter().collect();
        let device = self.model.device().clone();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        Ok(self
            .arch
            .build(self.model.classes(), self.model.input_spec().height, vb)?)
    }
}

fn lock_error() -> Error {
    Error::InvalidArgument("variable map lock poisoned by a panic".to_string())
}

/// Writes `tensors` of `model` with vulnmap's metadata.
pub fn save_model(
    arch: Arch,
    model: &dyn Classifier,
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let classes = serde_json::to_string(model.classes().names())
        .map_err(|e| Error::InvalidArgument(format!("class names: {e}")))?;
    let metadata = HashMap::from([
        (META_ARCH.to_string(), arch.name().to_string()),
        (META_CLASSES.to_string(), classes),
        (
            META_INPUT_SIZE.to_string(),
            model.input_spec().height.to_string(),
        ),
    ]);
    save_safetensors(path, tensors, metadata, None)
}

/// How the learning rate changes over the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    /// The same rate throughout (the paper's fine-tuning).
    Constant,
    /// Cosine decay from the rate to zero over the epochs (`CosineAnnealingLR`, stepped per epoch).
    Cosine,
}

impl LrSchedule {
    /// The rate for 1-based `epoch` of `epochs`.
    pub fn rate(self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let t = (epoch - 1) as f64 / epochs.max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Passes over the training split (default 10).
    pub epochs: usize,
    /// Images per batch, for training steps and evaluation alike (default 32).
    pub batch_size: usize,
    /// The optimiser's settings; `adam.lr` is the schedule's base rate (default 1e-4).
    pub adam: AdamConfig,
    /// How the learning rate changes over the epochs (default constant).
    pub schedule: LrSchedule,
    /// Shuffling seed (epoch `e` shuffles with `seed + e`).
    pub seed: u64,
    /// How every split's images are resized and cropped (default resize 224, centre crop 224).
    pub preprocess: Preprocess,
    /// Train only the head.
    pub freeze_backbone: bool,
    /// Flip training images at random (left-right, up-down).
    pub random_flips: bool,
    /// Standard deviation of Gaussian noise added to training pixels (0: none). Training with
    /// noise makes gradient maps less noisy (Smilkov et al., 2017, section 4).
    pub noise_std: f64,
    /// Where to save the best epoch's weights.
    pub checkpoint: Option<PathBuf>,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Default for TrainConfig {
    /// The paper's fine-tuning: Adam lr 1e-4, batch 32, 10 epochs, 224 x 224 (resize 224, crop).
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            adam: AdamConfig {
                lr: 1e-4,
                ..AdamConfig::default()
            },
            schedule: LrSchedule::Constant,
            seed: 0,
            preprocess: Preprocess::resize_crop(224, 224),
            freeze_backbone: false,
            random_flips: false,
            noise_std: 0.0,
            checkpoint: None,
            progress: true,
        }
    }
}

/// Loss and accuracy of one epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    /// The epoch, counted from 1.
    pub epoch: usize,
    /// Mean cross-entropy per training image, measured during the epoch's steps (train mode).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub train_loss: f64,
    /// Fraction of training images classified correctly during the epoch's steps, in [0, 1].
    pub train_accuracy: f64,
    /// Mean cross-entropy per validation image (the training loss when that split is empty).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub val_loss: f64,
    /// Validation accuracy, in [0, 1] (the training accuracy when that split is empty).
    pub val_accuracy: f64,
    /// Wall-clock time of the epoch, validation included, in seconds.
    pub seconds: f64,
}

/// What training did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    /// Every epoch's figures, in order.
    pub epochs: Vec<EpochStats>,
    /// The epoch whose weights were kept (best validation accuracy).
    pub best_epoch: usize,
    /// Mean cross-entropy per test image with the kept weights (NaN without a test split).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub test_loss: f64,
    /// Test accuracy with the kept weights, in [0, 1] (NaN without a test split).
    #[serde(deserialize_with = "vulnmap_data::json::nan_from_null")]
    pub test_accuracy: f64,
}

/// Sums of a split's loss and correct predictions.
#[derive(Default)]
struct Tally {
    loss: f64,
    correct: usize,
    seen: usize,
}

impl Tally {
    fn add(&mut self, logits: &Tensor, labels: &Tensor, loss: &Tensor) -> Result<()> {
        let n = labels.dim(0)?;
        self.loss += loss.to_scalar::<f32>()? as f64 * n as f64;
        let predicted = logits.argmax(1)?;
        self.correct += predicted
            .eq(labels)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        self.seen += n;
        Ok(())
    }

    fn mean_loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }

    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// Loss and accuracy of `model` (eval mode) on `indices`.
pub fn evaluate(model: &dyn Classifier, loader: &Loader, indices: &[usize]) -> Result<(f64, f64)> {
    let mut tally = Tally::default();
    for batch in loader.batches(indices, None) {
        let batch = batch?.to_device(model.device())?;
        let logits = model.forward(&batch.pixels)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
        tally.add(&logits, &batch.labels, &loss)?;
    }
    Ok((tally.mean_loss(), tally.accuracy()))
}

/// Trains `model` on `splits.train`, keeps the epoch with the best validation accuracy (its
/// weights end up in the model and, if asked, in `config.checkpoint`), and reports the test split.
pub fn fit(
    model: &TrainableModel,
    dataset: Arc<Dataset>,
    splits: &Splits,
    config: &TrainConfig,
) -> Result<TrainReport> {
    if splits.train.is_empty() {
        return Err(Error::InvalidArgument("the training split is empty".into()));
    }
    if dataset.classes.len() != model.model.num_classes() {
        return Err(Error::InvalidArgument(format!(
            "the dataset has {} classes but the model's head has {}",
            dataset.classes.len(),
            model.model.num_classes()
        )));
    }
    let vars = if config.freeze_backbone {
        model.head_vars()
    } else {
        model.vars()
    };
    let mut adam = Adam::new(vars, config.adam)?;
    let loader = Loader::new(dataset, config.preprocess, config.batch_size)
        .with_random_flips(config.random_flips);
    let device = model.model.device().clone();
    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, BTreeMap<String, Tensor>)> = None;
    for epoch in 1..=config.epochs {
        let start = Instant::now();
        adam.config.lr = config.schedule.rate(config.adam.lr, epoch, config.epochs);
        let bar = progress_bar(config.progress, splits.train.len(), epoch, config.epochs);
        let mut tally = Tally::default();
        for (b, batch) in loader
            .batches(&splits.train, Some(config.seed.wrapping_add(epoch as u64)))
            .enumerate()
        {
            let batch = batch?.to_device(&device)?;
            let pixels = if config.noise_std > 0.0 {
                let mut rng = random::rng(config.seed, &format!("train noise {epoch} {b}"));
                let noise = random::randn(&mut rng, batch.pixels.shape(), &device)?;
                (&batch.pixels + (noise * config.noise_std)?)?
            } else {
                batch.pixels.clone()
            };
            let logits = model.model.forward_t(&pixels, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
            adam.step(&loss.backward()?)?;
            tally.add(&logits, &batch.labels, &loss)?;
            bar.inc(batch.indices.len() as u64);
            bar.set_message(format!(
                "loss {:.4} acc {:.3}",
                tally.mean_loss(),
                tally.accuracy()
            ));
        }
        bar.finish_and_clear();
        let (val_loss, val_accuracy) = if splits.val.is_empty() {
            (tally.mean_loss(), tally.accuracy())
        } else {
            evaluate(model.model.as_ref(), &loader, &splits.val)?
        };
        let stats = EpochStats {
            epoch,
            train_loss: tally.mean_loss(),
            train_accuracy: tally.accuracy(),
            val_loss,
            val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::info!(
            "epoch {epoch}/{}: train loss {:.4} acc {:.3}, val loss {:.4} acc {:.3} ({:.1} s)",
            config.epochs,
            stats.train_loss,
            stats.train_accuracy,
            stats.val_loss,
            stats.val_accuracy,
            stats.seconds
        );
        if best.as_ref().is_none_or(|(acc, _, _)| val_accuracy > *acc) {
            let snapshot = model.snapshot()?;
            if let Some(path) = &config.checkpoint {
                save_model(model.arch, model.model.as_ref(), &snapshot, path)?;
            }
            best = Some((val_accuracy, epoch, snapshot));
        }
        epochs.push(stats);
    }
    let (_, best_epoch, snapshot) =
        best.ok_or_else(|| Error::InvalidArgument("no epochs to train".into()))?;
    model.restore(&snapshot)?;
    let (test_loss, test_accuracy) = if splits.test.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        evaluate(model.model.as_ref(), &loader, &splits.test)?
    };
    tracing::info!(
        "best epoch {best_epoch}: test loss {test_loss:.4}, accuracy {test_accuracy:.3}"
    );
    Ok(TrainReport {
        epochs,
        best_epoch,
        test_loss,
        test_accuracy,
    })
}

fn progress_bar(show: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images {msg} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("epoch {epoch}/{epochs}"));
    bar
}
