//! Convolutions: dense `Conv2d` and per-channel `DepthwiseConv2d`, with PyTorch or TF-"SAME" padding.

use crate::depthwise::depthwise_conv2d_fused;
use crate::fused_conv::{conv2d_fused, epilogue_by_tensor_ops, Epilogue};
use crate::windows::{pad2d, Pad2d, Windows};
use candle_core::{DType, Result, Tensor};
use candle_nn::{init, Init, VarBuilder};

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of pixels on every side, as PyTorch's `padding=p`.
    Uniform(usize),
    /// TensorFlow's "SAME": output `ceil(in / stride)`, the odd pixel at the bottom and right.
    TfSame,
}

impl Padding {
    fn resolve(self, input: (usize, usize), kernel: usize, stride: usize) -> Pad2d {
        match self {
            Padding::Uniform(p) => Pad2d::uniform(p),
            Padding::TfSame => Pad2d::tf_same(input, kernel, stride),
        }
    }
}

/// The initialisation torchvision gives convolutions: Kaiming normal, fan-out, ReLU gain.
pub const KAIMING_FAN_OUT: Init = Init::Kaiming {
    dist: init::NormalOrUniform::Normal,
    fan: init::FanInOut::FanOut,
    non_linearity: init::NonLinearity::ReLU,
};

/// `nn.Conv2d` with square kernels: tensor `weight` (`out x in x k x k`) and optional `bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl Conv2d {
    /// Loads or initialises a convolution from `in_channels` to `out_channels`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            KAIMING_FAN_OUT,
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            kernel,
            stride,
            padding,
        })
    }

    /// Convolves `x` (`N x in x H x W`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let epilogue = Epilogue {
            bias: self.bias.as_ref(),
            ..Epilogue::default()
        };
        self.forward_fused(x, &self.weight, epilogue)
    }

    /// The kernel (`Cout x Cin x k x k`).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// This convolution's geometry with another kernel, followed by `epilogue` (bias, residual
    /// add, ReLU) in the same op.
    pub fn forward_fused(&self, x: &Tensor, weight: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let pad = self.padding.resolve((h, w), self.kernel, self.stride);
        if pad.is_uniform() {
            conv2d_fused(x, weight, epilogue, self.stride, pad.top)
        } else {
            conv2d_fused(&pad2d(x, pad, 0.0)?, weight, epilogue, self.stride, 0)
        }
    }
}

