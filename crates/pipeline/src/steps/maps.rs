//! The saliency-method steps (`gradient`, `input_x_gradient`, `guided_backprop`, `smoothgrad`,
//! `integrated_gradients`, the class activation maps, `occlusion`, `rise`,
//! `extremal_perturbation`, `lime`, `kernel_shap`)
//! as the saliency library's [`Method`]s.

use crate::error::{Error, Result};
use crate::schema::{CamStep, Step, SurrogateStep};
use vulnmap_saliency::{
    Cam, CamRule, ExtremalPerturbation, Gradient, GuidedBackprop, InputXGradient,
    IntegratedGradients, Method, Occlusion, Rise, SmoothGrad, Surrogate,
};

/// The saliency method `step` runs, drawing its noise from `seed` and evaluating the model on at
/// most `batch_size` images at a time (occlusion and RISE, whose passes are forward only, four
/// times as many); `None` when the step is not a saliency method.
pub fn method(step: &Step, seed: u64, batch_size: usize) -> Result<Option<Method>> {
    let bs = batch_size;
    Ok(match step {
        Step::Gradient(_) => Some(Method::Gradient(Gradient { batch_size: bs })),
        Step::InputXGradient(_) => Some(Method::InputXGradient(InputXGradient { batch_size: bs })),
        Step::GuidedBackprop(_) => Some(Method::GuidedBackprop(GuidedBackprop { batch_size: bs })),
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
        Step::GradCam(s) => Some(cam(CamRule::GradCam, s, bs)),
        Step::GradCamPlusPlus(s) => Some(cam(CamRule::GradCamPlusPlus, s, bs)),
        Step::LayerCam(s) => Some(cam(CamRule::LayerCam, s, bs)),
        Step::EigenCam(s) => Some(cam(CamRule::EigenCam, s, bs)),
        // Score-CAM's passes are forward only, as occlusion's.
        Step::ScoreCam(s) => Some(cam(CamRule::ScoreCam, s, bs * 4)),
        Step::Occlusion(s) => Some(Method::Occlusion(Occlusion {
            window: s.window,
            stride: s.stride,
            baseline: s.baseline.fill(s.sigma),
            score: s.score,
            batch_size: bs * 4,
        })),
        Step::Rise(s) => Some(Method::Rise(Rise {
            masks: s.masks,
            cells: s.cells,
            keep: s.keep,
            seed,
            batch_size: bs * 4,
        })),
        Step::ExtremalPerturbation(s) => Some(Method::ExtremalPerturbation(ExtremalPerturbation {
            areas: s.areas.clone(),
            variant: s.variant,
            reward: s.reward,
            max_iters: s.max_iters,
            step: s.step,
            sigma: s.sigma,
            max_blur: s.max_blur,
            jitter: s.jitter,
            batch_size: bs,
            ..ExtremalPerturbation::default()
        })),
        Step::Lime(s) => Some(surrogate(Surrogate::lime(), s, seed, bs * 4)),
        Step::KernelShap(s) => Some(surrogate(Surrogate::kernel_shap(), s, seed, bs * 4)),
        _ => None,
    })
}

fn cam(rule: CamRule, step: &CamStep, batch_size: usize) -> Method {
    Method::Cam(Cam {
        rule,
        layer: step.layer.clone(),
        batch_size,
    })
}

/// The surrogate `base` with the step's settings; its passes are forward only.
fn surrogate(base: Surrogate, step: &SurrogateStep, seed: u64, batch_size: usize) -> Method {
    Method::Surrogate(Surrogate {
        cells: step.cells,
        samples: step.samples,
        baseline: step.baseline.fill(step.sigma),
        seed,
        batch_size,
        ..base
    })
}
