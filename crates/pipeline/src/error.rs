//! The errors of pipelines: configuration problems carry the file, line and column.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the position is unknown.
    pub line: usize,
    pub column: usize,
    /// The value at fault, as `steps[2].smoothgrad.samples` (empty for syntax errors).
    pub path: String,
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
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] vulnmap_data::Error),
    #[error(transparent)]
    Model(#[from] vulnmap_models::Error),
    #[error(transparent)]
    Saliency(#[from] vulnmap_saliency::Error),
    #[error(transparent)]
    Attack(#[from] vulnmap_attacks::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
