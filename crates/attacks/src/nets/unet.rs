//! A U-Net (Ronneberger et al., 2015) that outputs a mask in [0, 1] per pixel: the mask attack's
//! `m = U(I)`. Padded 3x3 convolutions, so the output has the input's size (divisible by 16);
//! four levels of max-pooling and 2x2 transposed-convolution upsampling with skip connections;
//! BatchNorm in train mode on one image (per-image normalisation), ReLU, a 1x1 convolution and
//! a sigmoid. One network per bank entry, as the attack trains one per image.

use super::bank::{self, BankedConv2d, BankedConvTranspose2d, BankedNorm, Placement};
use candle_core::{Result, Tensor, Var};
use vulnmap_ops::pool::max_pool2d;

/// The input's sides must be divisible by this (four poolings by two).
pub(crate) const MULTIPLE: usize = 16;

struct DoubleConv {
    convs: [BankedConv2d; 2],
    norms: [BankedNorm; 2],
}

impl DoubleConv {
    fn new(seeds: &[u64], name: &str, cin: usize, cout: usize, at: &Placement) -> Result<Self> {
        let conv = |i: usize, cin: usize| -> Result<BankedConv2d> {
            Ok(BankedConv2d {
                // Kaiming normal for ReLU: std sqrt(2 / fan_in).
                weight: bank::normal(
                    seeds,
                    &format!("{name} conv{i}"),
                    &[cout, cin, 3, 3],
                    (2.0 / (9 * cin) as f64).sqrt(),
                    at,
                )?,
                bias: None,
                stride: 1,
                padding: 1,
            })
        };
        let norm = || -> Result<BankedNorm> {
            Ok(BankedNorm {
                gamma: bank::constant(seeds.len(), &[cout], 1.0, at)?,
                beta: bank::constant(seeds.len(), &[cout], 0.0, at)?,
                eps: 1e-5,
            })
        };
        Ok(Self {
            convs: [conv(0, cin)?, conv(1, cout)?],
            norms: [norm()?, norm()?],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norms[0].forward(&self.convs[0].forward(x)?)?.relu()?;
        self.norms[1].forward(&self.convs[1].forward(&x)?)?.relu()
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = Vec::new();
        for (c, n) in self.convs.iter().zip(&self.norms) {
            v.extend([c.weight.clone(), n.gamma.clone(), n.beta.clone()]);
        }
        v
    }
}

/// A bank of U-Nets with `base` channels at the first level (doubling per level).
pub(crate) struct UNet {
    down: Vec<DoubleConv>,
    bottom: DoubleConv,
    up: Vec<(BankedConvTranspose2d, DoubleConv)>,
    head: BankedConv2d,
}

impl UNet {
    /// One U-Net per seed, for `channels`-channel images.
    pub(crate) fn new(channels: usize, base: usize, seeds: &[u64], at: &Placement) -> Result<Self> {
        if seeds.is_empty() || base == 0 {
            candle_core::bail!("a U-Net bank needs a seed and at least one base channel");
        }
        let widths = [base, base * 2, base * 4, base * 8];
        let mut down = Vec::new();
        let mut cin = channels;
        for (i, &w) in widths.iter().enumerate() {
            down.push(DoubleConv::new(
                seeds,
                &format!("unet down{i}"),
                cin,
                w,
                at,
            )?);
            cin = w;
        }
        let bottom = DoubleConv::new(seeds, "unet bottom", cin, base * 16, at)?;
        let mut up = Vec::new();
        let mut below = base * 16;
        for (i, &w) in widths.iter().enumerate().rev() {
            let upsample = BankedConvTranspose2d::normal(
                seeds,
                &format!("unet up{i}"),
                (below, w),
                (1.0 / (4 * below) as f64).sqrt(),
                (2, 2, 0),
                at,
            )?;
            up.push((
                upsample,
                DoubleConv::new(seeds, &format!("unet dec{i}"), 2 * w, w, at)?,
            ));
            below = w;
        }
        let head = BankedConv2d {
            weight: bank::normal(
                seeds,
                "unet head",
                &[1, base, 1, 1],
                (1.0 / base as f64).sqrt(),
                at,
            )?,
            bias: Some(bank::constant(seeds.len(), &[1], 0.0, at)?),
            stride: 1,
            padding: 0,
        };
        Ok(Self {
            down,
            bottom,
            up,
            head,
        })
    }

    /// The mask `B x 1 x H x W` in (0, 1) for images `B x C x H x W` (sides divisible by 16).
    pub(crate) fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        if h % MULTIPLE != 0 || w % MULTIPLE != 0 || h == 0 || w == 0 {
            candle_core::bail!("the U-Net needs sides divisible by {MULTIPLE}, got {h}x{w}");
        }
        let mut skips = Vec::new();
        let mut x = images.clone();
        for level in &self.down {
            x = level.forward(&x)?;
            skips.push(x.clone());
            x = max_pool2d(&x, 2, 2, 0)?;
        }
        x = self.bottom.forward(&x)?;
        for ((upsample, level), skip) in self.up.iter().zip(skips.iter().rev()) {
            x = upsample.forward(&x)?;
            x = level.forward(&Tensor::cat(&[skip, &x], 1)?)?;
        }
        candle_nn::ops::sigmoid(&self.head.forward(&x)?)
    }

    /// Every trainable tensor (bank first).
    pub(crate) fn vars(&self) -> Vec<Var> {
        let mut v = Vec::new();
        for d in self.down.iter().chain(std::iter::once(&self.bottom)) {
            v.extend(d.vars());
        }
        for (upsample, level) in &self.up {
            v.push(upsample.weight.clone());
            v.extend(level.vars());
        }
        v.push(self.head.weight.clone());
        v.extend(self.head.bias.iter().cloned());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn masks_have_the_input_size_and_odd_sizes_are_refused() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let unet = UNet::new(3, 4, &[1, 2], &Placement::f32(&dev))?;
        let images = Tensor::rand(0f32, 1.0, (2, 3, 32, 48), &dev)?;
        let m = unet.forward(&images)?;
        assert_eq!(m.dims(), &[2, 1, 32, 48]);
        assert!(m.min_all()?.to_scalar::<f32>()? > 0.0 && m.max_all()?.to_scalar::<f32>()? < 1.0);
        let err = unet
            .forward(&Tensor::rand(0f32, 1.0, (2, 3, 30, 32), &dev)?)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("divisible by 16") && err.contains("30x32"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn unet_gradients_match_finite_differences() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let at = Placement::new(&dev, DType::F64);
        let unet = UNet::new(2, 2, &[5], &at)?;
        let x = Tensor::rand(0f64, 1.0, (1, 2, 16, 16), &dev)?;
        // Max-pooling has kinks: a small step, and enough points to cover every level.
        let report =
            vulnmap_testkit::gradcheck::gradient_error(&x, |x| unet.forward(x), 1e-7, 200)?;
        assert!(
            report.max_abs_error <= 1e-5 * report.max_abs_gradient.max(1e-3),
            "{report:?}"
        );
        Ok(())
    }
}
