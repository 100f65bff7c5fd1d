//! The errors of saliency methods and metrics: bad parameters say which and what is allowed.

/// What can go wrong computing or judging a saliency map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter out of its range (zero samples, a window larger than the image, ...).
    #[error("{0}")]
    InvalidParameter(String),
    /// A tensor computation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The classifier failed.
    #[error(transparent)]
    Model(#[from] vulnmap_models::Error),
    /// A rendered picture could not be written (see [`crate::render::save`]).
    #[error(transparent)]
    Data(#[from] vulnmap_data::Error),
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Fails with `message` unless `ok`.
pub(crate) fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(message()))
    }
}
