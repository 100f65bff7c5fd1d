//! Rendering an eye as a colour fundus photograph (CFP) or a fluorescein angiogram (FA), with the
//! mask of the lesions drawn.
//!
//! CFP: an orange-red fundus with pigment texture, a darker macula, a yellow disc with a pale
//! cup, dark red vessels (veins darker and wider), lesions in their clinical colours. FA (grey):
//! dim choroidal background, dark foveal avascular zone, bright vessels and disc; haemorrhages
//! block fluorescence (dark), microaneurysms fill (bright dots), exudates leak (bright haze).
//! Both fall off in brightness towards the edge of the circular field.

use super::anatomy::Anatomy;
use super::lesions::{Blob, Lesion, LesionKind};
use super::noise::smoothstep;
use crate::dataset::Modality;
use crate::random::SeededRng;
use rand::Rng;

/// A rendered image: RGB in [0, 1] (row-major, interleaved) and its lesion mask.
pub struct Rendering {
    /// Side of the square image, in pixels.
    pub size: usize,
    /// `size * size * 3` values: RGB in [0, 1], row-major, interleaved; black outside the field.
    pub pixels: Vec<f32>,
    /// `size * size` flags, row-major: `true` where a lesion is drawn.
    pub mask: Vec<bool>,
}

/// Per-pixel coverage maps for what is drawn on top of the background.
struct Layers {
    artery: Vec<f32>,
    vein: Vec<f32>,
    lesion: [Vec<f32>; 3],
}

fn kind_index(kind: LesionKind) -> usize {
    match kind {
        LesionKind::Haemorrhage => 0,
        LesionKind::Exudate => 1,
        LesionKind::Microaneurysm => 2,
    }
}

fn rasterise_vessels(a: &Anatomy, artery: &mut [f32], vein: &mut [f32]) {
    let n = a.size;
    for seg in &a.vessels {
        let half = seg.width / 2.0;
        let reach = half + 1.0;
        let x0 = (seg.a.0.min(seg.b.0) - reach).floor().max(0.0) as usize;
        let y0 = (seg.a.1.min(seg.b.1) - reach).floor().max(0.0) as usize;
        let x1 = ((seg.a.0.max(seg.b.0) + reach).ceil() as usize + 1).min(n);
        let y1 = ((seg.a.1.max(seg.b.1) + reach).ceil() as usize + 1).min(n);
        let (dx, dy) = (seg.b.0 - seg.a.0, seg.b.1 - seg.a.1);
        let len2 = (dx * dx + dy * dy).max(1e-6);
        let buf = if seg.vein { &mut *vein } else { &mut *artery };
        for y in y0..y1 {
            for x in x0..x1 {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let t = (((px - seg.a.0) * dx + (py - seg.a.1) * dy) / len2).clamp(0.0, 1.0);
                let (qx, qy) = (seg.a.0 + t * dx - px, seg.a.1 + t * dy - py);
                let d = (qx * qx + qy * qy).sqrt();
                // Thin vessels draw fainter rather than thinner than a pixel.
                let cov = (half + 0.5 - d).clamp(0.0, 1.0) * seg.width.min(1.0);
                let cell = &mut buf[y * n + x];
                if cov > *cell {
                    *cell = cov;
                }
            }
        }
    }
}

fn rasterise_blobs(blobs: &[Blob], size: usize, out: &mut [f32]) {
    for blob in blobs {
        let (x0, y0, x1, y1) = blob.bounds(size);
        for y in y0..y1 {
            for x in x0..x1 {
                let c = blob.coverage(x as f32 + 0.5, y as f32 + 0.5);
                let cell = &mut out[y * size + x];
                if c > *cell {
                    *cell = c;
                }
            }
        }
    }
}

