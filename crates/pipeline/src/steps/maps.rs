//! The saliency-method steps (`gradient`, `smoothgrad`, `integrated_gradients`, `grad_cam`,
//! `occlusion`, `rise`) as the saliency library's [`Method`]s.

use crate::error::{Error, Result};
use crate::schema::Step;
use vulnmap_saliency::{
    GradCam, Gradient, IntegratedGradients, Method, Occlusion, Rise, SmoothGrad,
};

/// The saliency method `step` runs, drawing its noise from `seed` and evaluating the model on at
/// most `batch_size` images at a time (occlusion and RISE, whose passes are forward only, four
/// times as many); `None` when the step is not a saliency method.
pub fn method(step: &Step, seed: u64, batch_size: usize) -> Result<Option<Method>> {
    let bs = batch_size;
    Ok(match step {
        Step::Gradient(_) => Some(Method::Gradient(Gradient { batch_size: bs })),
        Step::Smoothgrad(s) => Some(Method::SmoothGrad(SmoothGrad {
            samples: s.samples,
            noise_level: s.noise_level,
            aggregate: s.aggregate,
            seed,
            batch_size: bs,
        })),
        Step::IntegratedGradients(s) => Some(Method::IntegratedGradients(IntegratedGradients {
            steps: s.steps,
            baseline: s.baseline.path_start(s.sigma).ok_or_else(|| {
                Error::Run("Integrated Gradients starts from `black` or `blurred`".into())
            })?,
            integration: s.integration,
            batch_size: bs,
        })),
        Step::GradCam(s) => Some(Method::GradCam(GradCam {
            layer: s.layer.clone(),
            batch_size: bs,
        })),
        Step::Occlusion(s) => Some(Method::Occlusion(Occlusion {
            window: s.window,
            stride: s.stride,
            baseline: s.baseline.fill(s.sigma),
            batch_size: bs * 4,
        })),
        Step::Rise(s) => Some(Method::Rise(Rise {
            masks: s.masks,
            cells: s.cells,
            keep: s.keep,
            seed,
            batch_size: bs * 4,
        })),
        _ => None,
    })
}
