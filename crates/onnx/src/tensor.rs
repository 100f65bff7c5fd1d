//! ONNX tensors (`TensorProto`) to candle tensors: inline or external data, checked against
//! their declared shape before anything is allocated.
//!
//! Floating-point tensors become f32 (the dtype the classifier runs in), integers i64 and
//! booleans u8, so that every operator sees one float, one integer and one boolean type.

use crate::proto::{data_type, TensorProto, EXTERNAL};
use candle_core::{DType, Device, Tensor};
use std::path::{Component, Path};

/// The most elements a constant may have: 2^28 (1 GiB of f32), beyond any classifier's largest
/// weight (VGG's first linear layer has 103 M) and small enough that a forged shape cannot
/// exhaust memory.
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

/// The dtype an ONNX element type runs as, or `None` for types this crate does not read.
pub(crate) fn dtype_of(onnx_type: i32) -> Option<DType> {
    match onnx_type {
        data_type::FLOAT | data_type::DOUBLE | data_type::FLOAT16 => Some(DType::F32),
        data_type::INT64 | data_type::INT32 | data_type::INT8 => Some(DType::I64),
        data_type::BOOL | data_type::UINT8 => Some(DType::U8),
        _ => None,
    }
}

/// The shape `dims` as sizes, refusing negative sizes and more than [`MAX_ELEMENTS`].
pub(crate) fn checked_shape(dims: &[i64]) -> Result<Vec<usize>, String> {
    let mut count: usize = 1;
    let mut shape = Vec::with_capacity(dims.len());
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| format!("negative dimension {d} in {dims:?}"))?;
        count = count
            .checked_mul(d)
            .filter(|&c| c <= MAX_ELEMENTS)
            .ok_or_else(|| format!("shape {dims:?} has more than {MAX_ELEMENTS} elements"))?;
        shape.push(d);
    }
    Ok(shape)
}

/// Decodes `proto` onto `device`; external data is read relative to `base` (the model's folder).
pub(crate) fn decode(proto: &TensorProto, base: &Path, device: &Device) -> Result<Tensor, String> {
    let shape = checked_shape(&proto.dims)?;
    let count: usize = shape.iter().product();
    let external;
    let raw: &[u8] = if proto.data_location == EXTERNAL {
        external = read_external(proto, base, count)?;
        &external
    } else {
        &proto.raw_data
    };
    let t = proto.data_type;
    let width = match t {
        data_type::FLOAT | data_type::INT32 => 4,
        data_type::DOUBLE | data_type::INT64 => 8,
        data_type::FLOAT16 => 2,
        data_type::INT8 | data_type::UINT8 | data_type::BOOL => 1,
        other => return Err(format!("element type {other} is not supported")),
    };
    let have = if !raw.is_empty() {
        raw.len() / width
    } else {
        match t {
            data_type::FLOAT | data_type::FLOAT16 => {
                proto.float_data.len().max(proto.int32_data.len())
            }
            data_type::DOUBLE => proto.double_data.len(),
            data_type::INT64 => proto.int64_data.len(),
            _ => proto.int32_data.len(),
        }
    };
    if have != count || (!raw.is_empty() && raw.len() != count * width) {
        return Err(format!(
            "shape {:?} needs {count} elements, the data holds {have}",
            proto.dims
        ));
    }
    let chunks = |n: usize| raw.chunks_exact(n);
    let tensor = match t {
        data_type::FLOAT => {
            let v: Vec<f32> = if raw.is_empty() {
                proto.float_data.clone()
            } else {
                chunks(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        data_type::DOUBLE => {
            let v: Vec<f32> = if raw.is_empty() {
                proto.double_data.iter().map(|&x| x as f32).collect()
            } else {
                chunks(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        data_type::FLOAT16 => {
            let v: Vec<f32> = if raw.is_empty() {
                proto
                    .int32_data
                    .iter()
                    .map(|&bits| half::f16::from_bits(bits as u16).to_f32())
                    .collect()
            } else {
                chunks(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        data_type::INT64 => {
            let v: Vec<i64> = if raw.is_empty() {
                proto.int64_data.clone()
            } else {
                chunks(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        data_type::INT32 => {
            let v: Vec<i64> = if raw.is_empty() {
                proto.int32_data.iter().map(|&x| x as i64).collect()
            } else {
                chunks(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        data_type::INT8 => {
            let v: Vec<i64> = if raw.is_empty() {
                proto.int32_data.iter().map(|&x| x as i64).collect()
            } else {
                raw.iter().map(|&b| b as i8 as i64).collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        _ => {
            // BOOL and UINT8.
            let v: Vec<u8> = if raw.is_empty() {
                proto.int32_data.iter().map(|&x| x as u8).collect()
            } else {
                raw.to_vec()
            };
            Tensor::from_vec(v, shape, device)
        }
    };
    tensor.map_err(|e| e.to_string())
}

/// Reads an external tensor's bytes: `location` must be a relative path inside the model's
/// folder, and `offset`/`length` must lie within the file.
fn read_external(proto: &TensorProto, base: &Path, count: usize) -> Result<Vec<u8>, String> {
    let field = |key: &str| {
        proto
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let location = field("location").ok_or("external data without a `location`")?;
    let relative = Path::new(location);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "external data location `{location}` must be a relative path inside the model's folder"
        ));
    }
    let number = |key: &str| -> Result<Option<u64>, String> {
        field(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("external data {key} `{v}` is not a number"))
            })
            .transpose()
    };
    let path = base.join(relative);
    let file_len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?.unwrap_or(file_len.saturating_sub(offset));
    let end = offset
        .checked_add(length)
        .filter(|&end| end <= file_len)
        .ok_or_else(|| {
            format!(
                "{}: external data [{offset}, +{length}) lies beyond the file's {file_len} bytes",
                path.display()
            )
        })?;
    if length > (count as u64).saturating_mul(8) {
        return Err(format!(
            "{}: external data of {length} bytes for {count} elements",
            path.display()
        ));
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = vec![0u8; (end - offset) as usize];
    file.read_exact(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}
