//! `baton stages validate` and `baton stages up`.

use std::collections::BTreeMap;
use std::io::Write;

use baton_common::diag::{Diagnostics, Severity};
use baton_common::spec::{DiskFiles, Project};
use serde::Serialize;

use super::{plan_view, readonly, run};
use super::{
    DownArgs, OutputFormat, OutputsArgs, SpecArgs, StateArgs, StatusArgs, UpArgs, ValidateArgs,
    EXIT_INVALID, EXIT_OK,
};
use crate::planner::{self, NoHistory, Plan, PlanError, Selection};
use crate::scheduler::driver::PlannedFiles;
use crate::store::StateKey;

/// Loads the project and runs the graph checks: the whole of validation (every environment
/// when none is named).
pub(super) fn load_and_check(spec: &SpecArgs) -> (Option<Project>, Diagnostics) {
    let (project, diags, _) = load_any(spec);
    (project, diags)
}

/// [`load_and_check`] for a command that runs or reads state, so needs one environment of a
/// project that declares environments; also returns the bytes of every file it read: what
/// a run ships.
pub(super) fn load_captured(spec: &SpecArgs) -> (Option<Project>, Diagnostics, PlannedFiles) {
    let (project, mut diags, files) = load_any(spec);
    if let Some(message) = project
        .as_ref()
        .and_then(crate::project::environment_required)
    {
        diags
            .error(&spec.config, baton_common::yaml::Pos::FILE, message)
            .with_help("`baton stages validate` lists the environments; `stages status --all-environments` shows them side by side");
        return (None, diags, files);
    }
    (project, diags, files)
}

fn load_any(spec: &SpecArgs) -> (Option<Project>, Diagnostics, PlannedFiles) {
    let provided = spec.provided.iter().cloned().collect();
    let environment = spec.environment.as_deref();
    let loaded = match &spec.generated {
        None => crate::project::load(&spec.config, &DiskFiles, provided, environment, spec.strict),
        Some(content) => {
            let mut extra = baton_common::spec::MemoryFiles::default();
            extra.insert(&spec.config, content.as_bytes());
            let files = baton_common::spec::OverlayFiles {
                base: &DiskFiles,
                extra,
            };
            crate::project::load(&spec.config, &files, provided, environment, spec.strict)
        }
    };
    (loaded.project, loaded.diagnostics, loaded.files)
}

#[derive(Serialize)]
struct ValidateReport<'a> {
    schema: &'static str,
    valid: bool,
    stages_file: String,
    stages: usize,
    migrations: usize,
    errors: usize,
    warnings: usize,
    notices: usize,
    diagnostics: &'a Diagnostics,
}

fn summary_counts(d: &Diagnostics) -> String {
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}, {}, {}",
        plural(d.count(Severity::Error), "error"),
        plural(d.count(Severity::Warning), "warning"),
        plural(d.count(Severity::Notice), "notice")
    )
}

/// `validate --verbose`: per stage, the variables treated as secret and why (declared,
/// `valueFromEnv`, or named like a secret), and those `not_secret` exempts. Imports from
/// another stage are secret when they were secret there (known when the stage runs).
fn write_secrets(p: &baton_common::spec::Project, out: &mut dyn Write) -> std::io::Result<()> {
    use baton_common::mask::sensitive_name;
    use std::collections::BTreeMap;
    writeln!(out, "secrets (masked everywhere):")?;
    for (spec, loaded) in p.spec.stages.iter().zip(&p.stages) {
        let mut why: BTreeMap<String, &str> = BTreeMap::new();
        let not_secret: Vec<&str> = spec
            .not_secret
            .iter()
            .chain(&p.spec.global.not_secret)
            .map(|s| s.value.as_str())
            .collect();
        let mut names: Vec<&str> = Vec::new();
        let entries = p
            .spec
            .global_entries()
            .chain(&spec.env)
            .chain(&loaded.config.env)
            .chain(loaded.migrations.iter().flat_map(|m| &m.env));
        for e in entries {
            if e.secret_from.is_some() {
                why.insert(e.name.value.clone(), "valueFromEnv");
            }
            names.push(&e.name.value);
        }
        names.extend(loaded.exports());
        names.extend(
            spec.env_from_stages
                .iter()
                .flat_map(|f| f.vars.iter().map(|v| v.value.as_str())),
        );
        for n in names {
            if sensitive_name(n) && !not_secret.contains(&n) {
                why.entry(n.to_owned()).or_insert("named like a secret");
            }
        }
        for s in spec.secrets.iter().chain(&loaded.config.secrets) {
            why.insert(s.value.clone(), "declared");
        }
        let listed: Vec<String> = why.iter().map(|(n, w)| format!("{n} ({w})")).collect();
        writeln!(
            out,
            "  {}: {}",
            spec.name.value,
            if listed.is_empty() {
                "none".to_owned()
            } else {
                listed.join(", ")
            }
        )?;
        if !not_secret.is_empty() {
            writeln!(out, "    not secret: {}", not_secret.join(", "))?;
        }
    }
    Ok(())
}

