//! Environments from the command line: `runs approve|reject`, `promote`, `audit [verify]`
//! and `stages status --all-environments`, locally and through a coordinator.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{
    readonly, run, stages, OutputFormat, PromoteArgs, StateArgs, StatusArgs, UpArgs, EXIT_INVALID,
    EXIT_OK, EXIT_RUN_FAILED,
};
use crate::runs::{self, Identity, RunsError};
use crate::store::{AuditRecord, StateKey, Store};

/// Which audit entries `baton audit` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct AuditFilter {
    pub environment: Option<String>,
    pub run: Option<u64>,
}

impl AuditFilter {
    fn keeps(&self, e: &AuditRecord) -> bool {
        self.environment
            .as_deref()
            .is_none_or(|env| e.environment == env)
            && self.run.is_none_or(|r| e.run == r)
    }
}

/// `baton audit` from an open store: the entries (filtered), or with `verify` whether the
/// whole chain holds (exit 1 naming the first broken entry).
pub(super) fn write_audit(
    store: &dyn Store,
    filter: &AuditFilter,
    verify: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    match store.audit() {
        Ok(entries) => print_audit(&entries, filter, verify, output, out, err),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(EXIT_RUN_FAILED)
        }
    }
}

/// [`write_audit`] for entries read from anywhere (a store, a coordinator).
pub(super) fn print_audit(
    entries: &[AuditRecord],
    filter: &AuditFilter,
    verify: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    if verify {
        return match crate::audit::verify(entries) {
            Ok((n, head)) => {
                writeln!(
                    out,
                    "audit log intact: {n} entries, head {}",
                    if head.is_empty() { "(empty)" } else { &head }
                )?;
                Ok(EXIT_OK)
            }
            Err(broken) => {
                writeln!(err, "error: the audit log is broken at {broken}")?;
                Ok(EXIT_RUN_FAILED)
            }
        };
    }
    let shown: Vec<&AuditRecord> = entries.iter().filter(|e| filter.keeps(e)).collect();
    if output == OutputFormat::Json {
        run::write_json(
            out,
            &serde_json::json!({ "schema": run::schema::AUDIT, "entries": shown }),
        )?;
        return Ok(EXIT_OK);
    }
    for e in shown {
        let env = if e.environment.is_empty() {
            "-"
        } else {
            &e.environment
        };
        let run = if e.run == 0 {
            "-".to_owned()
        } else {
            e.run.to_string()
        };
        let release = if e.release.is_empty() {
            "-"
        } else {
            runs::short(&e.release)
        };
        let reason = if e.reason.is_empty() {
            String::new()
        } else {
            format!("  {}", e.reason)
        };
        writeln!(
            out,
            "{:>5}  {}  {:<8} {:<16} {:<8} run {:<5} release {release}{reason}",
            e.seq,
            crate::status::utc(e.at_ms),
            e.action,
            e.by,
            env,
            run
        )?;
    }
    Ok(EXIT_OK)
}

/// `baton audit [verify]` on the state directory (asking the running process when one
/// holds it).
pub(super) fn audit_local(
    state: &StateArgs,
    state_key: &StateKey,
    filter: AuditFilter,
    verify: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let dir = stages::state_dir_of(state, &baton_common::spec::normalize(&state.config));
    let request = readonly::Request::Audit {
        filter: filter.clone(),
        json: output == OutputFormat::Json,
        verify,
    };
    match ask_or_open(&dir, state_key, &request, out, err)? {
        Ok(store) => write_audit(store.as_ref(), &filter, verify, output, out, err),
        Err(code) => Ok(code),
    }
}

/// `request` answered by the process running in the state directory `dir`, else that
/// directory's store, opened. `Err(exit code)` when answered, or when there is no state.
fn ask_or_open(
    dir: &std::path::Path,
    state_key: &StateKey,
    request: &readonly::Request,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Result<std::sync::Arc<crate::store::SledStore>, i32>> {
    if let Some(code) = readonly::ask(dir, request, out, err)? {
        return Ok(Err(code));
    }
    if !dir.exists() {
        writeln!(
            err,
            "error: no state in {}: nothing has run yet",
            dir.display()
        )?;
        return Ok(Err(EXIT_INVALID));
    }
    Ok(run::open_store(dir, state_key, err)?.ok_or(EXIT_INVALID))
}

/// `runs approve|reject RUN` on the state directory: decided by the process driving the run
/// when one does, else recorded in the run's log for when it is resumed.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_local(
    state: &StateArgs,
    state_key: &StateKey,
    run_id: u64,
    approve: bool,
    comment: String,
    by: Identity,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let dir = stages::state_dir_of(state, &baton_common::spec::normalize(&state.config));
    let request = readonly::Request::Decide {
        run: run_id,
        approve,
        by: by.clone(),
        comment: comment.clone(),
    };
    let store = match ask_or_open(&dir, state_key, &request, out, err)? {
        Ok(store) => store,
        Err(code) => return Ok(code),
    };
    match runs::decide_stored(store.as_ref(), run_id, approve, &by, &comment) {
        Ok(gate) => {
            writeln!(
                out,
                "run {run_id}: {gate} {}; no process is driving it: it goes on with `baton runs resume{}`",
                if approve { "approved" } else { "rejected" },
                state
                    .environment
                    .as_ref()
                    .map(|e| format!(" -e {e}"))
                    .unwrap_or_default()
            )?;
            Ok(EXIT_OK)
        }
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(match e {
                RunsError::Store(_) => EXIT_RUN_FAILED,
                _ => EXIT_INVALID,
            })
        }
    }
}

