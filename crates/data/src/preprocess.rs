//! Preprocessing as torchvision does it: resize the shorter side (bilinear, antialiased when
//! shrinking, like PIL), then crop the centre; and batches of files decoded in parallel.

use crate::error::{Error, Result};
use crate::image_io::{load_rgb, to_tensor, RgbImage};
use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Resize-then-crop, the standard evaluation transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    /// The shorter side is resized to this many pixels, keeping the aspect ratio.
    pub resize: Option<u32>,
    /// A centre crop of this height and width, after resizing.
    pub crop: Option<(u32, u32)>,
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform for `size` (256 -> 224 for 224).
    pub fn torchvision_eval(size: u32) -> Self {
        Self {
            resize: Some(size * 256 / 224),
            crop: Some((size, size)),
        }
    }

    /// The paper's code: `Resize(size)` then `CenterCrop(size)` (224 -> 224).
    pub fn resize_crop(resize: u32, crop: u32) -> Self {
        Self {
            resize: Some(resize),
            crop: Some((crop, crop)),
        }
    }

    /// Pixels as they are.
    pub fn none() -> Self {
        Self {
            resize: None,
            crop: None,
        }
    }

    /// Applies the transform to one image.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        let resized;
        let img = match self.resize {
            Some(size) => {
                resized = resize_shorter_side(img, size);
                &resized
            }
            None => img,
        };
        match self.crop {
            Some((ch, cw)) => centre_crop(img, ch, cw),
            None => Ok(img.clone()),
        }
    }

    /// Reads, orients and transforms one file to a `3 x H x W` tensor.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Tensor> {
        let path = path.as_ref();
        let img = self
            .apply(&load_rgb(path)?)
            .map_err(|e| Error::image(path, e))?;
        to_tensor(&img)
    }

    /// Reads files in parallel into one `N x 3 x H x W` batch on `device`; every image must come
    /// out the same size (use a crop).
    pub fn load_batch<P: AsRef<Path> + Sync>(
        &self,
        paths: &[P],
        device: &Device,
    ) -> Result<Tensor> {
        let tensors: Vec<Tensor> = paths
            .par_iter()
            .map(|p| self.load(p))
            .collect::<Result<_>>()?;
        let Some(first) = tensors.first() else {
            return Err(Error::InvalidArgument("no images to load".into()));
        };
        for (t, p) in tensors.iter().zip(paths) {
            if t.dims() != first.dims() {
                return Err(Error::image(
                    p.as_ref(),
                    format!(
                        "comes out {:?} but the first image is {:?}; give a crop so all images share a size",
                        t.dims(),
                        first.dims()
                    ),
                ));
            }
        }
        Ok(Tensor::stack(&tensors, 0)?.to_device(device)?)
    }
}

/// Resizes so the shorter side is `size` and the longer one `round(size * long / short)`.
///
/// torchvision's `Resize(int)` truncates the longer side instead (384 rather than 385 for a
/// 451 x 300 image); rounding keeps the aspect ratio closer and is what the shared PyTorch
/// reference fixtures used. The difference is at most one pixel of the longer side.
pub(crate) fn resize_shorter_side(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scaled = |long: u32, short: u32| (size as f64 * long as f64 / short as f64).round() as u32;
    let (nw, nh) = if w <= h {
        (size, scaled(h, w))
    } else {
        (scaled(w, h), size)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    // Triangle = bilinear; the image crate widens the kernel when shrinking, as PIL does.
    imageops::resize(img, nw, nh, FilterType::Triangle)
}

/// The centre `height x width` crop, offsets rounded half to even as torchvision's
/// `CenterCrop` (Python's `round`).
pub(crate) fn centre_crop(img: &RgbImage, height: u32, width: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if height > h || width > w {
        return Err(Error::InvalidArgument(format!(
            "a {height}x{width} crop does not fit in a {h}x{w} image (resize it first)"
        )));
    }
    let top = round_half_even((h - height) as f64 / 2.0);
    let left = round_half_even((w - width) as f64 / 2.0);
    Ok(imageops::crop_imm(img, left, top, width, height).to_image())
}

fn round_half_even(x: f64) -> u32 {
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r as u32
}

/// Image files (PNG, JPEG) in a folder, sorted by name.
pub(crate) fn image_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_python() {
        assert_eq!(round_half_even(80.5), 80);
        assert_eq!(round_half_even(81.5), 82);
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(2.4), 2);
    }

    #[test]
    fn resize_keeps_aspect_and_crop_takes_the_centre() {
        let img = RgbImage::from_fn(451, 300, |x, y| {
            image::Rgb([x as f32 / 451.0, y as f32 / 300.0, 0.5])
        });
        let out = resize_shorter_side(&img, 256);
        assert_eq!(out.dimensions(), (385, 256));
        let crop = centre_crop(&out, 224, 224).unwrap();
        assert_eq!(crop.dimensions(), (224, 224));
        assert!(centre_crop(&crop, 225, 10).is_err());
    }
}
