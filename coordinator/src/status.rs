//! What `stages status` reports about a project, computed from the store: per stage, the
//! applied migrations (with a note when a file changed or is gone, and the run that applied
//! each), the pending ones, the last run that touched it and how the stage ended there, and its
//! exported variables with secret values masked. Local mode and the coordinator compute it
//! here; the CLI renders it with [`write`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use baton_common::mask::Masker;
use baton_common::spec::Project;

use crate::store::{EventKind, EventRecord, RunRecord, RunStatus, StageKey, Store, StoreError};

/// One stage's status: what `stages status` shows, and its JSON (`-o json`; the same
/// record travels from a coordinator).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageState {
    pub name: String,
    /// Lowest version first.
    pub applied: Vec<AppliedState>,
    /// Lowest version first.
    pub pending: Vec<MigrationRef>,
    /// The last run that touched the stage and how the stage ended there; none: never run.
    pub last: Option<LastOutcome>,
    /// Exported variables, secret values as `***` and secrets inside values masked.
    pub exports: BTreeMap<String, String>,
}

impl StageState {
    /// `001_create_vpc (modified after apply), run 3 succeeded`, lowest version first.
    pub fn applied_lines(&self) -> Vec<String> {
        self.applied
            .iter()
            .map(|a| {
                let note = if a.file_removed {
                    " (file removed)"
                } else if a.modified_after_apply {
                    " (modified after apply)"
                } else {
                    ""
                };
                let run = match (a.run, &a.run_status) {
                    (Some(id), Some(status)) => format!(", run {id} {status}"),
                    _ => String::new(),
                };
                format!("{:03}_{}{note}{run}", a.version, a.name)
            })
            .collect()
    }

    /// `002_setup_security`, lowest version first.
    pub fn pending_lines(&self) -> Vec<String> {
        self.pending
            .iter()
            .map(|p| format!("{:03}_{}", p.version, p.name))
            .collect()
    }

    /// `last run 3: succeeded`, or `never run`.
    pub fn last_line(&self) -> String {
        match &self.last {
            Some(l) => format!("last run {}: {}", l.run, l.outcome),
            None => "never run".to_owned(),
        }
    }

    /// `name=value`, secrets masked.
    pub fn export_lines(&self) -> Vec<String> {
        self.exports
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect()
    }
}

/// A migration by version and name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationRef {
    pub version: u64,
    pub name: String,
}

/// An applied migration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedState {
    pub version: u64,
    pub name: String,
    /// Its file changed since it was applied.
    pub modified_after_apply: bool,
    /// Its file is gone.
    pub file_removed: bool,
    /// The run that applied it, and how that run ended (none when the run is gone).
    pub run: Option<u64>,
    pub run_status: Option<String>,
}

/// How a stage ended in the last run that touched it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastOutcome {
    pub run: u64,
    /// `succeeded`, `failed: ...`, `skipped (...)`, `not run`, `interrupted`; `(down)` added
    /// for a rollback.
    pub outcome: String,
}

/// A masker for the secret values among `vars`.
pub fn masker_for(vars: &BTreeMap<String, String>, secret: &[String]) -> Masker {
    let mut m = Masker::new();
    for name in secret {
        if let Some(v) = vars.get(name) {
            // A short value cannot be masked by value; it is masked by name instead.
            let _ = m.add(name, v);
        }
    }
    m
}

/// Exported variables with secrets masked: a secret's value is `***`, and secrets inside
/// other values are masked.
pub fn masked_exports(
    vars: &BTreeMap<String, String>,
    secret: &[String],
) -> BTreeMap<String, String> {
    let masker = masker_for(vars, secret);
    vars.iter()
        .map(|(n, v)| {
            let shown = if secret.contains(n) {
                "***".to_owned()
            } else {
                masker.mask(v)
            };
            (n.clone(), shown)
        })
        .collect()
}

/// `name=value` lines of exported variables, secrets masked.
pub fn export_lines(vars: &BTreeMap<String, String>, secret: &[String]) -> Vec<String> {
    masked_exports(vars, secret)
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect()
}

