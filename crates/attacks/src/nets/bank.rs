//! Banks of independent small networks run together: `B` networks of one shape, each with its
//! own weights, stacked along a leading dimension, each fed one input.
//!
//! Every attack trains a fresh noise generator (and, for the mask attack, a U-Net) per image, per
//! sliding window, per seed or per alpha. Stacking them turns `B` small convolutions into one
//! batched matrix product, and since Adam is elementwise, training the stack is exactly training
//! the `B` networks independently. Entry `b`'s initial weights come from its own seed only, so a
//! network does not depend on which others share its bank.

use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use vulnmap_data::random;
use vulnmap_ops::conv_grad::{col2im_channel_major, im2col, Geometry};
use vulnmap_ops::instance_norm::instance_norm;

/// Where and in what dtype a bank's weights live, and the initial weights already drawn for
/// them (shared by the clones of one placement: the banks of one attack run).
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub device: Device,
    pub dtype: DType,
    drawn: Arc<Drawn>,
}

impl Placement {
    /// `dtype` on `device`, nothing drawn yet.
    pub(crate) fn new(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
            drawn: Arc::default(),
        }
    }

    /// f32 on `device`.
    pub(crate) fn f32(device: &Device) -> Self {
        Self::new(device, DType::F32)
    }
}

/// The most bytes of initial weights kept for reuse, first come first kept: a 32-pixel window's
/// generator (4 MB) and a U-Net are kept whole; of the authors' 49 M-weight generator, the layers
/// that still fit (its 134 MB second layer never does, and is drawn again for every bank).
const DRAWN_BYTES: usize = 64 << 20;

/// Initial weights by seed and recipe (name, shape, distribution). A local attack's hundreds of
/// windows share one seed: their banks would otherwise draw the same million weights each time.
#[derive(Default)]
struct Drawn {
    kept: Mutex<Draws>,
}

impl std::fmt::Debug for Drawn {
    /// The number of draws kept, not their values (up to 64 MiB of them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Drawn({} kept)", self.lock().len())
    }
}

/// Drawn values by seed and recipe.
type Draws = HashMap<(u64, String), Arc<Vec<f32>>>;

impl Drawn {
    fn get(&self, key: &(u64, String)) -> Option<Arc<Vec<f32>>> {
        self.lock().get(key).cloned()
    }

