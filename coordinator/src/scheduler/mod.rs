//! The scheduler: a pure core ([`core::RunCore`], `apply(event) -> actions`) and one async
//! driver ([`driver`]) that performs the actions: persisting, dispatching stages to the
//! executor, timing pauses, evaluating conditions.

pub mod core;
pub mod driver;

#[cfg(test)]
mod tests;
