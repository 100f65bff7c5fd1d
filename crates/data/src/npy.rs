//! NumPy `.npy` files (format version 1.0, little-endian f32, C order): the arrays a Python user
//! opens with `numpy.load`, written through a temporary file and a rename.

use crate::error::{Error, Result};
use std::path::Path;

/// The bytes of an `.npy` file holding `values` with `shape`.
pub fn npy_bytes(values: &[f32], shape: &[usize]) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    if count != values.len() {
        return Err(Error::InvalidArgument(format!(
            "{} values do not fill an array of shape {shape:?}",
            values.len()
        )));
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of
    // 64 bytes and ended by a newline, as numpy writes it.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * values.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(bytes)
}

/// Writes `values` with `shape` to the `.npy` file `path`.
pub fn write_npy(path: &Path, values: &[f32], shape: &[usize]) -> Result<()> {
    crate::fs::write_atomic(path, &npy_bytes(values, shape)?)
}

#[cfg(test)]
mod tests {
    use super::npy_bytes;

    #[test]
    fn the_header_is_numpys_to_the_byte() {
        // numpy.save of np.array([[1, 2, 3], [4, 5, 6]], dtype='<f4'), header by the spec.
        let bytes = npy_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let text = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(
            text.starts_with(header) && text.ends_with(" \n"),
            "{text:?}"
        );
        assert_eq!(text.trim_end(), header);
        assert_eq!(bytes.len(), 10 + len + 24);
        assert_eq!(&bytes[10 + len..10 + len + 4], &1f32.to_le_bytes());
        assert_eq!(&bytes[bytes.len() - 4..], &6f32.to_le_bytes());
        let vector = npy_bytes(&[0.5; 4], &[4]).unwrap();
        assert!(std::str::from_utf8(&vector[10..70])
            .unwrap()
            .contains("'shape': (4,), }"));
        assert!(npy_bytes(&[1.0], &[2, 2]).is_err());
    }
}
