//! The async driver: performs the core's actions for one run.
//!
//! It owns the run's event log (one writer, so sequence numbers are gapless), evaluates
//! conditions, starts stages on the in-process executor (local mode; the gRPC transport will
//! replace only the dispatch), times `wait_between_stages` pauses, and persists every
//! transition before acting on it: a migration result is recorded the moment it arrives, so a
//! stage interrupted mid-way resumes after its last recorded migration.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use baton_agent::executor::{
    execute, AppliedMigration, Direction, StageEnd, StageEvent, StageReport, StageTask, VarLayers,
};
use baton_common::spec::{Project, RetryPolicy, SourceFiles};
use baton_common::template::{Scope, StageOutcome, StageOutcomes};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::{Action, Event, RunCore, SkipReason, StageNode};
use crate::planner::Plan;
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

/// Everything one local run needs.
pub struct LocalRun {
    pub project: Arc<Project>,
    pub plan: Arc<Plan>,
    pub store: Arc<dyn Store>,
    /// Names the project in the store (stage history is keyed by it).
    pub project_key: String,
    pub run: RunRecord,
    /// Sequence number of the next event (1 for a new run; after the last one when resuming).
    pub next_seq: u64,
    /// Stages of this run that already succeeded (a resumed run).
    pub done: BTreeSet<String>,
    /// The environment where stages run (local mode: this process's).
    pub process_env: BTreeMap<String, String>,
    /// `--set KEY=VALUE`: on top of `global.env`.
    pub overrides: BTreeMap<String, String>,
    pub files: Arc<dyn SourceFiles + Send + Sync>,
    pub direction: RunDirection,
}

impl std::fmt::Debug for LocalRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRun")
            .field("run", &self.run.id)
            .field("project", &self.project_key)
            .finish_non_exhaustive()
    }
}

/// Messages to the driver's loop from the tasks it started.
enum Internal {
    Stage(usize, StageEvent),
    /// A migration is about to touch the target: record that, then answer.
    Started(usize, StageEvent, tokio::sync::oneshot::Sender<()>),
    Done(usize, StageReport, u64),
    Released(usize),
}

/// Drives a run to its end. Every event is persisted, then sent to `progress`.
pub async fn drive(
    run: LocalRun,
    cancel: CancellationToken,
    progress: mpsc::Sender<EventRecord>,
) -> Result<RunStatus, DriveError> {
    let mut d = Driver::new(run, progress);
    d.run(cancel).await
}

struct Driver {
    r: LocalRun,
    progress: mpsc::Sender<EventRecord>,
    seq: u64,
    core: RunCore,
    /// Plan order index -> index into `project.spec.stages`.
    spec_index: Vec<usize>,
    /// What each stage of this run exported, once it succeeded.
    exports: Vec<Option<BTreeMap<String, String>>>,
    outcomes: StageOutcomes,
    started: Vec<Option<Instant>>,
}

