//! A convolution followed by BatchNorm (and a ReLU or ReLU6), the unit ResNet and
//! EfficientNet-Lite are built from.
//!
//! In eval mode with constant weights BatchNorm is an affine map per channel, folded into the
//! kernel and a bias once and reused, and the unit is one fused op keeping one activation for the
//! backward pass instead of four or five (convolution, scale, shift, ReLU, clip). Train mode, or
//! trainable weights, take the plain ops (batch statistics, weight gradients).

use candle_core::{Result, Tensor};
use std::sync::{Arc, Mutex};
use vulnmap_ops::batch_norm::BatchNorm;
use vulnmap_ops::conv::{Conv2d, DepthwiseConv2d};
use vulnmap_ops::fused_conv::Epilogue;
use vulnmap_ops::guided::ReluBackward;

/// What follows the BatchNorm: a skip connection added, then a ReLU (clipped at `max`, 6 for
/// ReLU6) with its backward rule.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Then<'a> {
    pub(crate) residual: Option<&'a Tensor>,
    pub(crate) relu: Option<ReluBackward>,
    pub(crate) max: Option<f64>,
}

impl Then<'_> {
    /// ReLU6 with `rule`'s backward.
    pub(crate) fn relu6(rule: ReluBackward) -> Self {
        Self {
            relu: Some(rule),
            max: Some(6.0),
            ..Self::default()
        }
    }

    fn epilogue<'a>(&self, bias: &'a Tensor) -> Epilogue<'a>
    where
        Self: 'a,
    {
        Epilogue {
            bias: Some(bias),
            residual: self.residual,
            relu: self.relu.is_some(),
            relu_max: self.max,
            relu_backward: self.relu.unwrap_or_default(),
        }
    }

    /// The same with plain tensor ops.
    fn by_tensor_ops(&self, mut y: Tensor) -> Result<Tensor> {
        if let Some(r) = self.residual {
            y = (y + r)?;
        }
        let Some(rule) = self.relu else {
            return Ok(y);
        };
        y = y.relu()?;
        if let Some(max) = self.max {
            y = y.minimum(max)?;
        }
        rule.apply(y)
    }
}

/// The kernel and bias with a BatchNorm folded in, computed on first use in eval mode.
#[derive(Debug, Clone, Default)]
struct Folded(Arc<Mutex<Option<(Tensor, Tensor)>>>);

impl Folded {
    /// `weight` scaled per output channel and BatchNorm's shift as a bias; `None` (and the cache
    /// cleared: a train-mode pass moves the running statistics) when the plain ops must run.
    fn get(
        &self,
        weight: &Tensor,
        bn: &BatchNorm,
        train: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let mut folded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if train || weight.track_op() || bn.is_trainable() {
            *folded = None;
            return Ok(None);
        }
        if let Some(kept) = folded.as_ref() {
            return Ok(Some(kept.clone()));
        }
        let (scale, shift) = bn.eval_affine()?;
        let cout = weight.dim(0)?;
        let scale = scale.reshape((cout, 1, 1, 1))?.to_dtype(weight.dtype())?;
        let kept = (weight.broadcast_mul(&scale)?, shift.flatten_all()?);
        *folded = Some(kept.clone());
        Ok(Some(kept))
    }
}

/// A convolution layer a following BatchNorm can be folded into.
pub(crate) trait FoldableConv {
    fn weight(&self) -> &Tensor;
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn forward_fused(&self, x: &Tensor, weight: &Tensor, epilogue: Epilogue) -> Result<Tensor>;
}

impl FoldableConv for Conv2d {
    fn weight(&self) -> &Tensor {
        Conv2d::weight(self)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, x)
    }
    fn forward_fused(&self, x: &Tensor, weight: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        Conv2d::forward_fused(self, x, weight, epilogue)
    }
}

impl FoldableConv for DepthwiseConv2d {
    fn weight(&self) -> &Tensor {
        DepthwiseConv2d::weight(self)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        DepthwiseConv2d::forward(self, x)
    }
    fn forward_fused(&self, x: &Tensor, weight: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        DepthwiseConv2d::forward_fused(self, x, weight, epilogue)
    }
}

/// A convolution (dense by default) and its BatchNorm.
#[derive(Debug, Clone)]
pub(crate) struct ConvBn<C = Conv2d> {
    conv: C,
    bn: BatchNorm,
    folded: Folded,
}

/// A depthwise convolution and its BatchNorm (no residual).
pub(crate) type DepthwiseBn = ConvBn<DepthwiseConv2d>;

impl<C: FoldableConv> ConvBn<C> {
    pub(crate) fn new(conv: C, bn: BatchNorm) -> Self {
        Self {
            conv,
            bn,
            folded: Folded::default(),
        }
    }

    /// `conv`, `bn`, then `then`.
    pub(crate) fn forward_then(&self, x: &Tensor, train: bool, then: Then) -> Result<Tensor> {
        match self.folded.get(self.conv.weight(), &self.bn, train)? {
            Some((kernel, bias)) => self.conv.forward_fused(x, &kernel, then.epilogue(&bias)),
            None => then.by_tensor_ops(self.bn.forward_t(&self.conv.forward(x)?, train)?),
        }
    }
}
