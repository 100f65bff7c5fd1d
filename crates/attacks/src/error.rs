//! The errors of attacks: bad parameters say which and what is allowed.

/// What can go wrong setting up or running an attack.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter out of its range (alpha <= 0, a window larger than the image, ...).
    #[error("{0}")]
    InvalidParameter(String),
    /// A tensor computation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The classifier failed.
    #[error(transparent)]
    Model(#[from] vulnmap_models::Error),
    /// Training images could not be read (the mask network).
    #[error(transparent)]
    Data(#[from] vulnmap_data::Error),
    /// A saliency computation failed (a SmoothGrad mask, the local attack's window grid, ...).
    #[error(transparent)]
    Saliency(#[from] vulnmap_saliency::Error),
}

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(message()))
    }
}
