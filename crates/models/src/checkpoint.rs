//! Checkpoints: reading safetensors and PyTorch `.pth` (zip) files, checking that they fit a model
//! tensor by tensor, and writing safetensors atomically.
//!
//! Loading is strict, as `load_state_dict(strict=True)`: every tensor the model asks for must be
//! in the file with its shape, and every tensor in the file must be used. All the problems are
//! reported at once, each with the tensor's name and both shapes.

use crate::error::{Error, Result, TensorProblem};
use crate::init::SeededVarMap;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Safetensors metadata key naming the architecture a checkpoint was saved from.
pub const META_ARCH: &str = "vulnmap.arch";
/// Safetensors metadata key holding the class names, as a JSON array of strings.
pub const META_CLASSES: &str = "vulnmap.classes";

/// Safetensors metadata key holding the input size (height = width) the model was trained at.
pub const META_INPUT_SIZE: &str = "vulnmap.input_size";

/// Buffers PyTorch saves that carry no weights; present or not, they never make a mismatch.
fn is_ignorable(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

enum Tensors {
    Safetensors(MmapedSafetensors),
    Pth(candle_core::pickle::PthTensors),
}

/// An opened checkpoint file: its tensors' names and shapes, loaded lazily.
pub struct Checkpoint {
    path: PathBuf,
    tensors: Tensors,
    /// Tensor name as the model sees it -> (name in the file, shape).
    index: BTreeMap<String, (String, Vec<usize>)>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` or PyTorch `.pth`/`.pt`/`.bin` (zip) checkpoint, telling the format
    /// from the file's first bytes. A truncated or foreign file is an error that says so.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut head = [0u8; 8];
        let len = read_prefix(&path, &mut head)?;
        if len >= 4 && &head[..4] == b"PK\x03\x04" {
            Self::open_pth(path)
        } else if len >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
            Err(Error::invalid(
                &path,
                "a legacy (pre-1.6, non-zip) PyTorch pickle; re-save it with torch.save(state_dict, path) \
                 from a recent PyTorch, or convert it to safetensors",
            ))
        } else {
            Self::open_safetensors(path)
        }
    }

    fn open_safetensors(path: PathBuf) -> Result<Self> {
        let metadata = check_safetensors_layout(&path)?;
        // SAFETY: the file is mapped read-only; vulnmap never writes to a checkpoint it reads.
        let st = unsafe { MmapedSafetensors::new(&path) }
            .map_err(|e| Error::invalid(&path, format!("not a readable safetensors file: {e}")))?;
        let index = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name.clone(), (name, view.shape().to_vec())))
            .collect();
        Ok(Self {
            path,
            tensors: Tensors::Safetensors(st),
            index,
            metadata,
        })
    }

    fn open_pth(path: PathBuf) -> Result<Self> {
        // A bare state dict, or one nested under a key as training scripts often save it.
        let mut last_err = None;
        for key in [
            None,
            Some("state_dict"),
            Some("model"),
            Some("model_state_dict"),
        ] {
            match candle_core::pickle::PthTensors::new(&path, key) {
                Ok(pth) if !pth.tensor_infos().is_empty() => {
                    let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                    // DataParallel prefixes every name with `module.`.
                    let strip = !names.is_empty() && names.iter().all(|n| n.starts_with("module."));
                    let index = pth
                        .tensor_infos()
                        .iter()
                        .map(|(name, info)| {
                            let seen = if strip {
                                name["module.".len()..].to_string()
                            } else {
                                name.clone()
                            };
                            (seen, (name.clone(), info.layout.shape().dims().to_vec()))
                        })
                        .collect();
                    return Ok(Self {
                        path,
                        tensors: Tensors::Pth(pth),
                        index,
                        metadata: HashMap::new(),
                    });
                }
                Ok(_) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(Error::invalid(
            &path,
            match last_err {
                Some(e) => format!("not a readable PyTorch zip checkpoint: {e}"),
                None => {
                    "a PyTorch checkpoint without tensors (expected a state dict, or one under \
                         `state_dict` or `model`)"
                        .to_string()
                }
            },
        ))
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and shapes, sorted by name.
    pub fn shapes(&self) -> BTreeMap<&str, &[usize]> {
        self.index
            .iter()
            .map(|(k, (_, s))| (k.as_str(), s.as_slice()))
            .collect()
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(_, s)| s.as_slice())
    }

    /// Safetensors metadata (empty for `.pth`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The class names stored by [`save_safetensors`] with [`META_CLASSES`], if any.
    pub fn class_names(&self) -> Result<Option<Vec<String>>> {
        match self.metadata.get(META_CLASSES) {
            None => Ok(None),
            Some(json) => serde_json::from_str(json).map(Some).map_err(|e| {
                Error::invalid(
                    &self.path,
                    format!("metadata `{META_CLASSES}` is not a JSON list of names: {e}"),
                )
            }),
        }
    }

    /// The input size stored by vulnmap's training with [`META_INPUT_SIZE`], if any.
    pub fn input_size(&self) -> Result<Option<usize>> {
        match self.metadata.get(META_INPUT_SIZE) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::invalid(
                    &self.path,
                    format!("metadata `{META_INPUT_SIZE}` is `{v}`, not a size in pixels"),
                )
            }),
        }
    }

    /// Loads tensor `name` in `dtype` on `device`. Weights are floating point and finite: an
    /// integer tensor (a wrong name mapping) or a NaN or infinity (a diverged training run) is
    /// refused, naming the tensor, rather than turned into a model that outputs nonsense.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (stored, _) = self.index.get(name).ok_or_else(|| {
            Error::invalid(&self.path, format!("no tensor `{name}` in the checkpoint"))
        })?;
        let t = match &self.tensors {
            Tensors::Safetensors(st) => st.get(stored).and_then(|v| v.load(&Device::Cpu)),
            Tensors::Pth(pth) => pth.get(stored).and_then(|t| {
                t.ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{stored}`")))
            }),
        }
        .map_err(|e| Error::invalid(&self.path, format!("cannot read tensor `{name}`: {e}")))?;
        if !matches!(
            t.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "tensor `{name}` holds {:?} integers; model weights are floating point",
                    t.dtype()
                ),
            ));
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "tensor `{name}` holds {} at element {at} (of {}); weights must be finite",
                    values[at],
                    values.len()
                ),
            ));
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Builds a model from this checkpoint with constant (non-trainable) weights, failing with
    /// every missing, unexpected and misshapen tensor if the checkpoint does not fit `model`.
    pub fn build<M>(
        &self,
        model: &str,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        self.build_with(model, None, false, dtype, device, build)
    }

    /// Builds a trainable model: the checkpoint's tensors become variables in `varmap`, except
    /// those under `fresh_prefix` (say `fc.`, to fine-tune a new head), which are drawn from
    /// `seed` in the shape the model asks for. Otherwise as strict as [`Checkpoint::build`].
    #[allow(clippy::too_many_arguments)]
    pub fn build_trainable<M>(
        &self,
        model: &str,
        varmap: &VarMap,
        fresh_prefix: Option<&str>,
        seed: u64,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        let fresh = Fresh {
            draw: SeededVarMap {
                varmap: varmap.clone(),
                seed,
            },
            prefixes: fresh_prefix.map(str::to_string).into_iter().collect(),
        };
        self.build_with(model, Some(fresh), true, dtype, device, build)
    }

    /// Builds a model with constant weights from the checkpoint, except the tensors under any of
    /// `prefixes` (say `fc.` and `layer4.`), which are re-initialised from `seed`: the
    /// model-randomisation sanity check of Adebayo et al.
    pub fn build_randomized<M>(
        &self,
        model: &str,
        prefixes: &[&str],
        seed: u64,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        let fresh = Fresh {
            draw: SeededVarMap {
                varmap: VarMap::new(),
                seed,
            },
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        };
        self.build_with(model, Some(fresh), false, dtype, device, build)
    }

    fn build_with<M>(
        &self,
        model: &str,
        fresh: Option<Fresh>,
        trainable: bool,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        let state = Arc::new(Mutex::new(LoadState::default()));
        let backend = CheckingBackend {
            checkpoint: self,
            state: state.clone(),
            fresh,
            trainable,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let built = build(vb);
        let state = std::mem::take(&mut *state.lock().map_err(|_| poisoned())?);
        if let Some(e) = state.read_error {
            return Err(e);
        }
        let problems = self.problems(state);
        if !problems.is_empty() {
            return Err(self.mismatch(model, problems));
        }
        Ok(built?)
    }

    /// Copies this checkpoint into the variables of `varmap` (built for `model` beforehand),
    /// with the same strict checks as [`Checkpoint::build`]: the way to fine-tune from it.
    pub fn load_into(&self, varmap: &VarMap, model: &str) -> Result<()> {
        let vars = varmap.data().lock().map_err(|_| poisoned())?;
        let mut state = LoadState::default();
        for (name, var) in vars.iter() {
            state.requested.push(name.clone());
            match self.shape(name) {
                None => state.problems.push(TensorProblem::Missing {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                }),
                Some(s) if s != var.dims() => state.problems.push(TensorProblem::Misshapen {
                    name: name.clone(),
                    checkpoint: s.to_vec(),
                    expected: var.dims().to_vec(),
                }),
                Some(_) => {}
            }
        }
        let problems = self.problems(state);
        if !problems.is_empty() {
            return Err(self.mismatch(model, problems));
        }
        for (name, var) in vars.iter() {
            var.set(&self.tensor(name, var.dtype(), var.device())?)?;
        }
        Ok(())
    }

    /// Adds the unexpected tensors to what the model's construction recorded.
    fn problems(&self, state: LoadState) -> Vec<TensorProblem> {
        let mut problems = state.problems;
        let requested: std::collections::HashSet<&str> =
            state.requested.iter().map(String::as_str).collect();
        for (name, (_, shape)) in &self.index {
            let replaced = state
                .fresh_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()));
            if !requested.contains(name.as_str()) && !is_ignorable(name) && !replaced {
                problems.push(TensorProblem::Unexpected {
                    name: name.clone(),
                    shape: shape.clone(),
                });
            }
        }
        problems
    }

    fn mismatch(&self, model: &str, problems: Vec<TensorProblem>) -> Error {
        Error::CheckpointMismatch {
            path: self.path.clone(),
            model: model.to_string(),
            problems,
            looks_like: detect_architecture(&self.shapes()),
        }
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument("checkpoint state lock poisoned by a panic".to_string())
}

