//! `baton stages up` (a real run), `stages down`, `stages status` and `runs list|show`, in
//! local mode: state in `.baton/` beside the stages file, stages executed in this process.
//! The run lifecycle itself lives in [`crate::runs`]; this module submits, watches and prints.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_common::spec::Project;
use tokio_util::sync::CancellationToken;

use super::{EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED};
use crate::planner::Plan;
use crate::runner::in_process::InProcessRunner;
pub(super) use crate::runs::{
    describe_selection, interrupted_run, key_of, project_key, scoped_key, StoreHistory,
};
use crate::runs::{RunOutcome, Runs, RunsError, Submission, Submitted};
use crate::scheduler::driver::{PlannedFiles, RunDirection};
use crate::store::{EventKind, EventRecord, RunStatus, SledStore, StageKey, StateKey, Store};

/// Where a project's state lives unless `--state-dir` says otherwise.
pub(super) fn default_state_dir(stages_file: &Path) -> PathBuf {
    stages_file
        .parent()
        .map_or_else(|| PathBuf::from(".baton"), |p| p.join(".baton"))
}

pub(super) fn open_store(
    dir: &Path,
    state_key: &StateKey,
    err: &mut dyn Write,
) -> std::io::Result<Option<Arc<SledStore>>> {
    match SledStore::open_keyed(dir, state_key) {
        Ok(s) => Ok(Some(Arc::new(s))),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(None)
        }
    }
}

/// A planned project, ready to run in this process.
pub(super) struct LocalProject {
    pub project: Project,
    pub files: PlannedFiles,
    pub plan: Plan,
    pub store: Arc<SledStore>,
    pub key: String,
    pub overrides: BTreeMap<String, String>,
    /// This process's environment: `valueFromEnv` and `env` in conditions.
    pub env: BTreeMap<String, String>,
    /// `-o json`: stdout holds only the run's JSON record (see [`run_json`]).
    pub output: super::OutputFormat,
    /// The live view (see `progress::live_wanted`), else plain lines.
    pub live: bool,
    /// Log lines (command output, retries) in the live view too.
    pub verbose: bool,
    /// `--skip-promotion-check --reason TEXT`.
    pub skip_promotion: Option<String>,
}

impl LocalProject {
    /// `stages up` on a runtime of its own.
    pub fn up(self, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
        runtime()?.block_on(up_async(self, out, err))
    }

