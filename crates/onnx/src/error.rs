//! What can go wrong reading or running an ONNX classifier, each error naming the file, node or
//! tensor at fault.

use std::path::PathBuf;

/// An ONNX model that cannot be read, is not a classifier, or uses what this crate cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file (or an external-data file beside it) could not be read.
    #[error("{}", .path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The file is not a well-formed ONNX model.
    #[error("{}: not a valid ONNX model: {reason}", .path.display())]
    Malformed {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A node this crate cannot run: an unknown operator, attribute or mode, or inputs that do
    /// not fit it.
    #[error("{}: node `{node}` ({op_type}, opset {opset}): {reason}", .path.display())]
    Node {
        /// The model file.
        path: PathBuf,
        /// The node's name (or its position when unnamed).
        node: String,
        /// Its operator.
        op_type: String,
        /// The model's `ai.onnx` opset.
        opset: i64,
        /// What went wrong (for an unknown operator, the list of supported ones).
        reason: String,
    },

    /// The graph is not an image classifier `N x C x H x W -> N x K`.
    #[error("{}: not an image classifier: {reason}", .path.display())]
    NotAClassifier {
        /// The model file.
        path: PathBuf,
        /// What the graph is instead.
        reason: String,
    },

    /// A value given by the caller (a normalisation, input size or layer) is not valid.
    #[error("{0}")]
    InvalidArgument(String),

    /// A tensor computation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
