//! The `baton` command line: flag parsing and dispatch. One module per subcommand.
//!
//! Every command writes its data to `out` and its diagnostics to `err` and returns the
//! process exit code: 0 success, 1 the run failed, 2 invalid input or usage (COMPAT.md).

mod coordinator;
mod demo;
mod environments;
mod graph;
mod plan_view;
pub mod progress;
mod readonly;
pub(crate) mod remote;
pub(crate) mod run;
mod stages;

pub use remote::RemoteArgs;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The name of the stages file single-stage mode (`baton up -c config.yaml`) generates in
/// memory for the stage (its history is kept under this project name). Never shown: see
/// [`shown_project`].
pub const SINGLE_STAGE_FILE: &str = ".baton-stage.yaml";

/// A project's name as people read it: the stages file, or `single stage` for single-stage
/// mode's generated one (an internal name).
pub fn shown_project(project: &str) -> String {
    match project.strip_suffix(SINGLE_STAGE_FILE) {
        Some("") => "single stage".to_owned(),
        Some(dir) => format!("single stage in {}", dir.trim_end_matches('/')),
        // A project key scoped to an environment (`stages.yaml/prod`).
        None => match project.split_once('/') {
            Some((file, env)) => format!("{file} [{env}]"),
            None => project.to_owned(),
        },
    }
}

