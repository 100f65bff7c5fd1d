//! The run's pictures: each image's input, maps and overlays, attack noise and perturbed images,
//! under `figures/<index>_<name>/`, named by step id.

use crate::error::{Error, Result};
use crate::source::Item;
use candle_core::{Device, Tensor};
use std::path::Path;
use vulnmap_saliency::render::{colorize, overlay, save, Colormap};

fn folder(item: &Item) -> String {
    let stem = item
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("figures/{:04}_{stem}", item.index)
}

/// The input image's figure, relative to the run directory.
pub(crate) fn input(item: &Item) -> String {
    format!("{}/input.png", folder(item))
}

/// The figure `what` (map, overlay, noise, perturbed) of step `id`, relative to the run directory.
pub(crate) fn file(item: &Item, id: &str, what: &str) -> String {
    format!("{}/{id}_{what}.png", folder(item))
}

fn parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Writes a `3 x H x W` image in [0, 1].
pub fn save_rgb(image: &Tensor, path: &Path) -> Result<()> {
    parent(path)?;
    let img = vulnmap_data::image_io::from_tensor(&image.to_device(&Device::Cpu)?)?;
    vulnmap_data::save_png(&img, path)?;
    Ok(())
}

/// Writes a perturbation of strength `alpha` with grey at zero and the full range at +-alpha.
pub fn save_noise(noise: &Tensor, alpha: f64, path: &Path) -> Result<()> {
    let scaled =
        ((noise.to_device(&Device::Cpu)? / (2.0 * alpha.max(1e-12)))? + 0.5)?.clamp(0f32, 1f32)?;
    save_rgb(&scaled, path)
}

/// Writes a map (`H x W`, [0, 1]) in colour, and laid over its image.
pub fn save_map(map: &Tensor, image: &Tensor, map_path: &Path, overlay_path: &Path) -> Result<()> {
    parent(map_path)?;
    let map = map.to_device(&Device::Cpu)?;
    save(&colorize(&map, Colormap::Inferno)?, map_path)?;
    save(
        &overlay(
            &image.to_device(&Device::Cpu)?,
            &map,
            0.5,
            Colormap::Inferno,
        )?,
        overlay_path,
    )?;
    Ok(())
}