pub(super) fn validate(
    args: &ValidateArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags) = load_and_check(&args.spec);
    let (stages, migrations) = project.as_ref().map_or((0, 0), |p| {
        (
            p.stages.len(),
            p.stages.iter().map(|s| s.migrations.len()).sum(),
        )
    });
    let file = args.spec.config.display().to_string();
    match args.output {
        OutputFormat::Json => {
            let report = ValidateReport {
                schema: run::schema::VALIDATION,
                valid: project.is_some(),
                stages_file: file,
                stages,
                migrations,
                errors: diags.count(Severity::Error),
                warnings: diags.count(Severity::Warning),
                notices: diags.count(Severity::Notice),
                diagnostics: &diags,
            };
            run::write_json(out, &report)?;
        }
        OutputFormat::Text => {
            if !diags.is_empty() {
                write!(out, "{diags}")?;
                writeln!(out)?;
            }
            match &project {
                Some(p) => {
                    writeln!(
                        out,
                        "{file}: valid: {stages} stages, {migrations} migrations ({})",
                        summary_counts(&diags)
                    )?;
                    if args.verbose {
                        write_secrets(p, out)?;
                    }
                }
                None => writeln!(out, "{file}: invalid: {}", summary_counts(&diags))?,
            }
        }
    }
    Ok(if project.is_some() {
        EXIT_OK
    } else {
        EXIT_INVALID
    })
}

#[derive(Serialize)]
struct DryRunReport<'a> {
    schema: &'static str,
    dry_run: bool,
    plan: &'a Plan,
    diagnostics: &'a Diagnostics,
}

/// A dry run's plan as JSON (`baton.plan/v1`).
fn write_plan_json(plan: &Plan, diags: &Diagnostics, out: &mut dyn Write) -> std::io::Result<()> {
    run::write_json(
        out,
        &DryRunReport {
            schema: run::schema::PLAN,
            dry_run: true,
            plan,
            diagnostics: diags,
        },
    )
}

pub(super) fn up(
    args: &UpArgs,
    env: BTreeMap<String, String>,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    up_with(args, env, Err(state_key), out, err)
}

