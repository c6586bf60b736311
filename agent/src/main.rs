//! The `baton-agent` binary: parse flags, set up logging and signals, find the agent's id,
//! and run [`baton_agent::session::run`] until SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use baton_agent::session::{run, AgentConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the C library's allocator: loading a large project allocates millions
/// of small strings and tree nodes from two threads at once, and glibc's malloc and free were
/// a quarter of the load's CPU (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs baton stages near their target, dialling out to a coordinator.
#[derive(Debug, Parser)]
#[command(name = "baton-agent", version)]
struct AgentArgs {
    /// The coordinator's URL, e.g. https://baton.example:7600.
    #[arg(long, env = "BATON_COORDINATOR")]
    coordinator: String,
    /// A label the agent offers (repeatable), e.g. --label env=prod. A stage runs here only
    /// when its `runs_on` selector is a subset of these.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// How many stage attempts run at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: u32,
    /// Where the agent keeps its state: its generated id, its outbox of results not yet
    /// acknowledged by the coordinator (`outbox/`), and the files of the stages it runs
    /// (under `work/`, removed when each ends). One agent per data directory.
    #[arg(long, default_value = ".baton-agent")]
    data_dir: PathBuf,
    /// HTTP/2 keepalive ping interval to the coordinator; a ping unanswered within half of it
    /// ends the connection, so a half-open one is noticed (e.g. 10s, 2s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    keepalive: Duration,
    /// On SIGTERM/SIGINT, how long running attempts get to stop and their results to reach
    /// the coordinator (what is not sent stays in the outbox for the next start).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// The agent's id (default: one generated on first start and kept in the data dir).
    #[arg(long)]
    name: Option<String>,
    /// A file holding the bearer token the coordinator expects from agents.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: the environment is visible to the
    /// agent's stages).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A CA bundle (PEM) the coordinator's TLS certificate must chain to.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The file holding the key that encrypts the outbox (64 hex digits). Else
    /// BATON_STATE_KEY (the key itself), else BATON_STATE_KEY_FILE, else `state.key` in the
    /// data directory, generated on first start.
    #[arg(long, value_name = "FILE")]
    state_key_file: Option<PathBuf>,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when
    /// not given.
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match baton_common::spec::duration::parse(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(e) => Err(format!(
            "`{s}` is not a duration ({e}); write e.g. 10s or 500ms"
        )),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "`{s}` is not a label: write KEY=VALUE, e.g. env=prod"
        )),
    }
}

/// The agent's id: `--name`, else the one kept in `data_dir/agent-id`, else a new one
/// written there (so a restarted agent is the same agent).
fn agent_id(name: Option<String>, data_dir: &Path) -> Result<String, String> {
    if let Some(n) = name.filter(|n| !n.trim().is_empty()) {
        return Ok(n);
    }
    let file = data_dir.join("agent-id");
    match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    }
    let random = baton_common::ids::random_hex().map_err(|e| e.to_string())?;
    let id = format!("agent-{}", &random[..12]);
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(&file, format!("{id}\n")))
        .map_err(|e| format!("cannot keep the agent id in {}: {e}", file.display()))?;
    Ok(id)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} `{}`: {e}", path.display()))
}

fn main() -> ExitCode {
    let args = AgentArgs::parse();
    let otlp = args.otlp_endpoint.clone();
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let telemetry = match baton_common::telemetry::init("baton-agent", otlp.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            baton_common::telemetry::shutdown_signal().await;
            signals.cancel();
        });
        tracing::info!(id = %config.id, labels = ?config.labels, capacity = config.capacity, "baton-agent starting");
        let code = match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
        // The last spans, off the async workers (the exporter blocks while it flushes).
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        code
    })
}

fn config(args: AgentArgs) -> Result<AgentConfig, String> {
    let id = agent_id(args.name, &args.data_dir)?;
    let token = match (&args.token_file, args.token) {
        (Some(f), _) => Some(baton_common::client::token_from_file(f)?),
        (None, t) => t,
    };
    let ca_pem = args
        .ca_file
        .as_deref()
        .map(|f| read_file(f, "CA file"))
        .transpose()?;
    // The only place the agent reads its environment: stages see it as `valueFromEnv`.
    let mut env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let state_key = baton_common::seal::StateKey::resolve(&env, args.state_key_file);
    // The agent's own credentials are not the stages' to read.
    for own in ["BATON_TOKEN", "BATON_STATE_KEY", "BATON_STATE_KEY_FILE"] {
        env.remove(own);
    }
    let mut c = AgentConfig::new(&args.coordinator, &id, args.data_dir);
    c.labels = args.labels.into_iter().collect();
    c.capacity = args.capacity;
    c.token = token;
    c.ca_pem = ca_pem;
    c.env = env;
    c.keepalive = args.keepalive;
    c.shutdown_grace = args.shutdown_grace;
    c.state_key = state_key;
    Ok(c)
}