/// Reads up to `buf.len()` bytes of `path`'s start; returns how many there were.
fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).map_err(|e| Error::io(path, e))? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Checks a safetensors file's framing against its size, so that a truncated download is reported
/// as such, and returns its `__metadata__`.
fn check_safetensors_layout(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if size < 8 {
        return Err(Error::invalid(
            path,
            format!(
                "not a safetensors file: only {size} bytes, fewer than the 8-byte header length"
            ),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 {
        return Err(Error::invalid(
            path,
            "not a safetensors or PyTorch checkpoint (its first bytes are neither a safetensors header \
             length nor a zip signature)",
        ));
    }
    if 8 + header_len > size {
        return Err(Error::invalid(
            path,
            format!(
                "truncated safetensors file: the header says it is {header_len} bytes long but the file \
                 has only {size} bytes in all (was a download or copy interrupted?)"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| {
            Error::invalid(
                path,
                format!("not a safetensors file: its header is not a JSON object ({e})"),
            )
        })?;
    let mut metadata = HashMap::new();
    let mut data_end = 0u64;
    let mut last = String::new();
    for (name, entry) in &header {
        if name == "__metadata__" {
            if let Some(map) = entry.as_object() {
                for (k, v) in map {
                    if let Some(v) = v.as_str() {
                        metadata.insert(k.clone(), v.to_string());
                    }
                }
            }
            continue;
        }
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| {
                Error::invalid(
                    path,
                    format!("safetensors header entry `{name}` has no data_offsets"),
                )
            })?;
        if end > data_end {
            data_end = end;
            last = name.clone();
        }
    }
    let available = size - 8 - header_len;
    if data_end > available {
        return Err(Error::invalid(
            path,
            format!(
                "truncated safetensors file: the tensor data should be {data_end} bytes but only {available} \
                 follow the header (tensor `{last}` is cut off; was a download or copy interrupted?)"
            ),
        ));
    }
    Ok(metadata)
}

#[derive(Default)]
struct LoadState {
    requested: Vec<String>,
    /// Tensors under these prefixes were drawn fresh; the checkpoint's are not "unexpected".
    fresh_prefixes: Vec<String>,
    problems: Vec<TensorProblem>,
    /// The first failure to read a tensor that was present and well-shaped.
    read_error: Option<Error>,
}

/// Hands a model its tensors from the checkpoint and records, instead of failing at the first,
/// every tensor that is missing or misshapen (standing in zeros so construction can go on).
struct CheckingBackend<'a> {
    checkpoint: &'a Checkpoint,
    state: Arc<Mutex<LoadState>>,
    /// Tensors drawn fresh instead of read.
    fresh: Option<Fresh>,
    /// Keep the tensors as variables in `fresh.draw.varmap` (to train them).
    trainable: bool,
}

/// Which tensors to draw fresh, and from what.
struct Fresh {
    /// Holds the variables; draws the fresh ones.
    draw: SeededVarMap,
    prefixes: Vec<String>,
}

impl SimpleBackend for CheckingBackend<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint state lock poisoned".into()))?;
        if let Some(fresh) = &self.fresh {
            if let Some(prefix) = fresh.prefixes.iter().find(|p| name.starts_with(p.as_str())) {
                if !state.fresh_prefixes.contains(prefix) {
                    state.fresh_prefixes.push(prefix.clone());
                }
                let t = fresh.draw.get(shape, name, init, dtype, dev)?;
                return Ok(if self.trainable { t } else { t.detach() });
            }
        }
        state.requested.push(name.to_string());
        let problem = match self.checkpoint.shape(name) {
            None => Some(TensorProblem::Missing {
                name: name.to_string(),
                expected: shape.dims().to_vec(),
            }),
            Some(s) if s != shape.dims() => Some(TensorProblem::Misshapen {
                name: name.to_string(),
                checkpoint: s.to_vec(),
                expected: shape.dims().to_vec(),
            }),
            Some(_) => None,
        };
        if let Some(p) = problem {
            state.problems.push(p);
            return Tensor::zeros(shape, dtype, dev);
        }
        match self.checkpoint.tensor(name, dtype, dev) {
            Ok(t) => match (&self.fresh, self.trainable) {
                (Some(fresh), true) => {
                    let var = Var::from_tensor(&t)?;
                    let mut vars = fresh.draw.varmap.data().lock().map_err(|_| {
                        candle_core::Error::Msg("variable map lock poisoned".into())
                    })?;
                    vars.insert(name.to_string(), var.clone());
                    Ok(var.as_tensor().clone())
                }
                _ => Ok(t),
            },
            Err(e) => {
                let msg = vulnmap_data::describe(&e);
                state.read_error.get_or_insert(e);
                Err(candle_core::Error::Msg(msg))
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.checkpoint
            .tensor(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(vulnmap_data::describe(&e)))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.shape(name).is_some()
    }
}

/// Names the architecture a set of tensors comes from, when it is one vulnmap knows.
pub fn detect_architecture(shapes: &BTreeMap<&str, &[usize]>) -> Option<String> {
    if shapes.contains_key("_conv_stem.weight") {
        return Some("efficientnet-lite0".to_string());
    }
    let width = shapes.get("conv1.weight")?.first().copied()?;
    let mut layers = [0usize; 4];
    for name in shapes.keys() {
        let mut parts = name.split('.');
        if let (Some(stage), Some(block)) = (parts.next(), parts.next()) {
            if let (Some(i), Ok(j)) = (
                stage
                    .strip_prefix("layer")
                    .and_then(|s| s.parse::<usize>().ok()),
                block.parse::<usize>(),
            ) {
                if (1..=4).contains(&i) {
                    layers[i - 1] = layers[i - 1].max(j + 1);
                }
            }
        }
    }
    let bottleneck = shapes.contains_key("layer1.0.conv3.weight");
    let name = match (bottleneck, layers, width) {
        (false, [2, 2, 2, 2], 64) => "resnet18",
        (false, [3, 4, 6, 3], 64) => "resnet34",
        (true, [3, 4, 6, 3], 64) => "resnet50",
        (true, [3, 4, 23, 3], 64) => "resnet101",
        (true, [3, 8, 36, 3], 64) => "resnet152",
        (false, [1, 1, 1, 1], 16) => "tiny-resnet",
        _ => return Some(format!("ResNet with blocks {layers:?} and width {width}")),
    };
    Some(name.to_string())
}

/// Writes `tensors` (in `dtype`, or as they are) and `metadata` to a safetensors file, through a
/// temporary file in the same directory and a rename, so an interrupted save never leaves a
/// half-written checkpoint behind.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
    dtype: Option<DType>,
) -> Result<()> {
    let path = path.as_ref();
    let converted: BTreeMap<&String, Tensor> = tensors
        .iter()
        .map(|(k, t)| {
            let t = match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t.clone(),
            };
            Ok((k, t.to_device(&Device::Cpu)?.contiguous()?))
        })
        .collect::<candle_core::Result<_>>()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let metadata = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    safetensors::tensor::serialize_to_file(
        converted.iter().map(|(k, t)| (k.as_str(), t)),
        metadata,
        &tmp,
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::invalid(path, format!("cannot write safetensors: {e}"))
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// All variables of `varmap`, by name, for [`save_safetensors`].
pub fn varmap_tensors(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    let data = varmap.data().lock().map_err(|_| poisoned())?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}
