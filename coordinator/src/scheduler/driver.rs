//! The async driver: performs the core's actions for one run.
//!
//! It owns the run's event log (one writer, so sequence numbers are gapless), evaluates
//! conditions, hands stages to a [`StageRunner`] (in-process in local mode, an agent over
//! gRPC in distributed mode: the driver does not know which), times `wait_between_stages`
//! pauses, and persists every transition before acting on it: a migration's start is recorded
//! before the runner may send its first request, and its result the moment it arrives, so a
//! stage interrupted mid-way resumes after its last recorded migration with the same keys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use baton_common::spec::{Project, RetryPolicy};
use baton_common::stage::{
    AppliedMigration, Assignment, AttemptId, Direction, StageEnd, StageEvent, StageReport,
    StageVars,
};
use baton_common::template::{Scope, StageOutcome, StageOutcomes, Template};
use baton_common::vars::{Layer, Layers};
use tokio::sync::mpsc;
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

/// How many attempts a stage gets in one run when its runner keeps losing them (an agent
/// that dies on it every time must not loop forever).
const MAX_ATTEMPTS: u32 = 3;

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
        Ok(Driver {
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

    /// Persists `ops` plus one event, durably, then reports the event.
    async fn record(
        &mut self,
        stage: Option<usize>,
        kind: EventKind,
        mut ops: Vec<Op>,
    ) -> Result<(), DriveError> {
        let event = EventRecord {
            v: FORMAT,
            seq: self.seq,
            at_ms: now_ms(),
            stage: stage.map(|k| self.name(k).to_owned()),
            kind,
        };
        self.seq += 1;
        ops.push(Op::AppendEvent {
            run: self.r.run.id,
            event: event.clone(),
        });
        let store = self.r.store.clone();
        let t = Transition { ops };
        // sled's flush blocks: keep it off the async workers.
        tokio::task::spawn_blocking(move || store.commit(t))
            .await
            .map_err(|e| StoreError::Io(format!("store task failed: {e}")))??;
        // A closed progress channel only means nobody watches.
        let _ = self.progress.send(event).await;
        Ok(())
    }

    async fn run(&mut self, cancel: CancellationToken) -> Result<RunStatus, DriveError> {
        let (tx, mut rx) = mpsc::channel::<RunnerMessage>(1024);
        let (release_tx, mut release_rx) = mpsc::channel::<usize>(64);
        let mut pauses = JoinSet::new();
        let mut queue: std::collections::VecDeque<Event> =
            std::collections::VecDeque::from([Event::Start]);
        let mut cancel_seen = false;
        loop {
            let event = match queue.pop_front() {
                Some(e) => e,
                None => tokio::select! {
                    // Cancellation first: stop starting stages and tell running ones.
                    () = cancel.cancelled(), if !cancel_seen => {
                        cancel_seen = true;
                        for a in self.attempts.iter().flatten() {
                            self.r.runner.cancel(a);
                        }
                        Event::Cancel
                    }
                    // What the runner reports, in the order it happened per attempt.
                    Some(msg) = rx.recv() => match self.on_runner(msg, cancel_seen, &tx).await? {
                        Some(e) => e,
                        None => continue,
                    },
                    // A `wait_between_stages` pause is over.
                    Some(k) = release_rx.recv() => Event::Released { stage: k },
                },
            };
            let actions = self.core.apply(event)?;
            for action in actions {
                match action {
                    Action::CheckCondition(k) => queue.push_back(self.check_condition(k).await?),
                    Action::Dispatch(k) => {
                        if let Some(e) = self.dispatch(k, &tx).await? {
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
                        return Ok(status);
                    }
                }
            }
        }
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
        if self.attempts[k].as_ref() != Some(&msg.attempt) {
            tracing::warn!(attempt = %msg.attempt, "stale report for an attempt that is no longer live; ignored");
            return Ok(None);
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
            RunnerEvent::Step(step) => {
                let started = match &step {
                    StageEvent::MigrationStarted { version, .. } => Some(*version),
                    _ => None,
                };
                self.on_stage_event(k, step).await?;
                if let Some(version) = started {
                    // Durable now: the runner may send.
                    self.r.runner.ack_started(&msg.attempt, version);
                }
                Ok(None)
            }
            RunnerEvent::Lost(why) => {
                self.attempts[k] = None;
                self.spans[k] = None;
                if cancel_seen {
                    let report = StageReport::ended(StageEnd::Cancelled);
                    let ok = self.on_stage_done(k, report, 0).await?;
                    return Ok(Some(Event::StageFinished { stage: k, ok }));
                }
                if self.attempt_counts[k] >= MAX_ATTEMPTS {
                    let message = format!(
                        "attempt {} was lost ({why}); the stage was lost {MAX_ATTEMPTS} times in this run and is not started again",
                        msg.attempt.attempt
                    );
                    let report = StageReport::ended(StageEnd::Failed(message));
                    let ok = self.on_stage_done(k, report, 0).await?;
                    return Ok(Some(Event::StageFinished { stage: k, ok }));
                }
                let message = format!(
                    "attempt {} was lost ({why}); the stage starts again after its last recorded migration, with the same idempotency keys",
                    msg.attempt.attempt
                );
                self.record(Some(k), EventKind::Notice { message }, vec![])
                    .await?;
                Ok(self.dispatch(k, tx).await?)
            }
            RunnerEvent::Ended(report) => {
                self.attempts[k] = None;
                self.spans[k] = None;
                let ms = self.started[k].map_or(0, |t| {
                    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
                });
                let ok = self.on_stage_done(k, report, ms).await?;
                // Recorded: the runner may forget the result.
                self.r.runner.ack_ended(&msg.attempt);
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
        let mut global: BTreeMap<String, String> = spec
            .global
            .env
            .iter()
            .map(|e| (e.name.value.clone(), e.value.clone()))
            .collect();
        global.extend(self.r.overrides.clone());
        let (imported, secret) = self.imports(k)?;
        let vars = StageVars {
            global,
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
                Some(&j) if self.exports[j].is_some() => self.exports[j].clone(),
                // Not in this run (or resumed): the stage's last successful result.
                _ => self
                    .r
                    .store
                    .result(&StageKey::new(&self.r.project_key, &efs.stage.value))?
                    .map(|r| Exports {
                        vars: r.exports,
                        secret: r.secret,
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

    /// The flat scope the engine evaluates for a stage (its condition, its `runs_on`).
    fn flat_vars(&self, vars: &StageVars) -> BTreeMap<String, String> {
        let mut layers = Layers::new();
        layers
            .set(Layer::Global, vars.global.clone())
            .set(Layer::Environment, self.r.condition_env.clone())
            .set(Layer::StageEnv, vars.stage.clone())
            .set(Layer::Imported, vars.imported.clone());
        layers.flatten(baton_common::vars::ENGINE)
    }

    async fn check_condition(&mut self, k: usize) -> Result<Event, DriveError> {
        let stage = &self.r.project.spec.stages[self.spec_index[k]];
        let Some(cond) = &stage.condition else {
            return Ok(Event::ConditionChecked {
                stage: k,
                runs: true,
            });
        };
        let vars = self.flat_vars(&self.stage_vars(k)?.0);
        let scope = Scope {
            vars: Some(&vars),
            auth: None,
            stage_outcomes: Some(&self.outcomes),
            env: Some(&self.r.condition_env),
        };
        match cond.value.evaluate(&scope) {
            Ok(runs) => Ok(Event::ConditionChecked { stage: k, runs }),
            Err(e) => {
                let message = format!(
                    "condition `{}` cannot be evaluated: {}",
                    cond.value.source(),
                    e.message
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
        let (vars, imported_secrets) = self.stage_vars(k)?;
        let flat = self.flat_vars(&vars);
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
        let id = AttemptId {
            run: self.r.run.id,
            stage: stage.name.value.clone(),
            attempt: attempt_no,
        };
        let mut files = BTreeMap::new();
        let mut problem = None;
        for path in &loaded.inputs {
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
        let runs_on = if stage.runs_on.is_empty() {
            &spec.global.runs_on
        } else {
            &stage.runs_on
        };
        let mut selector = Selector::new();
        for (label, value) in runs_on {
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
                // Declared here, plus what was secret where an import came from.
                let mut names: Vec<String> =
                    stage.secrets.iter().map(|s| s.value.clone()).collect();
                for n in imported_secrets {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
                names
            },
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
            },
            vec![],
        )
        .await?;
        if let Some(message) = problem {
            self.outcomes
                .insert(self.name(k).to_owned(), StageOutcome::Failed);
            self.record(Some(k), EventKind::StageFailed { message }, vec![])
                .await?;
            return Ok(Some(Event::StageFinished {
                stage: k,
                ok: false,
            }));
        }
        self.attempts[k] = Some(id);
        self.spans[k] = Some(span);
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
