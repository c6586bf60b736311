//! Durable state: runs, their append-only event logs, per-stage migration history and the
//! latest exported variables of each stage.
//!
//! [`Store`] is the only interface; [`SledStore`] keeps state in sled (the only module that
//! names sled) and [`MemoryStore`] in memory. One test suite runs against both.
//!
//! Rules (RELIABILITY.md): every state transition is one [`Transition`], applied atomically
//! across trees and flushed before `commit` returns, so whatever the caller does next (send a
//! dispatch, print a result) happens only after the state that caused it is durable. Records
//! are JSON with a format version `v`, so the format can evolve. Keys are big-endian so
//! ranges scan in order.

mod memory;
mod sled_store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use baton_common::seal::StateKey;
pub use memory::MemoryStore;
pub use sled_store::SledStore;

use crate::planner::Selection;

/// The record format this build writes.
pub const FORMAT: u32 = 1;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory `{dir}` is in use by another baton process{holder} (only one may open it at a time: wait for it to finish, or stop it)")]
    Locked {
        dir: String,
        /// ` (pid 123: baton stages up, since 21:50:03 UTC)` when the holder is known and
        /// alive; empty otherwise.
        holder: String,
    },
    /// The directory could not be opened for a reason that is not damage (a path or
    /// permission mistake, a full disk): `hint` says what to do.
    #[error("cannot open the state in `{dir}`: {message} ({hint})")]
    Open {
        dir: String,
        message: String,
        hint: String,
    },
    /// The state is damaged: a record fails its checksum or does not decode, or records
    /// were lost (fewer than the high-water mark says were written). Nothing was changed.
    #[error("the state in `{dir}` is damaged: {what}: {message}. Nothing was changed. Stop every baton using it, move it aside and restore it from a backup taken after the last run you trust; without one, moving it aside starts with no history, so the next run sends every migration again with new idempotency keys: first confirm on the target which resources exist")]
    Damaged {
        dir: String,
        what: String,
        message: String,
    },
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("a stored record is damaged ({what}): {message}")]
    Corrupt { what: String, message: String },
    #[error("the state in `{dir}` holds a {what} written by a newer baton (record format {format}; this baton reads up to {FORMAT}): upgrade baton. Nothing was changed")]
    Newer {
        dir: String,
        what: String,
        format: u64,
    },
}

/// How a run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    SucceededWithFailures,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::SucceededWithFailures => "succeeded with failures",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub v: u32,
    pub id: u64,
    /// The run's random id (32 hex digits), created with the run: with the store's id it
    /// makes the run's idempotency keys unique everywhere. Empty in runs recorded before it
    /// existed; those keep their old keys (see [`RunRecord::key_scope`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub project: String,
    /// `up` or `down`.
    pub direction: String,
    pub selection: Selection,
    pub plan_digest: String,
    /// The frozen plan the run executes (stages, order, waves, inputs), as JSON.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub plan: serde_json::Value,
    pub created_at_ms: u64,
    pub status: RunStatus,
    pub finished_at_ms: Option<u64>,
    /// Who submitted it (see [`AuditRecord::by`]); empty in runs recorded before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// The release it ran (see `planner::Plan::release`); empty in runs recorded before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// A down run: how far each stage goes back, so an interrupted one resumes as it began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<DownRecord>,
}

/// How a down run rolls back (`stages down`, or the rollback of a failed run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownRecord {
    /// Per stage, the version to roll back to (absent: all of its migrations).
    pub to: BTreeMap<String, u64>,
    pub skip_missing_down: bool,
}

impl RunRecord {
    /// What makes this run's idempotency keys its own: the store's id and the run's random
    /// id. Stable for the run's life, so a resumed or re-sent request carries the same key.
    pub fn key_scope(&self, store_id: &str) -> String {
        if self.uid.is_empty() {
            // Recorded by an older baton: resume with the keys it already sent.
            self.id.to_string()
        } else {
            format!("{store_id}/{}", self.uid)
        }
    }
}

/// One entry of a run's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub v: u32,
    pub seq: u64,
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    pub kind: EventKind,
}

