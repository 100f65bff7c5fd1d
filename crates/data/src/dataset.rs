//! Labelled image datasets: a folder per class, or a CSV manifest with modality, patient and
//! lesion mask per image.
//!
//! Manifest columns (a header row names them; order is free): `path` and `label` are required;
//! `modality` (`FA` or `CFP`), `patient_id` and `mask_path` are optional, as is any column vulnmap
//! does not use. Paths are relative to the manifest's folder. A row that names a missing file, an
//! unknown label or modality, or (when verifying) a corrupt image or a mask of another size is an
//! error naming the manifest line; with `skip_bad` such rows are listed and left out instead.

use crate::error::{Error, Result};
use crate::image_io::load_rgb;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The imaging modality of a retinal image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    /// Fluorescein angiography (grey).
    Fa,
    /// Colour fundus photography.
    Cfp,
}

impl Modality {
    /// `FA` or `CFP`, as manifests spell them.
    pub fn name(self) -> &'static str {
        match self {
            Modality::Fa => "FA",
            Modality::Cfp => "CFP",
        }
    }
}

impl std::str::FromStr for Modality {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "FA" => Ok(Modality::Fa),
            "CFP" => Ok(Modality::Cfp),
            _ => Err(format!("unknown modality `{s}`; expected FA or CFP")),
        }
    }
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image file; a manifest's relative paths are joined to the manifest's folder.
    pub path: PathBuf,
    /// Index into [`Dataset::classes`].
    pub label: usize,
    /// The modality from the manifest's `modality` column; `None` when absent or empty.
    pub modality: Option<Modality>,
    /// Images of one patient never land in two splits.
    pub patient: String,
    /// A lesion mask the size of the image (white = lesion).
    pub mask: Option<PathBuf>,
    /// Where the sample was declared, for error messages: the manifest line, if any.
    pub line: Option<usize>,
}

/// A row or file left out by `skip_bad`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The manifest line, when the sample came from a manifest.
    pub line: Option<usize>,
    /// The image file at fault, as in [`Sample::path`].
    pub path: PathBuf,
    /// Why it was left out: a missing file, an unknown label, a corrupt image or mask, etc.
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// How to read a manifest.
#[derive(Debug, Clone, Default)]
pub struct ManifestOptions {
    /// The allowed labels, in class-index order; without them the sorted distinct labels are the
    /// classes.
    pub classes: Option<Vec<String>>,
    /// Leave out bad rows (listing them) instead of failing.
    pub skip_bad: bool,
    /// Decode every image and mask to catch corrupt files and masks of the wrong size (slower).
    pub verify: bool,
}

/// A labelled set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Class names; a sample's label indexes this list.
    pub classes: Vec<String>,
    /// The labelled images, in manifest-row order or class by class for folders.
    pub samples: Vec<Sample>,
    /// Where the dataset was read from (manifest or folder), for messages.
    pub source: PathBuf,
}

