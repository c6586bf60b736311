//! baton-agent: runs a stage's migrations near their target.
//!
//! - [`assignment`]: runs one stage assignment (from a coordinator, or in-process) on the
//!   executor, with this machine's environment.
//! - [`executor`]: runs a stage (HTTP migrations, command steps, retries, secret masking).
//! - [`session`]: the connection to a coordinator (dial out, hello, assignments, reconnect).
//! - [`auth`]: basic, OAuth2 and PocketBase tokens.
//! - [`client`]: the stage's HTTP client from its `client:` options.
//!
//! This crate never depends on the coordinator: the executor does not know how a stage
//! arrived (in-process in local mode, over gRPC from a coordinator).

pub mod assignment;
pub mod auth;
pub mod client;
pub mod executor;
pub mod outbox;
pub mod session;
