//! baton-agent: runs a stage's migrations near their target.
//!
//! The stage executor (HTTP migrations, command steps, auth, retries, secret masking) and
//! the coordinator connection live here; this crate never depends on the coordinator.