/// What happened. Texts are masked before they are recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    RunStarted {
        stages: Vec<String>,
    },
    StageStarted {
        attempt: u32,
        /// The attempt's fencing token (0: local mode, or recorded before tokens existed).
        #[serde(default, skip_serializing_if = "is_zero")]
        token: u64,
    },
    /// The attempt was lost (its agent vanished, or gave it up) with nothing in doubt, or
    /// with `retry_on_lost: safe`: the stage starts again.
    AttemptLost {
        attempt: u32,
        message: String,
    },
    /// The attempt was lost with a migration in doubt and the stage's `retry_on_lost` is
    /// `never`: the stage waits for `baton runs resolve`.
    NeedsAttention {
        attempt: u32,
        /// The migration in doubt, `NNN_name`.
        migration: String,
        message: String,
    },
    /// An operator decided a stage that needed attention.
    StageResolved {
        /// `succeeded`, `failed` or `retry`.
        resolution: String,
        by: String,
    },
    /// A message from a replaced attempt (older fencing token) arrived and was rejected.
    StaleResult {
        attempt: u32,
        token: u64,
        message: String,
    },
    MigrationStarted {
        version: u64,
        name: String,
        direction: String,
    },
    Request {
        version: u64,
        method: String,
        url: String,
        status: Option<u16>,
        duration_ms: u64,
        attempt: u32,
        /// Why no answer came (`connection refused`); absent with a status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Log {
        line: String,
    },
    MigrationDone {
        version: u64,
        name: String,
        direction: String,
        duration_ms: u64,
    },
    StageSucceeded {
        duration_ms: u64,
    },
    StageFailed {
        message: String,
    },
    StageSkipped {
        reason: String,
    },
    StageNotRun {
        reason: String,
    },
    RunFinished {
        status: RunStatus,
    },
    Notice {
        message: String,
    },
    /// The run waits for an approval before the stages behind `gate` start: `environment`
    /// (the environment's `approval:`, before its first stage) or `stage` (the event's
    /// stage's own `approval:`). Says who may approve.
    AwaitingApproval {
        gate: String,
        /// The run (for the commands the message shows).
        #[serde(default)]
        run: u64,
        /// The plan the approval is for: an approval binds to it.
        digest: String,
        #[serde(default)]
        approvers: Vec<String>,
        #[serde(default)]
        separate_from_submitter: bool,
        #[serde(default)]
        submitter: String,
        /// When the wait ends in a rejection (`timeout`), ms since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_at_ms: Option<u64>,
        /// What the approval lets run: per stage behind the gate, `stage: 001_a, 002_b`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        plan: Vec<String>,
    },
    Approved {
        gate: String,
        by: String,
        digest: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        comment: String,
    },
    /// Rejected by `by` (or by `baton` when the wait timed out): the gated stages fail.
    Rejected {
        gate: String,
        by: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A migration recorded in a stage's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub v: u32,
    pub version: u64,
    pub name: String,
    pub digest: String,
    pub applied_at_ms: u64,
    pub run_id: u64,
    /// What its `up` extracted.
    pub vars: BTreeMap<String, String>,
}

/// The latest successful result of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResultRecord {
    pub v: u32,
    pub run_id: u64,
    pub at_ms: u64,
    /// Every variable the stage exports.
    pub exports: BTreeMap<String, String>,
    /// Names among `exports` whose values are secret.
    pub secret: Vec<String>,
}

/// Where a stage's state lives: project, environment, stage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StageKey {
    pub project: String,
    pub environment: String,
    pub stage: String,
}

impl StageKey {
    /// The key of `stage` under a project key (`stages.yaml`, or `stages.yaml/prod` for an
    /// environment: see `runs::scoped_key`). The implicit environment is `default`, as
    /// before environments existed, so earlier history keeps its keys.
    pub fn new(project: &str, stage: &str) -> Self {
        let (project, environment) = project.split_once('/').unwrap_or((project, "default"));
        StageKey {
            project: project.to_owned(),
            environment: environment.to_owned(),
            stage: stage.to_owned(),
        }
    }

    /// `project NUL environment NUL stage NUL`: a prefix no other stage's key extends.
    pub fn bytes(&self) -> Vec<u8> {
        let mut k = Vec::new();
        for part in [&self.project, &self.environment, &self.stage] {
            k.extend_from_slice(part.as_bytes());
            k.push(0);
        }
        k
    }
}

/// One write of a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    PutRun(RunRecord),
    AppendEvent {
        run: u64,
        event: EventRecord,
    },
    PutApplied {
        key: StageKey,
        record: AppliedRecord,
    },
    RemoveApplied {
        key: StageKey,
        version: u64,
    },
    PutResult {
        key: StageKey,
        record: StageResultRecord,
    },
    RemoveResult {
        key: StageKey,
    },
    /// What the coordinator keeps to rebuild a run after a restart (opaque here).
    PutSubmission {
        run: u64,
        bytes: Vec<u8>,
    },
    /// An entry of the audit log, at its `seq` (built by `crate::audit`, which chains it).
    AppendAudit(AuditRecord),
}

