//! # tensormerge-engine
//!
//! Mergekit-compatible configs, the planner, the streaming executor and the
//! expression language.
#![deny(missing_docs)]

pub mod expr;