/// `up` with the store already open (`Ok`; sled releases its lock only some time after a
/// close, so a command that looked at the store first passes it on instead of reopening it),
/// or the key to open it with (`Err`).
fn up_with(
    args: &UpArgs,
    env: BTreeMap<String, String>,
    opened: Result<std::sync::Arc<crate::store::SledStore>, &StateKey>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags, files) = load_captured(&args.spec);
    let Some(project) = project else {
        print_invalid(args, &diags, out, err)?;
        return Ok(EXIT_INVALID);
    };
    tracing::debug!(
        stages = project.stages.len(),
        "project loaded and validated"
    );
    let selection = selection_of(&args.stage, &args.from, &args.to);
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| run::default_state_dir(&project.stages_file));
    let key = run::key_of(&project);
    // While a run holds the state, a dry run plans with the history that run hands over.
    let served = if args.dry_run && opened.is_err() && state_dir.exists() {
        readonly::history(&state_dir, &key)
    } else {
        None
    };
    // A dry run reads history when there is some, and never creates the state directory.
    let store = match opened {
        Ok(store) => Some(store),
        Err(_) if served.is_some() => None,
        Err(_) if args.dry_run && !state_dir.exists() => None,
        Err(state_key) => match run::open_store(&state_dir, state_key, err)? {
            Some(s) => Some(s),
            None => return Ok(EXIT_INVALID),
        },
    };
    tracing::debug!("state opened");
    // The plan forecasts conditions with what the run will use: --set and this environment.
    let plan_vars = planner::PlanVars {
        overrides: args.set.iter().cloned().collect(),
        env: env.clone(),
    };
    let planned = match (&store, served) {
        (_, Some(history)) => planner::plan_with(&project, &selection, &history, &plan_vars),
        (Some(s), None) => match run::StoreHistory::of(s.as_ref(), &key, &project) {
            Ok(history) => planner::plan_with(&project, &selection, &history, &plan_vars),
            Err(e) => {
                writeln!(err, "error: {e}")?;
                return Ok(EXIT_INVALID);
            }
        },
        (None, None) => planner::plan_with(&project, &selection, &NoHistory, &plan_vars),
    };
    let mut plan = match planned {
        Ok(plan) => plan,
        Err(PlanError::Invalid(d)) => {
            write!(err, "{d}")?;
            return Ok(EXIT_INVALID);
        }
        Err(e @ (PlanError::Selection(_) | PlanError::History(_))) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
    };
    tracing::debug!(stages = plan.order.len(), "planned");
    if let Some(version) = args.up_to {
        let names: Vec<String> = plan.order.iter().map(|s| s.name.clone()).collect();
        for name in names {
            plan.cap_up(&name, version);
        }
    }
    // `runs_on` chooses agents; here there are none.
    let routed: Vec<&str> = project
        .spec
        .stages
        .iter()
        .filter(|s| !s.runs_on.is_empty() || !project.spec.global.runs_on.is_empty())
        .map(|s| s.name.value.as_str())
        .collect();
    if !routed.is_empty() {
        writeln!(
            err,
            "notice: {} set runs_on; local mode runs every stage on this machine (runs_on picks agents when a coordinator runs the stages)",
            routed.join(", ")
        )?;
    }
    if !args.dry_run {
        if !diags.is_empty() {
            write!(err, "{diags}")?;
        }
        let Some(store) = store else {
            return Ok(EXIT_INVALID);
        };
        let overrides: BTreeMap<String, String> = args.set.iter().cloned().collect();
        let live = super::progress::live_wanted(args.show.progress, &env);
        let local = run::LocalProject {
            project,
            files,
            plan,
            store,
            key,
            overrides,
            env,
            output: args.output,
            live,
            verbose: args.show.verbose,
            skip_promotion: args.reason.clone().filter(|_| args.skip_promotion_check),
        };
        return local.up(out, err);
    }
    match args.output {
        OutputFormat::Json => write_plan_json(&plan, &diags, out)?,
        OutputFormat::Text => {
            if !diags.is_empty() {
                write!(err, "{diags}")?;
            }
            plan_view::write_text(&plan, out)?;
        }
    }
    Ok(EXIT_OK)
}

pub(super) fn status(
    args: &StatusArgs,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, _, store) = match project_with_state(
        &args.spec,
        &args.state_dir,
        state_key,
        "nothing has run yet",
        Some(&|project| readonly::Request::Status {
            project,
            verbose: args.verbose,
            json: args.output == OutputFormat::Json,
        }),
        out,
        err,
    )? {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    run::status(
        &project,
        store.as_ref(),
        &run::key_of(&project),
        args.verbose,
        args.output,
        out,
        err,
    )
}

/// `stages outputs [STAGE]` from the state directory.
pub(super) fn outputs(
    args: &OutputsArgs,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let ask_outputs = |project| readonly::Request::Outputs {
        project,
        stage: args.stage.clone(),
        json: args.output == OutputFormat::Json,
    };
    let (project, _, store) = match project_with_state(
        &args.spec,
        &args.state_dir,
        state_key,
        "nothing has run yet, so nothing was exported",
        // A secret is never revealed through another process.
        (!args.reveal).then_some(&ask_outputs as &dyn Fn(String) -> readonly::Request),
        out,
        err,
    )? {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    write_stage_outputs(
        &project,
        store.as_ref(),
        &run::key_of(&project),
        args.stage.as_deref(),
        args.reveal,
        args.output,
        out,
        err,
    )
}

/// The exports of `project`'s stages (or only `one`), masked unless `reveal`, as `stages
/// outputs` prints them; also what a running process answers for it.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_stage_outputs(
    project: &Project,
    store: &dyn crate::store::Store,
    key: &str,
    one: Option<&str>,
    reveal: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let names: Vec<&str> = project
        .spec
        .stages
        .iter()
        .map(|s| s.name.value.as_str())
        .collect();
    if let Some(one) = one {
        if !names.contains(&one) {
            let help = baton_common::diag::closest(one, names.iter().copied())
                .map_or(String::new(), |c| format!(" (did you mean `{c}`?)"));
            writeln!(err, "error: there is no stage `{one}`{help}")?;
            return Ok(EXIT_INVALID);
        }
    }
    let mut exports = BTreeMap::new();
    for name in names.iter().filter(|n| one.is_none_or(|o| o == **n)) {
        let result = match store.result(&crate::store::StageKey::new(key, name)) {
            Ok(r) => r,
            Err(e) => {
                writeln!(err, "error: {e}")?;
                return Ok(EXIT_INVALID);
            }
        };
        if let Some(r) = result {
            let vars = if reveal {
                r.exports
            } else {
                crate::status::masked_exports(&r.exports, &r.secret)
            };
            exports.insert((*name).to_owned(), vars);
        }
    }
    run::write_outputs(&exports, one, output, out)?;
    Ok(EXIT_OK)
}

