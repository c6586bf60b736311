//! The CLI against a coordinator (`--coordinator URL` or `BATON_COORDINATOR`): `stages
//! validate|up`, `runs list|show|watch|cancel`, `agents list`. The project is loaded and
//! validated here first, exactly as in local mode; then its files (the bytes read) are sent,
//! and the run's events come back to the same progress view.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use baton_common::client::{endpoint, BearerToken};
use baton_common::proto::{self, control_service_client::ControlServiceClient};
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::run::{print_event, summary_of};
use super::stages::{load_captured, print_invalid, selection_parts};
use super::{
    DownArgs, OutputFormat, StatusArgs, UpArgs, ValidateArgs, EXIT_INVALID, EXIT_OK,
    EXIT_RUN_FAILED,
};
use crate::store::{EventKind, EventRecord, RunStatus};

/// Exit code when the user stopped watching (Ctrl-C): the run goes on.
pub const EXIT_STOPPED_WATCHING: i32 = 130;

/// Where the coordinator is and how to talk to it.
#[derive(Debug, Clone, Default, Args)]
pub struct RemoteArgs {
    /// The coordinator's URL (e.g. http://127.0.0.1:7600): run through it instead of locally.
    #[arg(long, env = "BATON_COORDINATOR")]
    pub coordinator: Option<String>,
    /// A file holding the operator token the coordinator expects.
    #[arg(long, conflicts_with = "token", requires = "coordinator")]
    pub token_file: Option<PathBuf>,
    /// The operator token itself (prefer --token-file).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A CA bundle (PEM) the coordinator's TLS certificate must chain to.
    #[arg(long, requires = "coordinator")]
    pub ca_file: Option<PathBuf>,
}

pub(super) type Client = ControlServiceClient<InterceptedService<Channel, BearerToken>>;

/// A failure worth one line: what the coordinator said, or why it could not be reached.
#[derive(Debug)]
pub(super) struct Failure {
    message: String,
    code: i32,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::Unauthenticated
            | Code::PermissionDenied => EXIT_INVALID,
            _ => EXIT_RUN_FAILED,
        };
        let message = match s.code() {
            Code::Unavailable => format!("cannot reach the coordinator: {}", s.message()),
            _ => s.message().to_owned(),
        };
        Failure { message, code }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: EXIT_INVALID,
    }
}

pub(super) async fn connect(r: &RemoteArgs) -> Result<Client, Failure> {
    let url = r.coordinator.clone().unwrap_or_default();
    let token = match (&r.token_file, &r.token) {
        (Some(f), _) => Some(baton_common::client::token_from_file(f).map_err(usage)?),
        (None, t) => t.clone(),
    };
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let me = super::identity(&env);
    let token = BearerToken::new(token.as_deref())
        .map_err(usage)?
        .as_user(&me.name, &me.groups);
    let ca = r
        .ca_file
        .as_deref()
        .map(|f| {
            std::fs::read(f)
                .map_err(|e| usage(format!("cannot read the CA file `{}`: {e}", f.display())))
        })
        .transpose()?;
    let channel = endpoint(&url, ca.as_deref())
        .map_err(|e| usage(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Failure {
            message: format!("cannot reach the coordinator at {url}: {e}"),
            code: EXIT_RUN_FAILED,
        })?;
    Ok(ControlServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
}

/// Runs `fut` on a fresh runtime.
fn block<T, Fut>(fut: Fut) -> std::io::Result<Result<T, Failure>>
where
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(fut))
}

/// The exit code of a command's result; a failure is printed as one line.
pub(super) fn finish(err: &mut dyn Write, r: Result<i32, Failure>) -> std::io::Result<i32> {
    match r {
        Ok(code) => Ok(code),
        Err(fail) => {
            writeln!(err, "error: {}", fail.message)?;
            Ok(fail.code)
        }
    }
}

