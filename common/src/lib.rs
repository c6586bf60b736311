//! baton-common: what both sides of baton share.
//!
//! - [`client`]: the client side of a connection to a coordinator (agent and CLI).
//! - [`yaml`]: YAML with a position on every node, and input limits.
//! - [`diag`]: validation findings (`file:line:col: severity: message`).
//! - [`ids`]: random identifiers that are unique across machines.
//! - [`group_flush`]: group commit for stores whose flush covers all earlier writes.
//! - [`template`] and [`condition`]: Go-template syntax and stage conditions.
//! - [`spec`]: the user's files (`stages.yaml`, stage `config.yaml`, migrations), parsed
//!   and checked into validated types.
//! - [`stage`]: the stage contract between the engine and whoever runs a stage, and its
//!   wire form.
//! - [`telemetry`]: logging and OTLP span export for the binaries, trace propagation.
//! - [`vars`]: where a stage's variables come from and which wins (the precedence rule).
//! - [`proto`]: the generated gRPC types; they never leave this crate's API unconverted.
//!
//! No sled, no reqwest, no petgraph here: this crate is pure data and parsing.

pub mod client;
pub mod condition;
pub mod diag;
pub mod group_flush;
pub mod ids;
pub mod mask;
pub mod seal;
pub mod spec;
pub mod stage;
pub mod telemetry;
pub mod template;
pub mod tokens;
pub mod vars;
pub mod yaml;

/// Generated from `proto/baton/v1/*.proto`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("baton.v1");
}
