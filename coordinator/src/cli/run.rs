//! `baton stages up` (a real run), `stages status` and `runs list|show`, in local mode:
//! state in `.baton/` beside the stages file, stages executed in this process.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_common::mask::Masker;
use baton_common::spec::{DiskFiles, Project};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED};
use crate::planner::{History, Plan, Selection};
use crate::scheduler::driver::{drive, LocalRun, RunDirection};
use crate::store::{
    now_ms, EventKind, EventRecord, Op, RunRecord, RunStatus, SledStore, StageKey, Store,
    Transition, FORMAT,
};

/// Where a project's state lives unless `--state-dir` says otherwise.
pub(super) fn default_state_dir(stages_file: &Path) -> PathBuf {
    stages_file
        .parent()
        .map_or_else(|| PathBuf::from(".baton"), |p| p.join(".baton"))
}

/// The store key of a project: its stages file's name, so variants of one project in one
/// directory keep separate histories.
pub(super) fn project_key(stages_file: &Path) -> String {
    stages_file.file_name().map_or_else(
        || "stages.yaml".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub(super) fn open_store(
    dir: &Path,
    err: &mut dyn Write,
) -> std::io::Result<Option<Arc<SledStore>>> {
    match SledStore::open(dir) {
        Ok(s) => Ok(Some(Arc::new(s))),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(None)
        }
    }
}

/// The store as the planner's view of earlier runs.
pub(super) struct StoreHistory<'a> {
    pub store: &'a dyn Store,
    pub project: String,
}

impl History for StoreHistory<'_> {
    fn stage_succeeded(&self, stage: &str) -> bool {
        matches!(
            self.store.result(&StageKey::new(&self.project, stage)),
            Ok(Some(_))
        )
    }

    fn applied_versions(&self, stage: &str) -> BTreeSet<u64> {
        self.store
            .applied(&StageKey::new(&self.project, stage))
            .map(|v| v.into_iter().map(|a| a.version).collect())
            .unwrap_or_default()
    }
}

/// The latest run of `project` that never finished.
pub(super) fn interrupted_run(
    store: &dyn Store,
    project: &str,
) -> Result<Option<RunRecord>, crate::store::StoreError> {
    Ok(store
        .runs()?
        .into_iter()
        .rev()
        .find(|r| r.project == project && r.direction == "up" && r.status == RunStatus::Running))
}

