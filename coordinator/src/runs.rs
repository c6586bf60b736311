//! The run lifecycle as a service: submit (a new run, or resume the project's interrupted
//! one), drive, roll back on failure, watch, cancel, list. The local CLI and the
//! coordinator's gRPC handlers call the same [`Runs`]; only the [`StageRunner`] behind it
//! differs (in-process, or agents over gRPC).
//!
//! Invariants:
//! - a run is recorded (flushed) before `submit` returns, so an acknowledged submission is
//!   never lost;
//! - one run at a time per project: a later submission waits in a FIFO queue, it never
//!   cancels or overlaps the earlier one;
//! - a run interrupted by a crash resumes as planned (same plan digest) with the same
//!   idempotency keys; with changed files it is marked failed and a new run starts; with
//!   another selection the submission is refused until it is resumed;
//! - every event a watcher sees was recorded first; a watcher that falls behind reads the
//!   store, so it never misses one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use baton_common::spec::Project;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use baton_common::stage::AttemptId;
use prost::Message;

use crate::planner::{History, Plan, Selection};
use crate::runner::remote::Verdict;
use crate::runner::StageRunner;
use crate::scheduler::driver::{
    drive, Control, FlushOn, PlannedFiles, Resolution, RunContext, RunDirection,
};
use crate::store::{
    now_ms, EventKind, EventRecord, Op, RunRecord, RunStatus, StageKey, Store, StoreError,
    Transition, FORMAT,
};

/// Why the service refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {run} ({selection}) was interrupted before it finished; resume it first with `baton runs resume`, then run this selection")]
    InterruptedFirst { run: u64, selection: String },
    #[error("run {run} ({what}) was interrupted before it finished; resume it first with `baton runs resume` (it changed the target; starting something else now would lose track of that)")]
    InterruptedOther { run: u64, what: String },
    #[error("there is no run {0} (see `baton runs list`)")]
    UnknownRun(u64),
    #[error("cannot create a run id: {0}")]
    Random(#[from] std::io::Error),
    #[error("cannot plan the rollback: {0}")]
    Rollback(String),
    #[error("run {0} is not running on this coordinator (see `baton runs list`)")]
    NotLive(u64),
    #[error("{0}")]
    Resolve(String),
    /// Promotion order: the release has not succeeded in the environment before.
    #[error("{0}")]
    Promotion(String),
}

/// Who acts: a name, and the groups it belongs to (`approvers: [group:NAME]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A planned project to run.
#[derive(Debug, Clone)]
pub struct Submission {
    pub project: Arc<Project>,
    /// The bytes the plan read.
    pub files: Arc<PlannedFiles>,
    pub plan: Plan,
    /// Names the project's history in the store.
    pub project_key: String,
    /// `--set KEY=VALUE`.
    pub overrides: BTreeMap<String, String>,
    /// `env "KEY"` in conditions (local mode: the CLI's environment; remote: empty).
    pub condition_env: BTreeMap<String, String>,
    /// A coordinator keeps the submission as the CLI sent it with each run it records, so
    /// it can rebuild the run after a restart; local mode re-reads its files instead.
    pub request: Option<Arc<baton_common::proto::SubmitRunRequest>>,
    /// Who submits it (the OS user locally, the operator token's name on a coordinator).
    pub by: String,
    /// `--skip-promotion-check --reason TEXT`: run even though the release has not
    /// succeeded in the environment before this one (recorded in the audit log).
    pub skip_promotion: Option<String>,
}

/// An accepted submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub run_id: u64,
    /// True when this resumes an interrupted run rather than starting a new one.
    pub resumed: bool,
    /// The first event of this submission's part of the run (1 for a new run; after the
    /// interrupted part for a resumed one).
    pub first_seq: u64,
    pub plan_digest: String,
    pub stages: usize,
    /// Lines to show before the run's events (what a resume does), secrets masked.
    pub notes: Vec<String>,
}

/// How a run ended, once it has.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// `None`: the run could not be driven (its error is in `error`).
    pub status: Option<RunStatus>,
    pub error: Option<String>,
    /// `rollback_on_failure`: the run that rolls this one back.
    pub rollback: Option<Rollback>,
}

/// The automatic rollback of a failed run.
#[derive(Debug, Clone)]
pub struct Rollback {
    pub run: u64,
    /// The stages it rolls back (those the failed run changed).
    pub stages: Vec<String>,
    pub plan: Arc<Plan>,
}

/// A run this process drives now (or queued to).
#[derive(Debug)]
struct Live {
    /// Live events for watchers; dropped once the run ends (its log is in the store), so a
    /// long-lived coordinator does not keep every finished run's buffer.
    events: Option<broadcast::Sender<EventRecord>>,
    cancel: CancellationToken,
    outcome: watch::Receiver<Option<RunOutcome>>,
    /// Waiting for an earlier run of its project to end.
    queued: Arc<std::sync::atomic::AtomicBool>,
    /// Operators' requests to its driver.
    control: mpsc::Sender<Control>,
}

/// The store as the planner's view of earlier runs, read once before planning: a store that
/// cannot be read is an error there, never "nothing applied". Serializable, so a running
/// process can hand it to a dry run in another (`cli::readonly`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreHistory {
    succeeded: BTreeSet<String>,
    applied: BTreeMap<String, BTreeSet<u64>>,
}

impl StoreHistory {
    /// The history of `stages` of `project`.
    pub fn read<'a>(
        store: &dyn Store,
        project: &str,
        stages: impl IntoIterator<Item = &'a str>,
    ) -> Result<StoreHistory, StoreError> {
        let mut h = StoreHistory::default();
        for stage in stages {
            let key = StageKey::new(project, stage);
            if store.result(&key)?.is_some() {
                h.succeeded.insert(stage.to_owned());
            }
            let versions: BTreeSet<u64> = store
                .applied(&key)?
                .into_iter()
                .map(|a| a.version)
                .collect();
            h.applied.insert(stage.to_owned(), versions);
        }
        Ok(h)
    }

    /// The history of every stage of `project`'s spec.
    pub fn of(store: &dyn Store, key: &str, project: &Project) -> Result<StoreHistory, StoreError> {
        StoreHistory::read(
            store,
            key,
            project.spec.stages.iter().map(|s| s.name.value.as_str()),
        )
    }
}