pub(super) fn runs(
    args: &StateArgs,
    state_key: &StateKey,
    id: Option<u64>,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let stages_file = baton_common::spec::normalize(&args.config);
    let json = output == OutputFormat::Json;
    let request = match id {
        None => readonly::Request::RunsList {
            json,
            environment: args.environment.clone(),
        },
        Some(run) => readonly::Request::RunsShow { run, json },
    };
    if let Some(code) = readonly::ask(&state_dir_of(args, &stages_file), &request, out, err)? {
        return Ok(code);
    }
    let Some(store) = existing_store(args, state_key, &stages_file, err)? else {
        return Ok(EXIT_INVALID);
    };
    match id {
        None => run::runs_list(
            store.as_ref(),
            args.environment.as_deref(),
            output,
            out,
            err,
        ),
        Some(id) => run::runs_show(store.as_ref(), id, output, out, err),
    }
}

/// `runs logs RUN` on the stages file's state directory.
pub(super) fn logs(
    args: &StateArgs,
    state_key: &StateKey,
    run: u64,
    stage: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let stages_file = baton_common::spec::normalize(&args.config);
    let request = readonly::Request::RunsLogs {
        run,
        stage: stage.map(str::to_owned),
    };
    if let Some(code) = readonly::ask(&state_dir_of(args, &stages_file), &request, out, err)? {
        return Ok(code);
    }
    let Some(store) = existing_store(args, state_key, &stages_file, err)? else {
        return Ok(EXIT_INVALID);
    };
    run::runs_logs(store.as_ref(), run, stage, out, err)
}

pub(super) fn down(
    args: &DownArgs,
    env: BTreeMap<String, String>,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags, files) = load_captured(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    let key = run::key_of(&project);
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| run::default_state_dir(&project.stages_file));
    if !state_dir.exists() {
        writeln!(
            out,
            "no state in {}: nothing has run, nothing to roll back",
            state_dir.display()
        )?;
        return Ok(EXIT_OK);
    }
    // While a run holds the state, a dry run plans with the history that run hands over.
    let served = if args.dry_run {
        readonly::history(&state_dir, &key)
    } else {
        None
    };
    let (store, history) = match served {
        Some(history) => (None, history),
        None => {
            let Some(store) = run::open_store(&state_dir, state_key, err)? else {
                return Ok(EXIT_INVALID);
            };
            match run::StoreHistory::of(store.as_ref(), &key, &project) {
                Ok(h) => (Some(store), h),
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_INVALID);
                }
            }
        }
    };
    let selection = selection_of(&args.stage, &args.from, &args.to);
    let dependents = if args.cascade {
        planner::Dependents::Cascade
    } else {
        planner::Dependents::Refuse
    };
    let plan = match planner::plan_down(&project, &selection, &history, dependents) {
        Ok(mut p) => {
            let overrides = args.set.iter().cloned().collect();
            p.digest = planner::cover_overrides(p.digest, &project, &overrides);
            if let Some(version) = args.down_to {
                let names: Vec<String> = p.order.iter().map(|s| s.name.clone()).collect();
                for name in names {
                    p.cap_down(&name, version);
                }
            }
            p
        }
        Err(PlanError::Invalid(d)) => {
            write!(err, "{d}")?;
            return Ok(EXIT_INVALID);
        }
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
    };
    if plan.order.iter().all(|s| s.pending.is_empty()) {
        // With -o json the note goes to stderr and stdout holds a run record with no run.
        let json = args.output == OutputFormat::Json;
        let note: &mut dyn Write = if json { &mut *err } else { &mut *out };
        match args.down_to {
            Some(v) => writeln!(
                note,
                "nothing to roll back: nothing is applied above version {v}"
            )?,
            None => writeln!(
                note,
                "nothing to roll back: no selected stage has applied migrations"
            )?,
        }
        if json {
            run::write_json(out, &run::nothing_to_do_json("down", &plan.digest))?;
        }
        return Ok(EXIT_OK);
    }
    let missing = planner::missing_down(&project, &plan);
    if !missing.is_empty() && !args.skip_missing_down {
        if args.dry_run {
            plan_view::write_text(&plan, out)?;
        }
        writeln!(err, "error: {}", planner::missing_down_message(&missing))?;
        return Ok(EXIT_INVALID);
    }
    if args.dry_run {
        match args.output {
            OutputFormat::Json => write_plan_json(&plan, &Diagnostics::default(), out)?,
            OutputFormat::Text => plan_view::write_text(&plan, out)?,
        }
        return Ok(EXIT_OK);
    }
    if !args.yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            writeln!(err, "error: `stages down` changes the target; add --yes to confirm (stdin is not a terminal)")?;
            return Ok(EXIT_INVALID);
        }
        plan_view::write_text(&plan, out)?;
        if !super::confirm("\nroll these back?", out)? {
            return Ok(EXIT_INVALID);
        }
    }
    let overrides: BTreeMap<String, String> = args.set.iter().cloned().collect();
    let live = super::progress::live_wanted(args.show.progress, &env);
    // Only a dry run plans with served history, and it has returned above.
    let Some(store) = store else {
        return Ok(EXIT_INVALID);
    };
    let local = run::LocalProject {
        project,
        files,
        plan,
        store,
        key,
        overrides,
        env,
        output: args.output,
        live,
        verbose: args.show.verbose,
        skip_promotion: None,
    };
    local.down(args.skip_missing_down, out, err)
}