/// The project's files by path relative to the stages file's directory, and the stages file's
/// own name: what the coordinator loads the project from.
fn project_files(
    stages_file: &Path,
    files: BTreeMap<PathBuf, Vec<u8>>,
) -> Result<(String, HashMap<String, Vec<u8>>), Failure> {
    let base = stages_file.parent().unwrap_or(Path::new(""));
    let mut out = HashMap::new();
    for (path, bytes) in files {
        let rel = if base.as_os_str().is_empty() {
            path.clone()
        } else {
            path.strip_prefix(base).map(Path::to_path_buf).map_err(|_| {
                usage(format!(
                    "`{}` is outside the project's directory `{}`; a coordinator receives only files under it (move the file into the project)",
                    path.display(),
                    base.display()
                ))
            })?
        };
        out.insert(rel.to_string_lossy().into_owned(), bytes);
    }
    let name = stages_file.file_name().map_or_else(
        || "stages.yaml".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok((name, out))
}

/// `stages validate --coordinator`: the coordinator's verdict on the files this CLI reads.
pub fn validate(
    args: &ValidateArgs,
    remote: &RemoteArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (_, _, files) = load_captured(&args.spec);
    let stages_file = baton_common::spec::normalize(&args.spec.config);
    let r = block(async {
        let (name, files) = project_files(&stages_file, files)?;
        let mut client = connect(remote).await?;
        let resp = client
            .validate(proto::ValidateRequest {
                files,
                stages_file: name,
                strict: args.spec.strict,
                provided: args.spec.provided.clone(),
                environment: args.spec.environment.clone().unwrap_or_default(),
            })
            .await?
            .into_inner();
        let mut errors = 0;
        for d in &resp.diagnostics {
            if d.severity == "error" {
                errors += 1;
            }
            let _ = writeln!(
                out,
                "{}:{}:{}: {}: {}",
                d.file, d.line, d.column, d.severity, d.message
            );
            if !d.help.is_empty() {
                let _ = writeln!(out, "  help: {}", d.help);
            }
        }
        let verdict = if errors == 0 { "valid" } else { "invalid" };
        let _ = writeln!(
            out,
            "{}: {verdict} on the coordinator ({} finding(s))",
            stages_file.display(),
            resp.diagnostics.len()
        );
        Ok(if errors == 0 { EXIT_OK } else { EXIT_INVALID })
    })?;
    finish(err, r)
}

/// `stages up --coordinator`: submit, then watch like local mode (unless `--detach`).
pub fn up(
    args: &UpArgs,
    remote: &RemoteArgs,
    detach: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    if args.dry_run {
        writeln!(
            err,
            "error: --dry-run with --coordinator is not available yet; run `baton stages up --dry-run` without --coordinator to see the plan against local state"
        )?;
        return Ok(EXIT_INVALID);
    }
    let (project, diags, files) = load_captured(&args.spec);
    if project.is_none() {
        print_invalid(args, &diags, out, err)?;
        return Ok(EXIT_INVALID);
    }
    if !diags.is_empty() {
        write!(err, "{diags}")?;
    }
    let stages_file = baton_common::spec::normalize(&args.spec.config);
    let stage_names: Vec<String> = project
        .as_ref()
        .map(|p| p.spec.stages.iter().map(|s| s.name.value.clone()).collect())
        .unwrap_or_default();
    let submission = Submit {
        stages_file: &stages_file,
        files,
        stage_names,
        selection: selection_parts(&args.stage, &args.from, &args.to),
        set: args.set.iter().cloned().collect(),
        detach,
        down: None,
        json: args.output == OutputFormat::Json,
        environment: args.spec.environment.clone().unwrap_or_default(),
        skip_promotion: args.reason.clone().filter(|_| args.skip_promotion_check),
    };
    let r = block(async {
        let mut client = connect(remote).await?;
        submit_and_watch(&mut client, submission, out, err).await
    })?;
    finish(err, r)
}

/// `stages down --coordinator`: rolls the selected stages back through the coordinator.
pub fn down(args: &DownArgs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    if args.dry_run {
        writeln!(
            err,
            "error: --dry-run with --coordinator is not available yet; `baton stages status --coordinator URL` shows what is applied"
        )?;
        return Ok(EXIT_INVALID);
    }
    let (project, diags, files) = load_captured(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    let (stages, from, to) = selection_parts(&args.stage, &args.from, &args.to);
    if !args.yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            writeln!(err, "error: `stages down` changes the target; add --yes to confirm (stdin is not a terminal)")?;
            return Ok(EXIT_INVALID);
        }
        let what = if stages.is_empty() && from.is_empty() {
            "every applied stage".to_owned()
        } else if stages.is_empty() {
            crate::runs::describe_selection(&crate::planner::Selection::Range {
                from: from.clone(),
                to: to.clone(),
            })
        } else {
            stages.join(", ")
        };
        if !super::confirm(&format!("roll back {what} on the coordinator?"), out)? {
            return Ok(EXIT_INVALID);
        }
    }
    let submission = Submit {
        stages_file: &project.stages_file,
        files,
        stage_names: project
            .spec
            .stages
            .iter()
            .map(|s| s.name.value.clone())
            .collect(),
        selection: (stages, from, to),
        set: args.set.iter().cloned().collect(),
        detach: false,
        down: Some((args.cascade, args.skip_missing_down)),
        json: args.output == OutputFormat::Json,
        environment: args.spec.environment.clone().unwrap_or_default(),
        skip_promotion: None,
    };
    let r = block(async {
        let mut client = connect(&args.remote).await?;
        submit_and_watch(&mut client, submission, out, err).await
    })?;
    finish(err, r)
}

