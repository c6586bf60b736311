//! Runs one [`Assignment`]: loads the stage from the files it carries, adds what only the
//! place where the stage runs knows (its environment: `valueFromEnv`, credentials), and hands
//! the stage to the [executor](crate::executor). Both transports call [`run`]: the
//! coordinator's in-process runner in local mode and the agent's session in distributed mode,
//! so a stage behaves the same wherever it runs.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use baton_common::spec::{
    load_stage_files, normalize, LoadOptions, LoadedStage, SourceFiles, StepAction, StepSpec,
};
use baton_common::stage::{Assignment, AttemptId, StageEnd, StageEvent, StageReport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::executor::{execute, StageTask, StepGate, VarLayers};

/// Where the stage runs, as the executor needs to know it.
#[derive(Debug, Default)]
pub struct Host {
    /// The environment of the process that runs the stage: the only source of
    /// `valueFromEnv` values and of `env` in conditions and templates. Shared by every
    /// stage it runs, not copied for each.
    pub env: Arc<crate::executor::ProcessEnv>,
    /// `User-Agent` of every request the stage sends.
    pub user_agent: String,
    /// Where an attempt's files are written before it runs (an agent's `DATA_DIR/work`), so
    /// command steps find them on disk; removed when the attempt ends. `None`: the files'
    /// paths are used as they are (local mode, where they came from this disk).
    pub workspace: Option<PathBuf>,
    /// HTTP clients shared by every stage this host runs.
    pub clients: Arc<crate::client::ClientCache>,
}

/// An attempt's files written under the workspace; removed when dropped.
#[derive(Debug)]
struct Materialized(PathBuf);

impl Drop for Materialized {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `path` below `root`: its root and prefix dropped, `..` kept from climbing out.
fn rebase(root: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = root.to_path_buf();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => out.push("_parent_"),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
        }
    }
    out
}

