//! The errors of reading and writing images and datasets, each naming the file (and line) at fault.

use std::path::PathBuf;

/// What can go wrong turning files into tensors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file (or folder) being read or written.
        path: PathBuf,
        /// The underlying I/O error (printed by `{:#}` chains, after the path).
        source: std::io::Error,
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

/// An error and its causes on one line, `a: b: c`, as `anyhow` prints them with `{:#}`: for
/// where an error must become text (a skipped file's reason, a message inside another error).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: error,
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_io_error_names_the_file_and_carries_its_cause() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = super::Error::io("a/b.png", cause);
        assert_eq!(e.to_string(), "a/b.png");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("no such file"));
        assert_eq!(super::describe(&e), "a/b.png: no such file");
    }
}