/// A depthwise convolution (`groups == channels`, weight `C x 1 x k x k`, no bias).
///
/// On the CPU a direct kernel ([`crate::depthwise`]); elsewhere a sum of `k * k` shifted,
/// strided views times per-channel weights, exact with a working backward pass on every device.
/// Both are much faster than candle's grouped convolution, which runs one convolution per channel.
#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl DepthwiseConv2d {
    /// Loads or initialises a depthwise convolution over `channels`.
    pub fn new(
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((channels, 1, kernel, kernel), "weight", KAIMING_FAN_OUT)?;
        Ok(Self {
            weight,
            kernel,
            stride,
            padding,
        })
    }

    /// A depthwise convolution with a given, constant `weight` (`C x 1 x k x k`, square).
    pub fn from_weight(weight: Tensor, stride: usize, padding: Padding) -> Result<Self> {
        let (_, one, k, k2) = weight.dims4()?;
        if one != 1 || k != k2 {
            candle_core::bail!(
                "depthwise weight must be C x 1 x k x k, got {:?}",
                weight.dims()
            );
        }
        Ok(Self {
            weight,
            kernel: k,
            stride,
            padding,
        })
    }

    /// Convolves each channel of `x` (`N x C x H x W`) with its own kernel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, &self.weight, Epilogue::default())
    }

    /// The weights (to fold a following BatchNorm into them).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// This layer's padding and stride with `weight` (e.g. this layer's with BatchNorm folded
    /// in) and `epilogue`'s bias and (clipped) ReLU in the same pass on the CPU; no residual.
    pub fn forward_fused(&self, x: &Tensor, weight: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let pad = self.padding.resolve((h, w), k, self.stride);
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            return depthwise_conv2d_fused(x, weight, epilogue, self.stride, pad);
        }
        epilogue_by_tensor_ops(self.forward_by_taps(x, weight, pad, c)?, epilogue)
    }

    fn forward_by_taps(&self, x: &Tensor, weight: &Tensor, pad: Pad2d, c: usize) -> Result<Tensor> {
        let k = self.kernel;
        let windows = Windows::new(x, (k, k), self.stride, pad, 0.0)?;
        let mut out: Option<Tensor> = None;
        for dy in 0..k {
            for dx in 0..k {
                let w_tap = weight
                    .narrow(2, dy, 1)?
                    .narrow(3, dx, 1)?
                    .reshape((1, c, 1, 1))?;
                let term = windows.tap(dy, dx)?.broadcast_mul(&w_tap)?;
                out = Some(match out {
                    Some(acc) => (acc + term)?,
                    None => term,
                });
            }
        }
        out.ok_or_else(|| candle_core::Error::Msg("depthwise kernel must be non-empty".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;
    use vulnmap_testkit::gradcheck::finite_difference_check;

    fn builder(tensors: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)
    }

    #[test]
    fn depthwise_equals_grouped_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, s, h, w) in &[(3, 1, 7, 6), (3, 2, 8, 9), (5, 2, 11, 10), (5, 1, 6, 6)] {
            let c = 4;
            let weight = Tensor::randn(0f64, 1.0, (c, 1, k, k), &dev)?;
            let x = Tensor::randn(0f64, 1.0, (2, c, h, w), &dev)?;
            let dw = DepthwiseConv2d::new(
                c,
                k,
                s,
                Padding::TfSame,
                builder(vec![("weight", weight.clone())]),
            )?;
            let got = dw.forward(&x)?;
            let pad = Pad2d::tf_same((h, w), k, s);
            let want = pad2d(&x, pad, 0.0)?.conv2d(&weight, 0, s, 1, c)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "k={k} s={s}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn the_device_generic_path_equals_the_cpu_kernel_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, s) in &[(3, 2), (5, 1)] {
            let c = 3;
            let weight = Tensor::randn(0f64, 1.0, (c, 1, k, k), &dev)?;
            let dw =
                DepthwiseConv2d::new(c, k, s, Padding::TfSame, builder(vec![("weight", weight)]))?;
            let x = Tensor::randn(0f64, 1.0, (2, c, 7, 8), &dev)?;
            let pad = Pad2d::tf_same((7, 8), k, s);
            let d = (dw.forward(&x)? - dw.forward_by_taps(&x, &dw.weight, pad, c)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(d < 1e-12, "paths differ by {d}");
            finite_difference_check(
                &x,
                |x| dw.forward_by_taps(x, &dw.weight, pad, c),
                1e-6,
                1e-6,
            )?;
        }
        Ok(())
    }

    #[test]
    fn tf_same_padding_gives_ceil_output_and_extra_pixel_last() {
        // 224 with a 3x3 stride-2 kernel: 112 outputs, one pixel of padding at the bottom/right.
        assert_eq!(
            Pad2d::tf_same((224, 224), 3, 2),
            Pad2d {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1
            }
        );
        // 5x5 stride 2 on 28: 14 outputs, total 3 -> 1 before, 2 after.
        assert_eq!(
            Pad2d::tf_same((28, 28), 5, 2),
            Pad2d {
                top: 1,
                bottom: 2,
                left: 1,
                right: 2
            }
        );
        assert_eq!(Pad2d::tf_same((7, 7), 3, 1), Pad2d::uniform(1));
    }

    #[test]
    fn depthwise_and_same_padded_conv_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, s) in &[(3, 2), (5, 2), (3, 1)] {
            let c = 3;
            let weight = Tensor::randn(0f64, 1.0, (c, 1, k, k), &dev)?;
            let dw =
                DepthwiseConv2d::new(c, k, s, Padding::TfSame, builder(vec![("weight", weight)]))?;
            let x = Tensor::randn(0f64, 1.0, (2, c, 7, 8), &dev)?;
            finite_difference_check(&x, |x| dw.forward(x), 1e-6, 1e-6)?;

            let weight = Tensor::randn(0f64, 1.0, (2, c, k, k), &dev)?;
            let conv = Conv2d::new(
                c,
                2,
                k,
                s,
                Padding::TfSame,
                false,
                builder(vec![("weight", weight)]),
            )?;
            finite_difference_check(&x, |x| conv.forward(x), 1e-6, 1e-6)?;
        }
        Ok(())
    }
}