/// `runs resume`: `stages up` with the interrupted run's own selection; an error when there
/// is nothing to resume.
pub(super) fn resume(
    args: &StateArgs,
    set: Vec<(String, String)>,
    env: BTreeMap<String, String>,
    state_key: &StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let stages_file = baton_common::spec::normalize(&args.config);
    let key = run::scoped_key(&run::project_key(&stages_file), args.environment.as_deref());
    let Some(store) = existing_store(args, state_key, &stages_file, err)? else {
        return Ok(EXIT_INVALID);
    };
    let Some(run) = run::interrupted_run(store.as_ref(), &key).ok().flatten() else {
        writeln!(
            err,
            "error: no interrupted run of {} to resume (see `baton runs list`)",
            stages_file.display()
        )?;
        return Ok(EXIT_INVALID);
    };
    if run.direction == "down" {
        return resume_down(args, &run, store, set, env, out, err);
    }
    let (stage, from, to) = match run.selection {
        Selection::All => (Vec::new(), None, None),
        Selection::Stages { names } => (names, None, None),
        Selection::Range { from, to } => (
            Vec::new(),
            Some(from).filter(|s| !s.is_empty()),
            Some(to).filter(|s| !s.is_empty()),
        ),
    };
    let up = UpArgs {
        spec: SpecArgs {
            config: args.config.clone(),
            strict: false,
            generated: None,
            provided: set.iter().map(|(k, _)| k.clone()).collect(),
            environment: args.environment.clone(),
        },
        dry_run: false,
        stage,
        from,
        to,
        output: OutputFormat::Text,
        state_dir: args.state_dir.clone(),
        set,
        remote: super::RemoteArgs::default(),
        detach: false,
        skip_promotion_check: false,
        reason: None,
        show: super::ShowArgs::default(),
        up_to: None,
    };
    up_with(&up, env, Ok(store), out, err)
}

