//! Saliency methods and the metrics that judge them, for any `vulnmap_models::Classifier`.
//!
//! This crate is being built: gradient, SmoothGrad, Integrated Gradients, Grad-CAM, occlusion and
//! RISE, map post-processing, and the deletion/insertion, pointing-game and randomisation metrics
//! land here next. Nothing is exported yet.
//!
//! Modules: none yet.
//!
//! Cargo features: none.
