//! The async driver: performs the core's actions for one run.
//!
//! It owns the run's event log (one writer, so sequence numbers are gapless), evaluates
//! conditions, hands stages to a [`StageRunner`] (in-process in local mode, an agent over
//! gRPC in distributed mode: the driver does not know which), times `wait_between_stages`
//! pauses, and persists every transition before acting on it: a migration's start is recorded
//! before the runner may send its first request, and its result the moment it arrives, so a
//! stage interrupted mid-way resumes after its last recorded migration with the same keys.
//!
//! Group commit: transitions are applied as they happen and made durable together, by one
//! flush, when the driver has nothing more at hand ([`Driver::settle`]); what acts on them
//! (an acknowledgement to the runner, an event to watchers) waits in the driver's outbox
//! until then. Starting an attempt is not such an act: the runner sends nothing before its
//! first migration's start is acknowledged, and that flush covers the stage's start too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use baton_common::spec::{Project, RetryOnLost, RetryPolicy};
use baton_common::stage::{
    AppliedMigration, Assignment, AttemptId, Direction, StageEnd, StageEvent, StageReport,
    StageVars,
};
use baton_common::template::{Scope, StageOutcome, StageOutcomes, Template};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::{Action, Event, RunCore, SkipReason, StageNode};
use crate::planner::Plan;
use crate::runner::{RunnerEvent, RunnerMessage, Selector, StageRunner};
use crate::store::{
    now_ms, AppliedRecord, EventKind, EventRecord, Op, RunRecord, RunStatus, StageKey,
    StageResultRecord, Store, StoreError, Transition, FORMAT,
};

/// Why a run could not be driven (the run's own failures are a [`RunStatus`], not this).
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("scheduler invariant broken: {0}")]
    Core(#[from] super::core::CoreError),
}

/// Which way a run moves its stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunDirection {
    Up,
    /// Roll back each stage's migrations above `to[stage]` (absent: all of them).
    Down {
        to: BTreeMap<String, u64>,
        skip_missing_down: bool,
    },
}

/// The bytes of every file the plan read, by path: what assignments ship, so a stage runs
/// exactly what was planned even if a file changes on disk during the run.
pub type PlannedFiles = BTreeMap<PathBuf, Vec<u8>>;

/// Everything one run needs.
pub struct RunContext {
    pub project: Arc<Project>,
    pub plan: Arc<Plan>,
    pub files: Arc<PlannedFiles>,
    pub store: Arc<dyn Store>,
    /// Who runs the stages.
    pub runner: Arc<dyn StageRunner>,
    /// Names the project in the store (stage history is keyed by it).
    pub project_key: String,
    pub run: RunRecord,
    /// Sequence number of the next event (1 for a new run; after the last one when resuming).
    pub next_seq: u64,
    /// Stages of this run that already succeeded (a resumed run).
    pub done: BTreeSet<String>,
    /// Attempts each stage already had in this run before this driver (a resumed run), so
    /// attempt numbers keep growing.
    pub prior_attempts: BTreeMap<String, u32>,
    /// `env "KEY"` in conditions (evaluated here, not where stages run): this process's
    /// environment in local mode, empty on a coordinator (agents' environments stay there).
    pub condition_env: BTreeMap<String, String>,
    /// `--set KEY=VALUE`: on top of `global.env`.
    pub overrides: BTreeMap<String, String>,
    pub direction: RunDirection,
    /// After a coordinator restart: attempts that were running, by stage, to adopt (their
    /// agents may still hold them) instead of starting new ones.
    pub adopt: BTreeMap<String, AttemptId>,
    /// Migrations started and not recorded done, by stage (a resumed run): in doubt if their
    /// attempt is lost.
    pub in_doubt: BTreeMap<String, (u64, String)>,
    /// Operators' decisions (`baton runs resolve`).
    pub control: Option<mpsc::Receiver<Control>>,
    /// Stops driving without recording anything (the coordinator shuts down; the run stays
    /// running in the store and is picked up again on restart). Unlike a cancel.
    pub stop: CancellationToken,
    /// Where the driver's flushes run; see [`FlushOn`].
    pub flush_on: FlushOn,
}

/// Where a driver runs its group commit's flush (sled's flush blocks its caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOn {
    /// On the blocking pool, so the async workers go on meanwhile: a coordinator, whose
    /// workers also answer agents' heartbeats and every other run, never waits for a disk.
    BlockingPool,
    /// On the driver's own worker thread, which waits for it: local mode, where one run is
    /// all the process does. It saves two thread hand-offs per flush (to the blocking pool
    /// and back), a third of the command's context switches at 20 ms; the other worker
    /// takes what waits meanwhile.
    DriverThread,
}

