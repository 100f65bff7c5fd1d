//! The synthetic fundus benchmark: retinal images whose lesions, and so whose right saliency
//! maps, are known.
//!
//! Each patient has two eyes; each eye has its own anatomy (disc, fovea, vessel tree, pigment)
//! and, with probability `lesion_prevalence`, lesions. An eye is photographed in colour (CFP)
//! and, with probability `fa_fraction`, also as a fluorescein angiogram (FA), both showing the
//! same lesions at the same places as each modality shows them. Every image has its lesion mask
//! (white = lesion) saved beside it, and a manifest lists them all. The same seed gives
//! byte-identical files.
//!
//! Modules: [`anatomy`] (eye structures), [`lesions`] (lesion kinds and placement), [`render`]
//! (CFP and FA images with masks), [`noise`] (texture).

pub mod anatomy;
pub mod lesions;
pub mod noise;
pub mod render;

use crate::dataset::Modality;
use crate::error::{Error, Result};
use crate::random;
use anatomy::{Anatomy, Eye};
use lesions::{Lesion, LesionKind};
use rand::Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What the labels say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum LabelScheme {
    /// `healthy` or `lesion`.
    #[default]
    Binary,
    /// `healthy`, `haemorrhage`, `exudate` or `microaneurysm`: each diseased eye has one kind.
    LesionType,
}

impl LabelScheme {
    /// The class names, in label order.
    pub fn classes(self) -> Vec<String> {
        let names: &[&str] = match self {
            LabelScheme::Binary => &["healthy", "lesion"],
            LabelScheme::LesionType => &["healthy", "haemorrhage", "exudate", "microaneurysm"],
        };
        names.iter().map(|s| s.to_string()).collect()
    }
}

/// How to generate a synthetic fundus set.
#[derive(Debug, Clone, PartialEq)]
pub struct FundusConfig {
    /// Number of patients, two eyes each (default 150).
    pub patients: usize,
    /// Images are `size x size`.
    pub size: usize,
    /// Seed of every random choice: the same seed gives the same files (default 0).
    pub seed: u64,
    /// Probability that an eye has lesions.
    pub lesion_prevalence: f64,
    /// Probability that an eye also has an FA image (1: every eye, 0: colour only).
    pub fa_fraction: f64,
    /// What the labels say (default [`LabelScheme::Binary`]).
    pub labels: LabelScheme,
}

impl Default for FundusConfig {
    fn default() -> Self {
        Self {
            patients: 150,
            size: 224,
            seed: 0,
            lesion_prevalence: 0.5,
            fa_fraction: 1.0,
            labels: LabelScheme::Binary,
        }
    }
}

/// One generated image with everything known about it.
pub struct FundusImage {
    /// The patient ID, `P0001` for the first.
    pub patient: String,
    /// Which of the patient's eyes.
    pub eye: Eye,
    /// Colour photograph or angiogram.
    pub modality: Modality,
    /// The class name under the config's label scheme.
    pub label: String,
    /// The kinds of lesion drawn (empty for a healthy eye).
    pub lesions: Vec<LesionKind>,
    /// RGB in [0, 1] (grey repeated for FA) and the lesion mask.
    pub rendering: render::Rendering,
}

impl FundusImage {
    /// The file name stem, e.g. `P0007_OD_CFP`.
    pub fn stem(&self) -> String {
        format!(
            "{}_{}_{}",
            self.patient,
            self.eye.code(),
            self.modality.name()
        )
    }
}

/// The anatomy and lesions of one eye, from which its images are rendered.
pub struct EyeModel {
    /// The eye's fixed structures.
    pub anatomy: Anatomy,
    /// Its lesions, two to four of each kind drawn (empty for a healthy eye).
    pub lesions: Vec<Lesion>,
}

/// Draws the eye `eye` of patient number `patient`.
pub fn eye_model(config: &FundusConfig, patient: usize, eye: Eye) -> EyeModel {
    let mut rng = random::rng(config.seed, &format!("eye {patient} {}", eye.code()));
    let anatomy = Anatomy::generate(&mut rng, config.size, eye);
    let lesions = if rng.random::<f64>() < config.lesion_prevalence {
        let kinds: Vec<LesionKind> = match config.labels {
            LabelScheme::LesionType => vec![LesionKind::ALL[rng.random_range(0..3)]],
            LabelScheme::Binary => {
                let first = LesionKind::ALL[rng.random_range(0..3)];
                if rng.random::<f64>() < 0.3 {
                    vec![first, LesionKind::ALL[rng.random_range(0..3)]]
                } else {
                    vec![first]
                }
            }
        };
        let mut lesions = Vec::new();
        for kind in kinds {
            for _ in 0..rng.random_range(2..=4) {
                lesions.push(lesions::place(&mut rng, &anatomy, kind));
            }
        }
        lesions
    } else {
        Vec::new()
    };
    EyeModel { anatomy, lesions }
}

