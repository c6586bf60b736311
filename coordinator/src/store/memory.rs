//! The in-memory store: the same contract as the sled store, for tests and dry runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{
    AppliedRecord, AuditRecord, EventRecord, Op, RunRecord, StageKey, StageResultRecord, Store,
    StoreError, Transition,
};

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    runs: BTreeMap<u64, RunRecord>,
    events: BTreeMap<(u64, u64), EventRecord>,
    applied: BTreeMap<(StageKey, u64), AppliedRecord>,
    results: BTreeMap<StageKey, StageResultRecord>,
    submissions: BTreeMap<u64, Vec<u8>>,
    audit: BTreeMap<u64, AuditRecord>,
    tokens: u64,
}

#[derive(Debug)]
pub struct MemoryStore {
    /// Random per instance, like a sled store's: two memory stores never share keys.
    id: String,
    state: Mutex<State>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        // Without an OS random source a memory store (tests, dry runs) still needs some id;
        // the address-free clock is unique enough for one process's in-memory state.
        let id =
            baton_common::ids::random_hex().unwrap_or_else(|_| format!("mem-{}", super::now_ms()));
        MemoryStore {
            id,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        let mut s = self.lock();
        s.next_id += 1;
        Ok(s.next_id)
    }

    fn fencing_token(&self) -> Result<u64, StoreError> {
        let mut s = self.lock();
        s.tokens += 1;
        Ok(s.tokens)
    }

    fn sync(&self) -> Result<(), StoreError> {
        // Nothing here outlives the process.
        Ok(())
    }

    fn commit(&self, t: Transition) -> Result<(), StoreError> {
        let mut s = self.lock();
        for op in t.ops {
            match op {
                Op::PutRun(r) => {
                    s.runs.insert(r.id, r);
                }
                Op::AppendEvent { run, event } => {
                    s.events.insert((run, event.seq), event);
                }
                Op::PutApplied { key, record } => {
                    s.applied.insert((key, record.version), record);
                }
                Op::RemoveApplied { key, version } => {
                    s.applied.remove(&(key, version));
                }
                Op::PutResult { key, record } => {
                    s.results.insert(key, record);
                }
                Op::RemoveResult { key } => {
                    s.results.remove(&key);
                }
                Op::PutSubmission { run, bytes } => {
                    s.submissions.insert(run, bytes);
                }
                Op::AppendAudit(a) => {
                    s.audit.insert(a.seq, a);
                }
            }
        }
        Ok(())
    }

    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.lock().runs.get(&id).cloned())
    }

    fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        Ok(self.lock().runs.values().cloned().collect())
    }

    fn events(&self, run: u64, from_seq: u64) -> Result<Vec<EventRecord>, StoreError> {
        Ok(self
            .lock()
            .events
            .range((run, from_seq)..=(run, u64::MAX))
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn applied(&self, key: &StageKey) -> Result<Vec<AppliedRecord>, StoreError> {
        let s = self.lock();
        Ok(s.applied
            .range((key.clone(), 0)..=(key.clone(), u64::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn is_applied(&self, key: &StageKey, version: u64) -> Result<bool, StoreError> {
        Ok(self.lock().applied.contains_key(&(key.clone(), version)))
    }

    fn result(&self, key: &StageKey) -> Result<Option<StageResultRecord>, StoreError> {
        Ok(self.lock().results.get(key).cloned())
    }

    fn submission(&self, run: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().submissions.get(&run).cloned())
    }

    fn audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self.lock().audit.values().cloned().collect())
    }

    fn last_audit(&self) -> Result<Option<AuditRecord>, StoreError> {
        Ok(self.lock().audit.values().next_back().cloned())
    }
}
