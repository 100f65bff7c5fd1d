//! Decoding PNG and JPEG files to RGB pixels in [0, 1], and writing pixels back as PNG.
//!
//! 8- and 16-bit grey, RGB and RGBA are read; grey becomes three equal channels (ImageNet models
//! want three), alpha is dropped (as PIL's `convert("RGB")`), and JPEG EXIF orientation is
//! applied so the pixels stand the way a viewer shows them.
//!
//! Files are untrusted: the header is read first and an image of more than [`max_pixels`]
//! pixels, or longer than [`MAX_ASPECT_RATIO`] times its width, is refused before any pixel is
//! decoded; a JPEG that ends before its end-of-image marker (a truncated download) is an error,
//! not an image padded with grey.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The pixel budget of one image when neither [`set_max_pixels`] nor `VULNMAP_MAX_PIXELS` sets
/// another: 64 megapixels (a 12-byte-per-pixel f32 image of 768 MB).
pub const DEFAULT_MAX_PIXELS: u64 = 64 << 20;
/// How many times longer than wide (or wide than long) an image may be.
pub const MAX_ASPECT_RATIO: u64 = 64;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(0);

/// Sets the pixel budget for the images this process reads (0: back to the default).
pub fn set_max_pixels(pixels: u64) {
    MAX_PIXELS.store(pixels, Ordering::Relaxed);
}

/// The pixel budget: [`set_max_pixels`]'s, else `VULNMAP_MAX_PIXELS`, else
/// [`DEFAULT_MAX_PIXELS`].
pub fn max_pixels() -> u64 {
    match MAX_PIXELS.load(Ordering::Relaxed) {
        0 => std::env::var("VULNMAP_MAX_PIXELS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_MAX_PIXELS),
        n => n,
    }
}

/// Refuses dimensions over the budget or of an extreme shape, before decoding.
fn check_dimensions(path: &Path, (w, h): (u32, u32), budget: u64) -> Result<()> {
    let (w, h) = (u64::from(w), u64::from(h));
    if w == 0 || h == 0 {
        return Err(Error::image(
            path,
            format!("the header says {w} x {h} pixels"),
        ));
    }
    if w * h > budget {
        return Err(Error::image(
            path,
            format!(
                "{w} x {h} pixels is more than the budget of {budget} pixels; resize it first, or \
                 raise the budget with --max-pixels or VULNMAP_MAX_PIXELS"
            ),
        ));
    }
    if w.max(h) > MAX_ASPECT_RATIO * w.min(h) {
        return Err(Error::image(
            path,
            format!("{w} x {h} pixels is longer than {MAX_ASPECT_RATIO} times its other side"),
        ));
    }
    Ok(())
}

/// Whether a JPEG's bytes reach its end-of-image marker. The marker segments before the scan
/// carry their lengths; inside entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a
/// restart marker or another marker, so the first 0xFF 0xD9 there is the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            i += 1; // entropy-coded data (or stray bytes a lenient decoder skips too)
            continue;
        }
        let marker = bytes[i + 1];
        match marker {
            0xD9 => return true,
            0x00 | 0xFF | 0xD0..=0xD7 | 0x01 => {
                i += if marker == 0xFF { 1 } else { 2 };
            }
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return false;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                i += 2 + len;
            }
        }
    }
    false
}

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
    // A file larger than the largest image within the budget could hold is not read at all.
    let budget = max_pixels();
    let most_bytes = budget * 8 + (16 << 20);
    if meta.len() > most_bytes {
        return Err(Error::image(
            path,
            format!(
                "{} bytes is more than an image of the pixel budget ({} pixels) can take",
                meta.len(),
                budget
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(most_bytes).read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let mut reader = ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        // As a reader opened on the path would: the extension names the format to try.
        if let Ok(format) = ImageFormat::from_path(path) {
            reader.set_format(format);
        }
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(most_bytes);
    reader.limits(limits);
    let format = reader.format().ok_or_else(|| {
        Error::image(path, "not an image vulnmap can read (expected PNG or JPEG)")
    })?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(&bytes) {
        return Err(Error::image(
            path,
            "the JPEG ends before its end-of-image marker (a truncated or unfinished file)",
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::image(path, format!("cannot decode: {e}")))?;
    check_dimensions(path, decoder.dimensions(), budget)?;
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