/// One entry of the audit log: who did what, when, where. Entries are hash-chained: `hash`
/// is SHA-256 over the previous entry's hash and this entry's fields, so an edited or
/// removed entry breaks the chain (`baton audit verify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u32,
    /// 0, 1, 2, ... without gaps.
    pub seq: u64,
    pub at_ms: u64,
    /// `submit`, `approve`, `reject`, `cancel`, `override`, `resolve`, `down`, `timeout`.
    pub action: String,
    /// The identity that acted (`alice`, the OS user locally; the operator token's name on a
    /// coordinator; `baton` for what baton decided itself, such as a timeout).
    pub by: String,
    /// The project's store key (`stages.yaml/prod`).
    pub project: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub environment: String,
    /// The run it concerns (0: none).
    #[serde(default)]
    pub run: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// Why (`--reason`, a comment, the stage resolved), masked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The previous entry's hash (empty for the first).
    pub prev: String,
    pub hash: String,
}

/// Writes that become durable together, or not at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transition {
    pub ops: Vec<Op>,
}

impl Transition {
    pub fn new() -> Self {
        Transition::default()
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }
}

/// The durable state. Implementations are shared across threads; `commit` blocks until the
/// transition is durable (call it from `spawn_blocking` in async code).
pub trait Store: Send + Sync {
    /// This store's random id, created with it and never changed: part of every
    /// idempotency key, so two state directories (two projects, environments, CI runners or
    /// a reset `.baton`) never send the same key.
    fn id(&self) -> &str;
    /// A new id, strictly larger than every id handed out before, across restarts. It is
    /// not flushed on its own: it becomes durable with the next commit (which a caller makes
    /// before anyone sees the id, as the run that holds it is committed), so only an id that
    /// no durable record holds can be handed out again after a crash.
    fn next_id(&self) -> Result<u64, StoreError>;
    /// A fencing token: strictly larger than every token handed out before, across crashes
    /// (not necessarily dense), without a flush of its own.
    fn fencing_token(&self) -> Result<u64, StoreError>;
    /// Applies a transition atomically and makes it durable.
    fn commit(&self, t: Transition) -> Result<(), StoreError>;
    /// Applies a transition atomically; it becomes durable with the next [`Store::commit`]
    /// (which flushes everything written before it). For records nothing acts on (log lines,
    /// request notes), so a flood of them costs no flush each and cannot hold up the
    /// transitions that matter.
    fn commit_unflushed(&self, t: Transition) -> Result<(), StoreError> {
        self.commit(t)
    }
    /// Makes every transition applied before this call durable (with
    /// [`Store::commit_unflushed`], this is how a batch of transitions shares one flush).
    fn sync(&self) -> Result<(), StoreError>;
    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError>;
    /// Whether run `id` exists, without reading its record (which holds the whole plan).
    fn has_run(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.run(id)?.is_some())
    }
    /// Every run, oldest first.
    fn runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// A run's events from `from_seq` on, in order.
    fn events(&self, run: u64, from_seq: u64) -> Result<Vec<EventRecord>, StoreError>;
    /// A stage's applied migrations, lowest version first.
    fn applied(&self, key: &StageKey) -> Result<Vec<AppliedRecord>, StoreError>;
    /// Whether the stage's history holds `version` (one lookup, nothing decoded).
    fn is_applied(&self, key: &StageKey, version: u64) -> Result<bool, StoreError>;
    fn result(&self, key: &StageKey) -> Result<Option<StageResultRecord>, StoreError>;
    /// What [`Op::PutSubmission`] kept for `run`.
    fn submission(&self, run: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// The audit log, oldest first.
    fn audit(&self) -> Result<Vec<AuditRecord>, StoreError>;
    /// The newest audit entry.
    fn last_audit(&self) -> Result<Option<AuditRecord>, StoreError>;
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    what: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })?;
    let format = v.get("v").and_then(serde_json::Value::as_u64).unwrap_or(0);
    if format > u64::from(FORMAT) {
        return Err(StoreError::Newer {
            dir: String::new(),
            what: what.to_owned(),
            format,
        });
    }
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
