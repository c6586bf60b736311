//! The audit log: every submit, approval, rejection, cancel, override, resolve and stage
//! down, with who, when, where (project and environment), the release and why. Append-only
//! in the store and hash-chained: each entry's `hash` is SHA-256 over the previous entry's
//! hash and its own fields, so [`verify`] detects an entry that was changed, removed or
//! reordered. (Removing the newest entries leaves a shorter valid chain: compare the head
//! `verify` reports with one kept elsewhere to detect that.)
//!
//! Appends are serialized in this process (one writer per store, as sled allows), and an
//! entry is committed in the same transition as what it records when there is one (a new
//! run), so a submission is never recorded without its entry.

use std::sync::Mutex;

use baton_common::spec::sha256_hex;

use crate::store::{now_ms, AuditRecord, Op, Store, StoreError, Transition, FORMAT};

/// What happened, before it is numbered and chained.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub action: &'static str,
    pub by: String,
    /// The project's store key (its environment is read from it).
    pub project: String,
    pub run: u64,
    pub release: String,
    pub reason: String,
}

static APPEND: Mutex<()> = Mutex::new(());

/// Commits `t` with `entries` appended to the audit log, atomically.
pub fn commit_with(
    store: &dyn Store,
    entries: Vec<Entry>,
    mut t: Transition,
) -> Result<Vec<AuditRecord>, StoreError> {
    let _one_writer = APPEND
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut last = store.last_audit()?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let record = chained(last.as_ref(), entry);
        t.push(Op::AppendAudit(record.clone()));
        last = Some(record.clone());
        out.push(record);
    }
    store.commit(t)?;
    Ok(out)
}

/// `entry` numbered and chained after `last`.
fn chained(last: Option<&AuditRecord>, entry: Entry) -> AuditRecord {
    let mut record = AuditRecord {
        v: FORMAT,
        seq: last.map_or(0, |l| l.seq + 1),
        at_ms: now_ms(),
        action: entry.action.to_owned(),
        by: entry.by,
        environment: crate::runs::environment_of(&entry.project)
            .unwrap_or_default()
            .to_owned(),
        project: entry.project,
        run: entry.run,
        release: entry.release,
        reason: entry.reason,
        prev: last.map(|l| l.hash.clone()).unwrap_or_default(),
        hash: String::new(),
    };
    record.hash = hash_of(&record);
    record
}

/// Appends `entry` on its own.
pub fn append(store: &dyn Store, entry: Entry) -> Result<AuditRecord, StoreError> {
    let mut records = commit_with(store, vec![entry], Transition::new())?;
    Ok(records.remove(0))
}

/// The hash an entry must carry: over its previous entry's hash and every field but `hash`.
pub fn hash_of(r: &AuditRecord) -> String {
    let fields = serde_json::json!([
        r.v,
        r.seq,
        r.at_ms,
        r.action,
        r.by,
        r.project,
        r.environment,
        r.run,
        r.release,
        r.reason,
    ]);
    sha256_hex(format!("{}\n{fields}", r.prev).as_bytes())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {what}")]
pub struct Broken {
    pub seq: u64,
    pub what: String,
}

/// Checks the whole chain: sequence numbers without gaps, each entry naming its
/// predecessor's hash, each hash matching its fields. Returns the head (count and hash).
pub fn verify(entries: &[AuditRecord]) -> Result<(u64, String), Broken> {
    let mut prev = String::new();
    for (i, e) in entries.iter().enumerate() {
        let expected = u64::try_from(i).unwrap_or(u64::MAX);
        if e.seq != expected {
            return Err(Broken {
                seq: expected,
                what: format!(
                    "missing (the next entry present is {}): entries were removed",
                    e.seq
                ),
            });
        }
        if e.prev != prev {
            return Err(Broken {
                seq: e.seq,
                what: "does not follow the entry before it: entries were removed or reordered"
                    .to_owned(),
            });
        }
        if hash_of(e) != e.hash {
            return Err(Broken {
                seq: e.seq,
                what: "its contents do not match its hash: it was changed after it was written"
                    .to_owned(),
            });
        }
        prev.clone_from(&e.hash);
    }
    Ok((u64::try_from(entries.len()).unwrap_or(u64::MAX), prev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn entry(action: &'static str, by: &str) -> Entry {
        Entry {
            action,
            by: by.to_owned(),
            project: "stages.yaml/prod".to_owned(),
            run: 1,
            release: "r".to_owned(),
            reason: String::new(),
        }
    }

    #[test]
    fn a_changed_removed_or_reordered_entry_breaks_the_chain() {
        let store = MemoryStore::new();
        for (a, by) in [("submit", "alice"), ("approve", "bob"), ("cancel", "carol")] {
            append(&store, entry(a, by)).expect("append");
        }
        let good = store.audit().expect("audit");
        assert_eq!(good[1].environment, "prod");
        let (n, head) = verify(&good).expect("intact");
        assert_eq!((n, head.as_str()), (3, good[2].hash.as_str()));

        let mut changed = good.clone();
        changed[1].by = "mallory".to_owned();
        assert_eq!(verify(&changed).unwrap_err().seq, 1);

        let mut removed = good.clone();
        removed.remove(1);
        assert_eq!(verify(&removed).unwrap_err().seq, 1);

        let mut rechained = good.clone();
        rechained[1].by = "mallory".to_owned();
        rechained[1].hash = hash_of(&rechained[1]);
        assert_eq!(
            verify(&rechained).unwrap_err().seq,
            2,
            "the next entry names the old hash"
        );
    }
}