    /// `stages down` on a runtime of its own.
    pub fn down(
        self,
        skip_missing_down: bool,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> std::io::Result<i32> {
        runtime()?.block_on(down_async(self, skip_missing_down, out, err))
    }

    /// The run service with the in-process runner, and the submission.
    fn service(self) -> (Arc<Runs>, Submission) {
        let runner = Arc::new(InProcessRunner::new(self.env.clone()));
        let runs = Runs::local(self.store, runner);
        let sub = Submission {
            project: Arc::new(self.project),
            files: Arc::new(self.files),
            plan: self.plan,
            project_key: self.key,
            overrides: self.overrides,
            by: super::identity(&self.env).name,
            condition_env: self.env,
            request: None,
            skip_promotion: self.skip_promotion,
        };
        (runs, sub)
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn runs_err(e: RunsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Runs a planned project; resumes the stages file's interrupted run when there is one.
pub(super) async fn up_async(
    local: LocalProject,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let json = local.output == super::OutputFormat::Json;
    let show = (local.live, local.verbose);
    let dir = local.store.dir().to_path_buf();
    let (runs, sub) = local.service();
    let plan = sub.plan.clone();
    let key = sub.project_key.clone();
    let project = sub.project.clone();
    // With -o json, stdout holds only the run's record: progress is not shown.
    let mut sink = std::io::sink();
    let data = out;
    let out: &mut dyn Write = if json { &mut sink } else { &mut *data };
    let submitted = match runs.submit_up(sub).await {
        Ok(s) => s,
        Err(
            e @ (RunsError::InterruptedFirst { .. }
            | RunsError::InterruptedOther { .. }
            | RunsError::Promotion(_)),
        ) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
        Err(e) => return Err(runs_err(e)),
    };
    // Read-only commands in other processes ask this one while it holds the state.
    let _reads = super::readonly::serve(&dir, runs.clone(), project, key.clone(), submitted.run_id);
    announce(&submitted, &plan, out, err)?;
    let run_id = submitted.run_id;
    let watched = watch_and_print(&runs, &submitted, &plan, show, out, err).await?;
    let outcome = watched.outcome;
    let Some(status) = outcome.status else {
        return Ok(EXIT_RUN_FAILED);
    };
    // A new run's events were all shown: the summary needs no second read of its log.
    let seen = (!submitted.resumed).then_some(watched.stage_ends.as_slice());
    summary(
        out,
        runs.store().as_ref(),
        &key,
        &plan,
        run_id,
        status,
        seen,
    )?;
    if status == RunStatus::Failed && !plan.rollback_on_failure {
        writeln!(err, "{}", next_steps(run_id, ""))?;
    }
    let mut rollback_run = None;
    if status == RunStatus::Cancelled {
        // How to go on: what was in flight is in doubt and keeps its key.
        let doubt =
            crate::runs::in_flight_when_cancelled(runs.store().as_ref(), &key).unwrap_or_default();
        writeln!(
            err,
            "run {run_id} was cancelled; `baton stages up` runs what is left{}",
            if doubt.is_empty() {
                String::new()
            } else {
                format!(
                    " and sends {} again with the same Idempotency-Key (it was in flight: check the target if it does not honour keys)",
                    doubt.join(", ")
                )
            }
        )?;
    }
    if status == RunStatus::Failed && plan.rollback_on_failure {
        match &outcome.rollback {
            None if outcome.error.is_none() => writeln!(
                out,
                "rollback_on_failure: run {run_id} changed nothing; nothing to roll back"
            )?,
            None => writeln!(
                err,
                "error: {}",
                outcome.error.as_deref().unwrap_or_default()
            )?,
            Some(rb) => {
                writeln!(
                    out,
                    "\nrollback_on_failure: rolling back what run {run_id} applied in {}",
                    rb.stages.join(", ")
                )?;
                let shown = Submitted {
                    run_id: rb.run,
                    resumed: false,
                    first_seq: 0,
                    plan_digest: rb.plan.digest.clone(),
                    stages: rb.stages.len(),
                    notes: Vec::new(),
                };
                announce(&shown, &rb.plan, out, err)?;
                let o = watch_and_print(&runs, &shown, &rb.plan, show, out, err)
                    .await?
                    .outcome;
                if let Some(s) = o.status {
                    writeln!(out, "\nrollback run {} {}", rb.run, s.as_str())?;
                    rollback_run = Some((rb.run, s));
                }
            }
        }
    }
    runs.shutdown().await;
    if json {
        let mut record = run_json(runs.store().as_ref(), &key, &plan, run_id, status);
        if let Some((id, s)) = rollback_run {
            record["rollback"] = serde_json::json!({"run": id, "status": s});
        }
        write_json(data, &record)?;
    }
    Ok(match status {
        RunStatus::Succeeded | RunStatus::SucceededWithFailures => EXIT_OK,
        _ => EXIT_RUN_FAILED,
    })
}

/// `stages down`: rolls the planned stages back, as a run.
pub(super) async fn down_async(
    local: LocalProject,
    skip_missing_down: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let json = local.output == super::OutputFormat::Json;
    let show = (local.live, local.verbose);
    let dir = local.store.dir().to_path_buf();
    let (runs, sub) = local.service();
    let plan = sub.plan.clone();
    let key = sub.project_key.clone();
    let project = sub.project.clone();
    let mut sink = std::io::sink();
    let data = out;
    let out: &mut dyn Write = if json { &mut sink } else { &mut *data };
    let direction = RunDirection::Down {
        to: plan.down_to.clone(),
        skip_missing_down,
    };
    let submitted = match runs.submit_down(sub, direction).await {
        Ok(s) => s,
        Err(e @ (RunsError::InterruptedFirst { .. } | RunsError::InterruptedOther { .. })) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
        Err(e) => return Err(runs_err(e)),
    };
    let _reads = super::readonly::serve(&dir, runs.clone(), project, key.clone(), submitted.run_id);
    announce(&submitted, &plan, out, err)?;
    let outcome = watch_and_print(&runs, &submitted, &plan, show, out, err)
        .await?
        .outcome;
    runs.shutdown().await;
    let Some(status) = outcome.status else {
        return Ok(EXIT_RUN_FAILED);
    };
    writeln!(out, "\nrun {} {}", submitted.run_id, status.as_str())?;
    if json {
        let record = run_json(runs.store().as_ref(), &key, &plan, submitted.run_id, status);
        write_json(data, &record)?;
    }
    Ok(if status == RunStatus::Succeeded {
        EXIT_OK
    } else {
        EXIT_RUN_FAILED
    })
}

/// What a submission says before its events: resume notes, or the new run's size.
pub(super) fn announce(
    s: &Submitted,
    plan: &Plan,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    for note in &s.notes {
        if note.starts_with("note:") {
            writeln!(err, "{note}")?;
        } else {
            writeln!(out, "{note}")?;
        }
    }
    if !s.resumed {
        let what = if plan.direction == "down" {
            "to roll back"
        } else {
            "to run"
        };
        let env = plan
            .environment
            .as_ref()
            .map(|e| format!(" in {e}"))
            .unwrap_or_default();
        writeln!(
            out,
            "run {}{env}: {} stage(s) {what} (plan {})",
            s.run_id,
            plan.order.len(),
            &plan.digest[..12.min(plan.digest.len())]
        )?;
    }
    Ok(())
}

/// The least time between two batches of progress shown (see [`watch_and_print`]): short
/// enough that nobody sees the difference, long enough that a burst of a run's events is
/// shown in one write instead of waking the printing thread for each few.
const PRINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// What [`watch_and_print`] saw: the run's outcome, and the events that end a stage, for
/// the summary (complete when the watch started at the run's beginning).
struct Watched {
    outcome: RunOutcome,
    stage_ends: Vec<EventRecord>,
}

/// Shows a run's progress until it ends; Ctrl-C cancels it. The outcome's error, when the
/// run could not be driven, is printed here.
async fn watch_and_print(
    runs: &Arc<Runs>,
    s: &Submitted,
    plan: &Plan,
    show: (bool, bool),
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Watched> {
    let run_id = s.run_id;
    let stages: Vec<String> = plan.order.iter().map(|s| s.name.clone()).collect();
    let ctrl_c = CancellationToken::new();
    let signal = ctrl_c.clone();
    // SIGINT (Ctrl-C) or SIGTERM: cancel the run; its stages stop (command steps: their
    // whole process group) and the run records that it was cancelled.
    let watcher = tokio::spawn(async move {
        baton_common::telemetry::shutdown_signal().await;
        signal.cancel();
    });
    let mut rx = runs.watch(run_id, s.first_seq, true).map_err(runs_err)?;
    let mut progress = super::progress::Progress::new(show.0, show.1, &stages, out);
    let mut cancelled = false;
    let cancel = |cancelled: &mut bool| {
        *cancelled = true;
        // Locally the one who stops the run is the one who started it.
        let by = runs
            .store()
            .run(run_id)
            .ok()
            .flatten()
            .map(|r| r.by)
            .unwrap_or_default();
        if let Err(e) = runs.cancel_by(run_id, &by) {
            tracing::warn!(run = run_id, error = %e, "the cancel was not audited");
            runs.cancel(run_id);
        }
    };
    let mut batch = Vec::new();
    let mut stage_ends = Vec::new();
    loop {
        tokio::select! {
            // Progress first, so it is shown in order before the summary.
            biased;
            e = rx.recv() => match e {
                Some(e) => batch.push(e),
                None => break,
            },
            () = ctrl_c.cancelled(), if !cancelled => {
                cancel(&mut cancelled);
                continue;
            }
        }
        // What arrived meanwhile is shown with it, in one write.
        while let Ok(e) = rx.try_recv() {
            batch.push(e);
        }
        let end = batch
            .last()
            .is_some_and(|e| matches!(e.kind, EventKind::RunFinished { .. }));
        progress.events(&batch)?;
        stage_ends.extend(batch.drain(..).filter(|e| is_stage_end(&e.kind)));
        if end {
            break;
        }
        // Then a pause before the next batch: this thread is not a runtime worker, so
        // every wake costs it two context switches, and a run's events come in bursts (a
        // stage's end and its dependents' starts). The watch holds what arrives meanwhile.
        tokio::select! {
            () = tokio::time::sleep(PRINT_PAUSE) => {}
            () = ctrl_c.cancelled(), if !cancelled => cancel(&mut cancelled),
        }
    }
    watcher.abort();
    progress.finish();
    let outcome = runs.outcome(run_id).await.unwrap_or(RunOutcome {
        status: None,
        error: Some("the run's driver is gone".to_owned()),
        rollback: None,
    });
    if let (None, Some(e)) = (outcome.status, &outcome.error) {
        writeln!(err, "error: run {run_id} stopped: {e}")?;
    }
    Ok(Watched {
        outcome,
        stage_ends,
    })
}

/// The events [`summary_of`] reads: how each stage ended.
fn is_stage_end(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::StageSucceeded { .. }
            | EventKind::StageFailed { .. }
            | EventKind::StageSkipped { .. }
            | EventKind::StageNotRun { .. }
    )
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
    let Some(line) = crate::status::event_text(e) else {
        return Ok(());
    };
    // One write per line (see `Progress::event`).
    out.write_all(format!("{} {stage:<16} {line}\n", clock(e.at_ms)).as_bytes())
}

/// The end of a run: each stage's outcome and duration, and what it exports (secrets masked).
fn summary(
    out: &mut dyn Write,
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    run_id: u64,
    status: RunStatus,
    seen: Option<&[EventRecord]>,
) -> std::io::Result<()> {
    let read;
    let events = match seen {
        Some(events) => events,
        None => {
            read = store.events(run_id, 0).unwrap_or_default();
            &read
        }
    };
    let stages: Vec<String> = plan.order.iter().map(|s| s.name.clone()).collect();
    // Built whole, then written with one call: a line per stage and per export went out
    // with a write of its own (stdout flushes at every newline), 1,500 for 500 stages.
    let mut text = Vec::new();
    summary_of(&mut text, events, &stages, run_id, status, &|stage| {
        store
            .result(&StageKey::new(key, stage))
            .ok()
            .flatten()
            .filter(|r| r.run_id == run_id)
    })?;
    out.write_all(&text)
}

/// A finished run as `stages up|down -o json` prints it (schema `baton.run/v1`): its id,
/// direction and status, and per stage its outcome, duration, error and exports (secrets
/// masked; from the events and results the store recorded, which hold masked text only).
pub(super) fn run_json(
    store: &dyn Store,
    key: &str,
    plan: &Plan,
    run_id: u64,
    status: RunStatus,
) -> serde_json::Value {
    let events = store.events(run_id, 0).unwrap_or_default();
    let stages: Vec<String> = plan.order.iter().map(|s| s.name.clone()).collect();
    run_record(
        &events,
        &stages,
        run_id,
        plan.direction,
        status,
        &plan.digest,
        &|stage| {
            store
                .result(&StageKey::new(key, stage))
                .ok()
                .flatten()
                .filter(|r| r.run_id == run_id)
                .map(|r| crate::status::masked_exports(&r.exports, &r.secret))
        },
    )
}

/// The `baton.run/v1` record of a finished run from its events: per stage of `stages`, its
/// outcome, duration, error or skip reason, and what `exports` gives for it (masked).
pub(super) fn run_record(
    events: &[EventRecord],
    stages: &[String],
    run_id: u64,
    direction: &str,
    status: RunStatus,
    digest: &str,
    exports: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> serde_json::Value {
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for name in stages {
        let mut outcome = "not run".to_owned();
        let (mut duration_ms, mut error, mut reason) = (None, None, None);
        for e in events
            .iter()
            .filter(|e| e.stage.as_deref() == Some(name.as_str()))
        {
            match &e.kind {
                EventKind::StageSucceeded { duration_ms: d } => {
                    outcome = "succeeded".to_owned();
                    duration_ms = Some(*d);
                }
                EventKind::StageFailed { message } => {
                    outcome = "failed".to_owned();
                    error = Some(message.clone());
                }
                EventKind::StageSkipped { reason: r } => {
                    outcome = "skipped".to_owned();
                    reason = Some(r.clone());
                }
                _ => {}
            }
        }
        rows.push(serde_json::json!({
            "name": name,
            "outcome": outcome,
            "duration_ms": duration_ms,
            "error": error,
            "reason": reason,
            "exports": exports(name).unwrap_or_default(),
        }));
    }
    serde_json::json!({
        "schema": schema::RUN,
        "run": run_id,
        "direction": direction,
        "status": status,
        "plan_digest": digest,
        "stages": rows,
        "rollback": null,
    })
}

/// A failure message as one line of a summary: its first line, at most 200 characters.
fn one_line(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    match first.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &first[..at]),
        None => first.to_owned(),
    }
}

/// What to do after a run that failed: the command that goes on, and where the whole story
/// is (`remote`: the coordinator flags to add).
pub(super) fn next_steps(run_id: u64, remote: &str) -> String {
    format!(
        "to go on: fix what failed (above), then `baton stages up{remote}` runs what did not succeed; `baton runs show {run_id}{remote}` has the run's whole log"
    )
}

/// [`summary`] from a run's events; `exports` gives a stage's recorded result when known.
pub(super) fn summary_of(
    out: &mut dyn Write,
    events: &[EventRecord],
    stages: &[String],
    run_id: u64,
    status: RunStatus,
    exports: &dyn Fn(&str) -> Option<crate::store::StageResultRecord>,
) -> std::io::Result<()> {
    let mut outcome: BTreeMap<&str, String> = BTreeMap::new();
    for e in events {
        let Some(stage) = &e.stage else { continue };
        let text = match &e.kind {
            EventKind::StageSucceeded { duration_ms } => {
                format!("succeeded in {:.1}s", *duration_ms as f64 / 1000.0)
            }
            EventKind::StageFailed { message } => format!("failed: {}", one_line(message)),
            EventKind::StageSkipped { reason } => format!("skipped ({reason})"),
            EventKind::StageNotRun { .. } => "not run".to_owned(),
            _ => continue,
        };
        outcome.insert(stage, text);
    }
    writeln!(out)?;
    writeln!(out, "run {run_id} {}", status.as_str())?;
    let width = stages.iter().map(String::len).max().unwrap_or(0);
    for name in stages {
        let state = outcome
            .get(name.as_str())
            .cloned()
            .unwrap_or_else(|| "not run".to_owned());
        writeln!(out, "  {name:width$}  {state}")?;
        let Some(result) = exports(name) else {
            continue;
        };
        for line in crate::status::export_lines(&result.exports, &result.secret) {
            writeln!(out, "  {:width$}    {line}", "")?;
        }
    }
    Ok(())
}

/// The JSON schema names and versions of what `-o json` prints (docs/cli.md, "JSON
/// output"): a breaking change takes a new version.
pub(super) mod schema {
    pub const STATUS: &str = "baton.status/v1";
    pub const OUTPUTS: &str = "baton.outputs/v1";
    pub const RUN: &str = "baton.run/v1";
    pub const PLAN: &str = "baton.plan/v1";
    pub const VALIDATION: &str = "baton.validation/v1";
    pub const AUDIT: &str = "baton.audit/v1";
    pub const ENVIRONMENTS: &str = "baton.environments/v1";
}

/// One JSON document on `out`, pretty-printed, then a newline: every `-o json` output.
pub(super) fn write_json(
    out: &mut dyn Write,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// The `baton.run/v1` record of a down submission that had nothing to roll back (no run).
pub(super) fn nothing_to_do_json(direction: &str, digest: &str) -> serde_json::Value {
    serde_json::json!({
        "schema": schema::RUN,
        "run": null,
        "direction": direction,
        "status": "nothing_to_do",
        "plan_digest": digest,
        "stages": [],
        "rollback": null,
    })
}

/// `stages outputs`: every stage's exports (`stage` header, then `name=value` lines), only
/// one stage's (`name=value` lines), or JSON (`{"schema": "baton.outputs/v1", "stages":
/// {STAGE: {NAME: VALUE}}}`).
pub(super) fn write_outputs(
    exports: &BTreeMap<String, BTreeMap<String, String>>,
    one: Option<&str>,
    output: super::OutputFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if output == super::OutputFormat::Json {
        return write_json(
            out,
            &serde_json::json!({"schema": schema::OUTPUTS, "stages": exports}),
        );
    }
    for (stage, vars) in exports {
        if one.is_none() {
            writeln!(out, "{stage}")?;
        }
        let pad = if one.is_none() { "  " } else { "" };
        for (n, v) in vars {
            writeln!(out, "{pad}{n}={v}")?;
        }
    }
    Ok(())
}

/// `stages status` as text, or as JSON (`{"schema": "baton.status/v1", "stages": [...]}`,
/// exports always included, secrets masked).
pub(super) fn write_status(
    states: &[crate::status::StageState],
    verbose: bool,
    output: super::OutputFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if output == super::OutputFormat::Json {
        return write_json(
            out,
            &serde_json::json!({"schema": schema::STATUS, "stages": states}),
        );
    }
    crate::status::write(states, verbose, out)
}

/// `stages status`: per stage, applied and pending migrations and the last result.
pub(super) fn status(
    project: &Project,
    store: &dyn Store,
    key: &str,
    verbose: bool,
    output: super::OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    match crate::status::stage_states(project, store, key) {
        Ok(states) => {
            write_status(&states, verbose, output, out)?;
            Ok(EXIT_OK)
        }
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(EXIT_RUN_FAILED)
        }
    }
}

/// A run's log line as `runs show` and `runs logs` print it: `HH:MM:SS stage | line`; `None`
/// for events that are not log lines.
pub(super) fn log_line(e: &EventRecord) -> Option<String> {
    match &e.kind {
        EventKind::Log { line } => Some(format!(
            "{} {:<16}   | {line}",
            clock(e.at_ms),
            e.stage.as_deref().unwrap_or("")
        )),
        _ => None,
    }
}

/// `runs logs RUN` on a local state directory.
pub(super) fn runs_logs(
    store: &dyn Store,
    id: u64,
    stage: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let events = match store.events(id, 0) {
        Ok(e) => e,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_RUN_FAILED);
        }
    };
    if matches!(store.run(id), Ok(None)) {
        writeln!(err, "error: there is no run {id} (see `baton runs list`)")?;
        return Ok(EXIT_INVALID);
    }
    for e in events
        .iter()
        .filter(|e| stage.is_none_or(|s| e.stage.as_deref() == Some(s)))
    {
        if let Some(line) = log_line(e) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(EXIT_OK)
}

/// One row of `runs list`, local or from a coordinator.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct RunRow {
    pub id: u64,
    pub status: String,
    pub direction: String,
    /// The project's store key (`stages.yaml`, or `stages.yaml/prod`).
    pub project: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub selection: String,
    pub created_at_ms: u64,
}

/// `runs list` as a table or JSON; with `environment`, only that environment's runs.
pub(super) fn write_runs(
    rows: &[RunRow],
    environment: Option<&str>,
    output: super::OutputFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let rows: Vec<&RunRow> = rows
        .iter()
        .filter(|r| environment.is_none() || r.environment.as_deref() == environment)
        .collect();
    if output == super::OutputFormat::Json {
        return write_json(out, &rows);
    }
    for r in rows {
        writeln!(
            out,
            "{:>6}  {:<24} {:<4} {:<28} {}",
            r.id,
            r.status,
            r.direction,
            super::shown_project(&r.project),
            r.selection
        )?;
    }
    Ok(())
}

/// `runs list` on a state directory.
pub(super) fn runs_list(
    store: &dyn Store,
    environment: Option<&str>,
    output: super::OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let runs = match store.runs() {
        Ok(r) => r,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_RUN_FAILED);
        }
    };
    let rows: Vec<RunRow> = runs
        .into_iter()
        .map(|r| RunRow {
            id: r.id,
            status: r.status.as_str().to_owned(),
            selection: describe_selection(&r.selection),
            direction: r.direction,
            environment: crate::runs::environment_of(&r.project).map(str::to_owned),
            project: r.project,
            created_at_ms: r.created_at_ms,
        })
        .collect();
    write_runs(&rows, environment, output, out)?;
    Ok(EXIT_OK)
}

/// `runs show RUN`.
pub(super) fn runs_show(
    store: &dyn Store,
    id: u64,
    output: super::OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let Ok(Some(run)) = store.run(id) else {
        writeln!(err, "error: there is no run {id} (see `baton runs list`)")?;
        return Ok(EXIT_INVALID);
    };
    if output == super::OutputFormat::Json {
        // As against a coordinator: one event record per line, with its sequence number.
        return match store.events(id, 0) {
            Ok(events) => {
                for e in &events {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
                Ok(EXIT_OK)
            }
            Err(e) => {
                writeln!(err, "error: {e}")?;
                Ok(EXIT_RUN_FAILED)
            }
        };
    }
    writeln!(
        out,
        "run {} {} ({}, plan {})",
        run.id,
        run.status.as_str(),
        super::shown_project(&run.project),
        &run.plan_digest[..12.min(run.plan_digest.len())]
    )?;
    let events = match store.events(id, 0) {
        Ok(e) => e,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_RUN_FAILED);
        }
    };
    for e in &events {
        match log_line(e) {
            Some(line) => writeln!(out, "{line}")?,
            None => print_event(out, e)?,
        }
    }
    Ok(EXIT_OK)
}
