//! The paper's attacks and classic baselines, for any [`vulnmap_models::Classifier`].
//!
//! ```no_run
//! use vulnmap_attacks::{random::random_attack, AttackConfig, Goal};
//!
//! // `pixels`: one image, 1 x 3 x H x W in [0, 1].
//! fn table1_row(
//!     model: &dyn vulnmap_models::Classifier,
//!     pixels: &candle_core::Tensor,
//! ) -> vulnmap_attacks::Result<String> {
//!     let config = AttackConfig { alpha: 0.02, ..AttackConfig::default() }; // the paper's random attack
//!     let outcomes = random_attack(model, pixels, &[Goal::Untargeted], &config)?;
//!     Ok(outcomes[0].table_row()) // alpha, losses, label change, iterations, confidence
//! }
//! ```
//!
//! Every attack is a set of jobs run by one loop ([`engine`]): a noise generator per job, trained
//! by Adam until the label flips with confidence above 0.9; jobs are banked `batch_size` at a
//! time and each stops on its own. Perturbations live in pixel space: `clamp(image + alpha *
//! noise * mask, 0, 1)`.
//!
//! Modules:
//! - [`engine`]: the attack loop (jobs, goals, regions, masking, configuration).
//! - [`random`]: the random attack, untargeted and targeted.
//! - [`rounds`]: an attack repeated over seeds with statistics, and the alpha sweep (Fig. 6).
//! - [`local`]: the local attack's window map and the (w, s) sweep (Figs. 7-8).
//! - [`saliency_attack`]: the SmoothGrad-masked attack and its random-mask controls (Figs. 9-10).
//! - [`mask_attack`]: the U-Net / free-mask attack of Eq. 6 (Fig. 11).
//! - [`amortised`]: one mask network trained across images, so a map costs one forward pass.
//! - [`baselines`]: FGSM and PGD, L-inf and L2.
//! - `outcome`: what an attack reports (a Table I row, the noise, the perturbed image) and how
//!   a map names its variant.
//!
//! Cargo features: none (CUDA comes through `vulnmap-models`).

pub mod amortised;
pub mod baselines;
pub mod engine;
mod error;
pub mod local;
pub mod mask_attack;
mod nets;
mod outcome;
pub mod random;
pub mod rounds;
pub mod saliency_attack;

pub use engine::{
    AttackConfig, AttackMode, DualReward, GeneratorChoice, Goal, Job, LearnedMask, MaskGame,
    MaskNetwork, MaskNetworkKind, Masking, Region, Sparsity,
};
pub use error::{Error, Result};
pub use outcome::{variant_name, AttackOutcome};
