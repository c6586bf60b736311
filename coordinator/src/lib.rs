//! baton-coordinator: the control plane.
//!
//! - [`planner`]: spec -> immutable plan (pure).
//! - [`cli`]: the `baton` command line.
//! - [`synthetic`]: generated projects for tests and benchmarks.

pub mod cli;
pub mod planner;
pub mod synthetic;
