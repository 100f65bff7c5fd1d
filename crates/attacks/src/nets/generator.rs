//! The noise generators of the paper's attacks: a DCGAN-style network mapping a fixed latent
//! vector `z` (drawn once from the seed, never changed) to noise in [-1, 1], trained by gradient
//! descent to flip the classifier.
//!
//! [`GeneratorKind::Paper`] is the authors' generator for 224 x 224 exactly: seven transposed
//! convolutions (no bias), BatchNorm in train mode and ReLU after the first six, Tanh at the end;
//! channels 100-2048-1024-512-256-128-64-3, spatial 1-4-8-9-26-52-108-224 (about 49 M weights).
//! [`GeneratorKind::Generic`] has the same structure for any size: 4 x 4 from `z`, doubling with
//! kernel 4, stride 2 until it covers the size, channels halving from at most 256 down to 64,
//! centre-cropped (about 4 M weights at 224, 0.6 M for a 32-pixel window).
//!
//! Weights are drawn from N(0, 0.02) and BatchNorm scales from N(1, 0.02), DCGAN's
//! initialisation (the paper does not say). A bank holds several independent generators
//! ([`crate::bank`]).

use super::bank::{self, BankedConvTranspose2d, BankedNorm, Placement};
use candle_core::{Result, Tensor, Var};
use vulnmap_data::random;

/// The size of the latent vector `z`.
pub(crate) const LATENT: usize = 100;

/// Which generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GeneratorKind {
    /// The authors' DCGAN; 224 x 224 only.
    Paper,
    /// The same structure for `height x width` noise.
    Generic { height: usize, width: usize },
}

impl GeneratorKind {
    /// The noise's height and width.
    pub(crate) fn size(self) -> (usize, usize) {
        match self {
            GeneratorKind::Paper => (224, 224),
            GeneratorKind::Generic { height, width } => (height, width),
        }
    }

    /// The transposed convolutions, in order.
    fn layers(self) -> Result<Vec<LayerSpec>> {
        Ok(match self {
            GeneratorKind::Paper => vec![
                (LATENT, 2048, 4, 1, 0),
                (2048, 1024, 4, 2, 1),
                (1024, 512, 4, 1, 1),
                (512, 256, 4, 3, 1),
                (256, 128, 4, 2, 1),
                (128, 64, 8, 2, 1),
                (64, 3, 12, 2, 1),
            ],
            GeneratorKind::Generic { height, width } => {
                if height == 0 || width == 0 {
                    candle_core::bail!("noise of size {height}x{width}");
                }
                let mut doublings = 0;
                while 4 << doublings < height.max(width) {
                    doublings += 1;
                }
                if doublings == 0 {
                    return Ok(vec![(LATENT, 3, 4, 1, 0)]);
                }
                let channels = |i: usize| (64usize << (doublings - 1 - i)).clamp(64, 256);
                let mut layers = vec![(LATENT, channels(0), 4, 1, 0)];
                for i in 1..doublings {
                    layers.push((channels(i - 1), channels(i), 4, 2, 1));
                }
                layers.push((channels(doublings - 1), 3, 4, 2, 1));
                layers
            }
        })
    }
}

impl GeneratorKind {
    /// Trainable weights of one generator (transposed convolutions and BatchNorm scales and
    /// shifts).
    pub(crate) fn weights(self) -> Result<usize> {
        let layers = self.layers()?;
        let last = layers.len() - 1;
        Ok(layers
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, k, _, _))| {
                cin * cout * k * k + if i < last { 2 * cout } else { 0 }
            })
            .sum())
    }
}

/// `(in channels, out channels, kernel, stride, padding)` of a transposed convolution.
type LayerSpec = (usize, usize, usize, usize, usize);

struct Layer {
    conv: BankedConvTranspose2d,
    norm: Option<BankedNorm>,
}

/// A bank of independent noise generators, one per seed.
pub(crate) struct NoiseGenerators {
    kind: GeneratorKind,
    layers: Vec<Layer>,
    /// `B x 100 x 1 x 1`, fixed.
    z: Tensor,
}

