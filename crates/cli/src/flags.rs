//! Value parsers for flags that multiply memory or time: the pipeline's own ranges
//! (`vulnmap_pipeline::limits`), so a flag and the same pipeline key get the same answer.

use vulnmap_pipeline::limits::{self, Limit};

fn within_u32(limit: &Limit, s: &str) -> Result<u32, String> {
    limit
        .parse(s)
        .and_then(|v| u32::try_from(v).map_err(|_| format!("`{s}` is too large")))
}

pub(crate) fn batch_size(s: &str) -> Result<usize, String> {
    limits::BATCH_SIZE.parse(s)
}

pub(crate) fn resize(s: &str) -> Result<u32, String> {
    within_u32(&limits::RESIZE, s)
}

pub(crate) fn image_size(s: &str) -> Result<u32, String> {
    within_u32(&limits::IMAGE_SIZE, s)
}

pub(crate) fn top(s: &str) -> Result<usize, String> {
    limits::TOP.parse(s)
}

pub(crate) fn patients(s: &str) -> Result<usize, String> {
    limits::PATIENTS.parse(s)
}
