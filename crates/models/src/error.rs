//! The errors of weight loading and model construction, each naming the file, tensor or value at fault.

use std::path::PathBuf;

/// What can go wrong when building a model or loading its weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor computation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading images or a dataset failed.
    #[error(transparent)]
    Data(#[from] vulnmap_data::Error),

    /// A file could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying I/O error (printed by `{:#}` chains, after the path).
        source: std::io::Error,
    },

    /// The file is not a checkpoint we can read (truncated, corrupt, or another format).
    #[error("{path}: {reason}")]
    InvalidCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint's tensors do not fit the model: each problem names the tensor and both shapes.
    #[error("{}", mismatch_message(.path, .model, .problems, .looks_like.as_deref()))]
    CheckpointMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The name of the architecture being built, e.g. `resnet50`.
        model: String,
        /// Every tensor that is missing, unexpected or of the wrong shape.
        problems: Vec<TensorProblem>,
        /// The architecture the checkpoint's tensors suggest, when it can be told.
        looks_like: Option<String>,
    },

    /// Weights were asked of the Hugging Face hub and could not be had.
    #[error("{0}")]
    Hub(String),

    /// A model name, layer name, device or other value that is not one of those known.
    #[error("{0}")]
    InvalidArgument(String),
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: error,
        }
    }

    /// A file at `path` that is not what it should be, and why.
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidCheckpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// One way in which a checkpoint tensor and the model disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    /// The model needs the tensor and the checkpoint lacks it.
    Missing {
        /// The tensor's name, e.g. `layer1.0.conv1.weight`.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// The checkpoint has a tensor the model does not use.
    Unexpected {
        /// The tensor's name in the checkpoint.
        name: String,
        /// Its shape in the checkpoint.
        shape: Vec<usize>,
    },
    /// Both have the tensor, with different shapes.
    Misshapen {
        /// The tensor's name.
        name: String,
        /// Its shape in the checkpoint.
        checkpoint: Vec<usize>,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
}

impl std::fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorProblem::Missing { name, expected } => {
                write!(
                    f,
                    "missing tensor `{name}` (the model expects shape {expected:?})"
                )
            }
            TensorProblem::Unexpected { name, shape } => {
                write!(
                    f,
                    "unexpected tensor `{name}` of shape {shape:?} (the model has no such tensor)"
                )
            }
            TensorProblem::Misshapen {
                name,
                checkpoint,
                expected,
            } => write!(
                f,
                "tensor `{name}` has shape {checkpoint:?} in the checkpoint but the model expects {expected:?}"
            ),
        }
    }
}

/// How many problems a mismatch error lists before summarising the rest.
const LISTED_PROBLEMS: usize = 12;

fn mismatch_message(
    path: &std::path::Path,
    model: &str,
    problems: &[TensorProblem],
    looks_like: Option<&str>,
) -> String {
    let count = |pred: fn(&TensorProblem) -> bool| problems.iter().filter(|p| pred(p)).count();
    let missing = count(|p| matches!(p, TensorProblem::Missing { .. }));
    let unexpected = count(|p| matches!(p, TensorProblem::Unexpected { .. }));
    let misshapen = count(|p| matches!(p, TensorProblem::Misshapen { .. }));
    let mut msg = format!(
        "checkpoint {} does not fit {model}: {misshapen} misshapen, {missing} missing, {unexpected} unexpected tensor(s)",
        path.display()
    );
    if let Some(arch) = looks_like {
        if arch != model {
            msg.push_str(&format!(
                "; its tensors look like a {arch} checkpoint (pass --model {arch}?)"
            ));
        }
    }
    // Misshapen first: they say the most about what went wrong.
    let mut sorted: Vec<&TensorProblem> = problems.iter().collect();
    sorted.sort_by_key(|p| match p {
        TensorProblem::Misshapen { .. } => 0,
        TensorProblem::Missing { .. } => 1,
        TensorProblem::Unexpected { .. } => 2,
    });
    for p in sorted.iter().take(LISTED_PROBLEMS) {
        msg.push_str(&format!("\n  - {p}"));
    }
    if problems.len() > LISTED_PROBLEMS {
        msg.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - LISTED_PROBLEMS
        ));
    }
    msg
}
