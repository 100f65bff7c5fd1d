//! Decoding PNG and JPEG files to RGB pixels in [0, 1], and writing pixels back as PNG.
//!
//! 8- and 16-bit grey, RGB and RGBA are read; grey becomes three equal channels (ImageNet models
//! want three), alpha is dropped (as PIL's `convert("RGB")`), and JPEG EXIF orientation is
//! applied so the pixels stand the way a viewer shows them.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader};
use std::path::Path;

/// An RGB image with f32 channels in [0, 1], stored row-major, channels interleaved.
pub type RgbImage = image::Rgb32FImage;

/// Reads an image file as RGB in [0, 1], upright.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    // A pipe would block the open forever and a device never ends: only regular files.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::image(
            path,
            "not a regular file (a folder, device or pipe); vulnmap reads image files only",
        ));
    }
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::image(
            path,
            "not an image vulnmap can read (expected PNG or JPEG)",
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::image(path, format!("cannot decode: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| Error::image(path, format!("cannot read the orientation: {e}")))?;
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| Error::image(path, format!("cannot decode: {e}")))?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb32f())
}

/// The image as a `3 x H x W` f32 tensor on the CPU.
pub fn to_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let hwc = Tensor::from_slice(img.as_raw(), (h as usize, w as usize, 3), &Device::Cpu)?;
    Ok(hwc.permute((2, 0, 1))?.contiguous()?)
}

/// A `3 x H x W` or `1 x H x W` or `H x W` tensor in [0, 1] as an RGB image (grey repeated).
pub fn from_tensor(t: &Tensor) -> Result<RgbImage> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let t = match t.rank() {
        2 => t.unsqueeze(0)?,
        3 => t,
        r => {
            return Err(Error::InvalidArgument(format!(
                "an image tensor has rank 2 or 3, got rank {r}"
            )))
        }
    };
    let (c, h, w) = t.dims3()?;
    let t = match c {
        1 => t.repeat((3, 1, 1))?,
        3 => t,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "an image tensor has 1 or 3 channels, got {c}"
            )))
        }
    };
    let data = t
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::InvalidArgument("image buffer of the wrong size".into()))
}

/// Writes pixels in [0, 1] as an 8-bit PNG, through a temporary file and a rename so a reader
/// never sees half a file.
pub fn save_png(img: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes: Vec<u8> = img
        .as_raw()
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let rgb8 = image::RgbImage::from_raw(img.width(), img.height(), bytes)
        .ok_or_else(|| Error::InvalidArgument("image buffer of the wrong size".into()))?;
    let tmp = crate::fs::temp_path(path);
    rgb8.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::image(path, format!("cannot write PNG: {e}")))?;
    crate::fs::rename(&tmp, path)
}
