//! YAML pipelines, the runner, run directories and reports for vulnmap.
//!
//! This crate is being built after the attacks; nothing is exported yet.
//!
//! Modules: none yet.
//!
//! Cargo features: none.
