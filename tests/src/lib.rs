//! baton-e2e: end-to-end scenarios that start a coordinator, agents and a recording target
//! API through the same `serve` functions as the binaries. The CLI's snapshot tests live
//! beside the `baton` binary (`coordinator/tests/`) because Cargo exposes a binary's path
//! only to its own package's tests.
