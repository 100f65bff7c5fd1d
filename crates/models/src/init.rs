//! Fresh, trainable weights drawn from a seed: a `VarBuilder` over a `VarMap` whose new variables
//! follow each layer's `Init` hint (Kaiming for convolutions, as torchvision) but come from
//! [`crate::random`], so the same seed gives the same network.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use vulnmap_data::random;

/// A builder whose tensors are trainable variables stored in `varmap`; variables already in the
/// map are reused (so a checkpoint loaded into the map first wins), new ones are drawn from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// The backend of [`seeded_var_builder`].
pub(crate) struct SeededVarMap {
    pub(crate) varmap: VarMap,
    pub(crate) seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "variable `{name}` has shape {:?} but {:?} was asked for",
                    var.dims(),
                    shape.dims()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(&init, &shape, &mut random::rng(self.seed, name));
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// Values for `init` over `shape`, as candle-nn's `Init::var` would draw them, but seeded.
fn sample(init: &Init, shape: &Shape, rng: &mut random::SeededRng) -> Vec<f32> {
    let n = shape.elem_count();
    match *init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => random::normal_vec(rng, n, mean, stdev),
        Init::Uniform { lo, up } => random::uniform_vec(rng, n, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => random::normal_vec(rng, n, 0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    random::uniform_vec(rng, n, -bound, bound)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_names_are_independent_of_order() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let draw = |names: &[&str], seed| -> Result<Vec<Vec<f32>>> {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
            for n in names {
                vb.get_with_hints((4, 3), n, vulnmap_ops::conv::KAIMING_FAN_OUT)?;
            }
            let data = vm.data().lock().unwrap();
            let mut out = Vec::new();
            for n in ["a", "b"] {
                out.push(data[n].as_tensor().flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        let ab = draw(&["a", "b"], 3)?;
        assert_eq!(ab, draw(&["b", "a"], 3)?);
        assert_ne!(ab, draw(&["a", "b"], 4)?);
        Ok(())
    }
}