/// Renders eye `eye` of patient `patient` in `modality`.
pub fn render_eye(
    config: &FundusConfig,
    patient: usize,
    eye: Eye,
    modality: Modality,
) -> FundusImage {
    let model = eye_model(config, patient, eye);
    let mut grain = random::rng(
        config.seed,
        &format!("grain {patient} {} {}", eye.code(), modality.name()),
    );
    let rendering = render::render(&model.anatomy, &model.lesions, modality, &mut grain);
    let mut kinds: Vec<LesionKind> = model.lesions.iter().map(|l| l.kind).collect();
    kinds.sort();
    kinds.dedup();
    let label = match (config.labels, kinds.first()) {
        (_, None) => "healthy".to_string(),
        (LabelScheme::Binary, Some(_)) => "lesion".to_string(),
        (LabelScheme::LesionType, Some(kind)) => kind.name().to_string(),
    };
    FundusImage {
        patient: patient_id(patient),
        eye,
        modality,
        label,
        lesions: kinds,
        rendering,
    }
}

fn patient_id(patient: usize) -> String {
    format!("P{:04}", patient + 1)
}

/// The images the config describes, in manifest order: patient, eye (OD, OS), CFP then FA.
pub fn plan(config: &FundusConfig) -> Vec<(usize, Eye, Modality)> {
    let mut items = Vec::new();
    for p in 0..config.patients {
        for eye in [Eye::Right, Eye::Left] {
            items.push((p, eye, Modality::Cfp));
            let mut rng = random::rng(config.seed, &format!("fa {p} {}", eye.code()));
            if rng.random::<f64>() < config.fa_fraction {
                items.push((p, eye, Modality::Fa));
            }
        }
    }
    items
}

/// Writes the images, masks and `manifest.csv` to `out` (in parallel); returns the manifest path.
/// Images go to `out/images/<stem>.png`, masks beside them as `<stem>_mask.png`. FA images are
/// written as grey PNGs.
pub fn write_dataset(config: &FundusConfig, out: &Path) -> Result<PathBuf> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let rows: Vec<String> = plan(config)
        .into_par_iter()
        .map(|(p, eye, modality)| -> Result<String> {
            let image = render_eye(config, p, eye, modality);
            let stem = image.stem();
            let image_path = images_dir.join(format!("{stem}.png"));
            let mask_path = images_dir.join(format!("{stem}_mask.png"));
            write_png(&image, &image_path)?;
            write_mask(&image.rendering, &mask_path)?;
            let kinds: Vec<&str> = image.lesions.iter().map(|k| k.name()).collect();
            Ok(format!(
                "images/{stem}.png,{},{},{},images/{stem}_mask.png,{},{}",
                image.label,
                modality.name(),
                image.patient,
                eye.code(),
                kinds.join(";")
            ))
        })
        .collect::<Result<_>>()?;
    let mut csv = String::from("path,label,modality,patient_id,mask_path,eye,lesions\n");
    for row in rows {
        csv.push_str(&row);
        csv.push('\n');
    }
    let manifest = out.join("manifest.csv");
    crate::fs::write_atomic(&manifest, csv.as_bytes())?;
    Ok(manifest)
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

fn write_png(image: &FundusImage, path: &Path) -> Result<()> {
    let n = image.rendering.size as u32;
    let px = &image.rendering.pixels;
    let tmp = crate::fs::temp_path(path);
    let saved = match image.modality {
        Modality::Fa => {
            let grey: Vec<u8> = px.chunks(3).map(|c| to_u8(c[0])).collect();
            image::GrayImage::from_raw(n, n, grey).map(|img| img.save(&tmp))
        }
        Modality::Cfp => {
            let rgb: Vec<u8> = px.iter().map(|&v| to_u8(v)).collect();
            image::RgbImage::from_raw(n, n, rgb).map(|img| img.save(&tmp))
        }
    };
    match saved {
        Some(Ok(())) => crate::fs::rename(&tmp, path),
        Some(Err(e)) => Err(Error::image(path, format!("cannot write PNG: {e}"))),
        None => Err(Error::image(path, "image buffer of the wrong size")),
    }
}

fn write_mask(rendering: &render::Rendering, path: &Path) -> Result<()> {
    let n = rendering.size as u32;
    let bytes: Vec<u8> = rendering
        .mask
        .iter()
        .map(|&m| if m { 255 } else { 0 })
        .collect();
    let tmp = crate::fs::temp_path(path);
    image::GrayImage::from_raw(n, n, bytes)
        .ok_or_else(|| Error::image(path, "mask buffer of the wrong size"))?
        .save(&tmp)
        .map_err(|e| Error::image(path, format!("cannot write PNG: {e}")))?;
    crate::fs::rename(&tmp, path)
}
