//! The sled store (sled 0.34.7, pinned). The only module that names sled.
//!
//! Trees: `runs` (run id BE -> RunRecord), `events` (run id BE ++ seq BE -> EventRecord),
//! `applied` (stage key ++ version BE -> AppliedRecord), `results` (stage key -> result),
//! `submissions` (run id BE -> what a coordinator needs to rebuild the run, opaque bytes).
//! A transition is one multi-tree transaction followed by `flush()`; `flush_async` is never
//! used (it deadlocks in 0.34) and nothing flushes inside a transaction.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::{
    decode, encode, AppliedRecord, EventRecord, Op, RunRecord, StageKey, StageResultRecord, Store,
    StoreError, Transition,
};

#[derive(Debug, Clone)]
pub struct SledStore {
    /// Random, created with the directory and kept in `meta` (see [`Store::id`]).
    id: String,
    db: sled::Db,
    runs: sled::Tree,
    events: sled::Tree,
    applied: sled::Tree,
    results: sled::Tree,
    submissions: sled::Tree,
    /// Counters (`next_id`).
    meta: sled::Tree,
    /// Group commit: transitions that arrive while a flush runs share the next one.
    group: std::sync::Arc<GroupFlush>,
}

/// Group commit. Every writer takes a ticket once its transaction is applied; a flush
/// covers every ticket issued before it started. A writer returns once a flush covering its
/// ticket has succeeded: it runs one itself when none is running, else waits for the
/// running one (which may not cover it) and then for or runs the next. N writers arriving
/// together cost about two flushes instead of N, and none returns before its data is
/// durable.
#[derive(Debug, Default)]
struct GroupFlush {
    state: std::sync::Mutex<FlushState>,
    done: std::sync::Condvar,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, FlushState> {
        // A poisoned lock only means a panic elsewhere; the counters are still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once everything written before this call is durable.
    fn flush_after_this(&self, db: &sled::Db) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.issued += 1;
        let mine = st.issued;
        loop {
            if st.durable >= mine {
                return Ok(());
            }
            if !st.flushing {
                st.flushing = true;
                let covers = st.issued;
                drop(st);
                let flushed = db.flush();
                st = self.lock();
                st.flushing = false;
                if flushed.is_ok() {
                    st.durable = st.durable.max(covers);
                }
                self.done.notify_all();
                // A failed flush fails its runner; waiters try again themselves.
                flushed.map_err(io)?;
                continue;
            }
            st = self
                .done
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`. A second process on the same directory
    /// is refused with [`StoreError::Locked`].
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            dir: shown.clone(),
            message: e.to_string(),
        })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    StoreError::Locked { dir: shown.clone() }
                }
                other => StoreError::Open {
                    dir: shown.clone(),
                    message: other.to_string(),
                },
            })?;
        restrict(dir).map_err(|e| StoreError::Open {
            dir: shown.clone(),
            message: format!("cannot make it private to its owner: {e}"),
        })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| StoreError::Open {
                dir: shown.clone(),
                message: e.to_string(),
            })
        };
        let meta = tree("meta")?;
        let id = store_id(&db, &meta).map_err(|message| StoreError::Open {
            dir: shown.clone(),
            message,
        })?;
        Ok(SledStore {
            group: std::sync::Arc::default(),
            id,
            runs: tree("runs")?,
            events: tree("events")?,
            applied: tree("applied")?,
            results: tree("results")?,
            submissions: tree("submissions")?,
            meta,
            db,
        })
    }
}

/// The store's id: read from `meta`, or created (random) and flushed on first open.
fn store_id(db: &sled::Db, meta: &sled::Tree) -> Result<String, String> {
    if let Some(v) = meta.get(b"store_id").map_err(|e| e.to_string())? {
        return String::from_utf8(v.to_vec())
            .map_err(|_| "the store id is damaged (not UTF-8)".to_owned());
    }
    let id = baton_common::ids::random_hex().map_err(|e| format!("no random source: {e}"))?;
    // Only one process opens the directory (sled's lock), so no other writer races this.
    meta.insert(b"store_id", id.as_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    Ok(id)
}

/// The state directory and what is in it are its owner's alone (0700 / 0600): it holds run
/// history and exported variables. The directory's mode also covers files sled adds later.
fn restrict(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let mode = if entry.file_type()?.is_dir() {
            0o700
        } else {
            0o600
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn run_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn event_key(run: u64, seq: u64) -> Vec<u8> {
    let mut k = run.to_be_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn applied_key(key: &StageKey, version: u64) -> Vec<u8> {
    let mut k = key.bytes();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl SledStore {
    /// One multi-tree transaction, not flushed.
    fn apply(&self, t: &Transition) -> Result<(), StoreError> {
        let result: Result<(), TransactionError<()>> = (
            &self.runs,
            &self.events,
            &self.applied,
            &self.results,
            &self.submissions,
        )
            .transaction(|(runs, events, applied, results, submissions)| {
                for op in &t.ops {
                    match op {
                        Op::PutRun(r) => {
                            runs.insert(&run_key(r.id), encode(r))?;
                        }
                        Op::AppendEvent { run, event } => {
                            events.insert(event_key(*run, event.seq), encode(event))?;
                        }
                        Op::PutApplied { key, record } => {
                            applied.insert(applied_key(key, record.version), encode(record))?;
                        }
                        Op::RemoveApplied { key, version } => {
                            applied.remove(applied_key(key, *version))?;
                        }
                        Op::PutResult { key, record } => {
                            results.insert(key.bytes(), encode(record))?;
                        }
                        Op::RemoveResult { key } => {
                            results.remove(key.bytes())?;
                        }
                        Op::PutSubmission { run, bytes } => {
                            submissions.insert(&run_key(*run), bytes.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        result.map_err(|e| StoreError::Io(format!("{e:?}")))
    }
}

impl Store for SledStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        // A plain counter, flushed before the id is used: ids people read stay small and
        // never repeat across crashes. (Fencing tokens use sled's `generate_id`.)
        let next = self
            .meta
            .update_and_fetch(b"next_id", |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(io)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(1, u64::from_be_bytes);
        self.group.flush_after_this(&self.db)?;
        Ok(next)
    }

    fn fencing_token(&self) -> Result<u64, StoreError> {
        // Monotonic across crashes without a flush per call: after a crash sled resumes
        // above every id it may have handed out.
        // generate_id starts at 0; tokens start at 1 (0 means "no token": local mode).
        self.db.generate_id().map(|id| id + 1).map_err(io)
    }

    fn commit(&self, t: Transition) -> Result<(), StoreError> {
        self.apply(&t)?;
        // Durable before the caller acts on it: a flush that started after this transaction
        // was applied covers it, whoever runs it.
        self.group.flush_after_this(&self.db)
    }

    fn commit_unflushed(&self, t: Transition) -> Result<(), StoreError> {
        self.apply(&t)
    }

    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        match self.runs.get(run_key(id)).map_err(io)? {
            Some(v) => decode("run", &v).map(Some),
            None => Ok(None),
        }
    }

    fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.runs
            .iter()
            .map(|kv| kv.map_err(io).and_then(|(_, v)| decode("run", &v)))
            .collect()
    }

    fn events(&self, run: u64, from_seq: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.events
            .range(event_key(run, from_seq)..event_key(run, u64::MAX))
            .map(|kv| kv.map_err(io).and_then(|(_, v)| decode("event", &v)))
            .collect()
    }

    fn applied(&self, key: &StageKey) -> Result<Vec<AppliedRecord>, StoreError> {
        self.applied
            .scan_prefix(key.bytes())
            .map(|kv| {
                kv.map_err(io)
                    .and_then(|(_, v)| decode("applied migration", &v))
            })
            .collect()
    }

    fn result(&self, key: &StageKey) -> Result<Option<StageResultRecord>, StoreError> {
        match self.results.get(key.bytes()).map_err(io)? {
            Some(v) => decode("stage result", &v).map(Some),
            None => Ok(None),
        }
    }

    fn submission(&self, run: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .submissions
            .get(run_key(run))
            .map_err(io)?
            .map(|v| v.to_vec()))
    }
}