/// A request to the driver of a live run.
#[derive(Debug)]
pub enum Control {
    /// Decide a stage that needs attention.
    Resolve {
        stage: String,
        resolution: Resolution,
        by: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Approve or reject what the run awaits (the first gate waiting). Replies with the
    /// gate decided, or why the caller may not decide it.
    Decide {
        approve: bool,
        by: crate::runs::Identity,
        comment: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// An approval gate's state in a run (see `EventKind::AwaitingApproval`).
#[derive(Debug, Clone, PartialEq)]
enum Gate {
    /// Waiting; the stages held behind it (plan order indices).
    Waiting {
        parked: Vec<usize>,
        approvers: Vec<String>,
        separate_from_submitter: bool,
        /// When the wait ends in a rejection (as recorded, so a restart keeps it).
        timeout_at_ms: Option<u64>,
    },
    Approved,
    Rejected(String),
}

/// What an operator decided about a stage that needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The migration in doubt took effect: recorded as applied, the stage as succeeded.
    Succeeded,
    /// It did not: the stage fails (`on_failure` applies).
    Failed,
    /// Start the stage again; the migration in doubt is re-sent with the same key.
    Retry,
}

impl Resolution {
    pub fn parse(s: &str) -> Option<Resolution> {
        match s {
            "succeeded" => Some(Resolution::Succeeded),
            "failed" => Some(Resolution::Failed),
            "retry" => Some(Resolution::Retry),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Succeeded => "succeeded",
            Resolution::Failed => "failed",
            Resolution::Retry => "retry",
        }
    }
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("run", &self.run.id)
            .field("project", &self.project_key)
            .finish_non_exhaustive()
    }
}

/// What a finished stage exported, and which names are secret.
#[derive(Debug, Clone)]
struct Exports {
    vars: BTreeMap<String, String>,
    secret: Vec<String>,
}

/// What the driver does once the transitions recorded before it are durable: nothing that
/// acts on what was recorded (a runner allowed to send, a result acknowledged, an event
/// shown) leaves the driver before it is on disk. See [`Driver::settle`].
enum Effect {
    /// An event for whoever watches the run.
    Progress(EventRecord),
    /// Adopt an attempt that was running when the coordinator stopped.
    Adopt {
        attempt: AttemptId,
        events: mpsc::Sender<RunnerMessage>,
    },
    /// The migration's start is recorded: the runner may send.
    AckStarted(AttemptId, u64),
    /// The attempt's end is recorded: the runner may forget it.
    AckEnded(AttemptId),
}

/// How many runner reports already waiting the driver takes into one batch before it makes
/// them durable and acts on them (so a flood of reports cannot hold back the batch's acts).
const MAX_BATCH: usize = 64;

/// How long a batch that nothing but watchers waits on may wait for the first step of an
/// attempt it started, so that one flush covers both (see [`Driver::holdable`]). Longer
/// than a stage takes to prepare in-process or on an agent nearby; a stage that takes
/// longer (a health check first) only has the batch flushed at the end of the wait.
const FIRST_STEP_HOLD: std::time::Duration = std::time::Duration::from_millis(2);

/// How many attempts a stage gets in one run when its runner keeps losing them before it
/// needs attention (an agent that dies on it every time must not loop forever).
const MAX_ATTEMPTS: u32 = 3;

/// The next gate that timed out, or never when there is no channel.
async fn recv_gate(rx: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next request on `control`, or never when there is no channel.
async fn recv(control: &mut Option<mpsc::Receiver<Control>>) -> Option<Control> {
    match control {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The gates a run's recorded events opened and decided.
fn gates_of(events: &[EventRecord]) -> Vec<(String, Gate)> {
    let mut gates: Vec<(String, Gate)> = Vec::new();
    for e in events {
        let (gate, state) = match &e.kind {
            EventKind::AwaitingApproval {
                gate,
                approvers,
                separate_from_submitter,
                timeout_at_ms,
                ..
            } => (
                gate,
                Gate::Waiting {
                    parked: Vec::new(),
                    approvers: approvers.clone(),
                    separate_from_submitter: *separate_from_submitter,
                    timeout_at_ms: *timeout_at_ms,
                },
            ),
            EventKind::Approved { gate, .. } => (gate, Gate::Approved),
            EventKind::Rejected { gate, by, reason } => {
                (gate, Gate::Rejected(rejection(by, reason)))
            }
            _ => continue,
        };
        match gates.iter_mut().find(|(g, _)| g == gate) {
            Some((_, s)) => *s = state,
            None => gates.push((gate.clone(), state)),
        }
    }
    gates
}

/// The first gate a run's recorded events leave waiting: its name, approvers and whether
/// the submitter is excluded.
pub fn waiting_gate(events: &[EventRecord]) -> Option<(String, Vec<String>, bool)> {
    gates_of(events).into_iter().find_map(|(g, s)| match s {
        Gate::Waiting {
            approvers,
            separate_from_submitter,
            ..
        } => Some((g, approvers, separate_from_submitter)),
        _ => None,
    })
}

/// Why gated stages fail: `rejected by bob: not today`.
fn rejection(by: &str, reason: &str) -> String {
    if reason.is_empty() {
        format!("not approved: rejected by {by}")
    } else {
        format!("not approved: rejected by {by}: {reason}")
    }
}

/// Whether `who` may decide a gate with these rules: one of `approvers` (a name, or
/// `group:NAME` of one of its groups; none listed: anyone), and not the submitter when the
/// gate says so. `Err` says why not.
pub fn may_approve(
    who: &crate::runs::Identity,
    approvers: &[String],
    separate_from_submitter: bool,
    submitter: &str,
) -> Result<(), String> {
    if separate_from_submitter && who.name == submitter {
        return Err(format!(
            "{} submitted this run and may not approve it (separate_from_submitter): someone else must",
            who.name
        ));
    }
    let listed = approvers.is_empty()
        || approvers.iter().any(|a| match a.strip_prefix("group:") {
            Some(g) => who.groups.iter().any(|mine| mine == g),
            None => *a == who.name,
        });
    if listed {
        Ok(())
    } else {
        Err(format!(
            "{} may not approve this run: approvers are {}{}",
            who.name,
            approvers.join(", "),
            if who.groups.is_empty() {
                String::new()
            } else {
                format!(" ({}'s groups: {})", who.name, who.groups.join(", "))
            }
        ))
    }
}

/// Drives a run to its end. Every event is persisted, then sent to `progress`.
pub async fn drive(
    run: RunContext,
    cancel: CancellationToken,
    progress: mpsc::Sender<EventRecord>,
) -> Result<RunStatus, DriveError> {
    let mut d = Driver::new(run, progress)?;
    d.run(cancel).await
}

struct Driver {
    r: RunContext,
    progress: mpsc::Sender<EventRecord>,
    seq: u64,
    core: RunCore,
    /// Plan order index -> index into `project.spec.stages`.
    spec_index: Vec<usize>,
    /// What each stage of this run exported, once it succeeded.
    exports: Vec<Option<Exports>>,
    outcomes: StageOutcomes,
    started: Vec<Option<Instant>>,
    /// Each stage's live attempt; messages about any other attempt are stale.
    attempts: Vec<Option<AttemptId>>,
    /// Attempts this driver started per stage.
    attempt_counts: Vec<u32>,
    /// Each live attempt's `stage` span (a child of the run's); closed when it ends.
    spans: Vec<Option<tracing::Span>>,
    /// Plan order index by stage name, for routing runner messages.
    by_name: BTreeMap<String, usize>,
    /// The migration each stage started and has not finished: in doubt if its attempt is lost.
    in_doubt: Vec<Option<(u64, String)>>,
    /// Stages waiting for `baton runs resolve`.
    needs_attention: Vec<bool>,
    /// The migration the stage's live attempt last started (a start sent again by the same
    /// attempt, after a reconnect, is recorded once).
    gated: Vec<Option<u64>>,
    /// Attempts whose stale messages were already recorded once.
    stale_seen: BTreeSet<AttemptId>,
    /// Approval gates by name (`environment`, `stage NAME`), in the order they opened.
    gates: Vec<(String, Gate)>,
    /// Where a gate's timeout is reported.
    timeouts: (mpsc::Sender<String>, Option<mpsc::Receiver<String>>),
    /// Gates whose timer runs.
    armed: BTreeSet<String>,
    /// Gates this driver has asked for (a gate left waiting by an earlier part of the run
    /// is asked again once).
    asked: BTreeSet<String>,
    /// The gates' timers (aborted when the driver goes).
    timers: JoinSet<()>,
    /// What waits for the transitions recorded so far to be durable, in order.
    outbox: Vec<Effect>,
    /// Transitions were applied since the last flush.
    dirty: bool,
    /// Stages whose attempt was started and has reported no step yet.
    fresh: BTreeSet<usize>,
}

impl Driver {
    fn new(r: RunContext, progress: mpsc::Sender<EventRecord>) -> Result<Self, DriveError> {
        let plan = r.plan.clone();
        let pos: BTreeMap<&str, usize> = plan
            .order
            .iter()
            .enumerate()
            .map(|(k, s)| (s.name.as_str(), k))
            .collect();
        let nodes: Vec<StageNode> = plan
            .order
            .iter()
            .map(|s| {
                let spec = &r.project.spec.stages[s.index];
                StageNode {
                    name: s.name.clone(),
                    // Dependencies outside the run succeeded earlier (the planner checked).
                    deps: s
                        .depends_on
                        .iter()
                        .filter_map(|d| pos.get(d.as_str()).copied())
                        .collect(),
                    on_failure: s.on_failure,
                    has_condition: spec.condition.is_some() && r.direction == RunDirection::Up,
                }
            })
            .collect();
        let max = plan
            .max_concurrent_stages
            .map_or(0, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let mut core = RunCore::new(nodes, max, plan.wait_between_stages.unwrap_or_default());
        let n = plan.order.len();
        let mut exports = vec![None; n];
        let mut outcomes = StageOutcomes::new();
        for (k, s) in plan.order.iter().enumerate() {
            if r.done.contains(&s.name) {
                core.preset_succeeded(k);
                outcomes.insert(s.name.clone(), StageOutcome::Succeeded);
                let key = StageKey::new(&r.project_key, &s.name);
                exports[k] = r.store.result(&key)?.map(|res| Exports {
                    vars: res.exports,
                    secret: res.secret,
                });
            }
        }
        let in_doubt = plan
            .order
            .iter()
            .map(|s| r.in_doubt.get(&s.name).cloned())
            .collect();
        // A resumed run keeps the approvals it was given (they bound to this same plan).
        let gates = if r.next_seq > 1 {
            gates_of(&r.store.events(r.run.id, 0)?)
        } else {
            Vec::new()
        };
        let (timeout_tx, timeout_rx) = mpsc::channel(16);
        Ok(Driver {
            gates,
            timeouts: (timeout_tx, Some(timeout_rx)),
            armed: BTreeSet::new(),
            asked: BTreeSet::new(),
            timers: JoinSet::new(),
            outbox: Vec::new(),
            dirty: false,
            fresh: BTreeSet::new(),
            in_doubt,
            needs_attention: vec![false; n],
            gated: vec![None; n],
            stale_seen: BTreeSet::new(),
            seq: r.next_seq,
            spec_index: plan.order.iter().map(|s| s.index).collect(),
            by_name: pos.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect(),
            r,
            progress,
            core,
            exports,
            outcomes,
            started: vec![None; n],
            attempts: vec![None; n],
            attempt_counts: vec![0; n],
            spans: vec![None; n],
        })
    }

    fn name(&self, k: usize) -> &str {
        &self.r.plan.order[k].name
    }

    fn key(&self, k: usize) -> StageKey {
        StageKey::new(&self.r.project_key, self.name(k))
    }

    /// [`Driver::record`] with an audit log entry in the same transition.
    async fn record_audited(
        &mut self,
        stage: Option<usize>,
        kind: EventKind,
        action: &'static str,
        by: &str,
        reason: &str,
    ) -> Result<(), DriveError> {
        let event = self.next_event(stage, kind);
        let mut t = Transition::new();
        t.push(Op::AppendEvent {
            run: self.r.run.id,
            event: event.clone(),
        });
        let entry = crate::audit::Entry {
            action,
            by: by.to_owned(),
            project: self.r.project_key.clone(),
            run: self.r.run.id,
            release: self.r.plan.release.clone(),
            reason: reason.to_owned(),
        };
        let store = self.r.store.clone();
        tokio::task::spawn_blocking(move || {
            crate::audit::commit_with(store.as_ref(), vec![entry], t)
        })
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))??;
        // That commit flushed everything written before it, too.
        self.dirty = false;
        self.outbox.push(Effect::Progress(event));
        Ok(())
    }

    /// The approvals stage `k` needs before it starts (up runs only): the environment's,
    /// then its own.
    fn gates_for(&self, k: usize) -> Vec<(String, baton_common::spec::ApprovalSpec)> {
        if self.r.direction != RunDirection::Up {
            return Vec::new();
        }
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        let mut out = Vec::new();
        // A run that changes nothing needs no approval; a stage with nothing pending neither.
        let changes = self.r.plan.order.iter().any(|s| !s.pending.is_empty());
        if let (Some(a), Some(env), true) = (
            spec.environment_approval(),
            spec.environment_name(),
            changes,
        ) {
            out.push((format!("environment {env}"), a.clone()));
        }
        if let Some(a) = spec
            .approval_of(stage)
            .filter(|_| !self.r.plan.order[k].pending.is_empty())
        {
            out.push((format!("stage {}", stage.name.value), a.clone()));
        }
        out
    }

    /// Starts stage `k`, unless an approval it needs is pending (then it waits behind it; the
    /// first to wait opens the gate) or was refused (then it fails).
    async fn gate_or_dispatch(
        &mut self,
        k: usize,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Option<Event>, DriveError> {
        for (gate, spec) in self.gates_for(k) {
            match self.gates.iter_mut().find(|(g, _)| *g == gate) {
                Some((_, Gate::Approved)) => continue,
                Some((_, Gate::Rejected(why))) => {
                    let message = why.clone();
                    return self.fail_stage(k, message).await;
                }
                Some((_, Gate::Waiting { parked, .. })) => {
                    parked.push(k);
                    // A gate still waiting from before a restart: asked again (same deadline),
                    // so whoever watches this part of the run sees who may decide, and how.
                    if self.asked.insert(gate.clone()) {
                        let timeout_at_ms = self.deadline(&gate);
                        self.ask_approval(&gate, &spec, k, timeout_at_ms).await?;
                    }
                    self.arm_timeout(&gate);
                    return Ok(None);
                }
                None => {
                    let timeout_at_ms = spec.timeout.as_ref().map(|t| {
                        now_ms()
                            .saturating_add(u64::try_from(t.value.as_millis()).unwrap_or(u64::MAX))
                    });
                    self.gates.push((
                        gate.clone(),
                        Gate::Waiting {
                            parked: vec![k],
                            approvers: spec.approvers.iter().map(|a| a.value.clone()).collect(),
                            separate_from_submitter: spec.separate_from_submitter,
                            timeout_at_ms,
                        },
                    ));
                    self.asked.insert(gate.clone());
                    self.ask_approval(&gate, &spec, k, timeout_at_ms).await?;
                    self.arm_timeout(&gate);
                    return Ok(None);
                }
            }
        }
        self.dispatch(k, tx).await
    }

    /// Records that the run awaits `gate`'s approval (first held stage `k`): the plan digest,
    /// what the approval lets run (the whole run's pending migrations for the environment's
    /// gate, the stage's for its own), who may decide, and until when.
    async fn ask_approval(
        &mut self,
        gate: &str,
        spec: &baton_common::spec::ApprovalSpec,
        k: usize,
        timeout_at_ms: Option<u64>,
    ) -> Result<(), DriveError> {
        let plan = self
            .r
            .plan
            .order
            .iter()
            .enumerate()
            .filter(|(i, s)| !s.pending.is_empty() && (gate.starts_with("environment ") || *i == k))
            .map(|(_, s)| {
                let pending: Vec<String> = s
                    .pending
                    .iter()
                    .map(|(v, n)| format!("{v:03}_{n}"))
                    .collect();
                format!("{}: {}", s.name, pending.join(", "))
            })
            .collect();
        let kind = EventKind::AwaitingApproval {
            plan,
            gate: gate.to_owned(),
            run: self.r.run.id,
            digest: self.r.plan.digest.clone(),
            approvers: spec.approvers.iter().map(|a| a.value.clone()).collect(),
            separate_from_submitter: spec.separate_from_submitter,
            submitter: self.r.run.by.clone(),
            timeout_at_ms,
        };
        let stage = gate.starts_with("stage ").then_some(k);
        self.record(stage, kind, vec![]).await
    }

    /// The deadline `gate` was opened with.
    fn deadline(&self, gate: &str) -> Option<u64> {
        self.gates.iter().find_map(|(g, s)| match s {
            Gate::Waiting { timeout_at_ms, .. } if g == gate => *timeout_at_ms,
            _ => None,
        })
    }

    /// Starts `gate`'s timer (once per driver), to the deadline its event recorded. The
    /// timer goes with the driver.
    fn arm_timeout(&mut self, gate: &str) {
        let Some(at) = self.deadline(gate) else {
            return;
        };
        if !self.armed.insert(gate.to_owned()) {
            return;
        }
        let wait = std::time::Duration::from_millis(at.saturating_sub(now_ms()));
        let tx = self.timeouts.0.clone();
        let gate = gate.to_owned();
        self.timers.spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = tx.send(gate).await;
        });
    }

    /// Every stage held behind a gate, released from it (the run is cancelled).
    fn unpark_all(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (_, g) in &mut self.gates {
            if let Gate::Waiting { parked, .. } = g {
                out.append(parked);
            }
        }
        out
    }

    /// An operator's decision on the first gate waiting: checked against who may decide it.
    async fn decide(
        &mut self,
        approve: bool,
        by: &crate::runs::Identity,
        comment: &str,
        queue: &mut std::collections::VecDeque<Event>,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Result<String, String>, DriveError> {
        let Some((gate, approvers, separate)) =
            self.gates.iter().find_map(|(g, state)| match state {
                Gate::Waiting {
                    approvers,
                    separate_from_submitter,
                    ..
                } => Some((g.clone(), approvers.clone(), *separate_from_submitter)),
                _ => None,
            })
        else {
            return Ok(Err(format!(
                "run {} is not awaiting an approval",
                self.r.run.id
            )));
        };
        if let Err(why) = may_approve(by, &approvers, separate, &self.r.run.by) {
            return Ok(Err(why));
        }
        let parked = self.decide_gate(&gate, approve, &by.name, comment).await?;
        self.release(parked, queue, tx).await?;
        Ok(Ok(gate))
    }

    /// Stages that waited behind a gate just decided go on through [`Driver::gate_or_dispatch`]:
    /// started, held by their next gate, or failed with the refusal's reason.
    async fn release(
        &mut self,
        parked: Vec<usize>,
        queue: &mut std::collections::VecDeque<Event>,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<(), DriveError> {
        for k in parked {
            if let Some(e) = self.gate_or_dispatch(k, tx).await? {
                queue.push_back(e);
            }
        }
        Ok(())
    }

    /// Fails stage `k` before it starts (a refused approval, a problem building its
    /// assignment): recorded, and the event the core needs.
    async fn fail_stage(&mut self, k: usize, message: String) -> Result<Option<Event>, DriveError> {
        self.outcomes
            .insert(self.name(k).to_owned(), StageOutcome::Failed);
        self.record(Some(k), EventKind::StageFailed { message }, vec![])
            .await?;
        Ok(Some(Event::StageFinished {
            stage: k,
            ok: false,
        }))
    }

    /// Records `gate` as approved or rejected (with the audit entry); returns the stages
    /// that waited behind it. A gate that is not waiting is left as it is.
    async fn decide_gate(
        &mut self,
        gate: &str,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<Vec<usize>, DriveError> {
        let Some((_, state)) = self.gates.iter_mut().find(|(g, _)| g == gate) else {
            return Ok(Vec::new());
        };
        let Gate::Waiting { parked, .. } = state else {
            return Ok(Vec::new());
        };
        let parked = std::mem::take(parked);
        *state = if approve {
            Gate::Approved
        } else {
            Gate::Rejected(rejection(by, comment))
        };
        let stage = gate
            .strip_prefix("stage ")
            .and_then(|name| self.by_name.get(name).copied());
        let (kind, action) = if approve {
            (
                EventKind::Approved {
                    gate: gate.to_owned(),
                    by: by.to_owned(),
                    digest: self.r.plan.digest.clone(),
                    comment: comment.to_owned(),
                },
                "approve",
            )
        } else {
            (
                EventKind::Rejected {
                    gate: gate.to_owned(),
                    by: by.to_owned(),
                    reason: comment.to_owned(),
                },
                if by == "baton" { "timeout" } else { "reject" },
            )
        };
        self.record_audited(stage, kind, action, by, comment)
            .await?;
        Ok(parked)
    }

    /// The run's next event (its sequence number taken).
    fn next_event(&mut self, stage: Option<usize>, kind: EventKind) -> EventRecord {
        let event = EventRecord {
            v: FORMAT,
            seq: self.seq,
            at_ms: now_ms(),
            stage: stage.map(|k| self.name(k).to_owned()),
            kind,
        };
        self.seq += 1;
        event
    }

    /// Applies `ops` plus one event as one transition; it becomes durable, and the event is
    /// reported, at the next [`Driver::settle`].
    async fn record(
        &mut self,
        stage: Option<usize>,
        kind: EventKind,
        mut ops: Vec<Op>,
    ) -> Result<(), DriveError> {
        let event = self.next_event(stage, kind);
        ops.push(Op::AppendEvent {
            run: self.r.run.id,
            event: event.clone(),
        });
        // Log lines and request notes change nothing anyone acts on: durable with the next
        // transition's flush, so a flood of them costs no flush of its own.
        let lazy = ops.len() == 1
            && matches!(
                event.kind,
                EventKind::Log { .. } | EventKind::Request { .. }
            );
        // Applying is in memory (sled writes its log in the background); the flush that
        // makes it durable is `settle`'s.
        self.r.store.commit_unflushed(Transition { ops })?;
        self.dirty |= !lazy;
        self.outbox.push(Effect::Progress(event));
        Ok(())
    }

    /// Group commit: makes every transition recorded so far durable with one flush, then
    /// performs what waited for it, in order. The loop settles whenever it has nothing
    /// more at hand, so the reports that arrived together (16 stages finishing at once) share
    /// one flush, and none of their effects leaves before it.
    async fn settle(&mut self) -> Result<(), DriveError> {
        if std::mem::take(&mut self.dirty) {
            match self.r.flush_on {
                FlushOn::DriverThread => self.r.store.sync()?,
                FlushOn::BlockingPool => {
                    let store = self.r.store.clone();
                    tokio::task::spawn_blocking(move || store.sync())
                        .await
                        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))??;
                }
            }
        }
        for effect in std::mem::take(&mut self.outbox) {
            match effect {
                // A closed progress channel only means nobody watches.
                Effect::Progress(event) => {
                    let _ = self.progress.send(event).await;
                }
                Effect::Adopt { attempt, events } => self.r.runner.adopt(&attempt, events),
                Effect::AckStarted(attempt, version) => {
                    self.r.runner.ack_started(&attempt, version);
                }
                Effect::AckEnded(attempt) => self.r.runner.ack_ended(&attempt),
            }
        }
        Ok(())
    }

    /// Whether the batch may wait a moment before its flush: it recorded something, only
    /// watchers (and runners forgetting results they already reported) wait on it, and an
    /// attempt the driver started has not reported its first step yet. That step (a migration's
    /// start, whose acknowledgement lets the runner send) needs a flush of its own, and
    /// that flush covers this batch too (the store recovers a prefix): at a stage boundary
    /// the previous stage's end and the next stage's first migration then share one flush
    /// instead of taking two in a row. Nothing is acted on before its flush either way.
    fn holdable(&self) -> bool {
        self.dirty
            && !self.fresh.is_empty()
            && self
                .outbox
                .iter()
                .all(|e| matches!(e, Effect::Progress(_) | Effect::AckEnded(_)))
    }

    async fn run(&mut self, cancel: CancellationToken) -> Result<RunStatus, DriveError> {
        let (tx, mut rx) = mpsc::channel::<RunnerMessage>(1024);
        let (release_tx, mut release_rx) = mpsc::channel::<usize>(64);
        let mut pauses = JoinSet::new();
        let mut queue: std::collections::VecDeque<Event> =
            std::collections::VecDeque::from([Event::Start]);
        let mut cancel_seen = false;
        let mut control = self.r.control.take();
        let mut timeouts = self.timeouts.1.take();
        let stop = self.r.stop.clone();
        // Runner reports taken since the last settle.
        let mut batch = 0;
        // Until when the current batch may wait for a fresh attempt's first step.
        let mut hold: Option<tokio::time::Instant> = None;
        loop {
            // What is already waiting joins the batch; then the batch is settled (made
            // durable and acted on) before the driver waits for more.
            let ready = match queue.is_empty() && batch < MAX_BATCH {
                true => rx.try_recv().ok(),
                false => None,
            };
            let event = match (queue.pop_front(), ready) {
                (Some(e), _) => e,
                (None, Some(msg)) => {
                    batch += 1;
                    match self.on_runner(msg, cancel_seen, &tx).await? {
                        Some(e) => e,
                        None => continue,
                    }
                }
                (None, None) if batch < MAX_BATCH && self.holdable() => {
                    let until =
                        *hold.get_or_insert_with(|| tokio::time::Instant::now() + FIRST_STEP_HOLD);
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(msg)) => {
                            batch += 1;
                            match self.on_runner(msg, cancel_seen, &tx).await? {
                                Some(e) => e,
                                None => continue,
                            }
                        }
                        // Waited long enough (the driver holds a sender: never closed).
                        _ => {
                            self.fresh.clear();
                            continue;
                        }
                    }
                }
                (None, None) => {
                    batch = 0;
                    hold = None;
                    self.settle().await?;
                    tokio::select! {
                    // The coordinator stops: leave the run as it is in the store.
                    () = stop.cancelled() => return Ok(RunStatus::Running),
                    // Cancellation first: stop starting stages and tell running ones.
                    () = cancel.cancelled(), if !cancel_seen => {
                        cancel_seen = true;
                        for a in self.attempts.iter().flatten() {
                            self.r.runner.cancel(a);
                        }
                        // Stages held for an approval will not start now.
                        for k in self.unpark_all() {
                            self.outcomes.insert(self.name(k).to_owned(), StageOutcome::Failed);
                            self.record(Some(k), EventKind::StageFailed { message: "cancelled while awaiting approval".to_owned() }, vec![]).await?;
                            queue.push_back(Event::StageFinished { stage: k, ok: false });
                        }
                        // A stage waiting for a decision will not get one now.
                        for k in 0..self.needs_attention.len() {
                            if std::mem::take(&mut self.needs_attention[k]) {
                                let message = match &self.in_doubt[k] {
                                    Some((v, n)) => format!("cancelled while it needed attention; migration {v:03}_{n} stays in doubt (check the target)"),
                                    None => "cancelled while it needed attention".to_owned(),
                                };
                                self.outcomes.insert(self.name(k).to_owned(), StageOutcome::Failed);
                                self.record(Some(k), EventKind::StageFailed { message }, vec![]).await?;
                                queue.push_back(Event::StageFinished { stage: k, ok: false });
                            }
                        }
                        Event::Cancel
                    }
                    Some(c) = recv(&mut control) => match c {
                        Control::Decide { approve, by, comment, reply } => {
                            let answer = self.decide(approve, &by, &comment, &mut queue, &tx).await?;
                            self.settle().await?;
                            let _ = reply.send(answer);
                            continue;
                        }
                        c => match self.on_control(c, &tx).await? {
                            Some(e) => e,
                            None => continue,
                        },
                    },
                    // What the runner reports, in the order it happened per attempt.
                    Some(msg) = rx.recv() => match self.on_runner(msg, cancel_seen, &tx).await? {
                        Some(e) => e,
                        None => continue,
                    },
                    // A `wait_between_stages` pause is over.
                    Some(k) = release_rx.recv() => Event::Released { stage: k },
                    // An approval was not given in time.
                    Some(gate) = recv_gate(&mut timeouts) => {
                        let parked = self.decide_gate(&gate, false, "baton", "no approval before the timeout (on_timeout: reject)").await?;
                        self.release(parked, &mut queue, &tx).await?;
                        continue;
                    }
                    }
                }
            };
            let actions = self.core.apply(event)?;
            for action in actions {
                match action {
                    Action::CheckCondition(k) => queue.push_back(self.check_condition(k).await?),
                    Action::Dispatch(k) => {
                        if let Some(e) = self.gate_or_dispatch(k, &tx).await? {
                            queue.push_back(e);
                        }
                    }
                    Action::Hold { stage, wait } => {
                        let release = release_tx.clone();
                        pauses.spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = release.send(stage).await;
                        });
                    }
                    Action::Skip { stage, reason } => {
                        self.outcomes
                            .insert(self.name(stage).to_owned(), StageOutcome::Skipped);
                        let reason = match reason {
                            SkipReason::Condition => "condition".to_owned(),
                            SkipReason::FailedDependency => {
                                "a dependency failed (skip_dependents)".to_owned()
                            }
                        };
                        self.record(Some(stage), EventKind::StageSkipped { reason }, vec![])
                            .await?;
                    }
                    Action::NotRun { stage } => {
                        let reason = if cancel_seen {
                            "the run was cancelled"
                        } else {
                            "the run stopped after a failure"
                        };
                        self.record(
                            Some(stage),
                            EventKind::StageNotRun {
                                reason: reason.to_owned(),
                            },
                            vec![],
                        )
                        .await?;
                    }
                    Action::Finish(status) => {
                        pauses.abort_all();
                        let mut run = self.r.run.clone();
                        run.status = status;
                        run.finished_at_ms = Some(now_ms());
                        self.record(
                            None,
                            EventKind::RunFinished { status },
                            vec![Op::PutRun(run)],
                        )
                        .await?;
                        self.settle().await?;
                        return Ok(status);
                    }
                }
            }
        }
    }

    /// Handles an operator's request; returns the core event it causes, if any.
    async fn on_control(
        &mut self,
        c: Control,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Option<Event>, DriveError> {
        let Control::Resolve {
            stage,
            resolution,
            by,
            reply,
        } = c
        else {
            return Ok(None);
        };
        let Some(&k) = self.by_name.get(&stage) else {
            let _ = reply.send(Err(format!("run {} has no stage `{stage}`", self.r.run.id)));
            return Ok(None);
        };
        if !self.needs_attention[k] {
            let _ = reply.send(Err(format!(
                "stage `{stage}` of run {} does not need attention",
                self.r.run.id
            )));
            return Ok(None);
        }
        self.needs_attention[k] = false;
        let mut ops = Vec::new();
        let doubt = self.in_doubt[k].take();
        if resolution == Resolution::Succeeded {
            if let Some((version, name)) = &doubt {
                let key = self.key(k);
                if self.r.direction == RunDirection::Up {
                    let digest = self.r.project.stages[self.spec_index[k]]
                        .migrations
                        .iter()
                        .find(|m| m.version == *version)
                        .map(|m| m.digest.clone())
                        .unwrap_or_default();
                    ops.push(Op::PutApplied {
                        key,
                        record: AppliedRecord {
                            v: FORMAT,
                            version: *version,
                            name: name.clone(),
                            digest,
                            applied_at_ms: now_ms(),
                            run_id: self.r.run.id,
                            vars: BTreeMap::new(),
                        },
                    });
                } else {
                    ops.push(Op::RemoveApplied {
                        key,
                        version: *version,
                    });
                }
            }
        }
        tracing::info!(
            run = self.r.run.id,
            stage,
            resolution = resolution.as_str(),
            by,
            "stage resolved"
        );
        self.record(
            Some(k),
            EventKind::StageResolved {
                resolution: resolution.as_str().to_owned(),
                by: by.clone(),
            },
            ops,
        )
        .await?;
        // The operator's decision is acknowledged once it is durable.
        self.settle().await?;
        let _ = reply.send(Ok(()));
        match resolution {
            Resolution::Retry => Ok(self.dispatch(k, tx).await?),
            Resolution::Failed => {
                let message = match &doubt {
                    Some((v, n)) => format!(
                        "resolved as failed by {by}: migration {v:03}_{n} did not take effect"
                    ),
                    None => format!("resolved as failed by {by}"),
                };
                let ok = self
                    .on_stage_done(k, StageReport::ended(StageEnd::Failed(message)), 0)
                    .await?;
                Ok(Some(Event::StageFinished { stage: k, ok }))
            }
            Resolution::Succeeded => {
                // What the stage exports now: what its recorded migrations extracted.
                let key = self.key(k);
                let mut exported = BTreeMap::new();
                for a in self.r.store.applied(&key)? {
                    exported.extend(a.vars);
                }
                let spec = &self.r.project.spec.stages[self.spec_index[k]];
                let previous = self
                    .r
                    .store
                    .result(&key)?
                    .map(|r| r.secret)
                    .unwrap_or_default();
                let secret_exports = exported
                    .keys()
                    .filter(|n| previous.contains(n) || spec.secrets.iter().any(|s| &s.value == *n))
                    .cloned()
                    .collect();
                let report = StageReport {
                    end: StageEnd::Succeeded,
                    migrations: Vec::new(),
                    exported,
                    secret_exports,
                };
                let ok = self.on_stage_done(k, report, 0).await?;
                Ok(Some(Event::StageFinished { stage: k, ok }))
            }
        }
    }

    /// What happens when stage `k`'s attempt is lost: cancelled (unconfirmed) in a cancelled
    /// run; needs attention when a migration is in doubt and the stage's `retry_on_lost` is
    /// `never`, or after [`MAX_ATTEMPTS`] attempts in this driver; else started again.
    async fn on_lost(
        &mut self,
        k: usize,
        attempt: &AttemptId,
        why: &str,
        cancel_seen: bool,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Option<Event>, DriveError> {
        self.attempts[k] = None;
        self.spans[k] = None;
        if cancel_seen {
            let message = format!(
                "cancelled (unconfirmed): attempt {} was lost ({why})",
                attempt.attempt
            );
            let ok = self
                .on_stage_done(k, StageReport::ended(StageEnd::Failed(message)), 0)
                .await?;
            return Ok(Some(Event::StageFinished { stage: k, ok }));
        }
        let doubt = self.in_doubt[k].clone();
        let never = doubt
            .as_ref()
            .is_some_and(|(v, _)| self.retry_on_lost(k, *v) == RetryOnLost::Never);
        // Lost too often: a person looks before it is started again.
        let again_and_again = self.attempt_counts[k] >= MAX_ATTEMPTS;
        if never || again_and_again {
            let migration = doubt
                .as_ref()
                .map(|(v, n)| format!("{v:03}_{n}"))
                .unwrap_or_default();
            let what = if never {
                format!("while migration {migration} was in flight; whether it took effect is unknown. Check the target, then")
            } else {
                format!(
                    "the stage was lost {MAX_ATTEMPTS} times in this run. Check its agents, then"
                )
            };
            let message = format!(
                "attempt {} was lost ({why}) {what}: baton runs resolve {} --stage {} --as succeeded|failed|retry",
                attempt.attempt,
                self.r.run.id,
                self.name(k)
            );
            self.needs_attention[k] = true;
            self.record(
                Some(k),
                EventKind::NeedsAttention {
                    attempt: attempt.attempt,
                    migration,
                    message,
                },
                vec![],
            )
            .await?;
            return Ok(None);
        }
        let message = match &self.in_doubt[k] {
            Some((v, n)) => format!("{why}; the stage starts again after its last recorded migration, re-sending {v:03}_{n} with the same Idempotency-Key (retry_on_lost: safe)"),
            None => format!("{why}; nothing was in flight, the stage starts again after its last recorded migration"),
        };
        self.record(
            Some(k),
            EventKind::AttemptLost {
                attempt: attempt.attempt,
                message,
            },
            vec![],
        )
        .await?;
        self.dispatch(k, tx).await
    }

    /// The stage's `retry_on_lost` (else `global`'s), else the in-doubt migration's own.
    fn retry_on_lost(&self, k: usize, version: u64) -> RetryOnLost {
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        stage
            .retry_on_lost
            .or(spec.global.retry_on_lost)
            .unwrap_or_else(|| {
                self.r.project.stages[self.spec_index[k]]
                    .migrations
                    .iter()
                    .find(|m| m.version == version)
                    .map(|m| m.retry_on_lost)
                    .unwrap_or_default()
            })
    }

    /// Handles one runner report; returns the core event it causes, if any.
    async fn on_runner(
        &mut self,
        msg: RunnerMessage,
        cancel_seen: bool,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Option<Event>, DriveError> {
        let Some(&k) = self.by_name.get(&msg.attempt.stage) else {
            tracing::warn!(attempt = %msg.attempt, "runner reported on a stage this run does not have");
            return Ok(None);
        };
        if let RunnerEvent::Stale(why) = &msg.event {
            if self.stale_seen.insert(msg.attempt.clone()) {
                let message = format!(
                    "a message from attempt {} was rejected: {why}",
                    msg.attempt.attempt
                );
                self.record(
                    Some(k),
                    EventKind::StaleResult {
                        attempt: msg.attempt.attempt,
                        token: msg.attempt.token,
                        message,
                    },
                    vec![],
                )
                .await?;
            }
            return Ok(None);
        }
        if self.attempts[k].as_ref() != Some(&msg.attempt) {
            tracing::warn!(attempt = %msg.attempt, "stale report for an attempt that is no longer live; ignored");
            return Ok(None);
        }
        if !matches!(msg.event, RunnerEvent::Placed { .. }) {
            self.fresh.remove(&k);
        }
        match msg.event {
            RunnerEvent::Waiting(why) => {
                self.record(Some(k), EventKind::Notice { message: why }, vec![])
                    .await?;
                Ok(None)
            }
            RunnerEvent::Placed { runner } => {
                tracing::debug!(attempt = %msg.attempt, %runner, "attempt placed");
                if runner != crate::runner::in_process::LOCAL {
                    let message = format!("attempt {} runs on agent {runner}", msg.attempt.attempt);
                    self.record(Some(k), EventKind::Notice { message }, vec![])
                        .await?;
                }
                Ok(None)
            }
            RunnerEvent::Stale(_) => Ok(None),
            RunnerEvent::Step(step) => {
                let started = match &step {
                    StageEvent::MigrationStarted { version, .. } => Some(*version),
                    _ => None,
                };
                // A start sent again (the agent reconnected before its acknowledgement came)
                // is recorded once and acknowledged again.
                let again = started.is_some() && self.gated[k] == started;
                if !again {
                    self.on_stage_event(k, step).await?;
                }
                if let Some(version) = started {
                    // Once durable, the runner may send.
                    self.outbox
                        .push(Effect::AckStarted(msg.attempt.clone(), version));
                }
                Ok(None)
            }
            RunnerEvent::Lost(why) => {
                let event = self.on_lost(k, &msg.attempt, &why, cancel_seen, tx).await?;
                // Once recorded, an agent that reported the loss may forget the attempt.
                self.outbox.push(Effect::AckEnded(msg.attempt.clone()));
                Ok(event)
            }
            RunnerEvent::Ended(report) => {
                self.attempts[k] = None;
                self.spans[k] = None;
                let ms = self.started[k].map_or(0, |t| {
                    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
                });
                let ok = self.on_stage_done(k, report, ms).await?;
                // Once recorded, the runner may forget the result.
                self.outbox.push(Effect::AckEnded(msg.attempt.clone()));
                Ok(Some(Event::StageFinished { stage: k, ok }))
            }
        }
    }

    /// The variables the engine gives stage `k` (the layers it knows; see
    /// `baton_common::vars`): `global.env` with the run's overrides, the stage's `env`, and
    /// what it imports (this run's exports, else the last recorded ones). The runner adds the
    /// environment where the stage runs and everything the stage's own files define.
    /// Also returns the imported names that were secret at their source.
    fn stage_vars(&self, k: usize) -> Result<(StageVars, Vec<String>), DriveError> {
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        let mut global: BTreeMap<String, String> = spec.global_vars();
        global.extend(self.r.overrides.clone());
        let (imported, secret) = self.imports(k)?;
        let vars = StageVars {
            global,
            literal_globals: self.r.overrides.keys().cloned().collect(),
            stage: stage
                .env
                .iter()
                .map(|e| (e.name.value.clone(), e.value.clone()))
                .collect(),
            imported,
        };
        Ok((vars, secret))
    }

    /// What stage `k` imports with `env_from_stages` (this run's exports, else the last
    /// recorded ones), and which of those names were secret where they came from: secretness
    /// travels with the value.
    fn imports(&self, k: usize) -> Result<(BTreeMap<String, String>, Vec<String>), DriveError> {
        let stage = &self.r.project.spec.stages[self.spec_index[k]];
        let mut imported = BTreeMap::new();
        let mut secret = Vec::new();
        for efs in &stage.env_from_stages {
            let source = match self.by_name.get(&efs.stage.value) {
                Some(&j) if self.exports[j].is_some() => {
                    self.exports[j].as_ref().map(std::borrow::Cow::Borrowed)
                }
                // Not in this run (or resumed): the stage's last successful result.
                _ => self
                    .r
                    .store
                    .result(&StageKey::new(&self.r.project_key, &efs.stage.value))?
                    .map(|r| {
                        std::borrow::Cow::Owned(Exports {
                            vars: r.exports,
                            secret: r.secret,
                        })
                    }),
            };
            if let Some(source) = source {
                for v in &efs.vars {
                    if let Some(value) = source.vars.get(&v.value) {
                        imported.insert(v.value.clone(), value.clone());
                        if source.secret.contains(&v.value) && !secret.contains(&v.value) {
                            secret.push(v.value.clone());
                        }
                    }
                }
            }
        }
        Ok((imported, secret))
    }

    /// Stage `k`'s `parameters_file`, its `#{name}#` tokens replaced with what the engine
    /// gives the stage (`vars`): the parameters become the stage's variables, above its
    /// `env`. An error says which token has no value, in which file and line.
    fn parameters(&self, k: usize, vars: &StageVars) -> Result<BTreeMap<String, String>, String> {
        let stage = &self.r.project.spec.stages[self.spec_index[k]];
        let Some(rel) = &stage.parameters_file else {
            return Ok(BTreeMap::new());
        };
        let path = baton_common::spec::beside(&self.r.project.stages_file, &rel.value);
        let text = self
            .r
            .files
            .get(&path)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| {
                format!(
                    "parameters_file `{}` is not among the files the run was planned with",
                    path.display()
                )
            })?;
        let flat = self.flat_vars(vars);
        baton_common::spec::parameters::parameters(text, |n| flat.get(n).cloned()).map_err(|e| {
            format!(
                "parameters_file `{}`: {e}; define it in the environment's variables (env_file or env), global.env or the stage's env",
                path.display()
            )
        })
    }

    /// The flat scope the engine evaluates for a stage (its `runs_on`, its parameters):
    /// values whose templates need what only the stage's runner knows are left out (see
    /// `Layers::resolve_known`).
    fn flat_vars(&self, vars: &StageVars) -> BTreeMap<String, String> {
        vars.layers(self.r.condition_env.clone())
            .resolve_known(baton_common::vars::ENGINE)
    }

    async fn check_condition(&mut self, k: usize) -> Result<Event, DriveError> {
        let stage = &self.r.project.spec.stages[self.spec_index[k]];
        let Some(cond) = &stage.condition else {
            return Ok(Event::ConditionChecked {
                stage: k,
                runs: true,
            });
        };
        let stage_vars = self.stage_vars(k)?.0;
        let (vars, env) = stage_vars.condition_inputs(&self.r.condition_env);
        let scope = Scope {
            vars: Some(&vars),
            auth: None,
            stage_outcomes: Some(&self.outcomes),
            env: Some(&env),
            below: None,
        };
        match cond.value.evaluate(&scope).map_err(|e| e.message) {
            Ok(runs) => Ok(Event::ConditionChecked { stage: k, runs }),
            Err(e) => {
                let message = format!(
                    "condition `{}` cannot be evaluated: {e}",
                    cond.value.source(),
                );
                self.outcomes
                    .insert(self.name(k).to_owned(), StageOutcome::Failed);
                self.record(Some(k), EventKind::StageFailed { message }, vec![])
                    .await?;
                Ok(Event::ConditionFailed { stage: k })
            }
        }
    }

    /// Starts an attempt of stage `k` on the runner. Returns a core event when the stage
    /// cannot start at all (its files are missing from the plan, a `runs_on` value does not
    /// render): then it has failed.
    async fn dispatch(
        &mut self,
        k: usize,
        tx: &mpsc::Sender<RunnerMessage>,
    ) -> Result<Option<Event>, DriveError> {
        let key = self.key(k);
        let applied: Vec<AppliedMigration> = self
            .r
            .store
            .applied(&key)?
            .into_iter()
            .map(|a| AppliedMigration {
                version: a.version,
                name: a.name,
                digest: a.digest,
                vars: a.vars,
            })
            .collect();
        let (mut vars, imported_secrets) = self.stage_vars(k)?;
        let earlier_secrets = self
            .r
            .store
            .result(&key)?
            .map(|r| r.secret)
            .unwrap_or_default();
        let mut problem = None;
        match self.parameters(k, &vars) {
            Ok(params) => vars.stage.extend(params),
            Err(message) => problem = Some(message),
        }
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        let loaded = &self.r.project.stages[self.spec_index[k]];
        let attempt_no = self
            .r
            .prior_attempts
            .get(self.name(k))
            .copied()
            .unwrap_or(0)
            + self.attempt_counts[k]
            + 1;
        self.attempt_counts[k] += 1;
        if let Some(id) = self.r.adopt.remove(&stage.name.value) {
            // Running when the coordinator stopped: its agent may still hold it.
            let message = format!(
                "attempt {} was running when the coordinator stopped; waiting for its agent to reattach",
                id.attempt
            );
            self.started[k] = Some(Instant::now());
            // The migration in flight was started by this same attempt.
            self.gated[k] = self.in_doubt[k].as_ref().map(|(v, _)| *v);
            self.attempts[k] = Some(id.clone());
            self.spans[k] =
                Some(tracing::info_span!("stage", stage = %id.stage, attempt = id.attempt));
            self.record(Some(k), EventKind::Notice { message }, vec![])
                .await?;
            self.outbox.push(Effect::Adopt {
                attempt: id,
                events: tx.clone(),
            });
            return Ok(None);
        }
        // No flush of its own: cheap enough for the async worker.
        let token = self.r.store.fencing_token()?;
        let id = AttemptId {
            run: self.r.run.id,
            stage: stage.name.value.clone(),
            attempt: attempt_no,
            token,
        };
        // `up --to VERSION`: migrations above the cap are not shipped, so they do not exist
        // for the executor (they stay pending).
        let beyond_cap: BTreeSet<&PathBuf> = match self.r.plan.up_to.get(&stage.name.value) {
            Some(cap) if matches!(self.r.direction, RunDirection::Up) => loaded
                .migrations
                .iter()
                .filter(|m| m.version > *cap)
                .map(|m| &m.file)
                .collect(),
            _ => BTreeSet::new(),
        };
        let mut files = BTreeMap::new();
        for path in loaded.inputs.iter().filter(|p| !beyond_cap.contains(p)) {
            match self.r.files.get(path) {
                Some(b) => {
                    files.insert(path.clone(), b.clone());
                }
                None => {
                    problem = Some(format!(
                        "`{}` is not among the files the run was planned with",
                        path.display()
                    ))
                }
            }
        }
        let runs_on = spec.runs_on_of(stage);
        let mut selector = Selector::new();
        // Flattening copies the whole environment: only for a stage that has labels to render.
        let flat = match runs_on.is_empty() {
            true => BTreeMap::new(),
            false => self.flat_vars(&vars),
        };
        for (label, value) in &runs_on {
            let scope = Scope::with_vars(&flat);
            match Template::parse(value).and_then(|t| t.render(&scope)) {
                Ok(v) => {
                    selector.insert(label.clone(), v);
                }
                Err(e) => {
                    problem = Some(format!(
                        "runs_on `{label}` cannot be rendered: {}",
                        e.message
                    ))
                }
            }
        }
        let assignment = Assignment {
            attempt: id.clone(),
            files,
            config_file: loaded.config_file.clone(),
            vars,
            secrets: {
                // Declared here, plus what was secret where an import came from, plus what
                // was secret in the stage's earlier results: once secret, always secret (a
                // no-op run or a rotated value never shows the old one in clear).
                let mut names: Vec<String> =
                    stage.secrets.iter().map(|s| s.value.clone()).collect();
                for n in imported_secrets.into_iter().chain(earlier_secrets) {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
                names
            },
            not_secret: stage
                .not_secret
                .iter()
                .chain(spec.global.not_secret.iter())
                .map(|s| s.value.clone())
                .collect(),
            applied,
            direction: match &self.r.direction {
                RunDirection::Up => Direction::Up,
                RunDirection::Down {
                    to,
                    skip_missing_down,
                } => Direction::Down {
                    to: to.get(&stage.name.value).copied().unwrap_or(0),
                    skip_missing_down: *skip_missing_down,
                },
            },
            retry: RetryPolicy::default()
                .overlay(spec.global.retry.as_ref())
                .overlay(stage.retry.as_ref()),
            timeout: stage.timeout.as_ref().map(|t| t.value),
            key_scope: self.r.run.key_scope(self.r.store.id()),
            traceparent: String::new(),
            // What `files` parse to, unless `up --to` left some migrations out of them.
            parsed: beyond_cap.is_empty().then(|| Arc::clone(loaded)),
        };
        let span = tracing::info_span!("stage", stage = %stage.name.value, attempt = attempt_no);
        let mut assignment = assignment;
        assignment.traceparent = baton_common::telemetry::traceparent(&span);
        if self.started[k].is_none() {
            self.started[k] = Some(Instant::now());
        }
        self.record(
            Some(k),
            EventKind::StageStarted {
                attempt: attempt_no,
                token,
            },
            vec![],
        )
        .await?;
        if let Some(message) = problem {
            return self.fail_stage(k, message).await;
        }
        self.attempts[k] = Some(id);
        self.spans[k] = Some(span);
        self.gated[k] = None;
        self.fresh.insert(k);
        // Starting an attempt acts on no target: the runner sends nothing before its first
        // migration's start is recorded and acknowledged, and that flush covers this
        // stage's start too (the store recovers a prefix). So it starts now, and its first
        // step usually joins this batch's flush instead of waiting for one of its own.
        self.r.runner.start(assignment, selector, tx.clone());
        Ok(None)
    }

    async fn on_stage_event(&mut self, k: usize, ev: StageEvent) -> Result<(), DriveError> {
        match ev {
            StageEvent::MigrationStarted {
                version,
                name,
                direction,
            } => {
                self.in_doubt[k] = Some((version, name.clone()));
                self.gated[k] = Some(version);
                self.record(
                    Some(k),
                    EventKind::MigrationStarted {
                        version,
                        name,
                        direction: direction.to_owned(),
                    },
                    vec![],
                )
                .await
            }
            StageEvent::RequestSent {
                version,
                method,
                url,
                status,
                duration,
                attempt,
                error,
            } => {
                let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
                self.record(
                    Some(k),
                    EventKind::Request {
                        version,
                        method,
                        url,
                        status,
                        duration_ms,
                        attempt,
                        error,
                    },
                    vec![],
                )
                .await
            }
            StageEvent::Log { line, .. } => {
                self.record(Some(k), EventKind::Log { line }, vec![]).await
            }
            StageEvent::MigrationFinished(m) => {
                let key = self.key(k);
                if self.in_doubt[k].as_ref().map(|(v, _)| *v) == Some(m.version) {
                    self.in_doubt[k] = None;
                }
                // Sent again (the agent reconnected, or the coordinator restarted before
                // acknowledging it): the history already says so; record it once.
                let recorded = self.r.store.is_applied(&key, m.version)?;
                if recorded == (m.direction == "up") {
                    tracing::debug!(stage = %key.stage, version = m.version, "migration end sent again; already recorded");
                    return Ok(());
                }
                let op = if m.direction == "up" {
                    Op::PutApplied {
                        key,
                        record: AppliedRecord {
                            v: FORMAT,
                            version: m.version,
                            name: m.name.clone(),
                            digest: m.digest.clone(),
                            applied_at_ms: now_ms(),
                            run_id: self.r.run.id,
                            vars: m.extracted.clone(),
                        },
                    }
                } else {
                    Op::RemoveApplied {
                        key,
                        version: m.version,
                    }
                };
                let duration_ms = u64::try_from(m.duration.as_millis()).unwrap_or(u64::MAX);
                let kind = EventKind::MigrationDone {
                    version: m.version,
                    name: m.name,
                    direction: m.direction.to_owned(),
                    duration_ms,
                };
                self.record(Some(k), kind, vec![op]).await
            }
        }
    }

    /// Records how a stage ended; returns whether it succeeded.
    async fn on_stage_done(
        &mut self,
        k: usize,
        report: StageReport,
        duration_ms: u64,
    ) -> Result<bool, DriveError> {
        match report.end {
            StageEnd::Succeeded => {
                let key = self.key(k);
                // After a rollback the stage exports what its remaining migrations extracted.
                let op = if self.r.direction != RunDirection::Up && report.exported.is_empty() {
                    Op::RemoveResult { key }
                } else {
                    Op::PutResult {
                        key,
                        record: StageResultRecord {
                            v: FORMAT,
                            run_id: self.r.run.id,
                            at_ms: now_ms(),
                            exports: report.exported.clone(),
                            secret: report.secret_exports.clone(),
                        },
                    }
                };
                self.exports[k] = Some(Exports {
                    vars: report.exported,
                    secret: report.secret_exports,
                });
                self.outcomes
                    .insert(self.name(k).to_owned(), StageOutcome::Succeeded);
                self.record(Some(k), EventKind::StageSucceeded { duration_ms }, vec![op])
                    .await?;
                Ok(true)
            }
            end => {
                let message = match end {
                    StageEnd::Failed(m) => m,
                    StageEnd::Cancelled => "cancelled".to_owned(),
                    StageEnd::TimedOut => {
                        let spec = &self.r.project.spec.stages[self.spec_index[k]];
                        let t = spec
                            .timeout
                            .as_ref()
                            .map(|t| baton_common::spec::duration::format(t.value))
                            .unwrap_or_default();
                        format!("timed out after {t}")
                    }
                    StageEnd::Lost(why) => format!("lost: {why}"),
                    StageEnd::Succeeded => unreachable!("handled above"),
                };
                self.outcomes
                    .insert(self.name(k).to_owned(), StageOutcome::Failed);
                self.record(Some(k), EventKind::StageFailed { message }, vec![])
                    .await?;
                Ok(false)
            }
        }
    }
}