impl Dataset {
    /// `root/<class>/<image>`: one folder per class (sorted names are the classes), each image
    /// its own patient.
    pub fn from_folders(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(root)
            .map_err(|e| Error::io(root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no class folders (expected {}/<class>/<image>.png)",
                root.display(),
                root.display()
            )));
        }
        let mut samples = Vec::new();
        for (label, (_, dir)) in classes.iter().enumerate() {
            for path in crate::preprocess::image_files(dir)? {
                samples.push(Sample {
                    patient: path.to_string_lossy().into_owned(),
                    path,
                    label,
                    modality: None,
                    mask: None,
                    line: None,
                });
            }
        }
        Ok(Self {
            classes: classes.into_iter().map(|(name, _)| name).collect(),
            samples,
            source: root.to_path_buf(),
        })
    }

    /// Reads a CSV manifest (see the module documentation). Returns the dataset and the rows left
    /// out with `skip_bad`.
    pub fn from_manifest(
        manifest: impl AsRef<Path>,
        options: &ManifestOptions,
    ) -> Result<(Self, Vec<Skipped>)> {
        let manifest = manifest.as_ref();
        let base = manifest.parent().unwrap_or(Path::new("."));
        let rows = read_rows(manifest)?;
        let classes: Vec<String> = match &options.classes {
            Some(c) => c.clone(),
            None => rows
                .iter()
                .map(|r| r.label.clone())
                .filter(|l| !l.is_empty())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        if options.classes.is_none() && classes.len() < 2 {
            return Err(Error::Manifest {
                path: manifest.to_path_buf(),
                line: 0,
                message: format!(
                    "every row has the label {}: the classes are read from the labels present, \
                     so this would be a one-class problem whose labels do not index a model's \
                     classes; declare the classes (--labels a,b, or `labels:` in a pipeline's data)",
                    classes.first().map_or("(none)".into(), |c| format!("`{c}`"))
                ),
            });
        }
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for row in rows {
            match row.to_sample(base, &classes) {
                Ok(sample) => samples.push(sample),
                Err(reason) => {
                    let bad = Skipped {
                        line: Some(row.line),
                        path: base.join(&row.path),
                        reason,
                    };
                    if !options.skip_bad {
                        return Err(Error::Manifest {
                            path: manifest.to_path_buf(),
                            line: row.line,
                            message: format!("{}: {}", bad.path.display(), bad.reason),
                        });
                    }
                    tracing::warn!("skipping {}:{bad}", manifest.display());
                    skipped.push(bad);
                }
            }
        }
        let mut dataset = Self {
            classes,
            samples,
            source: manifest.to_path_buf(),
        };
        if options.verify {
            skipped.extend(dataset.verify(options.skip_bad)?);
        }
        Ok((dataset, skipped))
    }

    /// Decodes every image and mask (in parallel): a corrupt file or a mask whose size differs
    /// from its image's is an error naming it, or with `skip_bad` a listed omission.
    pub fn verify(&mut self, skip_bad: bool) -> Result<Vec<Skipped>> {
        let problems: Vec<Option<String>> = self.samples.par_iter().map(check_sample).collect();
        let mut skipped = Vec::new();
        let mut kept = Vec::with_capacity(self.samples.len());
        for (sample, problem) in self.samples.drain(..).zip(problems) {
            match problem {
                None => kept.push(sample),
                Some(reason) => {
                    let bad = Skipped {
                        line: sample.line,
                        path: sample.path.clone(),
                        reason,
                    };
                    if !skip_bad {
                        return Err(match bad.line {
                            Some(line) => Error::Manifest {
                                path: self.source.clone(),
                                line,
                                message: format!("{}: {}", bad.path.display(), bad.reason),
                            },
                            None => Error::image(&bad.path, bad.reason),
                        });
                    }
                    tracing::warn!("skipping {}: {bad}", self.source.display());
                    skipped.push(bad);
                }
            }
        }
        self.samples = kept;
        Ok(skipped)
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Decodes a sample's image and mask; the reason it is bad, if it is.
fn check_sample(sample: &Sample) -> Option<String> {
    let image = match load_rgb(&sample.path) {
        Ok(img) => img,
        Err(e) => return Some(crate::describe(&e)),
    };
    let mask_path = sample.mask.as_ref()?;
    match load_rgb(mask_path) {
        Err(e) => Some(format!("mask: {}", crate::describe(&e))),
        Ok(mask) if mask.dimensions() != image.dimensions() => Some(format!(
            "mask {} is {}x{} but the image is {}x{}",
            mask_path.display(),
            mask.width(),
            mask.height(),
            image.width(),
            image.height()
        )),
        Ok(_) => None,
    }
}

/// A manifest row as written.
struct Row {
    line: usize,
    path: String,
    label: String,
    modality: String,
    patient: String,
    mask: String,
}

impl Row {
    fn to_sample(&self, base: &Path, classes: &[String]) -> std::result::Result<Sample, String> {
        if self.path.is_empty() {
            return Err("empty path".into());
        }
        let path = base.join(&self.path);
        if !path.is_file() {
            return Err("file does not exist".into());
        }
        let label = classes
            .iter()
            .position(|c| c == &self.label)
            .ok_or_else(|| {
                format!(
                    "unknown label `{}`; expected one of {}",
                    self.label,
                    classes.join(", ")
                )
            })?;
        let modality = if self.modality.is_empty() {
            None
        } else {
            Some(self.modality.parse::<Modality>()?)
        };
        let mask = if self.mask.is_empty() {
            None
        } else {
            let m = base.join(&self.mask);
            if !m.is_file() {
                return Err(format!("mask {} does not exist", m.display()));
            }
            Some(m)
        };
        Ok(Sample {
            patient: if self.patient.is_empty() {
                self.path.clone()
            } else {
                self.patient.clone()
            },
            path,
            label,
            modality,
            mask,
            line: Some(self.line),
        })
    }
}

fn read_rows(manifest: &Path) -> Result<Vec<Row>> {
    let bad = |line: usize, message: String| Error::Manifest {
        path: manifest.to_path_buf(),
        line,
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(manifest)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(io) => Error::io(manifest, io),
            other => bad(1, format!("{other:?}")),
        })?;
    let headers = reader.headers().map_err(|e| bad(1, e.to_string()))?.clone();
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(path_col), Some(label_col)) = (column("path"), column("label")) else {
        return Err(bad(
            1,
            format!(
                "the header must name `path` and `label` columns (optional: modality, patient_id, mask_path); found: {}",
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let (modality_col, patient_col, mask_col) = (
        column("modality"),
        column("patient_id"),
        column("mask_path"),
    );
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            bad(line, e.to_string())
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let get = |col: Option<usize>| col.and_then(|c| record.get(c)).unwrap_or("").to_string();
        rows.push(Row {
            line,
            path: get(Some(path_col)),
            label: get(Some(label_col)),
            modality: get(modality_col),
            patient: get(patient_col),
            mask: get(mask_col),
        });
    }
    Ok(rows)
}