/// Who runs this CLI locally, for run records, approvals and the audit log: `BATON_USER`,
/// else the OS user (`USER`, `LOGNAME`, else the user database's name for this process's
/// uid); groups from `BATON_GROUPS` (comma-separated).
/// Locally this is what the user says: whoever can write the state directory can do
/// anything there. A coordinator's operator tokens are the identities it enforces.
pub fn identity(env: &std::collections::BTreeMap<String, String>) -> crate::runs::Identity {
    let name = ["BATON_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|k| env.get(*k).filter(|v| !v.trim().is_empty()))
        .map(|v| v.trim().to_owned())
        .or_else(os_user)
        .unwrap_or_else(|| "unknown".to_owned());
    let groups = env
        .get("BATON_GROUPS")
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    crate::runs::Identity { name, groups }
}

/// This process's user name from the system's user database (containers and CI jobs often
/// set no `USER`): the real uid from `/proc/self/status`, looked up in `/etc/passwd`.
fn os_user() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut fields = l.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

/// Exit codes.
pub const EXIT_OK: i32 = 0;
pub const EXIT_RUN_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Deployment orchestrator: plans and runs multi-stage deployments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The file holding the key that encrypts secrets in the state directory (64 hex
    /// digits). Else BATON_STATE_KEY (the key itself), else BATON_STATE_KEY_FILE, else
    /// `state.key` in the state directory, generated on first use.
    #[arg(long, global = true, value_name = "FILE")]
    pub state_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Multi-stage orchestration: validate, plan and run a stages.yaml.
    #[command(subcommand)]
    Stages(StagesCommand),
    /// Run the bundled examples for real against a local demo API, then show their status.
    Demo(DemoArgs),
    /// Single-stage mode, as apirun users know it: apply one stage's pending migrations.
    Up(SingleArgs),
    /// Single-stage mode: roll one stage's migrations back.
    Down(SingleArgs),
    /// Single-stage mode: one stage's applied and pending migrations.
    Status(SingleArgs),
    /// Runs: from the state directory, or from a coordinator with --coordinator.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// The agents attached to a coordinator.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Run in an environment the release that last succeeded (every stage) in the
    /// environment before it: `baton promote --to prod`.
    Promote(PromoteArgs),
    /// The audit log: every submit, approval, rejection, cancel, override, resolve and stage
    /// down, who did it, when, where and why. `baton audit verify` checks its hash chain.
    Audit(AuditArgs),
    /// The coordinator service.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Print a shell completion script: `baton completions bash > /etc/bash_completion.d/baton`,
    /// `baton completions zsh > "${fpath[1]}/_baton"`, `baton completions fish >
    /// ~/.config/fish/completions/baton.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The environment to promote to (the one before it must have succeeded with these
    /// files).
    #[arg(long, value_name = "ENVIRONMENT")]
    pub to: String,
    /// The stages file.
    #[arg(long, short = 'c', default_value = "stages.yaml")]
    pub config: PathBuf,
    /// Print the plan and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Set a variable on top of `global.env` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// With --coordinator: submit, print the run's id, and return without watching.
    #[arg(long, requires = "coordinator")]
    pub detach: bool,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: Option<AuditAction>,
    #[command(flatten)]
    pub state: StateArgs,
    /// Only this run's entries.
    #[arg(long)]
    pub run: Option<u64>,
    /// Output format (json: {"schema": "baton.audit/v1", "entries": [...]}).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check the hash chain: exit 0 with the entry count and head hash when intact, 1
    /// naming the first entry that was changed, removed or reordered.
    Verify {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Every attached agent: id, labels, capacity, running attempts, last heartbeat.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Stop new assignments to an agent; its running stages finish, then it disconnects
    /// and exits (never counted as lost).
    Drain {
        /// The agent's id (see `baton agents list`).
        agent: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Serve AgentService and ControlService until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Whether a coordinator can record transitions: `ok` (exit 0), or `degraded` with why
    /// (exit 1; it stopped dispatching after a storage failure: free space, then restart it).
    Health {
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7600")]
    pub listen: String,
    /// Where the coordinator keeps its state (sled, the same format as local mode).
    #[arg(long, default_value = "baton-data")]
    pub data_dir: PathBuf,
    /// TLS certificate chain (PEM); with --tls-key, every connection uses TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A file holding the bearer token agents must present.
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
    /// A file holding the bearer token the CLI must present.
    #[arg(long)]
    pub operator_token_file: Option<PathBuf>,
    /// Allow plaintext or no tokens on an address other than loopback (prints a warning).
    #[arg(long)]
    pub insecure: bool,
    /// How often agents send heartbeats (H), e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub heartbeat: std::time::Duration,
    /// How long an agent keeps an attempt without a lease renewal (L); at least twice the
    /// heartbeat.
    #[arg(long, default_value = "15s", value_parser = parse_positive_duration)]
    pub lease: std::time::Duration,
    /// How much longer the coordinator waits before it declares an attempt lost (G): lost at
    /// L + G.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub grace: std::time::Duration,
    /// After a restart, how long attempts that were running wait for their agents to
    /// reattach (F).
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub failover_grace: std::time::Duration,
    /// HTTP/2 keepalive ping interval; a ping unanswered within half of it ends the
    /// connection (a half-open one is noticed).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub keepalive: std::time::Duration,
    /// How long shutdown waits for drivers to stop and sessions to close.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub shutdown_grace: std::time::Duration,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when
    /// not given.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct SingleArgs {
    /// The stage's config file.
    #[arg(long, short = 'c', default_value = "config.yaml")]
    pub config: PathBuf,
    /// Where state lives (default: `.baton/` beside the config file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Set a variable (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// `up`: print the plan and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// `down`: do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// `down`: pass over migrations that have no `down` step.
    #[arg(long)]
    pub skip_missing_down: bool,
    /// `status`: also show exported variables (secrets masked); `up`/`down`: also show log
    /// lines (command output, retries) in the live view.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// `up`: apply migrations up to this version only; `down`: roll back to this version
    /// (`--to 0`: all of them, the default).
    #[arg(long, value_name = "VERSION")]
    pub to: Option<u64>,
}

impl SingleArgs {
    /// The one-stage project: a generated stages file beside the config.
    fn spec(&self) -> SpecArgs {
        let config = baton_common::spec::normalize(&self.config);
        let dir = config
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        // The stage is named after its directory (the current one for a bare `config.yaml`).
        let name = std::fs::canonicalize(if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            &dir
        })
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "stage".to_owned());
        let file = config.file_name().map_or_else(
            || "config.yaml".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let generated = format!(
            "stages:\n  - name: {}\n    config_path: {}\n",
            serde_json::Value::String(name),
            serde_json::Value::String(file)
        );
        SpecArgs {
            config: dir.join(SINGLE_STAGE_FILE),
            strict: false,
            generated: Some(generated),
            provided: self.set.iter().map(|(k, _)| k.clone()).collect(),
            environment: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stages files to run, in order (default: the bundled examples).
    #[arg(long, short = 'c')]
    pub config: Vec<PathBuf>,
    /// Run them through a coordinator and two agents (in this process tree, real gRPC over
    /// loopback) instead of locally.
    #[arg(long, conflicts_with = "api_only")]
    pub distributed: bool,
    /// Only serve the demo cloud API (on --listen) until Ctrl-C, for trying the examples by
    /// hand, e.g. through a coordinator.
    #[arg(long)]
    pub api_only: bool,
    /// With --api-only: where the demo API listens (loopback).
    #[arg(long, default_value = "127.0.0.1:8080", requires = "api_only")]
    pub listen: String,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Every run, oldest first.
    List {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Resume the interrupted run of a stages file (what the next `stages up` would do).
    Resume {
        #[command(flatten)]
        state: StateArgs,
        /// Set a variable on top of `global.env` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<(String, String)>,
    },
    /// A run's event log.
    Show {
        /// The run's id (see `baton runs list`).
        run: u64,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Output format (json: one event per line, with its sequence number).
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Follow a run on a coordinator as it happens, from the start or a given event.
    Watch {
        /// The run's id.
        run: u64,
        /// First event to show (its sequence number; 0: from the start).
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Output format (json: one event per line, with its sequence number).
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// A run's log lines (command output, notes), from the state directory or a coordinator.
    Logs {
        /// The run's id.
        run: u64,
        /// Only this stage's lines.
        #[arg(long)]
        stage: Option<String>,
        /// Keep printing lines as they are recorded until the run finishes (coordinator).
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Approve what a run awaits (`awaiting approval`): as yourself locally (BATON_USER, else
    /// the OS user), as your operator token on a coordinator.
    Approve {
        /// The run's id.
        run: u64,
        /// Recorded with the approval.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Reject what a run awaits: the stages behind the approval fail, nothing is sent.
    Reject {
        /// The run's id.
        run: u64,
        /// Why, recorded with the rejection.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel a run on a coordinator: nothing new starts, agents stop in-flight stages.
    Cancel {
        /// The run's id.
        run: u64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Decide a stage that needs attention (its attempt was lost with a migration in flight):
    /// succeeded (it took effect), failed (it did not), or retry (send it again with the
    /// same Idempotency-Key).
    Resolve {
        /// The run's id.
        run: u64,
        /// The stage that needs attention.
        #[arg(long)]
        stage: String,
        /// succeeded, failed or retry.
        #[arg(long = "as", value_parser = ["succeeded", "failed", "retry"])]
        resolution: String,
        /// Who decides, recorded with the decision (default: USER@HOST).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    match baton_common::spec::duration::parse(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(e) => Err(format!(
            "`{s}` is not a duration ({e}); write e.g. 5s or 500ms"
        )),
    }
}

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The stages file (its `.baton/` directory holds the state).
    #[arg(long, short = 'c', default_value = "stages.yaml")]
    pub config: PathBuf,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The environment (for a project that declares environments).
    #[arg(long, short = 'e', value_name = "NAME", env = "BATON_ENVIRONMENT")]
    pub environment: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum StagesCommand {
    /// Check a stages file and every file it names; report every problem at once.
    Validate(ValidateArgs),
    /// Run stages in dependency order (`--dry-run` prints the plan and sends nothing).
    Up(UpArgs),
    /// Roll stages back (their `down` steps), in reverse dependency order.
    Down(DownArgs),
    /// Applied and pending migrations per stage, and each stage's last result.
    Status(StatusArgs),
    /// Draw the stage dependency graph.
    Graph(GraphArgs),
    /// The variables stages exported (what `env_from_stages` imports), for pipelines:
    /// `baton stages outputs network -o json`. Secret values are masked unless --reveal.
    Outputs(OutputsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// The stages file.
    #[arg(long, short = 'c', default_value = "stages.yaml")]
    pub config: PathBuf,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
    /// Set by the single-stage commands: `config` names a generated stages file with this
    /// content, beside the stage's `config.yaml`.
    #[arg(skip)]
    pub generated: Option<String>,
    /// Variables the command line sets (`--set`), so validation counts them as provided.
    #[arg(skip)]
    pub provided: Vec<String>,
    /// The environment (one of the stages file's `environments:`): its variables, agents,
    /// history and runs. Required by commands that run or read state when the project
    /// declares environments; `validate` without it checks every environment.
    #[arg(long, short = 'e', value_name = "NAME", env = "BATON_ENVIRONMENT")]
    pub environment: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Also list, per stage, which variables are treated as secret and why.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print the plan and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run only this stage (repeatable); its dependencies must have run before.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub stage: Vec<String>,
    /// First stage of a range; alone: it and every stage after it (its dependents).
    #[arg(long)]
    pub from: Option<String>,
    /// Last stage of a range; alone: it and every stage before it (its dependencies).
    #[arg(long)]
    pub to: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Set a variable on top of `global.env` (repeatable): --set api_base=http://127.0.0.1:8080
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// With --coordinator: submit, print the run's id, and return without watching.
    #[arg(long, requires = "coordinator")]
    pub detach: bool,
    /// Run in this environment although the release has not succeeded in the environment
    /// before it (needs --reason; recorded in the audit log).
    #[arg(long, requires = "reason")]
    pub skip_promotion_check: bool,
    /// Why the promotion check is skipped.
    #[arg(long, requires = "skip_promotion_check")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub show: ShowArgs,
    /// Single-stage `baton up --to VERSION` (not a `stages up` flag): apply up to it.
    #[arg(skip)]
    pub up_to: Option<u64>,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print what would be rolled back and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Roll back only this stage (repeatable).
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub stage: Vec<String>,
    /// The later stage of a range (rolled back first); alone: it and every stage it depends
    /// on.
    #[arg(long)]
    pub from: Option<String>,
    /// The earlier stage of a range (rolled back last); alone: it and every stage that
    /// depends on it.
    #[arg(long)]
    pub to: Option<String>,
    /// Also roll back stages that depend on the selected ones and are still applied.
    #[arg(long)]
    pub cascade: bool,
    /// Pass over migrations that have no `down` step (nothing is sent for them).
    #[arg(long)]
    pub skip_missing_down: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Set a variable on top of `global.env` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Output format (json: the run's record at the end instead of progress).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub show: ShowArgs,
    /// Single-stage `baton down --to VERSION` (not a `stages down` flag): roll back to it.
    #[arg(skip)]
    pub down_to: Option<u64>,
}

/// How a run's progress is shown (`stages up`, `stages down`).
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ShowArgs {
    /// How progress is shown: the live view on a terminal (auto), always (tty), or plain
    /// timestamped lines (plain; also what auto gives under NO_COLOR, TERM=dumb or CI).
    #[arg(long, value_enum, default_value_t)]
    pub progress: progress::ProgressMode,
    /// Also show log lines (command output, retries) in the live view.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct OutputsArgs {
    /// Only this stage (text output is then `name=value` lines).
    pub stage: Option<String>,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Output format (json: {"schema": "baton.outputs/v1", "stages": {STAGE: {NAME: VALUE}}}).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Show secret values in clear (local state only; never through a coordinator).
    #[arg(long, conflicts_with = "coordinator")]
    pub reveal: bool,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Also show each stage's exported variables (secrets masked).
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Output format (json: every stage with its exports, secrets masked).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where state lives (default: `.baton/` beside the stages file).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Every environment side by side: the release each runs, who ran it and when, and the
    /// versions each stage has applied.
    #[arg(long, conflicts_with = "environment")]
    pub all_environments: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    #[default]
    Mermaid,
    Dot,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Graph language.
    #[arg(long, value_enum, default_value_t)]
    pub format: GraphFormat,
}

/// Runs a parsed command line. `env` is the process environment, read once by `main`.
pub fn run(
    cli: Cli,
    env: std::collections::BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let key = crate::store::StateKey::resolve(&env, cli.state_key_file);
    // Diagnostics in the CLI's own commands only when asked for (the service sets up its own,
    // with span export): progress and results stay the only output otherwise.
    let serving = matches!(
        cli.command,
        Command::Coordinator(CoordinatorCommand::Serve(_))
    );
    if env.contains_key("BATON_LOG") && !serving {
        if let Err(e) = baton_common::telemetry::init("baton", None) {
            writeln!(err, "warning: {e}")?;
        }
    }
    match cli.command {
        Command::Stages(StagesCommand::Validate(a)) if a.remote.coordinator.is_some() => {
            remote::validate(&a, &a.remote, out, err)
        }
        Command::Stages(StagesCommand::Validate(a)) => stages::validate(&a, out, err),
        Command::Stages(StagesCommand::Up(mut a)) => {
            a.spec.provided = a.set.iter().map(|(k, _)| k.clone()).collect();
            if a.remote.coordinator.is_some() {
                remote::up(&a, &a.remote, a.detach, out, err)
            } else {
                stages::up(&a, env, &key, out, err)
            }
        }
        Command::Stages(StagesCommand::Down(mut a)) if a.remote.coordinator.is_some() => {
            a.spec.provided = a.set.iter().map(|(k, _)| k.clone()).collect();
            remote::down(&a, out, err)
        }
        Command::Stages(StagesCommand::Down(mut a)) => {
            a.spec.provided = a.set.iter().map(|(k, _)| k.clone()).collect();
            stages::down(&a, env, &key, out, err)
        }
        Command::Stages(StagesCommand::Status(a)) if a.all_environments => {
            environments::status_all(&a, &key, out, err)
        }
        Command::Stages(StagesCommand::Status(a)) if a.remote.coordinator.is_some() => {
            remote::status(&a, out, err)
        }
        Command::Stages(StagesCommand::Status(a)) => stages::status(&a, &key, out, err),
        Command::Stages(StagesCommand::Graph(a)) => graph::run(&a, out, err),
        Command::Stages(StagesCommand::Outputs(a)) if a.remote.coordinator.is_some() => {
            remote::outputs(&a, out, err)
        }
        Command::Stages(StagesCommand::Outputs(a)) => stages::outputs(&a, &key, out, err),
        Command::Demo(a) => demo::run(&a, env, out, err),
        Command::Promote(a) => environments::promote(&a, env, &key, out, err),
        Command::Audit(a) => {
            let (verify, state, remote) = match a.action {
                Some(AuditAction::Verify { state, remote }) => (true, state, remote),
                None => (false, a.state, a.remote),
            };
            let filter = environments::AuditFilter {
                environment: state.environment.clone(),
                run: a.run,
            };
            if remote.coordinator.is_some() {
                remote::audit(&remote, &filter, verify, a.output, out, err)
            } else {
                environments::audit_local(&state, &key, filter, verify, a.output, out, err)
            }
        }
        Command::Runs(RunsCommand::Approve {
            run,
            comment,
            state,
            remote,
        }) => decide(run, true, comment, &state, &remote, &env, &key, out, err),
        Command::Runs(RunsCommand::Reject {
            run,
            reason,
            state,
            remote,
        }) => decide(run, false, reason, &state, &remote, &env, &key, out, err),
        Command::Up(a) => {
            let up = UpArgs {
                spec: a.spec(),
                dry_run: a.dry_run,
                stage: Vec::new(),
                from: None,
                to: None,
                output: OutputFormat::Text,
                state_dir: a.state_dir,
                set: a.set,
                remote: RemoteArgs::default(),
                detach: false,
                skip_promotion_check: false,
                reason: None,
                show: ShowArgs {
                    progress: progress::ProgressMode::Auto,
                    verbose: a.verbose,
                },
                up_to: a.to,
            };
            stages::up(&up, env, &key, out, err)
        }
        Command::Down(a) => {
            let down = DownArgs {
                spec: a.spec(),
                dry_run: a.dry_run,
                stage: Vec::new(),
                from: None,
                to: None,
                cascade: false,
                skip_missing_down: a.skip_missing_down,
                yes: a.yes,
                state_dir: a.state_dir,
                set: a.set,
                remote: RemoteArgs::default(),
                output: OutputFormat::Text,
                show: ShowArgs {
                    progress: progress::ProgressMode::Auto,
                    verbose: a.verbose,
                },
                down_to: a.to,
            };
            stages::down(&down, env, &key, out, err)
        }
        Command::Status(SingleArgs { to: Some(_), .. }) => {
            writeln!(err, "error: `--to` is for `baton up` and `baton down`; `baton status` shows every version")?;
            Ok(EXIT_INVALID)
        }
        Command::Status(a) => {
            let status = StatusArgs {
                spec: a.spec(),
                remote: RemoteArgs::default(),
                verbose: a.verbose,
                state_dir: a.state_dir,
                output: OutputFormat::Text,
                all_environments: false,
            };
            stages::status(&status, &key, out, err)
        }
        Command::Runs(RunsCommand::Resume { state, set }) => {
            stages::resume(&state, set, env, &key, out, err)
        }
        Command::Runs(RunsCommand::List {
            remote,
            output,
            state,
        }) if remote.coordinator.is_some() => {
            remote::runs_list(&remote, state.environment.as_deref(), output, out, err)
        }
        Command::Runs(RunsCommand::List { state, output, .. }) => {
            stages::runs(&state, &key, None, output, out, err)
        }
        Command::Runs(RunsCommand::Show {
            run,
            remote,
            output,
            ..
        }) if remote.coordinator.is_some() => {
            remote::runs_watch(&remote, run, 0, false, output, out, err)
        }
        Command::Runs(RunsCommand::Show {
            run, state, output, ..
        }) => stages::runs(&state, &key, Some(run), output, out, err),
        Command::Runs(RunsCommand::Watch {
            run,
            from_seq,
            remote,
            output,
        }) => with_coordinator(
            &remote,
            "runs watch",
            err,
            |r, out, err| remote::runs_watch(r, run, from_seq, true, output, out, err),
            out,
        ),
        Command::Runs(RunsCommand::Logs {
            run,
            stage,
            follow,
            remote,
            ..
        }) if remote.coordinator.is_some() => {
            remote::runs_logs(&remote, run, stage.as_deref(), follow, out, err)
        }
        Command::Runs(RunsCommand::Logs { follow: true, .. }) => {
            writeln!(
                err,
                "error: `runs logs --follow` follows a run on a coordinator (add --coordinator URL); a local run shows its log live in `stages up`, and `runs logs RUN` prints it afterwards"
            )?;
            Ok(EXIT_INVALID)
        }
        Command::Runs(RunsCommand::Logs {
            run, stage, state, ..
        }) => stages::logs(&state, &key, run, stage.as_deref(), out, err),
        Command::Runs(RunsCommand::Cancel { run, remote }) => with_coordinator(
            &remote,
            "runs cancel",
            err,
            |r, out, err| remote::runs_cancel(r, run, out, err),
            out,
        ),
        Command::Runs(RunsCommand::Resolve {
            run,
            stage,
            resolution,
            by,
            remote,
        }) => with_coordinator(
            &remote,
            "runs resolve",
            err,
            |r, out, err| {
                remote::runs_resolve(r, run, &stage, &resolution, by.as_deref(), out, err)
            },
            out,
        ),
        Command::Agents(AgentsCommand::Drain { agent, remote }) => with_coordinator(
            &remote,
            "agents drain",
            err,
            |r, out, err| remote::agents_drain(r, &agent, out, err),
            out,
        ),
        Command::Agents(AgentsCommand::List { remote, output }) => with_coordinator(
            &remote,
            "agents list",
            err,
            |r, out, err| remote::agents_list(r, output, out, err),
            out,
        ),
        Command::Coordinator(CoordinatorCommand::Serve(a)) => coordinator::serve(&a, key, err),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "baton", out);
            Ok(EXIT_OK)
        }
        Command::Coordinator(CoordinatorCommand::Health { remote }) => {
            with_coordinator(&remote, "coordinator health", err, remote::health, out)
        }
    }
}

/// `runs approve|reject`: through a coordinator, else on the state directory.
#[allow(clippy::too_many_arguments)]
fn decide(
    run: u64,
    approve: bool,
    comment: Option<String>,
    state: &StateArgs,
    remote: &RemoteArgs,
    env: &std::collections::BTreeMap<String, String>,
    key: &crate::store::StateKey,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let comment = comment.unwrap_or_default();
    if remote.coordinator.is_some() {
        remote::decide(remote, run, approve, &comment, out, err)
    } else {
        environments::decide_local(state, key, run, approve, comment, identity(env), out, err)
    }
}

/// Asks `question` on a terminal; true when the answer is `yes`. Destructive commands call
/// it unless `--yes` was given (and refuse without a terminal before that).
fn confirm(question: &str, out: &mut dyn Write) -> std::io::Result<bool> {
    write!(out, "{question} type `yes` to confirm: ")?;
    out.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        return Ok(true);
    }
    writeln!(out, "nothing was rolled back")?;
    Ok(false)
}

/// Runs `f` when a coordinator is named; else says the command needs one.
fn with_coordinator(
    remote: &RemoteArgs,
    what: &str,
    err: &mut dyn Write,
    f: impl FnOnce(&RemoteArgs, &mut dyn Write, &mut dyn Write) -> std::io::Result<i32>,
    out: &mut dyn Write,
) -> std::io::Result<i32> {
    if remote.coordinator.is_none() {
        writeln!(
            err,
            "error: `baton {what}` talks to a coordinator: pass --coordinator URL or set BATON_COORDINATOR"
        )?;
        return Ok(EXIT_INVALID);
    }
    f(remote, out, err)
}