/// The status of every stage of `project` (stored under `key`).
pub fn stage_states(
    project: &Project,
    store: &dyn Store,
    key: &str,
) -> Result<Vec<StageState>, StoreError> {
    let runs: BTreeMap<u64, RunRecord> = store.runs()?.into_iter().map(|r| (r.id, r)).collect();
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
        for e in store.events(run.id, 0)?.into_iter().rev() {
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
    let mut states = Vec::with_capacity(project.spec.stages.len());
    for (spec, loaded) in project.spec.stages.iter().zip(&project.stages) {
        let k = StageKey::new(key, &spec.name.value);
        let applied = store.applied(&k)?;
        let applied_versions: BTreeSet<u64> = applied.iter().map(|a| a.version).collect();
        let pending = loaded
            .migrations
            .iter()
            .filter(|m| !applied_versions.contains(&m.version))
            .map(|m| MigrationRef {
                version: m.version,
                name: m.name.clone(),
            })
            .collect();
        let applied = applied
            .iter()
            .map(|a| {
                let file = loaded.migrations.iter().find(|m| m.version == a.version);
                let run = runs.get(&a.run_id);
                AppliedState {
                    version: a.version,
                    name: a.name.clone(),
                    modified_after_apply: file.is_some_and(|m| m.digest != a.digest),
                    file_removed: file.is_none(),
                    run: run.map(|r| r.id),
                    run_status: run.map(|r| r.status.as_str().to_owned()),
                }
            })
            .collect();
        let last = last_outcome
            .get(&spec.name.value)
            .map(|(run, outcome)| LastOutcome {
                run: *run,
                outcome: outcome.clone(),
            });
        let exports = store
            .result(&k)?
            .map(|r| masked_exports(&r.exports, &r.secret))
            .unwrap_or_default();
        states.push(StageState {
            name: spec.name.value.clone(),
            applied,
            pending,
            last,
            exports,
        });
    }
    Ok(states)
}

/// Renders `states` as `stages status` prints them; `verbose` adds exported variables.
pub fn write(states: &[StageState], verbose: bool, out: &mut dyn Write) -> std::io::Result<()> {
    for s in states {
        writeln!(
            out,
            "{}: {} applied, {} pending; {}",
            s.name,
            s.applied.len(),
            s.pending.len(),
            s.last_line()
        )?;
        for a in s.applied_lines() {
            writeln!(out, "  applied  {a}")?;
        }
        for p in s.pending_lines() {
            writeln!(out, "  pending  {p}")?;
        }
        if verbose {
            for e in s.export_lines() {
                writeln!(out, "  export   {e}")?;
            }
        }
    }
    Ok(())
}

/// `2026-11-30 23:50 UTC` for ms since the epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60
    )
}

/// The line people read for an event (the CLI's progress and `runs show`, the `message` of
/// a watched event); `None` for those it does not show.
pub fn event_text(e: &EventRecord) -> Option<String> {
    let line = match &e.kind {
        EventKind::RunStarted { .. } | EventKind::Log { .. } => return None,
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
            error,
            ..
        } => {
            let status = match (status, error) {
                (Some(s), _) => s.to_string(),
                (None, Some(why)) => why.clone(),
                (None, None) => "no answer".to_owned(),
            };
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
        EventKind::AttemptLost { attempt, message } => {
            format!("attempt {attempt} was lost: {message}")
        }
        EventKind::NeedsAttention { message, .. } => format!("NEEDS ATTENTION: {message}"),
        EventKind::StageResolved { resolution, by } => {
            format!("resolved as {resolution} by {by}")
        }
        EventKind::StaleResult { message, token, .. } => {
            format!("stale (token {token}): {message}")
        }
        EventKind::AwaitingApproval {
            gate,
            run,
            digest,
            approvers,
            separate_from_submitter,
            submitter,
            timeout_at_ms,
            plan,
        } => {
            let who = if approvers.is_empty() {
                "anyone".to_owned()
            } else {
                approvers.join(", ")
            };
            let not = if *separate_from_submitter {
                format!(", not {submitter} (who submitted it)")
            } else {
                String::new()
            };
            let until = timeout_at_ms.map_or_else(String::new, |t| {
                format!("; rejected if not approved by {}", utc(t))
            });
            let what = if plan.is_empty() {
                String::new()
            } else {
                format!(" [{}]", plan.join("; "))
            };
            format!(
                "AWAITING APPROVAL ({gate}) of plan {}{what}: may approve: {who}{not}{until}; approve with `baton runs approve {run}`, reject with `baton runs reject {run}`",
                &digest[..12.min(digest.len())]
            )
        }
        EventKind::Approved {
            gate, by, comment, ..
        } => {
            let comment = if comment.is_empty() {
                String::new()
            } else {
                format!(": {comment}")
            };
            format!("approved ({gate}) by {by}{comment}")
        }
        EventKind::Rejected { gate, by, reason } => {
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            };
            format!("REJECTED ({gate}) by {by}{reason}")
        }
    };
    Some(line)
}
