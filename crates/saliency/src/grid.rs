//! The grid of square windows that occlusion and the local attack slide over an image.

use crate::error::{ensure, Result};

/// Windows of `window x window` pixels every `stride` pixels.
///
/// Along each axis the offsets are `0, s, 2s, ...` while the window fits; if that leaves pixels
/// at the far edge uncovered, one more window flush with the edge is added, so every pixel is
/// covered (Captum's occlusion leaves them out; the paper's 100/50 grid on 224 would miss 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowGrid {
    /// Side of each square window, in pixels (positive, at most the image's sides).
    pub window: usize,
    /// Pixels between neighbouring windows along each axis (positive).
    pub stride: usize,
}

impl WindowGrid {
    /// Windows of `window x window` pixels every `stride` pixels.
    pub fn new(window: usize, stride: usize) -> Self {
        Self { window, stride }
    }

    fn offsets(&self, size: usize) -> Vec<usize> {
        let mut out: Vec<usize> = (0..=size - self.window).step_by(self.stride).collect();
        if out.last().is_some_and(|&last| last + self.window < size) {
            out.push(size - self.window);
        }
        out
    }

    /// Top-left corners `(y, x)` of the windows over an `h x w` image, row by row.
    pub fn positions(&self, (h, w): (usize, usize)) -> Result<Vec<(usize, usize)>> {
        ensure(self.window > 0 && self.stride > 0, || {
            format!(
                "window ({}) and stride ({}) must be positive",
                self.window, self.stride
            )
        })?;
        ensure(self.window <= h && self.window <= w, || {
            format!(
                "a {0}x{0} window is larger than the {h}x{w} image",
                self.window
            )
        })?;
        let (ys, xs) = (self.offsets(h), self.offsets(w));
        Ok(ys
            .iter()
            .flat_map(|&y| xs.iter().map(move |&x| (y, x)))
            .collect())
    }

    /// How many windows cover each pixel of an `h x w` image (row-major).
    pub fn coverage(&self, size: (usize, usize)) -> Result<Vec<f32>> {
        let (h, w) = size;
        let mut count = vec![0f32; h * w];
        for (y, x) in self.positions(size)? {
            for row in y..y + self.window {
                for c in &mut count[row * w + x..row * w + x + self.window] {
                    *c += 1.0;
                }
            }
        }
        Ok(count)
    }

    /// A `h x w` 0/1 mask of the window at `(y, x)` (row-major).
    pub fn mask(&self, (h, w): (usize, usize), (y, x): (usize, usize)) -> Vec<f32> {
        let mut m = vec![0f32; h * w];
        for row in y..(y + self.window).min(h) {
            for v in &mut m[row * w + x..row * w + (x + self.window).min(w)] {
                *v = 1.0;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_grid_covers_every_pixel() {
        let grid = WindowGrid::new(100, 50);
        let pos = grid.positions((224, 224)).unwrap();
        let offsets: Vec<usize> = pos.iter().filter(|p| p.0 == 0).map(|p| p.1).collect();
        assert_eq!(offsets, vec![0, 50, 100, 124]);
        assert_eq!(pos.len(), 16);
        assert!(grid.coverage((224, 224)).unwrap().iter().all(|&c| c >= 1.0));
        assert_eq!(WindowGrid::new(4, 2).positions((8, 8)).unwrap().len(), 9);
        let err = WindowGrid::new(300, 10)
            .positions((224, 224))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("300x300 window is larger than the 224x224 image"),
            "{err}"
        );
        assert!(WindowGrid::new(3, 0).positions((8, 8)).is_err());
    }
}
