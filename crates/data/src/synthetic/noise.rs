//! Smooth value noise: random values on a coarse grid, interpolated with a smoothstep. Cheap
//! texture for the fundus background (choroidal mottling, uneven pigment).

use crate::random::SeededRng;
use rand::Rng;

/// Noise with `cells x cells` grid cells over the unit square, values in [-1, 1].
pub struct ValueNoise {
    values: Vec<f32>,
    cells: usize,
}

impl ValueNoise {
    /// Noise with `cells x cells` grid cells (at least 1), its values drawn from `rng`.
    pub fn new(rng: &mut SeededRng, cells: usize) -> Self {
        let n = cells + 1;
        let values = (0..n * n)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        Self { values, cells }
    }

    /// The noise at `(u, v)` in [0, 1]^2 (clamped outside).
    pub fn at(&self, u: f32, v: f32) -> f32 {
        let n = self.cells + 1;
        let fx = (u.clamp(0.0, 1.0) * self.cells as f32).min(self.cells as f32 - 1e-4);
        let fy = (v.clamp(0.0, 1.0) * self.cells as f32).min(self.cells as f32 - 1e-4);
        let (ix, iy) = (fx as usize, fy as usize);
        let (tx, ty) = (smooth(fx - ix as f32), smooth(fy - iy as f32));
        let at = |x: usize, y: usize| self.values[y * n + x];
        let top = at(ix, iy) + (at(ix + 1, iy) - at(ix, iy)) * tx;
        let bottom = at(ix, iy + 1) + (at(ix + 1, iy + 1) - at(ix, iy + 1)) * tx;
        top + (bottom - top) * ty
    }
}

fn smooth(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// 0 below `edge0`, 1 above `edge1`, smooth between (either order of edges).
pub fn smoothstep(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    smooth(t)
}
