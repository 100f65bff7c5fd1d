//! The paper's generator-noise attacks (random, local, saliency-mask, U-Net-mask) and classic
//! baselines (FGSM, PGD), for any `vulnmap_models::Classifier`.
//!
//! This crate is being built after `vulnmap-saliency`; nothing is exported yet.
//!
//! Modules: none yet.
//!
//! Cargo features: none.
