//! baton-coordinator: the control plane.
//!
//! - [`planner`]: spec -> immutable plan (pure).
//! - [`scheduler`]: the run state machine (pure core) and its async driver.
//! - [`store`]: durable state (sled), behind the `Store` trait.
//! - [`cli`]: the `baton` command line.
//! - [`demo`]: the local cloud API `baton demo` runs the examples against.
//! - [`synthetic`]: generated projects for tests and benchmarks.

pub mod audit;
pub mod cli;
pub mod demo;
pub mod grpc;
pub mod planner;
pub mod project;
pub mod runner;
pub mod runs;
pub mod scheduler;
pub mod server;
pub mod status;
pub mod store;
pub mod synthetic;