impl History for StoreHistory {
    fn stage_succeeded(&self, stage: &str) -> bool {
        self.succeeded.contains(stage)
    }

    fn applied_versions(&self, stage: &str) -> BTreeSet<u64> {
        self.applied.get(stage).cloned().unwrap_or_default()
    }
}

/// The run service.
pub struct Runs {
    store: Arc<dyn Store>,
    runner: Arc<dyn StageRunner>,
    live: Mutex<HashMap<u64, Live>>,
    /// One lock per project: runs of a project take it in submission order (tokio's mutex
    /// is fair), so a second run waits for the first.
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Owns every driving task.
    tasks: TaskTracker,
    /// Cancels every run on shutdown.
    shutdown: CancellationToken,
    /// Stops every driver without cancelling its run (a coordinator shutting down).
    stop: CancellationToken,
    /// Why the service stopped dispatching (a store failure), if it did.
    degraded: Mutex<Option<String>>,
    flush_on: FlushOn,
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs")
            .field("runner", &self.runner)
            .finish_non_exhaustive()
    }
}

/// The store key of a project: its stages file's name, so variants of one project in one
/// directory keep separate histories.
pub fn project_key(stages_file: &Path) -> String {
    stages_file.file_name().map_or_else(
        || "stages.yaml".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The store key of a project in an environment: the project's key alone when it declares
/// no environments (the implicit one, as before environments existed), else
/// `PROJECT/ENVIRONMENT`. A stages file's name never holds a `/`, so keys cannot collide:
/// history, exports, runs, their queue and their interrupted-run check are all per key.
pub fn scoped_key(project: &str, environment: Option<&str>) -> String {
    match environment {
        Some(env) => format!("{project}/{env}"),
        None => project.to_owned(),
    }
}

/// The store key of a loaded project: its stages file's name, scoped to the environment it
/// was loaded for.
pub fn key_of(project: &Project) -> String {
    scoped_key(
        &project_key(&project.stages_file),
        project.spec.environment_name(),
    )
}

/// A key's environment (`None`: the implicit one).
pub fn environment_of(key: &str) -> Option<&str> {
    key.split_once('/').map(|(_, env)| env)
}

/// The latest run of `project` (up or down) that never finished.
pub fn interrupted_run(store: &dyn Store, project: &str) -> Result<Option<RunRecord>, StoreError> {
    Ok(store
        .runs()?
        .into_iter()
        .rev()
        .find(|r| r.project == project && r.status == RunStatus::Running))
}

/// `--stage a,b`, `--from a --to b`, `all stages`.
pub fn describe_selection(selection: &Selection) -> String {
    match selection {
        Selection::All => "all stages".to_owned(),
        Selection::Stages { names } => format!("--stage {}", names.join(",")),
        Selection::Range { from, to } if to.is_empty() => format!("--from {from}"),
        Selection::Range { from, to } if from.is_empty() => format!("--to {to}"),
        Selection::Range { from, to } => format!("--from {from} --to {to}"),
    }
}

impl Runs {
    /// The run service of a coordinator: drivers flush on the blocking pool.
    pub fn new(store: Arc<dyn Store>, runner: Arc<dyn StageRunner>) -> Arc<Runs> {
        Runs::flushing_on(store, runner, FlushOn::BlockingPool)
    }

    /// The run service of local mode: drivers flush on their own thread.
    pub fn local(store: Arc<dyn Store>, runner: Arc<dyn StageRunner>) -> Arc<Runs> {
        Runs::flushing_on(store, runner, FlushOn::DriverThread)
    }

    fn flushing_on(
        store: Arc<dyn Store>,
        runner: Arc<dyn StageRunner>,
        flush_on: FlushOn,
    ) -> Arc<Runs> {
        Arc::new(Runs {
            store,
            runner,
            flush_on,
            live: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            stop: CancellationToken::new(),
            degraded: Mutex::new(None),
        })
    }

    /// Why the service stopped dispatching (a storage failure), or `None` when healthy.
    pub fn health(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a coordinator restart: drives `run` (still running in the store) again from
    /// its stored submission `s`. Stages that finished stay finished; attempts that were
    /// running are adopted: `expect` is told each, so the runner can wait for its agent.
    pub async fn recover(
        self: &Arc<Self>,
        s: Submission,
        run: RunRecord,
        direction: RunDirection,
        expect: impl Fn(AttemptId),
    ) -> Result<Submitted, RunsError> {
        let store = self.store.clone();
        let prepared = blocking(move || resume_of(store.as_ref(), run)).await?;
        for a in prepared.running.values() {
            expect(a.clone());
        }
        let submitted = Submitted {
            run_id: prepared.run.id,
            resumed: true,
            first_seq: prepared.next_seq,
            plan_digest: s.plan.digest.clone(),
            stages: s.plan.order.len(),
            notes: prepared.notes.clone(),
        };
        self.start_with(s, prepared, direction, true);
        Ok(submitted)
    }

    /// Decides a stage of a live run that needs attention; recorded with `by` (in the run's
    /// log and the audit log).
    pub async fn resolve(
        &self,
        run: u64,
        stage: &str,
        resolution: Resolution,
        by: &str,
    ) -> Result<(), RunsError> {
        self.ask_driver(run, |reply| Control::Resolve {
            stage: stage.to_owned(),
            resolution,
            by: by.to_owned(),
            reply,
        })
        .await?;
        if let Some(record) = self.store.run(run)? {
            crate::audit::append(
                self.store.as_ref(),
                crate::audit::Entry {
                    action: "resolve",
                    by: by.to_owned(),
                    project: record.project,
                    run,
                    release: record.release,
                    reason: format!("stage {stage} as {}", resolution.as_str()),
                },
            )?;
        }
        Ok(())
    }

    /// Sends a live run's driver the request `make` builds around the reply channel, and
    /// returns its answer (its refusal as [`RunsError::Resolve`]).
    async fn ask_driver<T>(
        &self,
        run: u64,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Control,
    ) -> Result<T, RunsError> {
        let control = match self.live().get(&run) {
            Some(l) if l.outcome.borrow().is_none() => l.control.clone(),
            _ => return Err(RunsError::NotLive(run)),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        control
            .send(make(reply))
            .await
            .map_err(|_| RunsError::NotLive(run))?;
        answer
            .await
            .map_err(|_| RunsError::NotLive(run))?
            .map_err(RunsError::Resolve)
    }

    /// Approves (or rejects) what a live run awaits, as `by`: the gate decided, or why
    /// `by` may not (not an approver, the submitter of a run that needs someone else).
    pub async fn decide(
        &self,
        run: u64,
        approve: bool,
        by: &Identity,
        comment: &str,
    ) -> Result<String, RunsError> {
        self.ask_driver(run, |reply| Control::Decide {
            approve,
            by: by.clone(),
            comment: comment.to_owned(),
            reply,
        })
        .await
    }

    /// Cancels a live run on `by`'s request, recorded in the audit log.
    pub fn cancel_by(&self, run: u64, by: &str) -> Result<bool, RunsError> {
        let Some(record) = self.store.run(run)? else {
            return Err(RunsError::UnknownRun(run));
        };
        if !self.cancel(run) {
            return Ok(false);
        }
        crate::audit::append(
            self.store.as_ref(),
            crate::audit::Entry {
                action: "cancel",
                by: by.to_owned(),
                project: record.project,
                run,
                release: record.release,
                reason: String::new(),
            },
        )?;
        Ok(true)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Submits an up run: resumes the project's interrupted run when the plan is unchanged,
    /// else records a new one. Returns once the run is durable; it is driven in the
    /// background (see [`Runs::watch`] and [`Runs::outcome`]).
    pub async fn submit_up(self: &Arc<Self>, s: Submission) -> Result<Submitted, RunsError> {
        let store = self.store.clone();
        let key = s.project_key.clone();
        let plan = s.plan.clone();
        let live = self.live_ids();
        let stored = stored_submission(&s, 0);
        let origin = Origin::of(&s);
        let previous = previous_environment(&s.project);
        let prepared = blocking(move || {
            let mut origin = origin;
            if let Some(prev) = previous {
                origin.promotion = promotion_check(store.as_ref(), &key, &prev, &plan)?;
                if origin.promotion.is_some() && origin.override_reason.is_none() {
                    return Err(RunsError::Promotion(format!(
                        "{}; run `stages up -e {prev}` with these files first, or pass --skip-promotion-check --reason TEXT (recorded in the audit log)",
                        origin.promotion.clone().unwrap_or_default()
                    )));
                }
            }
            prepare(
                store.as_ref(),
                &key,
                &plan,
                &live,
                &RunDirection::Up,
                stored,
                &origin,
            )
        })
        .await?;
        let submitted = Submitted {
            run_id: prepared.run.id,
            resumed: prepared.resumed,
            first_seq: prepared.next_seq,
            plan_digest: s.plan.digest.clone(),
            stages: s.plan.order.len(),
            notes: prepared.notes.clone(),
        };
        self.start(s, prepared, RunDirection::Up);
        Ok(submitted)
    }

    /// Submits a down run (`stages down`).
    pub async fn submit_down(
        self: &Arc<Self>,
        s: Submission,
        direction: RunDirection,
    ) -> Result<Submitted, RunsError> {
        let store = self.store.clone();
        let key = s.project_key.clone();
        let plan = s.plan.clone();
        let live = self.live_ids();
        let asked = direction.clone();
        let stored = stored_submission(&s, 0);
        let origin = Origin::of(&s);
        let prepared =
            blocking(move || prepare(store.as_ref(), &key, &plan, &live, &asked, stored, &origin))
                .await?;
        let submitted = Submitted {
            run_id: prepared.run.id,
            resumed: prepared.resumed,
            first_seq: if prepared.resumed {
                prepared.next_seq
            } else {
                0
            },
            plan_digest: s.plan.digest.clone(),
            stages: s.plan.order.len(),
            notes: prepared.notes.clone(),
        };
        // A resumed run goes on as it began (its stored extent), whatever this call asked.
        let direction = match &prepared.run.down {
            Some(d) if prepared.resumed => RunDirection::Down {
                to: d.to.clone(),
                skip_missing_down: d.skip_missing_down,
            },
            _ => direction,
        };
        self.start(s, prepared, direction);
        Ok(submitted)
    }

    /// Runs this process drives or has queued: not interrupted (a new run queues behind).
    fn live_ids(&self) -> BTreeSet<u64> {
        self.live()
            .iter()
            .filter(|(_, l)| l.outcome.borrow().is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Makes `run_id` live: where its events go, its cancel token, where its outcome goes.
    fn register(&self, run_id: u64, queued: Arc<std::sync::atomic::AtomicBool>) -> Channels {
        let (events, _) = broadcast::channel(1024);
        let (outcome_tx, outcome_rx) = watch::channel(None);
        let (control_tx, control_rx) = mpsc::channel(16);
        let cancel = self.shutdown.child_token();
        self.live().insert(
            run_id,
            Live {
                events: Some(events.clone()),
                cancel: cancel.clone(),
                outcome: outcome_rx,
                queued,
                control: control_tx,
            },
        );
        Channels {
            events,
            cancel,
            outcome: outcome_tx,
            control: control_rx,
        }
    }

    /// Registers the run as live and spawns its driving task.
    fn start(self: &Arc<Self>, s: Submission, p: Prepared, direction: RunDirection) {
        self.start_with(s, p, direction, false);
    }

    /// [`Runs::start`]; `adopt`: attempts the run had running are adopted, not started anew
    /// (a coordinator's recovery; local mode starts them again).
    fn start_with(
        self: &Arc<Self>,
        s: Submission,
        p: Prepared,
        direction: RunDirection,
        adopt: bool,
    ) {
        let run_id = p.run.id;
        let queued = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ch = self.register(run_id, queued.clone());
        let queue = {
            let mut q = self
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.entry(s.project_key.clone()).or_default().clone()
        };
        let this = self.clone();
        // Take the queue's place now, in submission order, then wait for the turn.
        let turn = queue.lock_owned();
        let span = tracing::info_span!("run", run = run_id, project = %s.project_key);
        let job = Job {
            s,
            p,
            direction,
            ch,
            adopt,
        };
        self.tasks.spawn(
            async move {
                let _turn = turn.await;
                queued.store(false, std::sync::atomic::Ordering::SeqCst);
                // The project's turn covers the run's automatic rollback too.
                let mut next = Some(job);
                while let Some(job) = next.take() {
                    let tx = job.ch.outcome.clone();
                    let id = job.p.run.id;
                    let (outcome, follow) = this.drive_run(job).await;
                    let _ = tx.send(Some(outcome));
                    if let Some(l) = this.live().get_mut(&id) {
                        l.events = None;
                    }
                    next = follow;
                }
            }
            .instrument(span),
        );
    }

    /// Drives one run; returns its outcome and, for `rollback_on_failure`, the rollback run
    /// to drive next.
    async fn drive_run(self: &Arc<Self>, job: Job) -> (RunOutcome, Option<Job>) {
        let Job {
            s,
            p,
            direction,
            ch,
            adopt,
        } = job;
        let Channels {
            events,
            cancel,
            outcome: _,
            control,
        } = ch;
        let run_id = p.run.id;
        let ctx = RunContext {
            project: s.project.clone(),
            plan: Arc::new(s.plan.clone()),
            files: s.files.clone(),
            store: self.store.clone(),
            runner: self.runner.clone(),
            project_key: s.project_key.clone(),
            run: p.run,
            next_seq: p.next_seq,
            done: p.done,
            prior_attempts: p.prior_attempts,
            condition_env: s.condition_env.clone(),
            overrides: s.overrides.clone(),
            direction: direction.clone(),
            adopt: if adopt { p.running } else { BTreeMap::new() },
            in_doubt: p.in_doubt,
            control: Some(control),
            stop: self.stop.clone(),
            flush_on: self.flush_on,
        };
        let (tx, mut rx) = mpsc::channel(1024);
        let forward = async {
            while let Some(e) = rx.recv().await {
                // No receiver only means nobody watches right now.
                let _ = events.send(e);
            }
        };
        let (result, ()) = tokio::join!(drive(ctx, cancel.clone(), tx), forward);
        let status = match result {
            Ok(status) => status,
            Err(e) => {
                tracing::error!(run = run_id, error = %e, "run stopped");
                if matches!(e, crate::scheduler::driver::DriveError::Store(_)) {
                    *self
                        .degraded
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("run {run_id} stopped: {e}"));
                }
                let outcome = RunOutcome {
                    status: None,
                    error: Some(e.to_string()),
                    rollback: None,
                };
                return (outcome, None);
            }
        };
        let mut outcome = RunOutcome {
            status: Some(status),
            error: None,
            rollback: None,
        };
        if status == RunStatus::Failed
            && direction == RunDirection::Up
            && s.plan.rollback_on_failure
            && !cancel.is_cancelled()
        {
            match self.rollback(&s, run_id).await {
                Ok(Some((rb, job))) => {
                    outcome.rollback = Some(rb);
                    return (outcome, Some(job));
                }
                Ok(None) => {}
                Err(e) => outcome.error = Some(e.to_string()),
            }
        }
        (outcome, None)
    }

    /// `rollback_on_failure`: rolls back what `failed_run` applied, newest first, in reverse
    /// dependency order, as a run of its own (queued right behind, in the same project).
    async fn rollback(
        self: &Arc<Self>,
        s: &Submission,
        failed_run: u64,
    ) -> Result<Option<(Rollback, Job)>, RunsError> {
        // Per stage, the lowest version this run applied: everything from there up goes.
        let mut first_applied: BTreeMap<String, u64> = BTreeMap::new();
        for e in self.store.events(failed_run, 0)? {
            if let (
                Some(stage),
                EventKind::MigrationDone {
                    version, direction, ..
                },
            ) = (&e.stage, &e.kind)
            {
                if direction == "up" {
                    let v = first_applied.entry(stage.clone()).or_insert(*version);
                    *v = (*v).min(*version);
                }
            }
        }
        if first_applied.is_empty() {
            return Ok(None);
        }
        let history = StoreHistory::of(self.store.as_ref(), &s.project_key, &s.project)?;
        let selection = Selection::Stages {
            names: first_applied.keys().cloned().collect(),
        };
        let mut plan = crate::planner::plan_down(
            &s.project,
            &selection,
            &history,
            crate::planner::Dependents::Leave,
        )
        .map_err(|e| RunsError::Rollback(e.to_string()))?;
        plan.digest = crate::planner::cover_overrides(plan.digest, &s.project, &s.overrides);
        let stages: Vec<String> = first_applied.keys().cloned().collect();
        let to = first_applied
            .into_iter()
            .map(|(s, v)| (s, v.saturating_sub(1)))
            .collect();
        let direction = RunDirection::Down {
            to,
            skip_missing_down: false,
        };
        let rb_plan = Arc::new(plan.clone());
        let sub = Submission { plan, ..s.clone() };
        // This run still holds its project's turn: drive the rollback inside it.
        let store = self.store.clone();
        let key = sub.project_key.clone();
        let plan = sub.plan.clone();
        let record = down_record(&direction);
        let stored = stored_submission(&sub, failed_run);
        let origin = Origin {
            by: "baton".to_owned(),
            reason: format!("rollback_on_failure of run {failed_run}"),
            ..Origin::default()
        };
        let run =
            blocking(move || new_run(store.as_ref(), &key, &plan, None, record, stored, &origin))
                .await?;
        let run_id = run.id;
        let ch = self.register(run_id, Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let prepared = Prepared::new(run);
        tracing::info!(
            run = run_id,
            rollback_of = failed_run,
            "rollback_on_failure"
        );
        let rb = Rollback {
            run: run_id,
            stages,
            plan: rb_plan,
        };
        let job = Job {
            s: sub,
            p: prepared,
            direction,
            ch,
            adopt: false,
        };
        Ok(Some((rb, job)))
    }

    /// A run's events from `from_seq` on: what is recorded, then (with `follow`) live ones
    /// as they are recorded, ending after `run_finished` (or at once for a finished run).
    pub fn watch(
        self: &Arc<Self>,
        run: u64,
        from_seq: u64,
        follow: bool,
    ) -> Result<mpsc::Receiver<EventRecord>, RunsError> {
        if !self.store.has_run(run)? {
            return Err(RunsError::UnknownRun(run));
        }
        // Subscribe before reading the store, so nothing falls between the two.
        let live = if follow {
            self.live()
                .get(&run)
                .and_then(|l| l.events.as_ref().map(broadcast::Sender::subscribe))
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(256);
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let mut next = from_seq;
            let mut live = live;
            loop {
                // Everything recorded from `next` on.
                let s = store.clone();
                let stored = match blocking(move || s.events(run, next)).await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(run, error = %e, "watch stopped: store read failed");
                        return;
                    }
                };
                for e in stored {
                    next = e.seq + 1;
                    let end = matches!(e.kind, EventKind::RunFinished { .. });
                    if tx.send(e).await.is_err() || end {
                        return;
                    }
                }
                let Some(sub) = live.as_mut() else {
                    return;
                };
                loop {
                    match sub.recv().await {
                        Ok(e) if e.seq < next => continue,
                        Ok(e) if e.seq == next => {
                            next += 1;
                            let end = matches!(e.kind, EventKind::RunFinished { .. });
                            if tx.send(e).await.is_err() || end {
                                return;
                            }
                        }
                        // A gap (fell behind, or subscribed late): catch up from the store.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        // The run's driver is gone: whatever it recorded is in the store.
                        Err(broadcast::error::RecvError::Closed) => {
                            live = None;
                            break;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Waits until `run` has ended; `None` for a run this process is not driving.
    pub async fn outcome(&self, run: u64) -> Option<RunOutcome> {
        let mut rx = self.live().get(&run).map(|l| l.outcome.clone())?;
        loop {
            if let Some(o) = rx.borrow().clone() {
                return Some(o);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Cancels a run this process drives: nothing new starts, runners stop in-flight
    /// attempts. False when the run is not live here (finished, or unknown).
    pub fn cancel(&self, run: u64) -> bool {
        match self.live().get(&run) {
            Some(l) if l.outcome.borrow().is_none() => {
                l.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Every run, oldest first, with whether it waits in its project's queue.
    pub fn list(&self) -> Result<Vec<(RunRecord, bool)>, RunsError> {
        let live = self.live();
        Ok(self
            .store
            .runs()?
            .into_iter()
            .map(|r| {
                let queued = live
                    .get(&r.id)
                    .is_some_and(|l| l.queued.load(std::sync::atomic::Ordering::SeqCst));
                (r, queued)
            })
            .collect())
    }

    /// Cancels every run and waits for their tasks (bounded by the caller).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Stops every driver without cancelling its run and waits for them (bounded by the
    /// caller): what was recorded stays; runs stay running in the store, for the next start.
    pub async fn suspend(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Where a live run's events, cancel, outcome and operators' requests go.
#[derive(Debug)]
struct Channels {
    events: broadcast::Sender<EventRecord>,
    cancel: CancellationToken,
    outcome: watch::Sender<Option<RunOutcome>>,
    control: mpsc::Receiver<Control>,
}

/// What the store says about a result for an attempt no agent holds any more: recorded
/// already (acknowledge it again), or stale (reject it).
pub fn verdict(store: &dyn Store, attempt: &AttemptId) -> Verdict {
    let stale = |why: String| Verdict::Stale(why);
    let run = match store.run(attempt.run) {
        Ok(Some(r)) => r,
        Ok(None) => return stale(format!("there is no run {}", attempt.run)),
        Err(e) => return stale(format!("the store could not be read: {e}")),
    };
    let events = match store.events(run.id, 0) {
        Ok(e) => e,
        Err(e) => return stale(format!("the store could not be read: {e}")),
    };
    let mut started = false;
    let mut ended = false;
    for e in events
        .iter()
        .filter(|e| e.stage.as_deref() == Some(attempt.stage.as_str()))
    {
        match &e.kind {
            EventKind::StageStarted { attempt: n, token } => {
                if *n == attempt.attempt && (*token == attempt.token || *token == 0) {
                    started = true;
                } else if started || *n > attempt.attempt {
                    return stale(format!(
                        "attempt {} (token {}) replaced attempt {}",
                        n, token, attempt.attempt
                    ));
                }
            }
            EventKind::AttemptLost { attempt: n, .. }
            | EventKind::NeedsAttention { attempt: n, .. }
                if started && *n == attempt.attempt =>
            {
                return stale(format!(
                    "attempt {} was declared lost before its result arrived",
                    attempt.attempt
                ));
            }
            EventKind::StageSucceeded { .. } | EventKind::StageFailed { .. } if started => {
                ended = true;
            }
            _ => {}
        }
    }
    if !started {
        stale(format!(
            "run {} has no attempt {} of stage `{}` with token {}",
            run.id, attempt.attempt, attempt.stage, attempt.token
        ))
    } else if ended {
        Verdict::AlreadyApplied
    } else {
        stale(format!("run {} is not active on this coordinator", run.id))
    }
}

/// What a coordinator keeps with a run to rebuild it after a restart.
fn stored_submission(s: &Submission, rollback_of: u64) -> Option<Vec<u8>> {
    s.request.as_ref().map(|r| {
        baton_common::proto::StoredSubmission {
            request: Some((**r).clone()),
            rollback_of,
        }
        .encode_to_vec()
    })
}

/// A run to drive, with where its events and outcome go.
#[derive(Debug)]
struct Job {
    s: Submission,
    p: Prepared,
    direction: RunDirection,
    ch: Channels,
    /// Adopt the attempts that were running instead of starting them again.
    adopt: bool,
}

/// What a new or resumed run starts from.
#[derive(Debug)]
struct Prepared {
    run: RunRecord,
    /// An interrupted run picked up again.
    resumed: bool,
    next_seq: u64,
    done: BTreeSet<String>,
    prior_attempts: BTreeMap<String, u32>,
    notes: Vec<String>,
    /// Attempts that were running (no end recorded), by stage.
    running: BTreeMap<String, AttemptId>,
    /// Migrations started and not recorded done, by stage.
    in_doubt: BTreeMap<String, (u64, String)>,
}

impl Prepared {
    /// A new run, nothing done yet.
    fn new(run: RunRecord) -> Prepared {
        Prepared {
            run,
            resumed: false,
            next_seq: 1,
            done: BTreeSet::new(),
            prior_attempts: BTreeMap::new(),
            notes: Vec::new(),
            running: BTreeMap::new(),
            in_doubt: BTreeMap::new(),
        }
    }
}

/// What a down direction stores with its run.
fn down_record(direction: &RunDirection) -> Option<crate::store::DownRecord> {
    match direction {
        RunDirection::Up => None,
        RunDirection::Down {
            to,
            skip_missing_down,
        } => Some(crate::store::DownRecord {
            to: to.clone(),
            skip_missing_down: *skip_missing_down,
        }),
    }
}

/// Resume, refuse, or abandon the project's interrupted run (one still marked running that
/// nobody drives: not in `live`); else record a new one. An interrupted run of the other
/// direction (an up run when rolling back, a rollback when applying) must be resumed first.
fn prepare(
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    live: &BTreeSet<u64>,
    direction: &RunDirection,
    stored: Option<Vec<u8>>,
    origin: &Origin,
) -> Result<Prepared, RunsError> {
    let interrupted = store
        .runs()?
        .into_iter()
        .rev()
        .find(|r| r.project == key && r.status == RunStatus::Running && !live.contains(&r.id));
    if let Some(old) = &interrupted {
        if old.direction != plan.direction {
            let what = match (old.direction.as_str(), &old.down) {
                ("up", _) => "stages up".to_owned(),
                (_, Some(d)) if !d.to.is_empty() => "the rollback of a failed run".to_owned(),
                _ => "stages down".to_owned(),
            };
            return Err(RunsError::InterruptedOther { run: old.id, what });
        }
    }
    match interrupted {
        Some(old) if old.plan_digest == plan.digest && old.selection != plan.selection => {
            Err(RunsError::InterruptedFirst {
                run: old.id,
                selection: describe_selection(&old.selection),
            })
        }
        Some(old) if old.plan_digest == plan.digest => resume_of(store, old),
        other => {
            let mut notes = Vec::new();
            // The abandoned run's random id carries over: a migration it had in flight is sent
            // again with the key it was first sent with, so a target that honours keys does
            // not apply it twice (the new run never sends anything else the old one did).
            // The same after a run that was cancelled (Ctrl-C, SIGTERM) with a migration in
            // flight: that migration is in doubt exactly as after a crash.
            let cancelled = match &other {
                Some(_) => None,
                None => cancelled_in_doubt(store, key)?,
            };
            let inherit = other
                .as_ref()
                .or(cancelled.as_ref().map(|(run, _)| run))
                .map(|o| o.uid.clone())
                .filter(|u| !u.is_empty());
            if let Some((run, in_flight)) = &cancelled {
                notes.push(format!(
                    "note: run {} was cancelled with a migration in flight; it is sent again with the same Idempotency-Key",
                    run.id
                ));
                for (stage, version, name) in in_flight {
                    notes.push(in_flight_note(stage, *version, name));
                }
            }
            if let Some(old) = other {
                // The files changed since that run was planned: it cannot resume as planned.
                let mut abandoned = old.clone();
                abandoned.status = RunStatus::Failed;
                abandoned.finished_at_ms = Some(now_ms());
                let events = store.events(old.id, 0)?;
                let seq = events.last().map_or(1, |e| e.seq + 1);
                let note = EventRecord {
                    v: FORMAT,
                    seq,
                    at_ms: now_ms(),
                    stage: None,
                    kind: EventKind::Notice {
                        message: "abandoned: the files changed since this run was planned".into(),
                    },
                };
                let mut t = Transition::new();
                t.push(Op::PutRun(abandoned)).push(Op::AppendEvent {
                    run: old.id,
                    event: note,
                });
                store.commit(t)?;
                notes.push(format!("note: run {} was interrupted, but the files changed since it was planned; it is marked failed and a new run starts (a migration it had in flight is sent with the same Idempotency-Key)", old.id));
            }
            let run = new_run(
                store,
                key,
                plan,
                inherit,
                down_record(direction),
                stored,
                origin,
            )?;
            Ok(Prepared {
                notes,
                ..Prepared::new(run)
            })
        }
    }
}

/// A migration in doubt: stage, version, name.
type InDoubt = (String, u64, String);

/// `stage NNN_name` of each migration in flight when the project's latest run was
/// cancelled (empty when it was not cancelled, or nothing was in flight).
pub fn in_flight_when_cancelled(store: &dyn Store, key: &str) -> Result<Vec<String>, RunsError> {
    Ok(cancelled_in_doubt(store, key)?
        .map(|(_, doubt)| {
            doubt
                .into_iter()
                .map(|(stage, version, name)| format!("{stage} {version:03}_{name}"))
                .collect()
        })
        .unwrap_or_default())
}

/// The project's latest run, when it was cancelled with migrations in flight (started, never
/// recorded done, still not applied): the run and those migrations (stage, version, name).
fn cancelled_in_doubt(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(RunRecord, Vec<InDoubt>)>, RunsError> {
    let Some(last) = store.runs()?.into_iter().rev().find(|r| r.project == key) else {
        return Ok(None);
    };
    if last.status != RunStatus::Cancelled {
        return Ok(None);
    }
    let in_flight = migrations_in_flight(&store.events(last.id, 0)?);
    let mut doubt = Vec::new();
    for ((stage, version), (name, up)) in in_flight {
        let applied = store
            .applied(&StageKey::new(key, &stage))?
            .iter()
            .any(|a| a.version == version);
        // Up: not recorded applied; down: still recorded applied.
        if applied != up {
            doubt.push((stage, version, name));
        }
    }
    Ok((!doubt.is_empty()).then_some((last, doubt)))
}

/// Migrations a run's log shows started and never done, by (stage, version): their name and
/// whether they went up.
fn migrations_in_flight(events: &[EventRecord]) -> BTreeMap<(String, u64), (String, bool)> {
    let mut in_flight = BTreeMap::new();
    for e in events {
        let stage = e.stage.clone().unwrap_or_default();
        match &e.kind {
            EventKind::MigrationStarted {
                version,
                name,
                direction,
            } => {
                in_flight.insert((stage, *version), (name.clone(), direction == "up"));
            }
            EventKind::MigrationDone { version, .. } => {
                in_flight.remove(&(stage, *version));
            }
            _ => {}
        }
    }
    in_flight
}

/// The line that says a migration in doubt is sent again with its key.
fn in_flight_note(stage: &str, version: u64, name: &str) -> String {
    format!(
        "  stage {stage}: migration {version:03}_{name} was in flight when the run stopped; it is sent again with the same Idempotency-Key"
    )
}

/// An interrupted run picked up where its log ends: what is done, how many attempts each
/// stage had, which attempts were running and which migrations are in doubt.
fn resume_of(store: &dyn Store, old: RunRecord) -> Result<Prepared, RunsError> {
    let events = store.events(old.id, 0)?;
    let next_seq = events.last().map_or(1, |e| e.seq + 1);
    let mut notes = vec![format!(
        "resuming run {} (interrupted before it finished)",
        old.id
    )];
    let mut done = BTreeSet::new();
    let mut prior_attempts: BTreeMap<String, u32> = BTreeMap::new();
    let in_flight = migrations_in_flight(&events);
    let mut running: BTreeMap<String, AttemptId> = BTreeMap::new();
    for e in &events {
        let stage = e.stage.clone().unwrap_or_default();
        match &e.kind {
            EventKind::StageSucceeded { .. } => {
                running.remove(&stage);
                done.insert(stage);
            }
            EventKind::StageFailed { .. }
            | EventKind::AttemptLost { .. }
            | EventKind::NeedsAttention { .. } => {
                running.remove(&stage);
            }
            EventKind::StageStarted { attempt, token } => {
                let n = prior_attempts.entry(stage.clone()).or_insert(0);
                *n = (*n).max(*attempt);
                running.insert(
                    stage.clone(),
                    AttemptId {
                        run: old.id,
                        stage,
                        attempt: *attempt,
                        token: *token,
                    },
                );
            }
            _ => {}
        }
    }
    if !done.is_empty() {
        notes.push(format!(
            "  already done: {}",
            done.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    for ((stage, version), (name, _)) in &in_flight {
        notes.push(in_flight_note(stage, *version, name));
    }
    let in_doubt = in_flight
        .into_iter()
        .filter(|((stage, _), _)| !done.contains(stage))
        .map(|((stage, version), (name, _))| (stage, (version, name)))
        .collect();
    Ok(Prepared {
        run: old,
        resumed: true,
        next_seq,
        done,
        prior_attempts,
        notes,
        running,
        in_doubt,
    })
}

/// Records a new run and its first event; `uid` is the run's random id when it continues an
/// abandoned run (else a new one is drawn); `down` how a down run rolls back; `stored` what a
/// coordinator keeps to rebuild the run after a restart.
fn new_run(
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    uid: Option<String>,
    down: Option<crate::store::DownRecord>,
    stored: Option<Vec<u8>>,
    origin: &Origin,
) -> Result<RunRecord, RunsError> {
    let id = store.next_id()?;
    let uid = match uid {
        Some(u) => u,
        None => baton_common::ids::random_hex()?,
    };
    let run = RunRecord {
        v: FORMAT,
        id,
        uid,
        project: key.to_owned(),
        direction: plan.direction.to_owned(),
        selection: plan.selection.clone(),
        plan_digest: plan.digest.clone(),
        plan: serde_json::to_value(plan).unwrap_or_default(),
        created_at_ms: now_ms(),
        status: RunStatus::Running,
        finished_at_ms: None,
        down,
        by: origin.by.clone(),
        release: plan.release.clone(),
    };
    let started = EventRecord {
        v: FORMAT,
        seq: 0,
        at_ms: now_ms(),
        stage: None,
        kind: EventKind::RunStarted {
            stages: plan.order.iter().map(|s| s.name.clone()).collect(),
        },
    };
    let mut t = Transition::new();
    t.push(Op::PutRun(run.clone())).push(Op::AppendEvent {
        run: id,
        event: started,
    });
    if let Some(bytes) = stored {
        t.push(Op::PutSubmission { run: id, bytes });
    }
    // The submission and its audit entries are one transition: never one without the other.
    let entry = |action, reason: &str| crate::audit::Entry {
        action,
        by: origin.by.clone(),
        project: key.to_owned(),
        run: id,
        release: plan.release.clone(),
        reason: reason.to_owned(),
    };
    let mut entries = vec![entry(
        if plan.direction == "down" {
            "down"
        } else {
            "submit"
        },
        &origin.reason,
    )];
    if let (Some(why), Some(reason)) = (&origin.promotion, &origin.override_reason) {
        entries.push(entry(
            "override",
            &format!("{reason} (promotion check: {why})"),
        ));
    }
    crate::audit::commit_with(store, entries, t)?;
    tracing::debug!(run = run.id, "run recorded");
    Ok(run)
}

/// Approves (or rejects) what an interrupted run awaits, in its stored log, when no process
/// drives it (local mode between `stages up` and `runs resume`): the same rules as
/// [`Runs::decide`]; the run goes on when it is resumed.
pub fn decide_stored(
    store: &dyn Store,
    run: u64,
    approve: bool,
    by: &Identity,
    comment: &str,
) -> Result<String, RunsError> {
    let Some(record) = store.run(run)? else {
        return Err(RunsError::UnknownRun(run));
    };
    if record.status != RunStatus::Running {
        return Err(RunsError::Resolve(format!(
            "run {run} has ended ({}); there is nothing to approve",
            record.status.as_str()
        )));
    }
    let events = store.events(run, 0)?;
    let Some((gate, approvers, separate)) = crate::scheduler::driver::waiting_gate(&events) else {
        return Err(RunsError::Resolve(format!(
            "run {run} is not awaiting an approval"
        )));
    };
    crate::scheduler::driver::may_approve(by, &approvers, separate, &record.by)
        .map_err(RunsError::Resolve)?;
    let stage = gate.strip_prefix("stage ").map(str::to_owned);
    let kind = if approve {
        EventKind::Approved {
            gate: gate.clone(),
            by: by.name.clone(),
            digest: record.plan_digest.clone(),
            comment: comment.to_owned(),
        }
    } else {
        EventKind::Rejected {
            gate: gate.clone(),
            by: by.name.clone(),
            reason: comment.to_owned(),
        }
    };
    let mut t = Transition::new();
    t.push(Op::AppendEvent {
        run,
        event: EventRecord {
            v: FORMAT,
            seq: events.last().map_or(0, |e| e.seq + 1),
            at_ms: now_ms(),
            stage,
            kind,
        },
    });
    let entry = crate::audit::Entry {
        action: if approve { "approve" } else { "reject" },
        by: by.name.clone(),
        project: record.project,
        run,
        release: record.release,
        reason: comment.to_owned(),
    };
    crate::audit::commit_with(store, vec![entry], t)?;
    Ok(gate)
}

/// Who submits a run, and why when that matters, for its record and the audit log.
#[derive(Debug, Clone, Default)]
struct Origin {
    by: String,
    /// Recorded with the submission (a rollback's cause).
    reason: String,
    /// `--skip-promotion-check --reason`.
    override_reason: Option<String>,
    /// Why the promotion check failed (`None`: it passed, or there is none).
    promotion: Option<String>,
}

impl Origin {
    fn of(s: &Submission) -> Origin {
        Origin {
            by: s.by.clone(),
            reason: String::new(),
            override_reason: s.skip_promotion.clone(),
            promotion: None,
        }
    }
}

/// The environment before the one `project` was loaded for, in `environments:` order.
pub fn previous_environment(project: &Project) -> Option<String> {
    let env = project.spec.environment_name()?;
    let at = project
        .spec
        .environments
        .iter()
        .position(|e| e.name.value == env)?;
    at.checked_sub(1)
        .map(|i| project.spec.environments[i].name.value.clone())
}

/// The runs of the project `key` (scoped to any environment) in environment `env` that
/// applied every stage of a release and succeeded, oldest first: what promotion counts.
fn full_successes(store: &dyn Store, key: &str, env: &str) -> Result<Vec<RunRecord>, StoreError> {
    let base = key.split_once('/').map_or(key, |(p, _)| p);
    let scoped = scoped_key(base, Some(env));
    Ok(store
        .runs()?
        .into_iter()
        .filter(|r| {
            r.project == scoped
                && r.direction == "up"
                && r.status == RunStatus::Succeeded
                && r.selection == Selection::All
                && !r.release.is_empty()
        })
        .collect())
}

/// The latest of [`full_successes`].
pub fn last_release(
    store: &dyn Store,
    key: &str,
    env: &str,
) -> Result<Option<RunRecord>, StoreError> {
    Ok(full_successes(store, key, env)?.pop())
}

/// Promotion order: `plan`'s release must have succeeded (every stage) in `previous`. `None`
/// when it has; else why not.
fn promotion_check(
    store: &dyn Store,
    key: &str,
    previous: &str,
    plan: &Plan,
) -> Result<Option<String>, RunsError> {
    let done = full_successes(store, key, previous)?;
    if done.iter().any(|r| r.release == plan.release) {
        return Ok(None);
    }
    let env = plan.environment.as_deref().unwrap_or("this environment");
    Ok(Some(match done.last() {
        Some(r) => format!(
            "release {} has not succeeded in {previous} (the environment before {env}); {previous} last succeeded with release {} in run {}",
            short(&plan.release),
            short(&r.release),
            r.id
        ),
        None => format!(
            "release {} has not succeeded in {previous} (the environment before {env}); nothing has succeeded there yet",
            short(&plan.release)
        ),
    }))
}

/// The first 12 hex digits of a digest, as shown.
pub fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}

/// Runs blocking store work (sled's flush) off the async workers.
async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(StoreError::Io(format!("store task failed: {e}"))))?
}
