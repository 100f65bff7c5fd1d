//! Helpers shared by the saliency crate's integration tests.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub use vulnmap_testkit::device;
