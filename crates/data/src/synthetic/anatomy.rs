//! The anatomy of one eye: field of view, optic disc and cup, fovea, a branching vessel tree,
//! pigmentation and illumination. Both modalities (CFP, FA) of an eye are rendered from it.

use super::noise::ValueNoise;
use crate::random::SeededRng;
use rand::Rng;
use std::f32::consts::PI;

/// Which eye: in a right eye's photograph the optic disc is on the right (nasal) side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eye {
    /// The right eye (OD): the disc lies right of the centre of the image.
    Right,
    /// The left eye (OS): the disc lies left of the centre of the image.
    Left,
}

impl Eye {
    /// The ophthalmic abbreviation, `OD` (right) or `OS` (left).
    pub fn code(self) -> &'static str {
        match self {
            Eye::Right => "OD",
            Eye::Left => "OS",
        }
    }
}

/// A straight piece of vessel.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// The upstream end (towards the disc), `(x, y)` in pixels.
    pub a: (f32, f32),
    /// The downstream end, `(x, y)` in pixels.
    pub b: (f32, f32),
    /// Width in pixels.
    pub width: f32,
    /// Veins are wider and darker than arteries.
    pub vein: bool,
}

/// One eye's fixed structures, in pixel coordinates of a `size x size` image.
pub struct Anatomy {
    /// Side of the square image, in pixels.
    pub size: usize,
    /// Which eye; it decides the side the disc is on.
    pub eye: Eye,
    /// Centre of the field of view, `(x, y)` in pixels.
    pub centre: (f32, f32),
    /// Radius of the circular field of view.
    pub radius: f32,
    /// Centre of the optic disc, `(x, y)` in pixels.
    pub disc: (f32, f32),
    /// Radius of the optic disc, in pixels.
    pub disc_radius: f32,
    /// Cup radius as a fraction of the disc radius.
    pub cup: f32,
    /// Centre of the fovea, `(x, y)` in pixels.
    pub fovea: (f32, f32),
    /// The vessel tree (arteries and veins) as straight pieces.
    pub vessels: Vec<Segment>,
    /// Overall fundus brightness (pigmentation), around 1.
    pub pigment: f32,
    /// Illumination gradient across the field, (x, y) per radius.
    pub light: (f32, f32),
    /// Large-scale background mottling: 6 x 6 noise cells across the image.
    pub coarse: ValueNoise,
    /// Small-scale background texture: 24 x 24 noise cells across the image.
    pub fine: ValueNoise,
}

impl Anatomy {
    /// A random `eye` in a `size x size` image, drawn from `rng`.
    pub fn generate(rng: &mut SeededRng, size: usize, eye: Eye) -> Self {
        let s = size as f32;
        let centre = (
            s / 2.0 + rng.random_range(-0.01..0.01) * s,
            s / 2.0 + rng.random_range(-0.01..0.01) * s,
        );
        let radius = s * rng.random_range(0.455..0.475);
        // Nasal is towards the disc: right in a right eye.
        let nasal = if eye == Eye::Right { 1.0 } else { -1.0 };
        let disc_radius = radius * rng.random_range(0.115..0.14);
        let disc = (
            centre.0 + nasal * radius * rng.random_range(0.30..0.40),
            centre.1 + radius * rng.random_range(-0.06..0.06),
        );
        // The fovea lies about 2.5 disc diameters temporal to the disc, slightly below it.
        let fovea = (
            disc.0 - nasal * disc_radius * 2.0 * rng.random_range(2.3..2.7),
            disc.1 + disc_radius * rng.random_range(0.0..0.4),
        );
        let mut anatomy = Self {
            size,
            eye,
            centre,
            radius,
            disc,
            disc_radius,
            cup: rng.random_range(0.3..0.55),
            fovea,
            vessels: Vec::new(),
            pigment: rng.random_range(0.85..1.1),
            light: (rng.random_range(-0.1..0.1), rng.random_range(-0.1..0.1)),
            coarse: ValueNoise::new(rng, 6),
            fine: ValueNoise::new(rng, 24),
        };
        anatomy.vessels = vessel_tree(rng, &anatomy, nasal);
        anatomy
    }

    /// Distance from the centre of the field, in radii.
    pub fn radial(&self, x: f32, y: f32) -> f32 {
        ((x - self.centre.0).powi(2) + (y - self.centre.1).powi(2)).sqrt() / self.radius
    }
}

/// How a trunk vessel bends as it grows.
#[derive(Debug, Clone, Copy)]
enum Steer {
    /// Towards a fixed direction (nasal vessels).
    Towards(f32),
    /// Around the fovea, clockwise (`sense` -1) or anticlockwise (+1) in image coordinates.
    Around { sense: f32 },
}

