//! The agent's outbox: every message the coordinator must not miss (a migration's end, an
//! attempt's result) is journaled in the agent's own sled store and flushed (the session
//! sends it without waiting for the flush: see `session::Item::Journaled`); it is dropped
//! when the coordinator acknowledges the attempt's result (or rejects the attempt as stale).
//! A restarted agent re-sends what is still here and names these attempts in its hello.
//!
//! Layout: tree `outbox`, key = sequence number (u64 big-endian, so a scan is in the order
//! things happened), value = the `AgentMessage` as protobuf bytes, encrypted with the state
//! key (results carry exported values, secrets among them; see `baton_common::seal`); tree
//! `meta` holds the key check. sled 0.34.7 rules as in the coordinator: `flush()` (never
//! `flush_async`), from blocking code.
//!
//! Flushes are group commits ([`GroupFlush`]): a write takes a ticket, and a flush started
//! after it covers it, whoever runs it, so the stages of one agent that end together share
//! flushes, and a migration's end and its stage's result written back to back share one.
//! Dropping an acknowledged attempt is not flushed: if the agent stops before a later flush
//! covers the removal, the restarted agent sends the result again and the coordinator
//! answers that it had already recorded it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use std::sync::{Arc, Mutex, PoisonError};

use baton_common::group_flush::GroupFlush;
use baton_common::proto::{self, agent_message};
use baton_common::seal::{Sealer, StateKey};
use baton_common::stage::wire::attempt_of;
use baton_common::stage::AttemptId;
use prost::Message;

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the agent's data directory `{dir}` is in use by another baton-agent (one agent per data directory)")]
    Locked { dir: String },
    #[error("cannot open the agent's outbox in `{dir}`: {message} (if it is damaged, move the directory aside; results it held that the coordinator never acknowledged are then lost and their stages need attention)")]
    Open { dir: String, message: String },
    #[error("cannot open the agent's outbox in `{dir}`: {message}; give the key it was written with (--state-key-file, BATON_STATE_KEY, BATON_STATE_KEY_FILE, or the directory's state.key); nothing was changed")]
    Key { dir: String, message: String },
    #[error("the agent's outbox failed: {0}")]
    Io(String),
}

/// The journal. Cheap to clone (sled handles are shared).
#[derive(Debug, Clone)]
pub struct Outbox {
    db: sled::Db,
    tree: sled::Tree,
    sealer: Arc<Sealer>,
    /// The attempt of every journaled message, by sequence number (so finding an attempt's
    /// messages opens none of them).
    index: Arc<Mutex<BTreeMap<u64, AttemptId>>>,
    group: Arc<GroupFlush>,
}

/// The attempt a journaled message is about.
fn attempt_in(m: &proto::AgentMessage) -> Option<AttemptId> {
    let r = match &m.kind {
        Some(agent_message::Kind::StageEvent(e)) => e.attempt.clone(),
        Some(agent_message::Kind::StageResult(r)) => r.attempt.clone(),
        _ => None,
    };
    attempt_of(r, "journaled message").ok()
}

