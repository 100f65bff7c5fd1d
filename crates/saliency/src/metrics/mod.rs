//! How good is a saliency map: causal metrics (deletion and insertion), localisation against a
//! known mask (pointing game, AUROC, IoU), how concentrated it is (sparseness, complexity), how
//! robust it is (max- and average-sensitivity), how faithful (infidelity, ROAD) and the
//! model-randomisation sanity check; and bootstrap confidence intervals of mean scores.

pub mod bootstrap;
pub mod causal;
pub mod complexity;
pub mod infidelity;
pub mod localisation;
pub mod randomisation;
pub mod road;
pub mod robustness;
