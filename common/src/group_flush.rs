//! Group commit for a store whose flush makes durable everything written before it started
//! (sled's `flush`): the coordinator's store and the agent's outbox share it.
//!
//! A writer takes a ticket once its write is applied; a flush covers every ticket issued
//! before it started. A writer returns once a flush covering its ticket has succeeded: it
//! runs one itself when none is running, else waits for the running one (which may not cover
//! it) and then for or runs the next. N writers arriving together cost about two flushes
//! instead of N, and none returns before its data is durable.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The group's counters and the condition its waiters sleep on.
#[derive(Debug, Default)]
pub struct GroupFlush {
    state: Mutex<FlushState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// The last ticket handed out.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
}

impl GroupFlush {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        // A poisoned lock only means a panic elsewhere; the counters are still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A ticket for everything written before this call: any flush that starts after it
    /// covers it.
    pub fn ticket(&self) -> u64 {
        let mut st = self.lock();
        st.issued += 1;
        st.issued
    }

    /// The tickets handed out so far.
    pub fn issued(&self) -> u64 {
        self.lock().issued
    }

    /// Whether a flush covering `ticket` has succeeded.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.lock().durable >= ticket
    }

    /// Returns once a flush covering `ticket` has succeeded, running `flush` when none runs.
    /// A failed flush fails the writer that ran it; waiters try again themselves.
    pub fn wait<E>(&self, ticket: u64, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let mut st = self.lock();
        loop {
            if st.durable >= ticket {
                return Ok(());
            }
            if !st.flushing {
                st.flushing = true;
                let covers = st.issued;
                drop(st);
                let flushed = flush();
                st = self.lock();
                st.flushing = false;
                if flushed.is_ok() {
                    st.durable = st.durable.max(covers);
                }
                self.done.notify_all();
                flushed?;
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Returns once everything written before this call is durable.
    pub fn flush_after_this<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let ticket = self.ticket();
        self.wait(ticket, flush)
    }
}