/// `stages status --coordinator`: the project's stages as the coordinator's history has them.
pub fn status(args: &StatusArgs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let (project, diags, files) = load_captured(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    let r = block(async {
        let states = remote_states(&args.remote, &project, files).await?;
        super::run::write_status(&states, args.verbose, args.output, out).map_err(io_failure)?;
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// Every stage's state as the coordinator computes it from its store.
async fn remote_states(
    remote: &RemoteArgs,
    project: &baton_common::spec::Project,
    files: crate::scheduler::driver::PlannedFiles,
) -> Result<Vec<crate::status::StageState>, Failure> {
    let (name, files) = project_files(&project.stages_file, files)?;
    let mut client = connect(remote).await?;
    let resp = client
        .stages_status(proto::StagesStatusRequest {
            files,
            stages_file: name,
            project: String::new(),
            environment: project
                .spec
                .environment_name()
                .unwrap_or_default()
                .to_owned(),
        })
        .await?
        .into_inner();
    resp.stages
        .iter()
        .map(|s| serde_json::from_str(&s.record_json))
        .collect::<Result<_, _>>()
        .map_err(|e| Failure {
            message: format!(
                "the coordinator's status cannot be read ({e}); is it an older baton?"
            ),
            code: EXIT_RUN_FAILED,
        })
}

/// `stages outputs [STAGE] --coordinator URL`: what the coordinator recorded, secrets
/// masked (`--reveal` is refused before this).
pub fn outputs(
    args: &super::OutputsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags, files) = load_captured(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    if let Some(one) = &args.stage {
        if !project.spec.stages.iter().any(|s| &s.name.value == one) {
            writeln!(err, "error: there is no stage `{one}`")?;
            return Ok(EXIT_INVALID);
        }
    }
    let r = block(async {
        let states = remote_states(&args.remote, &project, files).await?;
        let exports = states
            .into_iter()
            .filter(|s| args.stage.as_ref().is_none_or(|one| one == &s.name))
            .filter(|s| s.last.is_some())
            .map(|s| (s.name, s.exports))
            .collect();
        super::run::write_outputs(&exports, args.stage.as_deref(), args.output, out)
            .map_err(io_failure)?;
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `runs logs RUN`: the run's log lines (command output, notes), optionally of one stage;
/// `follow` keeps printing them as they are recorded until the run finishes.
pub fn runs_logs(
    remote: &RemoteArgs,
    run: u64,
    stage: Option<&str>,
    follow: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let mut stream = client
            .watch_run(proto::WatchRunRequest {
                run_id: run,
                from_seq: 0,
                follow,
            })
            .await?
            .into_inner();
        while let Some(e) = stream.message().await? {
            let Ok(record) = serde_json::from_str::<EventRecord>(&e.record_json) else {
                continue;
            };
            if stage.is_some_and(|s| record.stage.as_deref() != Some(s)) {
                continue;
            }
            if let Some(line) = super::run::log_line(&record) {
                writeln!(out, "{line}")
                    .and_then(|()| out.flush())
                    .map_err(io_failure)?;
            }
        }
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// A project to submit, as loaded here.
pub(super) struct Submit<'a> {
    pub stages_file: &'a Path,
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    /// For the progress view until the run's own list arrives.
    pub stage_names: Vec<String>,
    /// `--stage`, `--from`, `--to` as the wire has them.
    pub selection: (Vec<String>, String, String),
    pub set: HashMap<String, String>,
    /// Print the run id and return instead of watching.
    pub detach: bool,
    /// `stages down`: `Some((cascade, skip_missing_down))`.
    pub down: Option<(bool, bool)>,
    /// `-o json`: stdout holds only the finished run's `baton.run/v1` record.
    pub json: bool,
    /// `--environment` (empty: none).
    pub environment: String,
    /// `--skip-promotion-check --reason TEXT`.
    pub skip_promotion: Option<String>,
}

/// A finished run's `baton.run/v1` record from the coordinator: its events, and the exports
/// its stages recorded in this run (masked, from the status the coordinator computes).
async fn remote_run_record(
    client: &mut Client,
    run: u64,
    direction: &str,
    digest: &str,
    status_request: proto::StagesStatusRequest,
) -> Result<serde_json::Value, Failure> {
    let mut stream = client
        .watch_run(proto::WatchRunRequest {
            run_id: run,
            from_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await? {
        if let Ok(record) = serde_json::from_str::<EventRecord>(&e.record_json) {
            events.push(record);
        }
    }
    let mut stages = Vec::new();
    let mut status = RunStatus::Failed;
    for e in &events {
        match &e.kind {
            EventKind::RunStarted { stages: s } => stages.clone_from(s),
            EventKind::RunFinished { status: s } => status = *s,
            _ => {}
        }
    }
    let states: Vec<crate::status::StageState> = client
        .stages_status(status_request)
        .await?
        .into_inner()
        .stages
        .iter()
        .filter_map(|s| serde_json::from_str(&s.record_json).ok())
        .collect();
    Ok(super::run::run_record(
        &events,
        &stages,
        run,
        direction,
        status,
        digest,
        &|stage| {
            states
                .iter()
                .find(|s| s.name == stage)
                .filter(|s| s.last.as_ref().is_some_and(|l| l.run == run))
                .map(|s| s.exports.clone())
        },
    ))
}

/// Submits a project and (unless detached) watches its run to the end, like local mode.
pub(super) async fn submit_and_watch(
    client: &mut Client,
    s: Submit<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    let (name, files) = project_files(s.stages_file, s.files)?;
    let (stages, from, to) = s.selection;
    let status_request = proto::StagesStatusRequest {
        files: files.clone(),
        stages_file: name.clone(),
        project: String::new(),
        environment: s.environment.clone(),
    };
    let resp = client
        .submit_run(proto::SubmitRunRequest {
            files,
            stages_file: name,
            stages,
            from,
            to,
            set: s.set,
            project: String::new(),
            down: s.down.is_some(),
            cascade: s.down.is_some_and(|(c, _)| c),
            skip_missing_down: s.down.is_some_and(|(_, k)| k),
            environment: s.environment,
            skip_promotion_reason: s.skip_promotion.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let direction = if s.down.is_some() { "down" } else { "up" };
    if resp.run_id == 0 {
        // A down submission with nothing to roll back records no run.
        for n in &resp.notes {
            if s.json {
                let _ = writeln!(err, "{n}");
            } else {
                let _ = writeln!(out, "{n}");
            }
        }
        if s.json {
            let record = super::run::nothing_to_do_json(direction, &resp.plan_digest);
            super::run::write_json(out, &record).map_err(io_failure)?;
        }
        return Ok(EXIT_OK);
    }
    if s.json {
        // Progress is not shown; the run's record is printed when it ends.
        for n in &resp.notes {
            let _ = writeln!(err, "{n}");
        }
        let code = watch(
            client,
            resp.run_id,
            0,
            true,
            &s.stage_names,
            false,
            false,
            &mut std::io::sink(),
            err,
        )
        .await?;
        let record = remote_run_record(
            client,
            resp.run_id,
            direction,
            &resp.plan_digest,
            status_request,
        )
        .await?;
        super::run::write_json(out, &record).map_err(io_failure)?;
        return Ok(code);
    }
    if s.detach {
        for n in &resp.notes {
            let _ = writeln!(err, "{n}");
        }
        let _ = writeln!(out, "{}", resp.run_id);
        return Ok(EXIT_OK);
    }
    for n in &resp.notes {
        let _ = writeln!(out, "{n}");
    }
    if !resp.notes.iter().any(|n| n.starts_with("resuming run")) {
        let _ = writeln!(
            out,
            "run {}: {} stage(s) to run (plan {})",
            resp.run_id,
            resp.stages,
            &resp.plan_digest[..12.min(resp.plan_digest.len())]
        );
    }
    watch(
        client,
        resp.run_id,
        0,
        true,
        &s.stage_names,
        true,
        false,
        out,
        err,
    )
    .await
}

/// Follows a run's events until it finishes; prints them like local mode and, with
/// `summarize`, the summary. Ctrl-C stops watching, never the run.
#[allow(clippy::too_many_arguments)]
async fn watch(
    client: &mut Client,
    run: u64,
    from_seq: u64,
    follow: bool,
    stages: &[String],
    summarize: bool,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    use std::io::IsTerminal;
    let mut stream = client
        .watch_run(proto::WatchRunRequest {
            run_id: run,
            from_seq,
            follow,
        })
        .await?
        .into_inner();
    let mut events: Vec<EventRecord> = Vec::new();
    let mut names: Vec<String> = stages.to_vec();
    let mut status = None;
    {
        let mut show = if summarize {
            let live = std::io::stdout().is_terminal();
            Show::Progress(super::progress::Progress::new(
                live, false, &names, &mut *out,
            ))
        } else {
            Show::Lines {
                out: &mut *out,
                json,
            }
        };
        loop {
            tokio::select! {
                // Ctrl-C first: stop watching at once.
                _ = tokio::signal::ctrl_c() => {
                    show.finish();
                    let _ = writeln!(err, "\nstopped watching run {run}; it goes on on the coordinator. `baton runs watch {run}` follows it again, `baton runs cancel {run}` cancels it.");
                    return Ok(EXIT_STOPPED_WATCHING);
                }
                msg = stream.message() => match msg? {
                    Some(e) => {
                        let record: EventRecord = serde_json::from_str(&e.record_json).map_err(|x| Failure {
                            message: format!("the coordinator sent an event this baton cannot read ({x}); upgrade baton"),
                            code: EXIT_RUN_FAILED,
                        })?;
                        if let EventKind::RunStarted { stages } = &record.kind {
                            names = stages.clone();
                        }
                        if let EventKind::RunFinished { status: s } = &record.kind {
                            status = Some(*s);
                        }
                        show.event(&record, &e.record_json).map_err(io_failure)?;
                        events.push(record);
                    }
                    None => break,
                }
            }
        }
        show.finish();
    }
    let Some(status) = status else {
        if !follow {
            // A snapshot of a run that has not finished yet.
            return Ok(EXIT_OK);
        }
        return Err(Failure {
            message: format!("the coordinator stopped sending run {run}'s events before it finished; `baton runs watch {run}` follows it again"),
            code: EXIT_RUN_FAILED,
        });
    };
    if summarize {
        summary_of(out, &events, &names, run, status, &|_| None).map_err(io_failure)?;
        if status == RunStatus::Failed {
            let _ = writeln!(err, "{}", super::run::next_steps(run, " --coordinator URL"));
        }
    }
    Ok(match status {
        RunStatus::Succeeded | RunStatus::SucceededWithFailures => EXIT_OK,
        _ => EXIT_RUN_FAILED,
    })
}

/// Where watched events go: the progress view (`stages up`), or one line each (`runs
/// watch|show`: text as local `runs show` prints it, or the stored JSON record).
enum Show<'o> {
    Progress(super::progress::Progress<'o>),
    Lines { out: &'o mut dyn Write, json: bool },
}

impl Show<'_> {
    fn event(&mut self, e: &EventRecord, raw: &str) -> std::io::Result<()> {
        match self {
            Show::Progress(p) => p.event(e),
            Show::Lines { out, json: true } => {
                writeln!(out, "{raw}")?;
                out.flush()
            }
            Show::Lines { out, json: false } => {
                match super::run::log_line(e) {
                    Some(line) => writeln!(out, "{line}")?,
                    None => print_event(*out, e)?,
                }
                out.flush()
            }
        }
    }

    fn finish(&mut self) {
        if let Show::Progress(p) = self {
            p.finish();
        }
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure {
        message: e.to_string(),
        code: EXIT_RUN_FAILED,
    }
}

/// `runs watch RUN` (`follow`: until the run finishes) and `runs show RUN` (what is recorded
/// now): each event from `from_seq` as a line.
pub fn runs_watch(
    remote: &RemoteArgs,
    run: u64,
    from_seq: u64,
    follow: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let json = output == OutputFormat::Json;
    let r = block(async {
        let mut client = connect(remote).await?;
        watch(
            &mut client,
            run,
            from_seq,
            follow,
            &[],
            false,
            json,
            out,
            &mut std::io::sink(),
        )
        .await
    })?;
    finish(err, r)
}

/// `runs cancel RUN`.
pub fn runs_cancel(
    remote: &RemoteArgs,
    run: u64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let resp = client
            .cancel_run(proto::CancelRunRequest { run_id: run })
            .await?
            .into_inner();
        if resp.cancelled {
            let _ = writeln!(
                out,
                "run {run}: cancel requested; running stages are being stopped"
            );
        } else {
            let _ = writeln!(out, "run {run} is not running; nothing to cancel");
        }
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `runs resolve`: decide a stage that needs attention.
pub fn runs_resolve(
    remote: &RemoteArgs,
    run: u64,
    stage: &str,
    resolution: &str,
    by: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let by = by.map_or_else(operator, str::to_owned);
    let r = block(async {
        let mut client = connect(remote).await?;
        client
            .resolve_stage(proto::ResolveStageRequest {
                run_id: run,
                stage: stage.to_owned(),
                resolution: resolution.to_owned(),
                decided_by: by.clone(),
            })
            .await?;
        let _ = writeln!(
            out,
            "run {run}: stage {stage} resolved as {resolution} by {by} (recorded in the run's log)"
        );
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `runs approve|reject RUN --coordinator`: decided as the caller's operator identity.
pub fn decide(
    remote: &RemoteArgs,
    run: u64,
    approve: bool,
    comment: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let resp = client
            .decide_run(proto::DecideRunRequest {
                run_id: run,
                approve,
                comment: comment.to_owned(),
            })
            .await?
            .into_inner();
        let _ = writeln!(
            out,
            "run {run}: {} {}",
            resp.gate,
            if approve { "approved" } else { "rejected" }
        );
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `baton audit [verify] --coordinator`.
pub(super) fn audit(
    remote: &RemoteArgs,
    filter: &super::environments::AuditFilter,
    verify: bool,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let resp = client.audit(proto::AuditRequest {}).await?.into_inner();
        let mut entries = Vec::new();
        for e in &resp.entries_json {
            entries.push(serde_json::from_str(e).map_err(|e| Failure {
                message: format!("the coordinator sent an audit entry this CLI cannot read: {e}"),
                code: EXIT_RUN_FAILED,
            })?);
        }
        let mut text_err = Vec::new();
        let code =
            super::environments::print_audit(&entries, filter, verify, output, out, &mut text_err)
                .map_err(io_failure)?;
        let _ = err.write_all(&text_err);
        Ok(code)
    })?;
    finish(err, r)
}

/// The coordinator's latest successful run of every stage of `key`'s project in `env`.
/// `Err(exit code)` once reported.
pub(super) fn last_release(
    remote: &RemoteArgs,
    key: &str,
    env: &str,
    err: &mut dyn Write,
) -> std::io::Result<Result<Option<super::environments::Release>, i32>> {
    let r = block(async {
        let mut client = connect(remote).await?;
        release_in(&mut client, key, env).await
    })?;
    Ok(match r {
        Ok(found) => Ok(found),
        Err(f) => {
            writeln!(err, "error: {}", f.message)?;
            Err(f.code)
        }
    })
}

/// [`last_release`] on an open connection.
async fn release_in(
    client: &mut Client,
    key: &str,
    env: &str,
) -> Result<Option<super::environments::Release>, Failure> {
    let scoped = crate::runs::scoped_key(key.split_once('/').map_or(key, |(p, _)| p), Some(env));
    let runs = client
        .list_runs(proto::ListRunsRequest {})
        .await?
        .into_inner()
        .runs;
    Ok(runs
        .into_iter()
        .rev()
        .find(|r| {
            r.project == scoped
                && r.direction == "up"
                && r.status == "succeeded"
                && r.selection == "all stages"
                && !r.release.is_empty()
        })
        .map(|r| super::environments::Release {
            digest: r.release,
            run: r.run_id,
            by: r.by,
            at_ms: r.created_at_ms,
        }))
}

/// One environment's column of `stages status --all-environments --coordinator`.
pub(super) fn environment_column(
    remote: &RemoteArgs,
    project: &baton_common::spec::Project,
    key: &str,
    env: &str,
    files: crate::scheduler::driver::PlannedFiles,
) -> Result<super::environments::Column, String> {
    let r = block(async {
        let states = remote_states(remote, project, files).await?;
        let mut client = connect(remote).await?;
        let release = release_in(&mut client, key, env).await?;
        Ok((release, states))
    })
    .map_err(|e| e.to_string())?;
    r.map_err(|f| f.message)
}

/// Who runs this CLI, for decisions recorded in a run's log: `USER@HOST`.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{user}@{host}")
}

/// `coordinator health`: `ok`, or `degraded: WHY` (exit 1).
pub fn health(
    remote: &RemoteArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let h = client.health(proto::HealthRequest {}).await?.into_inner();
        if h.status == "ok" {
            let _ = writeln!(out, "ok");
            Ok(EXIT_OK)
        } else {
            let _ = writeln!(out, "{}: {}", h.status, h.error);
            Ok(EXIT_RUN_FAILED)
        }
    })?;
    finish(err, r)
}

/// `agents drain`.
pub fn agents_drain(
    remote: &RemoteArgs,
    agent: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let resp = client
            .drain_agent(proto::DrainAgentRequest {
                agent_id: agent.to_owned(),
            })
            .await?
            .into_inner();
        let _ = writeln!(
            out,
            "agent {agent}: draining; no new assignments; {} running attempt(s) finish, then it disconnects",
            resp.running
        );
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `runs list` against a coordinator.
pub fn runs_list(
    remote: &RemoteArgs,
    environment: Option<&str>,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let runs = client
            .list_runs(proto::ListRunsRequest {})
            .await?
            .into_inner()
            .runs;
        let rows: Vec<super::run::RunRow> = runs
            .into_iter()
            .map(|r| super::run::RunRow {
                id: r.run_id,
                status: r.status,
                direction: r.direction,
                environment: crate::runs::environment_of(&r.project).map(str::to_owned),
                project: r.project,
                selection: r.selection,
                created_at_ms: r.created_at_ms,
            })
            .collect();
        let written = super::run::write_runs(&rows, environment, output, out);
        written.map_err(io_failure)?;
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}

/// `agents list`.
pub fn agents_list(
    remote: &RemoteArgs,
    output: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let r = block(async {
        let mut client = connect(remote).await?;
        let agents = client
            .list_agents(proto::ListAgentsRequest {})
            .await?
            .into_inner()
            .agents;
        let labels = |l: &HashMap<String, String>| {
            let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            v.sort();
            v.join(",")
        };
        let written = match output {
            OutputFormat::Json => {
                let rows: Vec<serde_json::Value> = agents
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "id": a.agent_id,
                            "labels": a.labels.iter().collect::<BTreeMap<_, _>>(),
                            "capacity": a.capacity, "running": a.running,
                            "last_seen_ms_ago": a.last_seen_ms_ago, "version": a.version,
                            "draining": a.draining,
                        })
                    })
                    .collect();
                super::run::write_json(out, &rows)
            }
            OutputFormat::Text => writeln!(
                out,
                "{:<24} {:<36} {:>8} {:>7}  last heartbeat",
                "ID", "LABELS", "CAPACITY", "RUNNING"
            )
            .and_then(|()| {
                agents.iter().try_for_each(|a| {
                    writeln!(
                        out,
                        "{:<24} {:<36} {:>8} {:>7}  {:.1}s ago",
                        if a.draining {
                            format!("{} (draining)", a.agent_id)
                        } else {
                            a.agent_id.clone()
                        },
                        labels(&a.labels),
                        a.capacity,
                        a.running,
                        a.last_seen_ms_ago as f64 / 1000.0
                    )
                })
            }),
        };
        written.map_err(io_failure)?;
        Ok(EXIT_OK)
    })?;
    finish(err, r)
}