/// `baton promote --to ENV`: `stages up -e ENV` with the release that last succeeded (every
/// stage) in the environment before ENV. baton runs the files it is given, so they must be
/// that release; else it says which release to check out.
pub(super) fn promote(
    args: &PromoteArgs,
    env: BTreeMap<String, String>,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let up = UpArgs {
        spec: super::SpecArgs {
            config: args.config.clone(),
            strict: false,
            generated: None,
            provided: args.set.iter().map(|(k, _)| k.clone()).collect(),
            environment: Some(args.to.clone()),
        },
        dry_run: args.dry_run,
        stage: Vec::new(),
        from: None,
        to: None,
        output: args.output,
        state_dir: args.state_dir.clone(),
        set: args.set.clone(),
        remote: args.remote.clone(),
        detach: args.detach,
        skip_promotion_check: false,
        reason: None,
        show: args.show,
        up_to: None,
    };
    let (project, diags, _) = stages::load_captured(&up.spec);
    let Some(project) = project else {
        stages::print_invalid(&up, &diags, out, err)?;
        return Ok(EXIT_INVALID);
    };
    let Some(previous) = runs::previous_environment(&project) else {
        writeln!(
            err,
            "error: `{}` is the first environment: there is nothing to promote from (run `baton stages up -e {}`)",
            args.to, args.to
        )?;
        return Ok(EXIT_INVALID);
    };
    let release = crate::planner::release_of(&project, &crate::planner::project_inputs(&project));
    let key = run::key_of(&project);
    let last = if args.remote.coordinator.is_some() {
        match super::remote::last_release(&args.remote, &key, &previous, err)? {
            Ok(last) => last,
            Err(code) => return Ok(code),
        }
    } else {
        let dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| run::default_state_dir(&project.stages_file));
        if !dir.exists() {
            None
        } else {
            let Some(store) = run::open_store(&dir, state_key, err)? else {
                return Ok(EXIT_INVALID);
            };
            match runs::last_release(store.as_ref(), &key, &previous) {
                Ok(last) => last.map(Release::of),
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_RUN_FAILED);
                }
            }
        }
    };
    let Some(Release {
        run: run_id,
        digest: last_release,
        by,
        ..
    }) = last
    else {
        writeln!(
            err,
            "error: nothing has succeeded in {previous} yet (every stage, in one run): run `baton stages up -e {previous}` first"
        )?;
        return Ok(EXIT_INVALID);
    };
    if last_release != release {
        writeln!(
            err,
            "error: {previous} last succeeded with release {} (run {run_id}, by {by}), but these files are release {}: check out the files {previous} ran, then promote again",
            runs::short(&last_release),
            runs::short(&release)
        )?;
        return Ok(EXIT_INVALID);
    }
    writeln!(
        out,
        "promoting release {} from {previous} (run {run_id}, by {by}) to {}",
        runs::short(&release),
        args.to
    )?;
    if up.remote.coordinator.is_some() {
        super::remote::up(&up, &up.remote, up.detach, out, err)
    } else {
        stages::up(&up, env, state_key, out, err)
    }
}

/// One environment's column of the dashboard.
#[derive(Debug, Serialize)]
struct EnvironmentStatus {
    name: String,
    /// The release its last successful run of every stage applied.
    release: Option<Release>,
    stages: Vec<crate::status::StageState>,
}

/// The latest successful run of every stage in an environment: its release, its id, who ran
/// it and when.
#[derive(Debug, Serialize)]
pub(super) struct Release {
    pub digest: String,
    pub run: u64,
    pub by: String,
    pub at_ms: u64,
}

impl Release {
    fn of(r: crate::store::RunRecord) -> Release {
        Release {
            digest: r.release,
            run: r.id,
            by: r.by,
            at_ms: r.finished_at_ms.unwrap_or(r.created_at_ms),
        }
    }
}

/// What the dashboard shows of one environment: its release and its stages' status.
pub(super) type Column = (Option<Release>, Vec<crate::status::StageState>);

/// Where the dashboard's columns come from: given the project loaded for an environment,
/// its store key, the environment's name and the files read, the column or why not.
pub(super) type ColumnSource<'a> = dyn FnMut(
        &baton_common::spec::Project,
        &str,
        &str,
        crate::scheduler::driver::PlannedFiles,
    ) -> Result<Column, String>
    + 'a;