impl Outbox {
    /// Opens (or creates) the outbox under `dir`. A second agent on the same directory is
    /// refused; damage is refused with a message naming the directory.
    pub fn open(dir: &Path, key: &StateKey) -> Result<Outbox, OutboxError> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| OutboxError::Open {
            dir: shown.clone(),
            message: e.to_string(),
        })?;
        let db = sled::Config::new()
            .path(dir.join("outbox"))
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    OutboxError::Locked { dir: shown.clone() }
                }
                other => OutboxError::Open {
                    dir: shown.clone(),
                    message: other.to_string(),
                },
            })?;
        let open_tree = |name: &str| {
            db.open_tree(name).map_err(|e| OutboxError::Open {
                dir: shown.clone(),
                message: e.to_string(),
            })
        };
        let (tree, meta) = (open_tree("outbox")?, open_tree("meta")?);
        let check = meta.get(b"key_check").map_err(Self::io)?;
        let (sealer, new_check) =
            Sealer::for_store(dir, key, check.as_deref()).map_err(|message| OutboxError::Key {
                dir: shown.clone(),
                message,
            })?;
        if let Some(c) = new_check {
            meta.insert(b"key_check", c).map_err(Self::io)?;
            db.flush().map_err(Self::io)?;
        }
        let mut outbox = Outbox {
            db,
            tree,
            sealer: Arc::new(sealer),
            index: Arc::default(),
            group: Arc::default(),
        };
        let index = outbox
            .entries()
            .into_iter()
            .filter_map(|(seq, m)| Some((seq, attempt_in(&m)?)))
            .collect();
        outbox.index = Arc::new(Mutex::new(index));
        Ok(outbox)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, AttemptId>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io(e: sled::Error) -> OutboxError {
        OutboxError::Io(e.to_string())
    }

    /// Journals `m` durably; returns its sequence number. Blocks (flush): call it from
    /// `spawn_blocking` in async code.
    pub fn journal(&self, m: &proto::AgentMessage) -> Result<u64, OutboxError> {
        let (seq, ticket) = self.write(m)?;
        self.sync(ticket)?;
        Ok(seq)
    }

    /// Writes `m` without waiting for a flush; returns its sequence number and the ticket
    /// that [`Outbox::sync`] makes durable.
    pub fn write(&self, m: &proto::AgentMessage) -> Result<(u64, u64), OutboxError> {
        let seq = self.db.generate_id().map_err(Self::io)?;
        self.tree
            .insert(seq.to_be_bytes(), self.sealer.seal(&m.encode_to_vec()))
            .map_err(Self::io)?;
        if let Some(a) = attempt_in(m) {
            self.index().insert(seq, a);
        }
        Ok((seq, self.group.ticket()))
    }

    /// Returns once what was written before `ticket` was taken is durable. Blocks (flush).
    pub fn sync(&self, ticket: u64) -> Result<(), OutboxError> {
        self.group
            .wait(ticket, || self.db.flush().map(drop).map_err(Self::io))
    }

    /// Whether what was written before `ticket` was taken is durable.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.group.is_durable(ticket)
    }

    /// The journaled message `seq`, if it is still there.
    pub fn get(&self, seq: u64) -> Option<proto::AgentMessage> {
        let bytes = self.tree.get(seq.to_be_bytes()).ok()??;
        let plain = self.sealer.open(&bytes).ok()?;
        proto::AgentMessage::decode(plain.as_ref()).ok()
    }

    /// Every journaled message, oldest first. Entries that no longer decode are skipped
    /// (and logged): they cannot be sent anyway.
    pub fn entries(&self) -> Vec<(u64, proto::AgentMessage)> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let Ok((k, v)) = item else { continue };
            let Ok(key) = <[u8; 8]>::try_from(k.as_ref()) else {
                continue;
            };
            let decoded = self.sealer.open(&v).and_then(|plain| {
                proto::AgentMessage::decode(plain.as_ref()).map_err(|e| e.to_string())
            });
            match decoded {
                Ok(m) => out.push((u64::from_be_bytes(key), m)),
                Err(e) => tracing::warn!(error = %e, "an outbox entry does not decode; skipped"),
            }
        }
        out
    }

    /// Attempts with journaled messages.
    pub fn attempts(&self) -> BTreeSet<AttemptId> {
        self.index().values().cloned().collect()
    }

    /// Drops every message of `attempt` (its result was acknowledged, or it was rejected);
    /// returns their sequence numbers. Not flushed (see the module's notes).
    pub fn drop_attempt(&self, attempt: &AttemptId) -> Result<Vec<u64>, OutboxError> {
        let mut index = self.index();
        let doomed: Vec<u64> = index
            .iter()
            .filter(|(_, a)| *a == attempt)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &doomed {
            self.tree.remove(seq.to_be_bytes()).map_err(Self::io)?;
            index.remove(seq);
        }
        Ok(doomed)
    }

    /// After a restart: every attempt with journaled messages but no result was running when
    /// the agent stopped. Nothing runs it any more, so its result is journaled now as lost
    /// (a migration it had started is in doubt; the coordinator decides). Blocks (flush).
    pub fn close_interrupted(&self) -> Result<Vec<AttemptId>, OutboxError> {
        let mut ended: BTreeMap<AttemptId, bool> = BTreeMap::new();
        for (_, m) in self.entries() {
            if let Some(a) = attempt_in(&m) {
                let is_result = matches!(m.kind, Some(agent_message::Kind::StageResult(_)));
                *ended.entry(a).or_insert(false) |= is_result;
            }
        }
        let mut closed = Vec::new();
        for (attempt, has_result) in ended {
            if has_result {
                continue;
            }
            let result = proto::AgentMessage {
                kind: Some(agent_message::Kind::StageResult(proto::StageResult {
                    attempt: Some((&attempt).into()),
                    outcome: proto::StageOutcome::Lost as i32,
                    migrations: Vec::new(),
                    exported: Default::default(),
                    error: "the agent restarted while the attempt ran".to_owned(),
                    secret_exports: Vec::new(),
                })),
            };
            self.journal(&result)?;
            closed.push(attempt);
        }
        Ok(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(stage: &str) -> AttemptId {
        AttemptId {
            run: 7,
            stage: stage.to_owned(),
            attempt: 1,
            token: 42,
        }
    }

    fn finished(a: &AttemptId, version: u64) -> proto::AgentMessage {
        proto::AgentMessage {
            kind: Some(agent_message::Kind::StageEvent(proto::StageEvent {
                attempt: Some(a.into()),
                kind: Some(proto::stage_event::Kind::MigrationFinished(
                    proto::MigrationFinished {
                        migration: Some(proto::AppliedMigration {
                            version,
                            name: "m".to_owned(),
                            digest: "d".to_owned(),
                            variables: Default::default(),
                        }),
                        direction: "up".to_owned(),
                        duration_ms: 1,
                    },
                )),
            })),
        }
    }

    #[test]
    fn survives_reopen_and_closes_interrupted_attempts() {
        let dir = std::env::temp_dir().join(format!("baton-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (attempt("a"), attempt("b"));
        {
            let o = Outbox::open(&dir, &StateKey::default()).unwrap();
            o.journal(&finished(&a, 1)).unwrap();
            o.journal(&finished(&b, 1)).unwrap();
            let done = proto::AgentMessage {
                kind: Some(agent_message::Kind::StageResult(proto::StageResult {
                    attempt: Some((&b).into()),
                    outcome: proto::StageOutcome::Succeeded as i32,
                    ..Default::default()
                })),
            };
            o.journal(&done).unwrap();
        }
        let o = Outbox::open(&dir, &StateKey::default()).unwrap();
        assert_eq!(o.attempts(), [a.clone(), b.clone()].into_iter().collect());
        // `a` had no result: it was running when the agent stopped.
        assert_eq!(o.close_interrupted().unwrap(), vec![a.clone()]);
        assert!(o.close_interrupted().unwrap().is_empty());
        let entries = o.entries();
        assert_eq!(entries.len(), 4);
        assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "in order");
        match &entries[3].1.kind {
            Some(agent_message::Kind::StageResult(r)) => {
                assert_eq!(r.outcome, proto::StageOutcome::Lost as i32);
                assert_eq!(attempt_of(r.attempt.clone(), "t").unwrap(), a);
            }
            other => panic!("expected a lost result, got {other:?}"),
        }
        assert_eq!(o.drop_attempt(&b).unwrap().len(), 2);
        assert_eq!(o.attempts(), [a].into_iter().collect());
        drop(o);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Entries are encrypted with the state key; another key is refused at open.
    #[test]
    fn entries_are_sealed_and_another_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("baton-outbox-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = attempt("a");
        let secret = "exported-secret-5150";
        {
            let o = Outbox::open(&dir, &StateKey::default()).unwrap();
            o.journal(&proto::AgentMessage {
                kind: Some(agent_message::Kind::StageResult(proto::StageResult {
                    attempt: Some((&a).into()),
                    outcome: proto::StageOutcome::Succeeded as i32,
                    exported: [("db_password".to_owned(), secret.to_owned())].into(),
                    ..Default::default()
                })),
            })
            .unwrap();
            assert_eq!(o.entries().len(), 1, "a sealed entry reads back");
        }
        // Every byte under the directory (sled keeps a few files and a blob folder).
        fn all_bytes(dir: &Path, into: &mut Vec<u8>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    all_bytes(&path, into);
                } else {
                    into.extend(std::fs::read(&path).unwrap());
                }
            }
        }
        let mut raw = Vec::new();
        all_bytes(&dir, &mut raw);
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        let other = dir.join("other.key");
        std::fs::write(&other, "77".repeat(32)).unwrap();
        let wrong = StateKey::resolve(&BTreeMap::new(), Some(other));
        let mut refused = None;
        for _ in 0..500 {
            match Outbox::open(&dir, &wrong) {
                Err(OutboxError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => {
                    refused = Some(other);
                    break;
                }
            }
        }
        let text = match refused {
            Some(Err(e)) => e.to_string(),
            other => panic!("another key was not refused: {other:?}"),
        };
        assert!(text.contains("does not open"), "{text}");
        assert!(text.contains("--state-key-file"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