/// Runs a planned project; resumes the stages file's interrupted run when there is one.
#[allow(clippy::too_many_arguments)]
pub(super) async fn up_async(
    project: Project,
    plan: Plan,
    store: Arc<SledStore>,
    key: String,
    overrides: BTreeMap<String, String>,
    process_env: BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let io_err = |e: crate::store::StoreError| std::io::Error::other(e.to_string());
    // A run that crashed mid-way is resumed, never silently restarted.
    let mut done = BTreeSet::new();
    let mut next_seq = 1;
    let run = match interrupted_run(store.as_ref(), &key).map_err(io_err)? {
        Some(old) if old.plan_digest == plan.digest && old.selection != plan.selection => {
            writeln!(
                err,
                "error: run {} ({}) was interrupted before it finished; resume it first with `baton runs resume`, then run this selection",
                old.id,
                describe_selection(&old.selection)
            )?;
            return Ok(EXIT_INVALID);
        }
        Some(old) if old.plan_digest == plan.digest => {
            let events = store.events(old.id, 0).map_err(io_err)?;
            next_seq = events.last().map_or(1, |e| e.seq + 1);
            writeln!(
                out,
                "resuming run {} (interrupted before it finished)",
                old.id
            )?;
            let mut in_flight: BTreeMap<(String, u64), String> = BTreeMap::new();
            for e in &events {
                let stage = e.stage.clone().unwrap_or_default();
                match &e.kind {
                    EventKind::StageSucceeded { .. } => {
                        done.insert(stage);
                    }
                    EventKind::MigrationStarted { version, name, .. } => {
                        in_flight.insert((stage, *version), name.clone());
                    }
                    EventKind::MigrationDone { version, .. } => {
                        in_flight.remove(&(stage, *version));
                    }
                    _ => {}
                }
            }
            if !done.is_empty() {
                writeln!(
                    out,
                    "  already done: {}",
                    done.iter().cloned().collect::<Vec<_>>().join(", ")
                )?;
            }
            for ((stage, version), name) in &in_flight {
                writeln!(
                    out,
                    "  stage {stage}: migration {version:03}_{name} was in flight when the run stopped; it is sent again with the same Idempotency-Key"
                )?;
            }
            old
        }
        other => {
            if let Some(old) = other {
                // The files changed since that run was planned: it cannot resume as planned.
                let mut abandoned = old.clone();
                abandoned.status = RunStatus::Failed;
                abandoned.finished_at_ms = Some(now_ms());
                let events = store.events(old.id, 0).map_err(io_err)?;
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
                store.commit(t).map_err(io_err)?;
                writeln!(err, "note: run {} was interrupted, but the files changed since it was planned; it is marked failed and a new run starts", old.id)?;
            }
            new_run(store.as_ref(), &key, &plan, out)?
        }
    };
    let run_id = run.id;
    let plan = Arc::new(plan);
    let project = Arc::new(project);
    let local = LocalRun {
        project: project.clone(),
        plan: plan.clone(),
        store: store.clone(),
        project_key: key.clone(),
        run,
        next_seq,
        done,
        process_env: process_env.clone(),
        overrides: overrides.clone(),
        files: Arc::new(DiskFiles),
        direction: RunDirection::Up,
    };
    let Some(status) = drive_and_print(local, out, err).await? else {
        return Ok(EXIT_RUN_FAILED);
    };
    summary(out, store.as_ref(), &key, &plan, run_id, status)?;
    if status == RunStatus::Failed && plan.rollback_on_failure {
        rollback(
            &project,
            &store,
            &key,
            run_id,
            overrides,
            process_env,
            out,
            err,
        )
        .await?;
    }
    Ok(match status {
        RunStatus::Succeeded | RunStatus::SucceededWithFailures => EXIT_OK,
        _ => EXIT_RUN_FAILED,
    })
}

/// Records a new run and its first event.
fn new_run(
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    out: &mut dyn Write,
) -> std::io::Result<RunRecord> {
    let io_err = |e: crate::store::StoreError| std::io::Error::other(e.to_string());
    let id = store.next_id().map_err(io_err)?;
    let uid = baton_common::ids::random_hex()?;
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
    store.commit(t).map_err(io_err)?;
    let what = if plan.direction == "down" {
        "to roll back"
    } else {
        "to run"
    };
    writeln!(
        out,
        "run {id}: {} stage(s) {what} (plan {})",
        plan.order.len(),
        &plan.digest[..12]
    )?;
    Ok(run)
}

/// Drives a run, showing its progress; `None` when the run could not be driven.
async fn drive_and_print(
    local: LocalRun,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Option<RunStatus>> {
    use std::io::IsTerminal;
    let run_id = local.run.id;
    let stages: Vec<String> = local.plan.order.iter().map(|s| s.name.clone()).collect();
    let cancel = CancellationToken::new();
    let ctrl_c = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let (tx, mut rx) = mpsc::channel(1024);
    let driving = drive(local, cancel, tx);
    tokio::pin!(driving);
    let mut progress =
        super::progress::Progress::new(std::io::stdout().is_terminal(), &stages, out);
    let result = loop {
        tokio::select! {
            // Progress first, so it is shown in order before the summary.
            biased;
            Some(e) = rx.recv() => progress.event(&e)?,
            r = &mut driving => break r,
        }
    };
    watcher.abort();
    while let Ok(e) = rx.try_recv() {
        progress.event(&e)?;
    }
    progress.finish();
    match result {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            writeln!(err, "error: run {run_id} stopped: {e}")?;
            Ok(None)
        }
    }
}

