//! Damaged copies of files for the property tests of readers of untrusted input.

/// `bytes` with the byte at each `(position mod length, value)` overwritten, then cut to the
/// fraction `keep` of its length (at least one byte).
pub fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], keep: f64) -> Vec<u8> {
    for &(at, value) in edits {
        let n = bytes.len();
        bytes[at % n] = value;
    }
    let keep = ((bytes.len() as f64) * keep).ceil() as usize;
    bytes.truncate(keep.max(1));
    bytes
}
