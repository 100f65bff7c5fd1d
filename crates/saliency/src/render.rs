//! Maps as pictures: perceptual colour maps (from `colorgrad`), overlays on the image, PNG files.

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};
use colorgrad::Gradient;
use std::path::Path;

/// A colour map for values in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colormap {
    /// Google's Turbo: a rainbow map, smoother than Jet; dark blue (0) to dark red (1).
    Turbo,
    /// Matplotlib's Inferno: perceptually uniform, black (0) through red to pale yellow (1).
    Inferno,
    /// Matplotlib's Viridis: perceptually uniform, purple (0) through teal to yellow (1).
    Viridis,
    /// Matplotlib's Magma: perceptually uniform, black (0) through pink to pale yellow (1).
    Magma,
    /// Black (0) to white (1).
    Grey,
}

impl Colormap {
    /// The colour of `t` in [0, 1].
    pub fn color(self, t: f32) -> [u8; 3] {
        let t = t.clamp(0.0, 1.0);
        let rgba = match self {
            Colormap::Turbo => colorgrad::preset::turbo().at(t).to_rgba8(),
            Colormap::Inferno => colorgrad::preset::inferno().at(t).to_rgba8(),
            Colormap::Viridis => colorgrad::preset::viridis().at(t).to_rgba8(),
            Colormap::Magma => colorgrad::preset::magma().at(t).to_rgba8(),
            Colormap::Grey => {
                let v = (t * 255.0).round() as u8;
                [v, v, v, 255]
            }
        };
        [rgba[0], rgba[1], rgba[2]]
    }

    /// 256 colours, so that colouring an image is a lookup.
    fn table(self) -> Vec<[u8; 3]> {
        (0..256).map(|i| self.color(i as f32 / 255.0)).collect()
    }
}

fn values(map: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (h, w) = map.dims2()?;
    Ok((
        h,
        w,
        map.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// A map (`H x W`, [0, 1]) in colour.
pub fn colorize(map: &Tensor, colormap: Colormap) -> Result<image::RgbImage> {
    let (h, w, v) = values(map)?;
    let table = colormap.table();
    let bytes: Vec<u8> = v
        .iter()
        .flat_map(|&t| table[(t.clamp(0.0, 1.0) * 255.0).round() as usize])
        .collect();
    Ok(image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer of the image's size"))
}

/// The map in colour laid over the image (`3 x H x W` in [0, 1]) with opacity `alpha`.
pub fn overlay(
    image: &Tensor,
    map: &Tensor,
    alpha: f32,
    colormap: Colormap,
) -> Result<image::RgbImage> {
    ensure((0.0..=1.0).contains(&alpha), || {
        format!("overlay alpha must be in [0, 1], got {alpha}")
    })?;
    let (h, w, v) = values(map)?;
    let (c, ih, iw) = image.dims3()?;
    ensure(c == 3 && (ih, iw) == (h, w), || {
        format!("image of shape {:?} for a {h}x{w} map", image.dims())
    })?;
    let px = image
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let table = colormap.table();
    let mut bytes = Vec::with_capacity(h * w * 3);
    for (i, &t) in v.iter().enumerate() {
        let color = table[(t.clamp(0.0, 1.0) * 255.0).round() as usize];
        for ch in 0..3 {
            let base = px[i * 3 + ch].clamp(0.0, 1.0) * 255.0;
            bytes.push((base * (1.0 - alpha) + color[ch] as f32 * alpha).round() as u8);
        }
    }
    Ok(image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer of the image's size"))
}

/// Writes an RGB picture as PNG through a temporary file and a rename.
pub fn save(picture: &image::RgbImage, path: &Path) -> Result<()> {
    let tmp = vulnmap_data::fs::temp_path(path);
    picture
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| vulnmap_data::Error::Image {
            path: path.to_path_buf(),
            reason: format!("cannot write PNG: {e}"),
        })?;
    vulnmap_data::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn colour_maps_run_dark_to_bright_and_overlays_blend() {
        for cmap in [
            Colormap::Inferno,
            Colormap::Viridis,
            Colormap::Magma,
            Colormap::Grey,
        ] {
            let lum = |c: [u8; 3]| c.iter().map(|&v| v as u32).sum::<u32>();
            assert!(lum(cmap.color(0.0)) < lum(cmap.color(1.0)), "{cmap:?}");
        }
        let map = Tensor::new(&[[0f32, 1.0]], &Device::Cpu).unwrap();
        let img = Tensor::ones((3, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let o = overlay(&img, &map, 0.5, Colormap::Grey).unwrap();
        assert_eq!(o.get_pixel(0, 0).0, [128, 128, 128]);
        assert_eq!(o.get_pixel(1, 0).0, [255, 255, 255]);
        assert!(overlay(&img, &map, 1.5, Colormap::Grey).is_err());
    }
}
