//! The errors of reading and writing images and datasets, each naming the file (and line) at fault.

use std::path::PathBuf;

/// What can go wrong turning files into tensors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file (or folder) being read or written.
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },

    /// An image could not be decoded or encoded.
    #[error("{path}: {reason}")]
    Image {
        /// The image (or mask) file.
        path: PathBuf,
        /// What went wrong: a decoding or encoding failure, an unsupported format, etc.
        reason: String,
    },

    /// A manifest row (or the header, line 1) that cannot be used.
    #[error("{path}:{line}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The 1-based line in the manifest (the header is line 1; 0 when unknown).
        line: usize,
        /// What is wrong with the row, usually naming the image it points to.
        message: String,
    },

    /// A value that is not one of those accepted (a crop larger than the image, say).
    #[error("{0}")]
    InvalidArgument(String),

    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