/// Writes `a`'s files under `workspace` and rebases its paths there.
fn materialize(workspace: &Path, a: &mut Assignment) -> Result<Materialized, String> {
    let dir = workspace.join(format!(
        "run{}-{}-{}",
        a.attempt.run,
        a.attempt.stage.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
            "_"
        ),
        a.attempt.attempt
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let guard = Materialized(dir.clone());
    let mut files = BTreeMap::new();
    for (path, bytes) in std::mem::take(&mut a.files) {
        let to = rebase(&dir, &path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&to, &bytes).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
        files.insert(to, bytes);
    }
    a.files = files;
    a.config_file = rebase(&dir, &a.config_file);
    Ok(guard)
}

/// The files an assignment carries. A path it does not carry is read from this machine's
/// disk only when absolute (a `client.ca_file` installed where the agent runs); everything
/// else the stage reads must have travelled with it.
#[derive(Debug, Clone)]
pub struct ShippedFiles(BTreeMap<PathBuf, Vec<u8>>);

impl ShippedFiles {
    pub fn new(files: BTreeMap<PathBuf, Vec<u8>>) -> Self {
        ShippedFiles(files.into_iter().map(|(p, b)| (normalize(&p), b)).collect())
    }
}

impl SourceFiles for ShippedFiles {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self.0.get(&normalize(path)) {
            Some(b) => Ok(b.clone()),
            None if path.is_absolute() => baton_common::spec::DiskFiles.read(path),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{}` did not travel with the assignment", path.display()),
            )),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let dir = normalize(dir);
        // A stage with no migrations ships no file under its migration directory: that is an
        // empty directory, not a missing one (the planner checked it exists).
        Ok(self
            .0
            .keys()
            .filter(|p| p.parent() == Some(dir.as_path()))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
}

/// The persist-then-act gates of running attempts: each migration's start waits here until
/// whoever records it (the driver, or the coordinator over the stream) acknowledges it.
#[derive(Debug, Clone, Default)]
pub struct Gates(Arc<Mutex<Waiting>>);

/// Gates waiting, by attempt and migration version.
type Waiting = HashMap<(AttemptId, u64), oneshot::Sender<()>>;

impl Gates {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Migration `version` of `attempt` is recorded: let it send.
    pub fn ack(&self, attempt: &AttemptId, version: u64) -> bool {
        match self.lock().remove(&(attempt.clone(), version)) {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }

    /// Drops every gate of `attempt` (it ended).
    pub fn forget(&self, attempt: &AttemptId) {
        self.lock().retain(|(a, _), _| a != attempt);
    }

    /// The executor's gate for one attempt: send `MigrationStarted` on the attempt's own
    /// step channel (so it follows every earlier step), then wait for [`Gates::ack`] or the
    /// attempt's cancellation.
    fn gate(
        &self,
        attempt: AttemptId,
        steps: mpsc::Sender<StageEvent>,
        cancel: CancellationToken,
    ) -> StepGate {
        let gates = self.clone();
        Arc::new(move |event| {
            let (attempt, gates, steps, cancel) = (
                attempt.clone(),
                gates.clone(),
                steps.clone(),
                cancel.clone(),
            );
            Box::pin(async move {
                let version = match &event {
                    StageEvent::MigrationStarted { version, .. } => *version,
                    _ => 0,
                };
                // Cancelled already: the migration is not announced (nothing will be sent).
                if cancel.is_cancelled() {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                gates.lock().insert((attempt, version), tx);
                if steps.send(event).await.is_ok() {
                    tokio::select! {
                        // A cancelled attempt never waits for an acknowledgement that won't come.
                        () = cancel.cancelled() => {}
                        _ = rx => {}
                    }
                }
            })
        })
    }
}

/// Runs `a` to its end, handing every step to `report` in the order it happened (a
/// migration's start through `gates`, so it waits for its acknowledgement), and returns how
/// it ended. What both runners call.
pub async fn run_reporting<F, Fut>(
    a: Assignment,
    host: &Host,
    cancel: CancellationToken,
    gates: &Gates,
    mut report: F,
) -> StageReport
where
    F: FnMut(StageEvent) -> Fut,
    Fut: Future<Output = ()>,
{
    let id = a.attempt.clone();
    // The attempt's span joins the run's trace through the assignment's traceparent.
    let span =
        tracing::info_span!("attempt", run = id.run, stage = %id.stage, attempt = id.attempt);
    baton_common::telemetry::adopt(&span, &a.traceparent);
    let (stx, mut srx) = mpsc::channel(256);
    let gate = gates.gate(id.clone(), stx.clone(), cancel.clone());
    let exec = tracing::Instrument::instrument(run(a, host, cancel, stx, Some(gate)), span);
    tokio::pin!(exec);
    let end = loop {
        tokio::select! {
            // Steps first, so each is reported before the attempt's end.
            biased;
            Some(step) = srx.recv() => report(step).await,
            end = &mut exec => break end,
        }
    };
    while let Ok(step) = srx.try_recv() {
        report(step).await;
    }
    gates.forget(&id);
    end
}

/// Loads `a`'s stage from `files`; a stage that does not load ends failed, naming it.
fn load(a: &Assignment, files: &ShippedFiles) -> Result<LoadedStage, StageReport> {
    load_stage_files(
        &a.attempt.stage,
        &a.config_file,
        files,
        LoadOptions::default(),
    )
    .map_err(|diags| {
        StageReport::ended(StageEnd::Failed(format!(
            "stage `{}`: its files do not load where it runs:\n{diags}",
            a.attempt.stage
        )))
    })
}

/// Whether any step of `stage` (up, down or a down's lookup) runs a command.
fn runs_commands(stage: &LoadedStage) -> bool {
    fn is_command(step: &StepSpec) -> bool {
        matches!(step.action, Some(StepAction::Command(_)))
            || step.find.as_deref().is_some_and(is_command)
    }
    stage
        .migrations
        .iter()
        .flat_map(|m| m.up.iter().chain(m.down.iter()))
        .any(is_command)
}

/// Runs `a` to its end. Every failure, including files that do not load, is a
/// [`StageEnd::Failed`] naming the stage; nothing panics.
pub async fn run(
    a: Assignment,
    host: &Host,
    cancel: CancellationToken,
    events: mpsc::Sender<StageEvent>,
    gate: Option<StepGate>,
) -> StageReport {
    let mut a = a;
    let mut files = ShippedFiles::new(std::mem::take(&mut a.files));
    // In the process that planned the run, the stage comes parsed from the same bytes.
    let mut stage = match a.parsed.take() {
        Some(parsed) => parsed,
        None => match load(&a, &files) {
            Ok(s) => Arc::new(s),
            Err(end) => return end,
        },
    };
    // Only a command runs beside the stage's files, so only a stage with a command step has
    // them written where it runs; requests read them from the assignment. (Writing and
    // removing every attempt's files cost more than the rest of a short stage.)
    let mut _written = None;
    if let Some(ws) = host.workspace.as_ref().filter(|_| runs_commands(&stage)) {
        a.files = files.0;
        match materialize(ws, &mut a) {
            Ok(m) => _written = Some(m),
            Err(e) => {
                return StageReport::ended(StageEnd::Failed(format!(
                    "stage `{}`: cannot write its files where it runs: {e}",
                    a.attempt.stage
                )))
            }
        }
        files = ShippedFiles::new(std::mem::take(&mut a.files));
        stage = match load(&a, &files) {
            Ok(s) => Arc::new(s),
            Err(end) => return end,
        };
    }
    let task = StageTask {
        key_scope: a.key_scope,
        stage: a.attempt.stage,
        loaded: stage,
        vars: VarLayers {
            global: a.vars.global,
            literal_globals: a.vars.literal_globals,
            process_env: host.env.clone(),
            stage: a.vars.stage,
            from_stages: a.vars.imported,
        },
        applied: a.applied,
        secrets: a.secrets,
        not_secret: a.not_secret,
        retry: a.retry,
        direction: a.direction,
        timeout: a.timeout,
        files: Arc::new(files),
        gate,
        user_agent: host.user_agent.clone(),
        clients: Some(host.clients.clone()),
    };
    execute(task, cancel, events).await
}