fn layers(a: &Anatomy, lesions: &[Lesion], modality: Modality) -> Layers {
    let n = a.size * a.size;
    let mut l = Layers {
        artery: vec![0.0; n],
        vein: vec![0.0; n],
        lesion: [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
    };
    rasterise_vessels(a, &mut l.artery, &mut l.vein);
    for lesion in lesions {
        let blobs = match modality {
            Modality::Cfp => &lesion.cfp,
            Modality::Fa => &lesion.fa,
        };
        rasterise_blobs(blobs, a.size, &mut l.lesion[kind_index(lesion.kind)]);
    }
    l
}

fn mix(c: [f32; 3], target: [f32; 3], t: f32) -> [f32; 3] {
    [
        c[0] + (target[0] - c[0]) * t,
        c[1] + (target[1] - c[1]) * t,
        c[2] + (target[2] - c[2]) * t,
    ]
}

/// Renders `a` with `lesions` in `modality`. `grain` supplies the per-pixel sensor noise; with
/// the same grain the image without lesions differs from this one exactly on the mask.
pub fn render(
    a: &Anatomy,
    lesions: &[Lesion],
    modality: Modality,
    grain: &mut SeededRng,
) -> Rendering {
    let size = a.size;
    let s = size as f32;
    let grain: Vec<f32> = (0..size * size)
        .map(|_| grain.random::<f32>() - 0.5)
        .collect();
    let l = layers(a, lesions, modality);
    let mut pixels = vec![0f32; size * size * 3];
    let mut mask = vec![false; size * size];
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let r = a.radial(px, py);
            let fov = ((1.0 - r) * a.radius + 0.5).clamp(0.0, 1.0);
            if fov == 0.0 {
                continue;
            }
            let (u, v) = (px / s, py / s);
            let (coarse, fine) = (a.coarse.at(u, v), a.fine.at(u, v));
            let light = (1.0 - 0.5 * r * r * r.sqrt())
                * (1.0
                    + a.light.0 * (px - a.centre.0) / a.radius
                    + a.light.1 * (py - a.centre.1) / a.radius);
            let d_fovea = ((px - a.fovea.0).powi(2) + (py - a.fovea.1).powi(2)).sqrt() / a.radius;
            let d_disc = ((px - a.disc.0).powi(2) + (py - a.disc.1).powi(2)).sqrt() / a.disc_radius;
            let disc = smoothstep(1.05, 0.9, d_disc);
            let cup = smoothstep(a.cup + 0.08, a.cup - 0.05, d_disc);
            let (art, vein) = (l.artery[i], l.vein[i]);
            let [hem, exu, ma] = [l.lesion[0][i], l.lesion[1][i], l.lesion[2][i]];
            mask[i] = hem > 0.0 || exu > 0.0 || ma > 0.0;
            let rgb = match modality {
                Modality::Cfp => {
                    let tex = a.pigment * (1.0 + 0.07 * coarse + 0.035 * fine + 0.04 * grain[i]);
                    let mut c = [0.80 * tex, 0.38 * tex, 0.17 * tex];
                    let macula = (-(d_fovea / 0.2).powi(2)).exp();
                    c = [
                        c[0] * (1.0 - 0.3 * macula),
                        c[1] * (1.0 - 0.45 * macula),
                        c[2] * (1.0 - 0.45 * macula),
                    ];
                    c = mix(c, [0.97 * tex, 0.84 * tex, 0.6 * tex], disc);
                    c = mix(c, [1.0, 0.95, 0.85], cup);
                    c = [
                        c[0] * (1.0 - 0.22 * art),
                        c[1] * (1.0 - 0.55 * art),
                        c[2] * (1.0 - 0.55 * art),
                    ];
                    c = [
                        c[0] * (1.0 - 0.35 * vein),
                        c[1] * (1.0 - 0.7 * vein),
                        c[2] * (1.0 - 0.68 * vein),
                    ];
                    if hem > 0.0 {
                        c = mix(c, [0.32, 0.03, 0.02], 0.95 * hem);
                    }
                    if exu > 0.0 {
                        c = mix(c, [1.0, 0.92, 0.52], 0.95 * exu);
                    }
                    if ma > 0.0 {
                        c = mix(c, [0.34, 0.03, 0.02], 0.97 * ma);
                    }
                    c
                }
                Modality::Fa => {
                    let mut g =
                        0.4 * a.pigment * (1.0 + 0.1 * coarse + 0.05 * fine + 0.06 * grain[i]);
                    g *= 1.0 - 0.6 * (-(d_fovea / 0.13).powi(2)).exp();
                    g += (0.62 - g) * disc;
                    g += (0.9 - g) * art;
                    g += (0.82 - g) * vein;
                    if hem > 0.0 {
                        g *= 1.0 - 0.85 * hem;
                    }
                    if ma > 0.0 {
                        g += (0.97 - g) * ma;
                    }
                    if exu > 0.0 {
                        g += (1.0 - g) * 0.8 * exu;
                    }
                    [g, g, g]
                }
            };
            let k = light * fov;
            for (ch, value) in rgb.iter().enumerate() {
                pixels[i * 3 + ch] = (value * k).clamp(0.0, 1.0);
            }
        }
    }
    Rendering { size, pixels, mask }
}