    /// Keeps `values` unless that would pass [`DRAWN_BYTES`].
    fn keep(&self, key: (u64, String), values: Arc<Vec<f32>>) {
        let mut kept = self.lock();
        let bytes: usize = kept.values().map(|v| v.len() * 4).sum();
        if bytes + values.len() * 4 <= DRAWN_BYTES {
            kept.insert(key, values);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Draws> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stacks one tensor per bank entry, each drawn from that entry's seed and `name` by `f`, which
/// `recipe` names (with `name` and `shape` it identifies the draw).
///
/// Each distinct seed is drawn once, on its own thread (a local attack's windows and a random
/// attack's images usually share one seed, and the authors' generator has 49 M weights), and
/// not again for a later bank of the same placement.
fn draw(
    seeds: &[u64],
    name: &str,
    shape: &[usize],
    recipe: &str,
    at: &Placement,
    f: impl Fn(&mut random::SeededRng, usize) -> Vec<f32> + Sync,
) -> Result<Var> {
    let n: usize = shape.iter().product();
    let key = |seed: u64| (seed, format!("{name} {shape:?} {recipe}"));
    let mut distinct = seeds.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let mut drawn: HashMap<u64, Arc<Vec<f32>>> = distinct
        .iter()
        .filter_map(|&seed| Some((seed, at.drawn.get(&key(seed))?)))
        .collect();
    let fresh: Vec<(u64, Arc<Vec<f32>>)> = distinct
        .into_par_iter()
        .filter(|seed| !drawn.contains_key(seed))
        .map(|seed| (seed, Arc::new(f(&mut random::rng(seed, name), n))))
        .collect();
    for (seed, values) in fresh {
        at.drawn.keep(key(seed), values.clone());
        drawn.insert(seed, values);
    }
    let mut values = Vec::with_capacity(seeds.len() * n);
    for seed in seeds {
        values.extend_from_slice(&drawn[seed]);
    }
    let mut dims = vec![seeds.len()];
    dims.extend_from_slice(shape);
    if at.dtype == DType::F32 {
        // Straight into a variable: `Var::from_tensor` would copy the weights once more.
        return Var::from_vec(values, dims, &at.device);
    }
    Var::from_tensor(&Tensor::from_vec(values, dims, &at.device)?.to_dtype(at.dtype)?)
}

/// Weights drawn from N(0, std) per entry (DCGAN's initialisation uses std 0.02).
pub(crate) fn normal(
    seeds: &[u64],
    name: &str,
    shape: &[usize],
    std: f64,
    at: &Placement,
) -> Result<Var> {
    draw(seeds, name, shape, &format!("N(0, {std})"), at, |rng, n| {
        random::normal_vec(rng, n, 0.0, std)
    })
}

/// Weights drawn from N(mean, std) per entry.
pub(crate) fn normal_around(
    seeds: &[u64],
    name: &str,
    shape: &[usize],
    mean: f64,
    std: f64,
    at: &Placement,
) -> Result<Var> {
    draw(
        seeds,
        name,
        shape,
        &format!("N({mean}, {std})"),
        at,
        |rng, n| random::normal_vec(rng, n, mean, std),
    )
}

/// A constant per entry.
pub(crate) fn constant(entries: usize, shape: &[usize], value: f64, at: &Placement) -> Result<Var> {
    let mut dims = vec![entries];
    dims.extend_from_slice(shape);
    Var::from_tensor(&(Tensor::ones(dims, at.dtype, &at.device)? * value)?)
}

/// `ConvTranspose2d` (no bias) with one kernel per entry: input `B x Cin x H x W`, weight
/// `B x Cout x k x k x Cin`, each entry's PyTorch kernel (`Cin x Cout x k x k`) transposed.
///
/// The layout decides the backward's products. With the kernel as the left factor (columns
/// `W x`), the input gradient is `W^T g`, a product GEMM runs fast; PyTorch's layout makes it
/// `g W^T` with few rows and a long inner dimension, 8 times slower for a 32-pixel window's
/// generator, where it was most of an update.
pub(crate) struct BankedConvTranspose2d {
    pub weight: Var,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl BankedConvTranspose2d {
    /// Kernels drawn from N(0, std) per entry, in PyTorch's order (a seed gives the weights it
    /// gives a `ConvTranspose2d`), then stored transposed.
    pub(crate) fn normal(
        seeds: &[u64],
        name: &str,
        (cin, cout): (usize, usize),
        std: f64,
        (kernel, stride, padding): (usize, usize, usize),
        at: &Placement,
    ) -> Result<Self> {
        let columns = cout * kernel * kernel;
        let recipe = format!("N(0, {std}) transposed");
        let shape = [cout, kernel, kernel, cin];
        let weight = draw(seeds, name, &shape, &recipe, at, |rng, n| {
            let pytorch = random::normal_vec(rng, n, 0.0, std);
            let mut stored = vec![0f32; n];
            for (i, row) in pytorch.chunks_exact(columns).enumerate() {
                for (o, &v) in row.iter().enumerate() {
                    stored[o * cin + i] = v;
                }
            }
            stored
        })?;
        Ok(Self {
            weight,
            kernel,
            stride,
            padding,
        })
    }

    /// Output height and width for an `h x w` input.
    pub(crate) fn output_size(&self, (h, w): (usize, usize)) -> Result<(usize, usize)> {
        let out = |n: usize| ((n - 1) * self.stride + self.kernel).checked_sub(2 * self.padding);
        match (out(h), out(w)) {
            (Some(a), Some(b)) if a > 0 && b > 0 => Ok((a, b)),
            _ => candle_core::bail!("transposed convolution of a {h}x{w} input has no output"),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let dims = self.weight.dims();
        let (cout, k) = (dims[1], dims[2]);
        let out = self.output_size((h, w))?;
        // The transposed convolution is the adjoint of the convolution from its output back to
        // its input: columns W x, then col2im.
        let g = Geometry::conv(cout, out, k, self.stride, self.padding)?;
        if g.output() != (h, w) {
            candle_core::bail!(
                "transposed convolution geometry does not invert for a {h}x{w} input"
            );
        }
        let kernels = self.weight.as_tensor().reshape((b, cout * k * k, cin))?;
        let cols = kernels.matmul(&x.reshape((b, cin, h * w))?)?; // B x (Cout k k) x hw
        col2im_channel_major(&cols, &g)
    }
}

/// `Conv2d` with one kernel (and bias) per entry: input `B x Cin x H x W`, weight
/// `B x Cout x Cin x k x k`.
pub(crate) struct BankedConv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub padding: usize,
}

impl BankedConv2d {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let dims = self.weight.dims();
        let (cout, k) = (dims[1], dims[3]);
        let g = Geometry::conv(cin, (h, w), k, self.stride, self.padding)?;
        let (ho, wo) = g.output();
        let cols = im2col(x, &g)?; // B x P x (Cin k k)
        let wt = self
            .weight
            .as_tensor()
            .reshape((b, cout, cin * k * k))?
            .transpose(1, 2)?;
        let y = cols
            .matmul(&wt)?
            .transpose(1, 2)?
            .reshape((b, cout, ho, wo))?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.as_tensor().reshape((b, cout, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// BatchNorm in train mode on a batch of one image: normalisation over each channel's pixels,
/// then an affine map per entry and channel (`gamma`, `beta`: `B x C`), which is
/// [`vulnmap_ops::instance_norm`] with a scale and shift per plane.
pub(crate) struct BankedNorm {
    pub gamma: Var,
    pub beta: Var,
    pub eps: f64,
}

impl BankedNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        instance_norm(x, self.gamma.as_tensor(), self.beta.as_tensor(), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use vulnmap_testkit::gradcheck::finite_difference_check;

    #[test]
    fn draws_kept_from_an_earlier_bank_equal_fresh_ones() -> Result<()> {
        let dev = Device::Cpu;
        let values = |v: Var| -> Result<Vec<f32>> { v.as_tensor().flatten_all()?.to_vec1() };
        let shared = Placement::f32(&dev);
        normal(&[3, 1], "w", &[2, 3], 1.0, &shared)?;
        normal_around(&[1], "g", &[4], 1.0, 0.5, &shared)?;
        // Same seed and name, another shape or distribution: not the kept draw.
        let cases: [(&[u64], &[usize], f64); 4] = [
            (&[1, 5, 1], &[2, 3], 1.0),
            (&[1], &[3, 2], 1.0),
            (&[1], &[2, 3], 2.0),
            (&[3], &[2, 3], 1.0),
        ];
        for (seeds, shape, std) in cases {
            let kept = values(normal(seeds, "w", shape, std, &shared)?)?;
            let fresh = values(normal(seeds, "w", shape, std, &Placement::f32(&dev))?)?;
            assert_eq!(kept, fresh, "{seeds:?} {shape:?} {std}");
        }
        let kept = values(normal_around(&[1], "g", &[4], 1.0, 0.5, &shared)?)?;
        let fresh = values(normal_around(
            &[1],
            "g",
            &[4],
            1.0,
            0.5,
            &Placement::f32(&dev),
        )?)?;
        assert_eq!(kept, fresh);
        assert_eq!(
            shared.drawn.lock().len(),
            6,
            "one entry per seed and recipe"
        );
        Ok(())
    }

    #[test]
    fn banked_transposed_convolution_equals_candles_per_entry() -> Result<()> {
        let dev = vulnmap_testkit::device();
        for &(k, s, p, h) in &[
            (4, 1, 0, 1),
            (4, 2, 1, 4),
            (4, 3, 1, 9),
            (8, 2, 1, 5),
            (12, 2, 1, 3),
        ] {
            let at = Placement::f32(&dev);
            let layer =
                BankedConvTranspose2d::normal(&[1, 2, 3], "w", (3, 2), 1.0, (k, s, p), &at)?;
            // The same seeds' kernels in PyTorch's layout.
            let pytorch = normal(&[1, 2, 3], "w", &[3, 2, k, k], 1.0, &at)?;
            let x = Tensor::randn(0f32, 1.0, (3, 3, h, h + 1), &dev)?;
            let ours = layer.forward(&x)?;
            for b in 0..3 {
                let theirs = x.narrow(0, b, 1)?.conv_transpose2d(
                    &pytorch.as_tensor().get(b)?,
                    p,
                    0,
                    s,
                    1,
                )?;
                let d = (ours.narrow(0, b, 1)? - theirs)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-4, "k={k} s={s} p={p}: entry {b} differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn banked_convolution_equals_candles_per_entry_and_gradients_check() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let at = Placement::f32(&dev);
        let layer = BankedConv2d {
            weight: normal(&[4, 5], "w", &[3, 2, 3, 3], 1.0, &at)?,
            bias: Some(normal(&[4, 5], "b", &[3], 1.0, &at)?),
            stride: 1,
            padding: 1,
        };
        let x = Tensor::randn(0f32, 1.0, (2, 2, 5, 6), &dev)?;
        let ours = layer.forward(&x)?;
        for b in 0..2 {
            let theirs =
                x.narrow(0, b, 1)?
                    .conv2d(&layer.weight.as_tensor().get(b)?, 1, 1, 1, 1)?;
            let bias = layer
                .bias
                .as_ref()
                .unwrap()
                .as_tensor()
                .get(b)?
                .reshape((1, 3, 1, 1))?;
            let d = (ours.narrow(0, b, 1)? - theirs.broadcast_add(&bias)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "entry {b} differs by {d}");
        }
        // Input gradients of both banked layers and the norm, in f64.
        let w = Tensor::randn(0f64, 1.0, (2, 2, 4, 4, 3), &dev)?;
        let tconv = BankedConvTranspose2d {
            weight: Var::from_tensor(&w)?,
            kernel: 4,
            stride: 2,
            padding: 1,
        };
        let x = Tensor::randn(0f64, 1.0, (2, 3, 3, 3), &dev)?;
        finite_difference_check(&x, |x| tconv.forward(x), 1e-6, 1e-6)?;
        // ... and with respect to the weights, which is what training follows.
        finite_difference_check(
            &w,
            |w| {
                BankedConvTranspose2d {
                    weight: Var::from_tensor(w)?,
                    kernel: 4,
                    stride: 2,
                    padding: 1,
                }
                .forward(&x)
            },
            1e-6,
            1e-6,
        )?;
        let cw = Tensor::randn(0f64, 1.0, (2, 4, 3, 3, 3), &dev)?;
        finite_difference_check(
            &cw,
            |w| {
                BankedConv2d {
                    weight: Var::from_tensor(w)?,
                    bias: None,
                    stride: 1,
                    padding: 1,
                }
                .forward(&x)
            },
            1e-6,
            1e-6,
        )?;
        let norm = BankedNorm {
            gamma: Var::from_tensor(&Tensor::randn(1f64, 0.1, (2, 3), &dev)?)?,
            beta: Var::from_tensor(&Tensor::zeros((2, 3), DType::F64, &dev)?)?,
            eps: 1e-5,
        };
        finite_difference_check(&x, |x| norm.forward(x), 1e-6, 1e-6)?;
        Ok(())
    }
}
