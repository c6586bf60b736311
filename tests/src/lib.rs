//! baton-e2e: the harness for baton's end-to-end tests.
//!
//! - [`cli`]: running the real `baton` binary with a time limit.
//! - [`cluster`]: the real `baton coordinator serve` and `baton-agent` processes.
//! - [`files`]: copying and writing project files.
//! - [`target`]: a recording target API (HTTP or HTTPS on 127.0.0.1) answering from a script.
//! - [`tls`]: a private CA and a server certificate for TLS tests.
//! - [`stage`]: one-stage projects on disk, loaded by the real spec loader, run by the
//!   real executor.
//!
//! The CLI's snapshot tests live beside the `baton` binary (`coordinator/tests/`) because
//! Cargo exposes a binary's path only to its own package's tests.

pub mod cli;
pub mod cluster;
pub mod files;
pub mod proxy;
pub mod schema;
pub mod stage;
pub mod target;
pub mod tls;