impl Driver {
    fn new(r: LocalRun, progress: mpsc::Sender<EventRecord>) -> Self {
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
                exports[k] = r.store.result(&key).ok().flatten().map(|res| res.exports);
            }
        }
        Driver {
            seq: r.next_seq,
            spec_index: plan.order.iter().map(|s| s.index).collect(),
            r,
            progress,
            core,
            exports,
            outcomes,
            started: vec![None; n],
        }
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
        let (tx, mut rx) = mpsc::channel::<Internal>(1024);
        let mut tasks = JoinSet::new();
        let stage_cancel = cancel.child_token();
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
                        stage_cancel.cancel();
                        Event::Cancel
                    }
                    msg = rx.recv() => match msg {
                        Some(Internal::Stage(k, ev)) => {
                            self.on_stage_event(k, ev).await?;
                            continue;
                        }
                        Some(Internal::Started(k, ev, ack)) => {
                            self.on_stage_event(k, ev).await?;
                            // Durable now: the executor may send.
                            let _ = ack.send(());
                            continue;
                        }
                        Some(Internal::Done(k, report, ms)) => {
                            let ok = self.on_stage_done(k, report, ms).await?;
                            Event::StageFinished { stage: k, ok }
                        }
                        Some(Internal::Released(k)) => Event::Released { stage: k },
                        // The driver holds a sender, so the channel never closes here.
                        None => Event::Cancel,
                    },
                },
            };
            let actions = self.core.apply(event)?;
            for action in actions {
                match action {
                    Action::CheckCondition(k) => queue.push_back(self.check_condition(k).await?),
                    Action::Dispatch(k) => {
                        self.dispatch(k, &tx, &mut tasks, stage_cancel.child_token())
                            .await?
                    }
                    Action::Hold { stage, wait } => {
                        let tx = tx.clone();
                        tasks.spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = tx.send(Internal::Released(stage)).await;
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
                        tasks.abort_all();
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

    /// The variables a stage sees before its own config: global (with overrides), process
    /// environment, stage env, and what it imports.
    fn layers(&self, k: usize) -> VarLayers {
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        let mut global: BTreeMap<String, String> = spec
            .global
            .env
            .iter()
            .map(|e| (e.name.value.clone(), e.value.clone()))
            .collect();
        global.extend(self.r.overrides.clone());
        let mut from_stages = BTreeMap::new();
        for efs in &stage.env_from_stages {
            let source = self
                .r
                .plan
                .order
                .iter()
                .position(|s| s.name == efs.stage.value);
            let vars = match source.and_then(|j| self.exports[j].clone()) {
                Some(v) => Some(v),
                // Not in this run (or resumed): the stage's last successful result.
                None => self
                    .r
                    .store
                    .result(&StageKey::new(&self.r.project_key, &efs.stage.value))
                    .ok()
                    .flatten()
                    .map(|r| r.exports),
            };
            if let Some(vars) = vars {
                for v in &efs.vars {
                    if let Some(value) = vars.get(&v.value) {
                        from_stages.insert(v.value.clone(), value.clone());
                    }
                }
            }
        }
        VarLayers {
            global,
            process_env: self.r.process_env.clone(),
            stage: stage
                .env
                .iter()
                .map(|e| (e.name.value.clone(), e.value.clone()))
                .collect(),
            from_stages,
        }
    }

    async fn check_condition(&mut self, k: usize) -> Result<Event, DriveError> {
        let stage = &self.r.project.spec.stages[self.spec_index[k]];
        let Some(cond) = &stage.condition else {
            return Ok(Event::ConditionChecked {
                stage: k,
                runs: true,
            });
        };
        let layers = self.layers(k);
        let mut vars = layers.global.clone();
        vars.extend(layers.process_env.clone());
        vars.extend(layers.stage);
        vars.extend(layers.from_stages);
        let scope = Scope {
            vars: Some(&vars),
            auth: None,
            stage_outcomes: Some(&self.outcomes),
            env: Some(&layers.process_env),
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

    async fn dispatch(
        &mut self,
        k: usize,
        tx: &mpsc::Sender<Internal>,
        tasks: &mut JoinSet<()>,
        cancel: CancellationToken,
    ) -> Result<(), DriveError> {
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
        let spec = &self.r.project.spec;
        let stage = &spec.stages[self.spec_index[k]];
        let loaded = &self.r.project.stages[self.spec_index[k]];
        // The executor's gate: "migration started" goes through the stage's own forwarder.
        let (gtx, mut grx) = mpsc::channel::<(StageEvent, tokio::sync::oneshot::Sender<()>)>(1);
        let task = StageTask {
            key_scope: self.r.run.key_scope(self.r.store.id()),
            stage: stage.name.value.clone(),
            config_file: PathBuf::from(&loaded.config_file),
            config: loaded.config.clone(),
            migrations: loaded.migrations.clone(),
            vars: self.layers(k),
            applied,
            secrets: stage.secrets.iter().map(|s| s.value.clone()).collect(),
            retry: RetryPolicy::default()
                .overlay(spec.global.retry.as_ref())
                .overlay(stage.retry.as_ref()),
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
            timeout: stage.timeout.as_ref().map(|t| t.value),
            files: self.r.files.clone(),
            gate: Some(gate(gtx)),
        };
        self.started[k] = Some(Instant::now());
        self.record(Some(k), EventKind::StageStarted { attempt: 1 }, vec![])
            .await?;
        let tx = tx.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            let (etx, mut erx) = mpsc::channel(256);
            let exec = execute(task, cancel, etx);
            tokio::pin!(exec);
            let report = loop {
                tokio::select! {
                    // Events first, so each is recorded before the stage's end.
                    biased;
                    Some(ev) = erx.recv() => { let _ = tx.send(Internal::Stage(k, ev)).await; }
                    Some((ev, ack)) = grx.recv() => {
                        // Everything the stage emitted before this migration goes first, so the
                        // log keeps the stage's order (the previous migration's end before the
                        // next one's start).
                        while let Ok(earlier) = erx.try_recv() {
                            let _ = tx.send(Internal::Stage(k, earlier)).await;
                        }
                        let _ = tx.send(Internal::Started(k, ev, ack)).await;
                    }
                    report = &mut exec => break report,
                }
            };
            while let Some(ev) = erx.recv().await {
                let _ = tx.send(Internal::Stage(k, ev)).await;
            }
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let _ = tx.send(Internal::Done(k, report, ms)).await;
        });
        Ok(())
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
                self.exports[k] = Some(report.exported);
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

/// The executor's gate: hands the `MigrationStarted` event to the stage's forwarder (which
/// passes it to the driver after every earlier event of the stage) and waits until the
/// driver has recorded it.
fn gate(
    gtx: mpsc::Sender<(StageEvent, tokio::sync::oneshot::Sender<()>)>,
) -> baton_agent::executor::StepGate {
    Arc::new(move |event| {
        let gtx = gtx.clone();
        Box::pin(async move {
            let (ack, done) = tokio::sync::oneshot::channel();
            if gtx.send((event, ack)).await.is_ok() {
                // If the driver is gone, the run is over; nothing waits for the answer.
                let _ = done.await;
            }
        })
    })
}
