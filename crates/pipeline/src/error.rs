//! The errors of pipelines: configuration problems carry the file, line and column.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The pipeline file, as named to `load` or `parse`.
    pub file: PathBuf,
    /// 1-based; 0 when the position is unknown.
    pub line: usize,
    /// 1-based, like `line`; 0 when the position is unknown.
    pub column: usize,
    /// The value at fault, as `steps[2].smoothgrad.samples` (empty for syntax errors).
    pub path: String,
    /// What is wrong, as a sentence for the user.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ", line {}, column {}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ", `{}`", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What can go wrong loading or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file is invalid; every problem found is listed.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Config(Vec<Problem>),
    /// A run directory, shard or result that cannot be used as asked.
    #[error("{0}")]
    Run(String),
    /// A step failed on a chunk of images.
    #[error("step `{id}` on chunk {chunk}")]
    Step {
        /// The step's id.
        id: String,
        /// The chunk of images it ran on (its images are `chunk * chunk_size ..`).
        chunk: usize,
        /// Why it failed (the error's `source`, printed by `{:#}` chains).
        source: Box<Error>,
    },
    /// A file or folder could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Reading, generating or preprocessing images or a dataset failed.
    #[error(transparent)]
    Data(#[from] vulnmap_data::Error),
    /// Building, loading or training a model failed, or the device is unusable.
    #[error(transparent)]
    Model(#[from] vulnmap_models::Error),

    /// Reading or running an ONNX classifier failed.
    #[error(transparent)]
    Onnx(#[from] vulnmap_onnx::Error),
    /// A saliency map or metric could not be computed.
    #[error(transparent)]
    Saliency(#[from] vulnmap_saliency::Error),
    /// An attack could not be run.
    #[error(transparent)]
    Attack(#[from] vulnmap_attacks::Error),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A result could not be turned into JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