/// `stages status --all-environments`: environments × stages, with the release each
/// environment runs, who ran it and when, and the versions applied.
pub(super) fn status_all(
    args: &StatusArgs,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags) = stages::load_and_check(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    if project.spec.environments.is_empty() {
        writeln!(
            err,
            "error: {} declares no environments; `baton stages status` shows its stages",
            project.stages_file.display()
        )?;
        return Ok(EXIT_INVALID);
    }
    if args.remote.coordinator.is_some() {
        let remote = args.remote.clone();
        return dashboard(
            &args.spec,
            &project,
            &mut |loaded, key, env, files| {
                super::remote::environment_column(&remote, loaded, key, env, files)
            },
            args.output,
            out,
            err,
        );
    }
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| run::default_state_dir(&project.stages_file));
    let store = if dir.exists() {
        match run::open_store(&dir, state_key, err)? {
            Some(s) => Some(s),
            None => return Ok(EXIT_INVALID),
        }
    } else {
        None
    };
    let mut columns = store_columns(store.as_ref().map(|s| s.as_ref() as &dyn Store));
    dashboard(&args.spec, &project, &mut columns, args.output, out, err)
}

/// The columns of `store` (`None`: nothing has run yet).
pub(super) fn store_columns(
    store: Option<&dyn Store>,
) -> impl FnMut(
    &baton_common::spec::Project,
    &str,
    &str,
    crate::scheduler::driver::PlannedFiles,
) -> Result<Column, String>
       + '_ {
    move |loaded, key, env, _files| {
        let empty = crate::store::MemoryStore::new();
        let s: &dyn Store = store.unwrap_or(&empty);
        let release = runs::last_release(s, key, env)
            .map_err(|e| e.to_string())?
            .map(Release::of);
        let stages = crate::status::stage_states(loaded, s, key).map_err(|e| e.to_string())?;
        Ok((release, stages))
    }
}

/// The dashboard of `project` (loaded without an environment), its columns from `column`.
pub(super) fn dashboard(
    spec_args: &super::SpecArgs,
    project: &baton_common::spec::Project,
    column: &mut ColumnSource<'_>,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let mut columns = Vec::new();
    for env in &project.spec.environments {
        let name = env.name.value.clone();
        let spec = super::SpecArgs {
            environment: Some(name.clone()),
            ..spec_args.clone()
        };
        let (loaded, diags, files) = stages::load_captured(&spec);
        let Some(loaded) = loaded else {
            write!(err, "{diags}")?;
            return Ok(EXIT_INVALID);
        };
        let key = run::key_of(&loaded);
        let (release, stages) = match column(&loaded, &key, &name, files) {
            Ok(c) => c,
            Err(e) => {
                writeln!(err, "error: {e}")?;
                return Ok(EXIT_RUN_FAILED);
            }
        };
        columns.push(EnvironmentStatus {
            name,
            release,
            stages,
        });
    }
    if output == OutputFormat::Json {
        run::write_json(
            out,
            &serde_json::json!({ "schema": run::schema::ENVIRONMENTS, "environments": columns }),
        )?;
        return Ok(EXIT_OK);
    }
    write_dashboard(project, &columns, out)?;
    Ok(EXIT_OK)
}

/// One line of the dashboard's release rows.
type ReleaseCell = fn(&Release) -> String;

fn write_dashboard(
    project: &baton_common::spec::Project,
    columns: &[EnvironmentStatus],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let width = project
        .spec
        .stages
        .iter()
        .map(|s| s.name.value.len())
        .max()
        .unwrap_or(0)
        .max("release".len());
    let cell = 24;
    write!(out, "{:width$}", "")?;
    for c in columns {
        write!(out, "  {:<cell$}", c.name)?;
    }
    writeln!(out)?;
    let rows: [(&str, ReleaseCell); 3] = [
        ("release", |r| runs::short(&r.digest).to_owned()),
        ("run, by", |r| format!("{}, {}", r.run, r.by)),
        ("when", |r| crate::status::utc(r.at_ms)),
    ];
    for (label, f) in rows {
        write!(out, "{label:width$}")?;
        for c in columns {
            let text = c.release.as_ref().map_or_else(|| "-".to_owned(), f);
            write!(out, "  {text:<cell$}")?;
        }
        writeln!(out)?;
    }
    for (i, s) in project.spec.stages.iter().enumerate() {
        write!(out, "{:width$}", s.name.value)?;
        for c in columns {
            let text = c.stages.get(i).map_or_else(String::new, |st| {
                let total = st.applied.len() + st.pending.len();
                let top = st
                    .applied
                    .iter()
                    .map(|a| a.version)
                    .max()
                    .map_or_else(|| "none".to_owned(), |v| format!("v{v:03}"));
                // The outcome's first words: `failed: why` and `skipped (condition)` are
                // `failed` and `skipped` here; `runs show` has the rest.
                let last = st.last.as_ref().map_or("never run".to_owned(), |l| {
                    l.outcome
                        .split([':', '('])
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                });
                format!("{top} {}/{total} {last}", st.applied.len())
            });
            write!(out, "  {text:<cell$}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}
