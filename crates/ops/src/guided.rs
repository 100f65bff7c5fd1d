//! Guided backpropagation's rectifier (Springenberg et al., 2015): the forward pass is the
//! network's own; the backward pass through each ReLU keeps a gradient only where both the
//! ReLU's input and the incoming gradient are positive.
//!
//! [`positive_gradient`] is the piece candle's autograd lacks: an identity whose backward
//! passes `max(grad, 0)`. Placed after a ReLU (or ReLU6), it turns that rectifier's backward
//! into guided backpropagation's, on every device.

use crate::cpu_kernels::{slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Which backward pass a network's rectifiers take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReluBackward {
    /// The true gradient: `grad * (input > 0)`.
    #[default]
    Exact,
    /// Guided backpropagation: `max(grad, 0) * (input > 0)`.
    Guided,
}

impl ReluBackward {
    /// `activation` (the output of a rectifier) with this backward rule.
    pub fn apply(self, activation: Tensor) -> Result<Tensor> {
        match self {
            ReluBackward::Exact => Ok(activation),
            ReluBackward::Guided => positive_gradient(&activation),
        }
    }
}

/// `x` unchanged, with a backward pass that lets only positive gradients through.
pub fn positive_gradient(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(PositiveGradient)
}

struct PositiveGradient;

impl CustomOp1 for PositiveGradient {
    fn name(&self) -> &'static str {
        "vulnmap-positive-gradient"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn copy<T: Float>(storage: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
            Ok(T::storage(
                slice::<T>(storage, layout, "positive gradient")?.to_vec(),
            ))
        }
        let out = match storage.dtype() {
            DType::F32 => copy::<f32>(storage, layout)?,
            DType::F64 => copy::<f64>(storage, layout)?,
            other => candle_core::bail!("positive gradient: f32 or f64, not {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.relu()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_guided_relu_passes_only_positive_gradients_where_its_input_is_positive() -> Result<()> {
        let x = Var::from_vec(vec![-1f32, 2.0, 3.0, -4.0], 4, &Device::Cpu)?;
        // Upstream gradient (d loss / d relu(x)): the weights of the sum.
        let weights = Tensor::new(&[5f32, -6.0, 7.0, 8.0], &Device::Cpu)?;
        for (rule, expected) in [
            (ReluBackward::Exact, [0f32, -6.0, 7.0, 0.0]),
            (ReluBackward::Guided, [0f32, 0.0, 7.0, 0.0]),
        ] {
            let y = rule.apply(x.as_tensor().relu()?)?;
            assert_eq!(y.to_vec1::<f32>()?, [0.0, 2.0, 3.0, 0.0]);
            let grads = (y * &weights)?.sum_all()?.backward()?;
            let g = grads.get(x.as_tensor()).expect("a gradient");
            assert_eq!(g.to_vec1::<f32>()?, expected, "{rule:?}");
        }
        Ok(())
    }
}