/// `rollback_on_failure`: rolls back what the failed run `failed_run` applied, newest first,
/// in reverse dependency order, as a run of its own.
#[allow(clippy::too_many_arguments)]
async fn rollback(
    project: &Arc<Project>,
    store: &Arc<SledStore>,
    key: &str,
    failed_run: u64,
    overrides: BTreeMap<String, String>,
    process_env: BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    let io_err = |e: crate::store::StoreError| std::io::Error::other(e.to_string());
    // Per stage, the lowest version this run applied: everything from there up goes.
    let mut first_applied: BTreeMap<String, u64> = BTreeMap::new();
    for e in store.events(failed_run, 0).map_err(io_err)? {
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
        writeln!(
            out,
            "rollback_on_failure: run {failed_run} changed nothing; nothing to roll back"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "\nrollback_on_failure: rolling back what run {failed_run} applied in {}",
        first_applied.keys().cloned().collect::<Vec<_>>().join(", ")
    )?;
    let history = StoreHistory {
        store: store.as_ref(),
        project: key.to_owned(),
    };
    let selection = Selection::Stages {
        names: first_applied.keys().cloned().collect(),
    };
    let plan = match crate::planner::plan_down(
        project,
        &selection,
        &history,
        crate::planner::Dependents::Leave,
    ) {
        Ok(p) => p,
        Err(e) => {
            writeln!(err, "error: cannot plan the rollback: {e}")?;
            return Ok(());
        }
    };
    let to = first_applied
        .into_iter()
        .map(|(s, v)| (s, v.saturating_sub(1)))
        .collect();
    let direction = RunDirection::Down {
        to,
        skip_missing_down: false,
    };
    let run = drive_down(
        project.clone(),
        plan,
        store,
        key,
        overrides,
        process_env,
        direction,
        out,
        err,
    )
    .await?;
    if let Some((run_id, status)) = run {
        writeln!(out, "\nrollback run {run_id} {}", status.as_str())?;
    }
    Ok(())
}

/// `stages down`: rolls the planned stages back, as a run.
#[allow(clippy::too_many_arguments)]
pub(super) async fn down_async(
    project: Project,
    plan: Plan,
    store: Arc<SledStore>,
    key: String,
    overrides: BTreeMap<String, String>,
    process_env: BTreeMap<String, String>,
    skip_missing_down: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let direction = RunDirection::Down {
        to: BTreeMap::new(),
        skip_missing_down,
    };
    let run = drive_down(
        Arc::new(project),
        plan,
        &store,
        &key,
        overrides,
        process_env,
        direction,
        out,
        err,
    )
    .await?;
    let Some((run_id, status)) = run else {
        return Ok(EXIT_RUN_FAILED);
    };
    writeln!(out, "\nrun {run_id} {}", status.as_str())?;
    Ok(if status == RunStatus::Succeeded {
        EXIT_OK
    } else {
        EXIT_RUN_FAILED
    })
}

/// Records a new down run for `plan` and drives it: `stages down` and `rollback_on_failure`.
#[allow(clippy::too_many_arguments)]
async fn drive_down(
    project: Arc<Project>,
    plan: Plan,
    store: &Arc<SledStore>,
    key: &str,
    overrides: BTreeMap<String, String>,
    process_env: BTreeMap<String, String>,
    direction: RunDirection,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Option<(u64, RunStatus)>> {
    let run = new_run(store.as_ref(), key, &plan, out)?;
    let run_id = run.id;
    let local = LocalRun {
        project,
        plan: Arc::new(plan),
        store: store.clone(),
        project_key: key.to_owned(),
        run,
        next_seq: 1,
        done: BTreeSet::new(),
        process_env,
        overrides,
        files: Arc::new(DiskFiles),
        direction,
    };
    Ok(drive_and_print(local, out, err)
        .await?
        .map(|status| (run_id, status)))
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// One line per event a person would follow (request-level detail stays in the log).
pub(super) fn print_event(out: &mut dyn Write, e: &EventRecord) -> std::io::Result<()> {
    let stage = e.stage.as_deref().unwrap_or("");
    let line = match &e.kind {
        EventKind::RunStarted { .. } | EventKind::Log { .. } => return Ok(()),
        EventKind::StageStarted { .. } => "started".to_owned(),
        EventKind::MigrationStarted {
            version,
            name,
            direction,
        } => format!("{version:03}_{name} {direction}..."),
        EventKind::Request {
            method,
            url,
            status,
            duration_ms,
            attempt,
            ..
        } => {
            let status = status.map_or_else(|| "no answer".to_owned(), |s| s.to_string());
            let retry = if *attempt > 1 {
                format!(" (attempt {attempt})")
            } else {
                String::new()
            };
            format!("  {method} {url} -> {status} in {duration_ms} ms{retry}")
        }
        EventKind::MigrationDone {
            version,
            name,
            direction,
            duration_ms,
        } => {
            format!("{version:03}_{name} {direction} done in {duration_ms} ms")
        }
        EventKind::StageSucceeded { duration_ms } => {
            format!("succeeded in {:.1}s", *duration_ms as f64 / 1000.0)
        }
        EventKind::StageFailed { message } => format!("FAILED: {message}"),
        EventKind::StageSkipped { reason } => format!("skipped ({reason})"),
        EventKind::StageNotRun { reason } => format!("not run: {reason}"),
        EventKind::RunFinished { status } => format!("run {}", status.as_str()),
        EventKind::Notice { message } => message.clone(),
    };
    writeln!(out, "{} {stage:<16} {line}", clock(e.at_ms))
}

/// The end of a run: each stage's outcome and duration, and what it exports (secrets masked).
fn summary(
    out: &mut dyn Write,
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    run_id: u64,
    status: RunStatus,
) -> std::io::Result<()> {
    let mut outcome: BTreeMap<String, String> = BTreeMap::new();
    for e in store.events(run_id, 0).unwrap_or_default() {
        let Some(stage) = e.stage else { continue };
        let text = match e.kind {
            EventKind::StageSucceeded { duration_ms } => {
                format!("succeeded in {:.1}s", duration_ms as f64 / 1000.0)
            }
            EventKind::StageFailed { .. } => "failed".to_owned(),
            EventKind::StageSkipped { reason } => format!("skipped ({reason})"),
            EventKind::StageNotRun { .. } => "not run".to_owned(),
            _ => continue,
        };
        outcome.insert(stage, text);
    }
    writeln!(out)?;
    writeln!(out, "run {run_id} {}", status.as_str())?;
    let width = plan.order.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &plan.order {
        let state = outcome
            .get(&s.name)
            .cloned()
            .unwrap_or_else(|| "not run".to_owned());
        writeln!(out, "  {:width$}  {state}", s.name)?;
        let k = StageKey::new(key, &s.name);
        let Ok(Some(result)) = store.result(&k) else {
            continue;
        };
        if result.run_id != run_id || result.exports.is_empty() {
            continue;
        }
        let masker = masker_for(&result.exports, &result.secret);
        for (n, v) in &result.exports {
            let shown = if result.secret.contains(n) {
                "***".to_owned()
            } else {
                masker.mask(v)
            };
            writeln!(out, "  {:width$}    {n}={shown}", "")?;
        }
    }
    Ok(())
}

/// A masker for the secret values among `vars`.
pub(super) fn masker_for(vars: &BTreeMap<String, String>, secret: &[String]) -> Masker {
    let mut m = Masker::new();
    for name in secret {
        if let Some(v) = vars.get(name) {
            // A short value cannot be masked by value; mask by name below instead.
            let _ = m.add(name, v);
        }
    }
    m
}

/// `stages status`: per stage, applied and pending migrations and the last result.
pub(super) fn status(
    project: &Project,
    store: &dyn Store,
    key: &str,
    verbose: bool,
    out: &mut dyn Write,
) -> std::io::Result<i32> {
    let runs: BTreeMap<u64, RunRecord> = store
        .runs()
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    // Each stage's most recent outcome: one pass over this project's runs, newest first.
    let names: BTreeSet<&str> = project
        .spec
        .stages
        .iter()
        .map(|s| s.name.value.as_str())
        .collect();
    let mut last_outcome: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for run in runs.values().rev().filter(|r| r.project == key) {
        if last_outcome.len() == names.len() {
            break;
        }
        for e in store
            .events(run.id, 0)
            .unwrap_or_default()
            .into_iter()
            .rev()
        {
            let Some(stage) = e.stage else { continue };
            let what = match e.kind {
                EventKind::StageSucceeded { .. } => "succeeded".to_owned(),
                EventKind::StageFailed { message } => format!("failed: {message}"),
                EventKind::StageSkipped { reason } => format!("skipped ({reason})"),
                EventKind::StageNotRun { .. } => "not run".to_owned(),
                EventKind::StageStarted { .. } if run.status == RunStatus::Running => {
                    "interrupted".to_owned()
                }
                _ => continue,
            };
            let label = if run.direction == "down" {
                format!("{what} (down)")
            } else {
                what
            };
            last_outcome.entry(stage).or_insert((run.id, label));
        }
    }
    for (spec, loaded) in project.spec.stages.iter().zip(&project.stages) {
        let k = StageKey::new(key, &spec.name.value);
        let applied = store.applied(&k).unwrap_or_default();
        let applied_versions: BTreeSet<u64> = applied.iter().map(|a| a.version).collect();
        let pending: Vec<String> = loaded
            .migrations
            .iter()
            .filter(|m| !applied_versions.contains(&m.version))
            .map(|m| format!("{:03}_{}", m.version, m.name))
            .collect();
        let result = store.result(&k).ok().flatten();
        let last = match last_outcome.get(&spec.name.value) {
            Some((run, what)) => format!("last run {run}: {what}"),
            None => "never run".to_owned(),
        };
        writeln!(
            out,
            "{}: {} applied, {} pending; {last}",
            spec.name.value,
            applied.len(),
            pending.len()
        )?;
        for a in &applied {
            let file = loaded.migrations.iter().find(|m| m.version == a.version);
            let note = match file {
                None => " (file removed)",
                Some(m) if m.digest != a.digest => " (modified after apply)",
                Some(_) => "",
            };
            let run = runs.get(&a.run_id).map_or(String::new(), |r| {
                format!(", run {} {}", r.id, r.status.as_str())
            });
            writeln!(out, "  applied  {:03}_{}{note}{run}", a.version, a.name)?;
        }
        for p in &pending {
            writeln!(out, "  pending  {p}")?;
        }
        if verbose {
            if let Some(r) = &result {
                let masker = masker_for(&r.exports, &r.secret);
                for (n, v) in &r.exports {
                    let shown = if r.secret.contains(n) {
                        "***".to_owned()
                    } else {
                        masker.mask(v)
                    };
                    writeln!(out, "  export   {n}={shown}")?;
                }
            }
        }
    }
    Ok(EXIT_OK)
}

fn describe_selection(selection: &Selection) -> String {
    match selection {
        Selection::All => "all stages".to_owned(),
        Selection::Stages { names } => format!("--stage {}", names.join(",")),
        Selection::Range { from, to } => format!("--from {from} --to {to}"),
    }
}

/// `runs list`.
pub(super) fn runs_list(store: &dyn Store, out: &mut dyn Write) -> std::io::Result<i32> {
    for r in store.runs().unwrap_or_default() {
        let selection = describe_selection(&r.selection);
        writeln!(
            out,
            "{:>6}  {:<24} {:<4} {:<28} {}",
            r.id,
            r.status.as_str(),
            r.direction,
            r.project,
            selection
        )?;
    }
    Ok(EXIT_OK)
}

/// `runs show RUN`.
pub(super) fn runs_show(
    store: &dyn Store,
    id: u64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let Ok(Some(run)) = store.run(id) else {
        writeln!(err, "error: there is no run {id} (see `baton runs list`)")?;
        return Ok(EXIT_INVALID);
    };
    writeln!(
        out,
        "run {} {} ({}, plan {})",
        run.id,
        run.status.as_str(),
        run.project,
        &run.plan_digest[..12.min(run.plan_digest.len())]
    )?;
    for e in store.events(id, 0).unwrap_or_default() {
        if let EventKind::Log { line } = &e.kind {
            writeln!(
                out,
                "{} {:<16}   | {line}",
                clock(e.at_ms),
                e.stage.as_deref().unwrap_or("")
            )?;
        } else {
            print_event(out, &e)?;
        }
    }
    Ok(EXIT_OK)
}