impl NoiseGenerators {
    /// One generator per seed: its weights and its `z` come from that seed alone.
    pub(crate) fn new(kind: GeneratorKind, seeds: &[u64], at: &Placement) -> Result<Self> {
        if seeds.is_empty() {
            candle_core::bail!("a bank of generators needs at least one seed");
        }
        let specs = kind.layers()?;
        let last = specs.len() - 1;
        let layers = specs
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, k, s, p))| {
                let conv = BankedConvTranspose2d::normal(
                    seeds,
                    &format!("generator {i} weight"),
                    (cin, cout),
                    0.02,
                    (k, s, p),
                    at,
                )?;
                let norm = if i < last {
                    Some(BankedNorm {
                        gamma: bank::normal_around(
                            seeds,
                            &format!("generator {i} gamma"),
                            &[cout],
                            1.0,
                            0.02,
                            at,
                        )?,
                        beta: bank::constant(seeds.len(), &[cout], 0.0, at)?,
                        eps: 1e-5,
                    })
                } else {
                    None
                };
                Ok(Layer { conv, norm })
            })
            .collect::<Result<Vec<_>>>()?;
        let z: Vec<Tensor> = seeds
            .iter()
            .map(|&s| {
                random::randn(
                    &mut random::rng(s, "generator z"),
                    (LATENT, 1, 1),
                    &at.device,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            kind,
            layers,
            z: Tensor::stack(&z, 0)?.to_dtype(at.dtype)?,
        })
    }

    /// How many generators.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.z.dim(0).unwrap_or(0)
    }

    /// Noise `B x 3 x H x W` in [-1, 1] from the fixed latent vectors.
    pub(crate) fn forward(&self) -> Result<Tensor> {
        self.forward_from(&self.z)
    }

    /// Noise from other latent vectors (`B x 100 x 1 x 1`).
    pub(crate) fn forward_from(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.clone();
        for layer in &self.layers {
            x = layer.conv.forward(&x)?;
            x = match &layer.norm {
                Some(norm) => norm.forward(&x)?.relu()?,
                None => x.tanh()?,
            };
        }
        let (h, w) = self.kind.size();
        let (_, _, gh, gw) = x.dims4()?;
        if (gh, gw) == (h, w) {
            return Ok(x);
        }
        x.narrow(2, (gh - h) / 2, h)?.narrow(3, (gw - w) / 2, w)
    }

    /// A zero variable of the noise's shape (`B x 3 x H x W`): added to the noise, it gets the
    /// noise's gradient.
    pub(crate) fn zero_noise(&self) -> Result<Var> {
        let (h, w) = self.kind.size();
        Var::zeros((self.z.dim(0)?, 3, h, w), self.z.dtype(), self.z.device())
    }

    /// Every trainable tensor; each has the bank as its leading dimension.
    pub(crate) fn vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for layer in &self.layers {
            vars.push(layer.conv.weight.clone());
            if let Some(norm) = &layer.norm {
                vars.push(norm.gamma.clone());
                vars.push(norm.beta.clone());
            }
        }
        vars
    }

    /// The number of weights of one generator.
    #[cfg(test)]
    fn weights_per_generator(&self) -> usize {
        self.vars()
            .iter()
            .map(|v| v.elem_count() / self.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_generator_makes_224_by_224_noise_in_range() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let spatial: Vec<usize> = {
            let mut s = vec![1usize];
            for &(_, _, k, st, p) in &GeneratorKind::Paper.layers()? {
                let last = *s.last().unwrap();
                s.push((last - 1) * st + k - 2 * p);
            }
            s
        };
        assert_eq!(spatial, vec![1, 4, 8, 9, 26, 52, 108, 224]);
        let g = NoiseGenerators::new(GeneratorKind::Paper, &[0], &Placement::f32(&dev))?;
        assert!(g.weights_per_generator() > 45_000_000);
        let noise = g.forward()?;
        assert_eq!(noise.dims(), &[1, 3, 224, 224]);
        let (lo, hi) = (
            noise.min_all()?.to_scalar::<f32>()?,
            noise.max_all()?.to_scalar::<f32>()?,
        );
        assert!(lo >= -1.0 && hi <= 1.0 && hi - lo > 0.1);
        Ok(())
    }

    #[test]
    fn generic_generators_fit_any_size_and_seeds_decide_everything() -> Result<()> {
        let dev = vulnmap_testkit::device();
        for &(h, w) in &[(224, 224), (100, 100), (32, 32), (128, 96), (3, 5)] {
            let g = NoiseGenerators::new(
                GeneratorKind::Generic {
                    height: h,
                    width: w,
                },
                &[1, 2, 1],
                &Placement::f32(&dev),
            )?;
            let noise = g.forward()?;
            assert_eq!(noise.dims(), &[3, 3, h, w]);
            let a = noise.get(0)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(
                a,
                noise.get(2)?.flatten_all()?.to_vec1::<f32>()?,
                "same seed, same noise"
            );
            assert_ne!(a, noise.get(1)?.flatten_all()?.to_vec1::<f32>()?);
            // A generator alone equals the same generator in a bank.
            let alone = NoiseGenerators::new(
                GeneratorKind::Generic {
                    height: h,
                    width: w,
                },
                &[2],
                &Placement::f32(&dev),
            )?
            .forward()?;
            let d = (alone.get(0)? - noise.get(1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "bank changes a generator's output by {d}");
        }
        let g = NoiseGenerators::new(
            GeneratorKind::Generic {
                height: 224,
                width: 224,
            },
            &[0],
            &Placement::f32(&dev),
        )?;
        assert!(g.weights_per_generator() < 5_000_000);
        Ok(())
    }

    #[test]
    fn generator_gradients_match_finite_differences() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let at = Placement::new(&dev, candle_core::DType::F64);
        let g = NoiseGenerators::new(
            GeneratorKind::Generic {
                height: 10,
                width: 9,
            },
            &[3, 4],
            &at,
        )?;
        let z = random::randn(&mut random::rng(1, "z"), (2, LATENT, 1, 1), &dev)?
            .to_dtype(candle_core::DType::F64)?;
        vulnmap_testkit::gradcheck::finite_difference_check(&z, |z| g.forward_from(z), 1e-6, 1e-6)?;
        Ok(())
    }
}
