//! What the steps' settings mean to the libraries: each step's conversion into vulnmap's own
//! settings, shared by the runner and the CLI so that both run the same thing.
//!
//! - [`maps`]: the saliency-method steps as [`vulnmap_saliency::Method`]s.
//! - [`attacks`]: the attack steps' settings as the attack library's.

pub mod attacks;
pub mod maps;
