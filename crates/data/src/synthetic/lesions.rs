//! Lesions and where they go: haemorrhages (dark red blots), hard exudates (clusters of bright
//! yellow dots, leaking in FA) and microaneurysms (clusters of tiny red dots, bright in FA).
//!
//! Each lesion is a set of elliptical blobs. A blob's coverage is cut to zero below
//! [`COVERAGE_THRESHOLD`], so the rendered lesion and its ground-truth mask are the same pixels:
//! the mask covers the drawn lesions and nothing else.

use super::anatomy::Anatomy;
use crate::random::SeededRng;
use rand::Rng;
use std::f32::consts::PI;

/// Coverage below which a lesion leaves a pixel untouched (and out of the mask).
pub const COVERAGE_THRESHOLD: f32 = 0.15;

/// The kinds of lesion the generator draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LesionKind {
    /// A dark red blot of two or three ellipses; dark in FA as well (blocked fluorescence).
    Haemorrhage,
    /// A cluster of bright yellow dots; in FA a bright haze of leakage instead.
    Exudate,
    /// A cluster of tiny dark red dots; bright dots in FA.
    Microaneurysm,
}

impl LesionKind {
    /// Every kind, in the order of the lesion-type labels.
    pub const ALL: [LesionKind; 3] = [
        LesionKind::Haemorrhage,
        LesionKind::Exudate,
        LesionKind::Microaneurysm,
    ];

    /// The label name of the kind.
    pub fn name(self) -> &'static str {
        match self {
            LesionKind::Haemorrhage => "haemorrhage",
            LesionKind::Exudate => "exudate",
            LesionKind::Microaneurysm => "microaneurysm",
        }
    }
}

/// An ellipse with a hard (anti-aliased) or Gaussian edge.
#[derive(Debug, Clone, Copy)]
pub struct Blob {
    /// Centre, `(x, y)` in pixels.
    pub centre: (f32, f32),
    /// Semi-axis along `angle`, in pixels (for a soft blob, the Gaussian's scale).
    pub rx: f32,
    /// Semi-axis across `angle`, in pixels.
    pub ry: f32,
    /// Rotation of the `rx` axis from the x axis, in radians (y points down).
    pub angle: f32,
    /// Gaussian falloff (FA leakage) instead of a sharp edge.
    pub soft: bool,
}

impl Blob {
    /// Coverage in [0, 1] at pixel centre `(x, y)`, zero below the threshold.
    pub fn coverage(&self, x: f32, y: f32) -> f32 {
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        let (c, s) = (self.angle.cos(), self.angle.sin());
        let (u, v) = ((dx * c + dy * s) / self.rx, (-dx * s + dy * c) / self.ry);
        let e = (u * u + v * v).sqrt();
        let cov = if self.soft {
            (-2.0 * e * e).exp()
        } else {
            // One pixel of anti-aliasing across the edge.
            ((1.0 - e) * self.rx.min(self.ry) + 0.5).clamp(0.0, 1.0)
        };
        if cov < COVERAGE_THRESHOLD {
            0.0
        } else {
            cov
        }
    }

    /// Pixel bounds `(x0, y0, x1, y1)` (exclusive ends) outside which coverage is zero.
    pub fn bounds(&self, size: usize) -> (usize, usize, usize, usize) {
        let reach = self.rx.max(self.ry) + 1.5;
        let lo = |c: f32| (c - reach).floor().max(0.0) as usize;
        let hi = |c: f32| ((c + reach).ceil() as usize + 1).min(size);
        (
            lo(self.centre.0),
            lo(self.centre.1),
            hi(self.centre.0),
            hi(self.centre.1),
        )
    }
}

/// One lesion: what it is and the blobs it is drawn with in each modality.
#[derive(Debug, Clone)]
pub struct Lesion {
    /// What the lesion is.
    pub kind: LesionKind,
    /// Where it was placed, `(x, y)` in pixels; its blobs gather around this point.
    pub centre: (f32, f32),
    /// Blobs drawn in colour photographs.
    pub cfp: Vec<Blob>,
    /// Blobs drawn in fluorescein angiograms.
    pub fa: Vec<Blob>,
}

/// Places a lesion of `kind` in the posterior fundus, away from the optic disc.
pub fn place(rng: &mut SeededRng, a: &Anatomy, kind: LesionKind) -> Lesion {
    let scale = a.size as f32 / 224.0;
    let centre = loop {
        let r = a.radius * 0.78 * rng.random::<f32>().sqrt();
        let t = rng.random_range(0.0..2.0 * PI);
        let p = (a.centre.0 + r * t.cos(), a.centre.1 + r * t.sin());
        let from_disc = ((p.0 - a.disc.0).powi(2) + (p.1 - a.disc.1).powi(2)).sqrt();
        if from_disc > a.disc_radius * 1.9 {
            break p;
        }
    };
    let dot = |rng: &mut SeededRng, spread: f32, r_lo: f32, r_hi: f32| {
        let t = rng.random_range(0.0..2.0 * PI);
        let d = spread * rng.random::<f32>().sqrt();
        let r = (rng.random_range(r_lo..r_hi) * scale).max(1.3);
        Blob {
            centre: (centre.0 + d * t.cos(), centre.1 + d * t.sin()),
            rx: r,
            ry: r * rng.random_range(0.8..1.0),
            angle: rng.random_range(0.0..PI),
            soft: false,
        }
    };
    match kind {
        LesionKind::Haemorrhage => {
            // A blot: two or three overlapping ellipses. FA shows the same shape, dark.
            let parts = rng.random_range(2..=3);
            let base = rng.random_range(5.0..9.5) * scale;
            let blobs: Vec<Blob> = (0..parts)
                .map(|i| {
                    let off = if i == 0 {
                        0.0
                    } else {
                        base * rng.random_range(0.3..0.8)
                    };
                    let t = rng.random_range(0.0..2.0 * PI);
                    Blob {
                        centre: (centre.0 + off * t.cos(), centre.1 + off * t.sin()),
                        rx: (base * rng.random_range(0.6..1.0)).max(2.0),
                        ry: (base * rng.random_range(0.45..0.9)).max(1.6),
                        angle: rng.random_range(0.0..PI),
                        soft: false,
                    }
                })
                .collect();
            Lesion {
                kind,
                centre,
                cfp: blobs.clone(),
                fa: blobs,
            }
        }
        LesionKind::Exudate => {
            // Yellow dots in colour; in FA the dots hardly show but the leaking vessels light up.
            let spread = rng.random_range(6.0..12.0) * scale;
            let n = rng.random_range(4..=9);
            let dots = (0..n).map(|_| dot(rng, spread, 1.8, 3.2)).collect();
            let leak = Blob {
                centre,
                rx: spread * rng.random_range(1.2..1.6) + 2.0,
                ry: spread * rng.random_range(1.0..1.4) + 2.0,
                angle: rng.random_range(0.0..PI),
                soft: true,
            };
            Lesion {
                kind,
                centre,
                cfp: dots,
                fa: vec![leak],
            }
        }
        LesionKind::Microaneurysm => {
            let spread = rng.random_range(6.0..11.0) * scale;
            let n = rng.random_range(5..=9);
            let dots: Vec<Blob> = (0..n).map(|_| dot(rng, spread, 2.0, 3.0)).collect();
            Lesion {
                kind,
                centre,
                cfp: dots.clone(),
                fa: dots,
            }
        }
    }
}