/// Resumes an interrupted down run (`stages down`, or the rollback of a failed run) as it
/// began: the same selection, each stage as far back as it was going.
fn resume_down(
    args: &StateArgs,
    run: &crate::store::RunRecord,
    store: std::sync::Arc<crate::store::SledStore>,
    set: Vec<(String, String)>,
    env: BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let spec = SpecArgs {
        config: args.config.clone(),
        strict: false,
        generated: None,
        provided: set.iter().map(|(k, _)| k.clone()).collect(),
        environment: args.environment.clone(),
    };
    let (project, diags, files) = load_captured(&spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    let key = run::key_of(&project);
    let history = match run::StoreHistory::of(store.as_ref(), &key, &project) {
        Ok(h) => h,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
    };
    let plan = match planner::plan_down(
        &project,
        &run.selection,
        &history,
        planner::Dependents::Leave,
    ) {
        Ok(mut p) => {
            let overrides = set.iter().cloned().collect();
            p.digest = planner::cover_overrides(p.digest, &project, &overrides);
            p
        }
        Err(e) => {
            writeln!(
                err,
                "error: cannot plan run {}'s rollback again: {e}",
                run.id
            )?;
            return Ok(EXIT_INVALID);
        }
    };
    let skip_missing_down = run.down.as_ref().is_some_and(|d| d.skip_missing_down);
    let local = run::LocalProject {
        project,
        files,
        plan,
        store,
        key,
        overrides: set.into_iter().collect(),
        live: super::progress::live_wanted(super::progress::ProgressMode::Auto, &env),
        env,
        output: OutputFormat::Text,
        verbose: false,
        skip_promotion: None,
    };
    local.down(skip_missing_down, out, err)
}

/// What `stages up` says about a project that does not validate (nothing was run).
pub(super) fn print_invalid(
    args: &UpArgs,
    diags: &Diagnostics,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    match args.output {
        OutputFormat::Json => run::write_json(
            out,
            &serde_json::json!({ "valid": false, "diagnostics": diags }),
        ),
        OutputFormat::Text => {
            write!(err, "{diags}")?;
            writeln!(
                err,
                "{}: invalid: {}; nothing was run",
                args.spec.config.display(),
                summary_counts(diags)
            )
        }
    }
}

/// `--stage` / `--from` / `--to` as the wire's fields (stages, from, to).
pub(super) fn selection_parts(
    stage: &[String],
    from: &Option<String>,
    to: &Option<String>,
) -> (Vec<String>, String, String) {
    match selection_of(stage, from, to) {
        Selection::All => (Vec::new(), String::new(), String::new()),
        Selection::Stages { names } => (names, String::new(), String::new()),
        Selection::Range { from, to } => (Vec::new(), from, to),
    }
}

/// `--stage` / `--from` / `--to` as a selection.
fn selection_of(stage: &[String], from: &Option<String>, to: &Option<String>) -> Selection {
    match (stage, from, to) {
        ([], from, to) if from.is_some() || to.is_some() => Selection::Range {
            from: from.clone().unwrap_or_default(),
            to: to.clone().unwrap_or_default(),
        },
        ([], _, _) => Selection::All,
        (names, _, _) => Selection::Stages {
            names: names.to_vec(),
        },
    }
}

/// A valid project and its open store. `Err(code)` when the command ends here: invalid files
/// (printed), no state yet (`no_state` printed; exit 0), or a store that cannot be opened.
#[allow(clippy::type_complexity)]
fn project_with_state(
    spec: &SpecArgs,
    state_dir: &Option<std::path::PathBuf>,
    state_key: &StateKey,
    no_state: &str,
    read: Option<&dyn Fn(String) -> readonly::Request>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<
    Result<
        (
            Project,
            PlannedFiles,
            std::sync::Arc<crate::store::SledStore>,
        ),
        i32,
    >,
> {
    let (project, diags, files) = load_captured(spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(Err(EXIT_INVALID));
    };
    let state_dir = state_dir
        .clone()
        .unwrap_or_else(|| run::default_state_dir(&project.stages_file));
    if !state_dir.exists() {
        writeln!(out, "no state in {}: {no_state}", state_dir.display())?;
        return Ok(Err(EXIT_OK));
    }
    // A read-only command while a run holds the state: that run answers it.
    if let Some(request) = read.map(|r| r(run::key_of(&project))) {
        if let Some(code) = readonly::ask(&state_dir, &request, out, err)? {
            return Ok(Err(code));
        }
    }
    match run::open_store(&state_dir, state_key, err)? {
        Some(store) => Ok(Ok((project, files, store))),
        None => Ok(Err(EXIT_INVALID)),
    }
}

/// Where the state of `stages_file` is: `--state-dir`, else `.baton/` beside it.
pub(super) fn state_dir_of(args: &StateArgs, stages_file: &std::path::Path) -> std::path::PathBuf {
    args.state_dir
        .clone()
        .unwrap_or_else(|| run::default_state_dir(stages_file))
}

/// The store of `stages_file`'s state directory; `None` (reported) when there is no state or
/// it cannot be opened.
fn existing_store(
    args: &StateArgs,
    state_key: &StateKey,
    stages_file: &std::path::Path,
    err: &mut dyn Write,
) -> std::io::Result<Option<std::sync::Arc<crate::store::SledStore>>> {
    let state_dir = state_dir_of(args, stages_file);
    if !state_dir.exists() {
        writeln!(
            err,
            "error: no state in {}: nothing has run yet",
            state_dir.display()
        )?;
        return Ok(None);
    }
    run::open_store(&state_dir, state_key, err)
}