/// The radius, in field radii, at which the temporal arcades pass the fovea.
const ARCADE: f32 = 0.42;

/// Grows the arcades from the disc: superior and inferior temporal (curving around the macula),
/// superior and inferior nasal; an artery and a vein for each, branching as they go.
fn vessel_tree(rng: &mut SeededRng, a: &Anatomy, nasal: f32) -> Vec<Segment> {
    let temporal_dir = if nasal > 0.0 { PI } else { 0.0 };
    let nasal_dir = if nasal > 0.0 { 0.0 } else { PI };
    let mut segments = Vec::new();
    let trunk = a.radius * 0.028;
    for &(up, temporal) in &[(-1.0f32, true), (1.0, true), (-1.0, false), (1.0, false)] {
        for vein in [false, true] {
            let (start, steer) = if temporal {
                // Temporal arcades circle the fovea (above and below it) at about `ARCADE` radii.
                let vertical = up * PI / 2.0;
                let start = vertical
                    + angle_diff(temporal_dir, vertical).signum() * 0.3
                    + rng.random_range(-0.2..0.2);
                (start, Steer::Around { sense: up * nasal })
            } else {
                (
                    nasal_dir + up * rng.random_range(0.5..0.9),
                    Steer::Towards(nasal_dir),
                )
            };
            let width = if vein { trunk * 1.25 } else { trunk } * rng.random_range(0.9..1.1);
            let start_at = (
                a.disc.0 + start.cos() * a.disc_radius * 0.15 + if vein { 1.5 } else { -1.5 },
                a.disc.1 + start.sin() * a.disc_radius * 0.15,
            );
            let budget = a.radius * if temporal { 1.4 } else { 1.2 };
            grow(
                rng,
                a,
                &mut segments,
                start_at,
                start,
                width,
                budget,
                vein,
                0,
                Some(steer),
            );
        }
    }
    segments
}

#[allow(clippy::too_many_arguments)]
fn grow(
    rng: &mut SeededRng,
    a: &Anatomy,
    out: &mut Vec<Segment>,
    mut pos: (f32, f32),
    mut dir: f32,
    mut width: f32,
    budget: f32,
    vein: bool,
    depth: usize,
    steer: Option<Steer>,
) {
    let step = a.radius * 0.025;
    let min_width = (a.size as f32 / 224.0 * 0.6).max(0.45);
    let faz = a.disc_radius * 1.4; // the foveal avascular zone
    let mut travelled = 0.0;
    while travelled < budget && width > min_width {
        match steer {
            Some(Steer::Towards(target)) => dir += angle_diff(target, dir) * 0.02,
            Some(Steer::Around { sense }) => {
                let (dx, dy) = (pos.0 - a.fovea.0, pos.1 - a.fovea.1);
                let d = (dx * dx + dy * dy).sqrt() / a.radius;
                // The tangent of the circle about the fovea, turned inwards when outside it.
                let inward = 0.5 * ((d - ARCADE) / ARCADE).clamp(-1.0, 1.0);
                let target = dy.atan2(dx) + sense * (PI / 2.0 + inward);
                dir += angle_diff(target, dir) * 0.12;
            }
            None => {}
        }
        dir += rng.random_range(-0.12..0.12);
        let next = (pos.0 + step * dir.cos(), pos.1 + step * dir.sin());
        let dist_fovea = ((next.0 - a.fovea.0).powi(2) + (next.1 - a.fovea.1).powi(2)).sqrt();
        if a.radial(next.0, next.1) > 1.02 || dist_fovea < faz {
            break;
        }
        out.push(Segment {
            a: pos,
            b: next,
            width,
            vein,
        });
        pos = next;
        travelled += step;
        width *= 0.993;
        if depth < 4 && rng.random::<f32>() < 0.07 {
            let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
            let child_dir = dir + side * rng.random_range(0.45..1.1);
            let child_width = width * rng.random_range(0.55..0.75);
            let remaining = (budget - travelled) * rng.random_range(0.4..0.8) + a.radius * 0.2;
            grow(
                rng,
                a,
                out,
                pos,
                child_dir,
                child_width,
                remaining,
                vein,
                depth + 1,
                None,
            );
            width *= 0.9;
        }
    }
}

/// `target - current` wrapped to (-pi, pi].
fn angle_diff(target: f32, current: f32) -> f32 {
    let mut d = target - current;
    while d > PI {
        d -= 2.0 * PI;
    }
    while d <= -PI {
        d += 2.0 * PI;
    }
    d
}
