//! The stage executor: runs a stage's migrations, up or down, and reports each step.
//!
//! [`execute`] takes a [`StageTask`] (a validated stage, the variables in scope, the
//! migrations already applied, a direction), a cancellation token and an event sink. It
//! runs the pending migrations in order and sends a [`StageEvent`] for every step; the
//! returned [`StageReport`] says how the stage ended, what each migration extracted, and
//! which variables the stage now exports. It does not know how the stage arrived (in-process
//! in local mode, over gRPC later) and keeps no state between calls: the caller records each
//! `MigrationFinished` event as it arrives, so an interrupted stage resumes after its last
//! recorded migration.
//!
//! Invariants:
//! - every event and error text passes through the stage's [`Masker`] first;
//! - a cancelled or timed-out stage stops between requests and drops any request in flight;
//! - a variable is rendered into a request once, never re-rendered.

mod command;
pub(crate) mod http;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_common::mask::Masker;
use baton_common::spec::{
    LoadedStage, MigrationSpec, RetryPolicy, SourceFiles, StepAction, StepSpec,
};
use baton_common::template::{Scope, TemplateError, TemplateErrorKind};
use baton_common::vars::{self, Layer, Layers};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use baton_common::stage::{
    AppliedMigration, Direction, MigrationOutcome, StageEnd, StageEvent, StageReport,
};

use crate::auth::Tokens;
use crate::client::build_client;

/// The environment where stages run, shared by every stage a process runs. Its names that
/// say their value is secret (`GITHUB_TOKEN`) are found once here, not for every stage.
#[derive(Debug, Clone, Default)]
pub struct ProcessEnv {
    vars: BTreeMap<String, String>,
    /// The names for which [`baton_common::mask::sensitive_name`] holds.
    sensitive: Vec<String>,
}

impl ProcessEnv {
    pub fn new(vars: BTreeMap<String, String>) -> Self {
        let sensitive = vars
            .keys()
            .filter(|k| baton_common::mask::sensitive_name(k))
            .cloned()
            .collect();
        ProcessEnv { vars, sensitive }
    }

    /// Every variable, by name.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }
}

impl From<BTreeMap<String, String>> for ProcessEnv {
    fn from(vars: BTreeMap<String, String>) -> Self {
        ProcessEnv::new(vars)
    }
}

/// Variables given to a stage, by precedence layer (lowest first). The executor adds the
/// stage config's `env`, values extracted during the stage, and each migration's own `env`.
#[derive(Debug, Clone, Default)]
pub struct VarLayers {
    /// `global.env`, with the run's `--set` values on top.
    pub global: BTreeMap<String, String>,
    /// Names in `global` whose values came from `--set`: never rendered as templates.
    pub literal_globals: Vec<String>,
    /// The environment where the stage runs (also the source of `valueFromEnv`).
    pub process_env: Arc<ProcessEnv>,
    /// The stage's `env` in stages.yaml.
    pub stage: BTreeMap<String, String>,
    /// Values imported with `env_from_stages`.
    pub from_stages: BTreeMap<String, String>,
}

/// Everything the executor needs to run one stage.
#[derive(Clone)]
pub struct StageTask {
    /// What makes this run's idempotency keys unique everywhere (the store's and the run's
    /// random ids); the same for every attempt of the run, so a re-sent request reuses its key.
    pub key_scope: String,
    pub stage: String,
    /// The stage's files, parsed: its config file (relative paths in it, `ca_file`, are
    /// resolved beside it), its config and its migrations, sorted by version.
    pub loaded: Arc<LoadedStage>,
    pub vars: VarLayers,
    pub applied: Vec<AppliedMigration>,
    /// Names of variables whose values are secret (stages.yaml and config `secrets:`).
    pub secrets: Vec<String>,
    /// Names that say they are secret but are not (`not_secret`).
    pub not_secret: Vec<String>,
    /// Retry policy after global and stage levels; config and migration levels are applied here.
    pub retry: RetryPolicy,
    pub direction: Direction,
    /// Bounds the whole stage (`timeout` in stages.yaml).
    pub timeout: Option<Duration>,
    /// Reads body files and CA files.
    pub files: Arc<dyn SourceFiles + Send + Sync>,
    /// Awaited before each migration's first side effect, with the `MigrationStarted` event:
    /// the caller makes "migration N started" durable here, so after a crash it knows the
    /// migration may have reached the target (persist, then act). `None`: not awaited.
    pub gate: Option<StepGate>,
    /// `User-Agent` of every request (`baton/VERSION` locally, `baton-agent/VERSION (ID)` on
    /// an agent, so a target's log shows which agent sent what).
    pub user_agent: String,
    /// The runner's HTTP clients, shared across its stages; `None`: a client of its own.
    pub clients: Option<Arc<crate::client::ClientCache>>,
}

/// See [`StageTask::gate`].
pub type StepGate = Arc<
    dyn Fn(StageEvent) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

impl std::fmt::Debug for StageTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageTask")
            .field("key_scope", &self.key_scope)
            .field("stage", &self.stage)
            .field("direction", &self.direction)
            .field("migrations", &self.loaded.migrations.len())
            .finish_non_exhaustive()
    }
}

/// Why a step failed; the message is masked before it leaves the executor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StepError {
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
}

impl StepError {
    pub(crate) fn failed(msg: impl Into<String>) -> Self {
        StepError::Failed(msg.into())
    }
}

/// The context one stage's steps share.
pub(crate) struct StageCtx<'a> {
    pub task: &'a StageTask,
    pub client: reqwest::Client,
    /// Grows when auth tokens are acquired, so it sits behind a lock (never held across an await).
    pub masker: std::sync::Mutex<Masker>,
    pub tokens: Tokens,
    pub cancel: CancellationToken,
    pub events: &'a mpsc::Sender<StageEvent>,
    /// The stage's variables before any migration (config env included): its layers
    /// resolved (`vars::STAGE`), under each migration's own.
    pub base: BTreeMap<String, String>,
    pub max_response_bytes: usize,
}

impl StageCtx<'_> {
    pub(crate) fn mask(&self, text: &str) -> String {
        // A poisoned lock only means a panic elsewhere; the secrets it holds are intact.
        self.masker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .mask(text)
    }

    /// The secrets known now, for masking a stream.
    pub(crate) fn masker_snapshot(&self) -> Masker {
        self.masker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn add_secret(&self, name: &str, value: &str) -> Result<(), StepError> {
        let mut m = self
            .masker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.add(name, value)
            .map_err(|e| StepError::failed(e.to_string()))
    }

    /// Values extracted for variables the stage declares secret are masked from now on. The
    /// step already happened, so a value too short to mask does not fail it: it is reported.
    pub(crate) async fn mask_declared_secrets(&self, version: u64, got: &BTreeMap<String, String>) {
        for (k, v) in got.iter().filter(|(k, _)| self.task.is_secret(k)) {
            if self.add_secret(k, v).is_err() {
                let line =
                    format!("secret `{k}` is shorter than 4 characters and cannot be masked");
                self.emit(StageEvent::Log {
                    version: Some(version),
                    line,
                })
                .await;
            }
        }
    }

    /// Announces a migration: through the gate when there is one (and waits for it), else
    /// as an ordinary event.
    pub(crate) async fn started(&self, m: &MigrationSpec, direction: &'static str) {
        let event = StageEvent::MigrationStarted {
            version: m.version,
            name: m.name.clone(),
            direction,
        };
        match &self.task.gate {
            Some(gate) => gate(event).await,
            None => self.emit(event).await,
        }
    }

    pub(crate) async fn emit(&self, event: StageEvent) {
        let event = match event {
            StageEvent::Log { version, line } => StageEvent::Log {
                version,
                line: self.mask(&line),
            },
            StageEvent::RequestSent {
                version,
                method,
                url,
                status,
                duration,
                attempt,
                error,
            } => StageEvent::RequestSent {
                version,
                method,
                url: self.mask(&url),
                status,
                duration,
                attempt,
                error: error.map(|e| self.mask(&e)),
            },
            other => other,
        };
        // A closed sink means nobody listens any more; the stage still runs to its end.
        let _ = self.events.send(event).await;
    }

    pub(crate) fn process_env(&self) -> &BTreeMap<String, String> {
        self.task.vars.process_env.vars()
    }
}

/// Default cap on a response body read for extraction.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Runs a stage. Never panics on bad input; every failure is a [`StageEnd::Failed`] with a
/// message naming the migration.
pub async fn execute(
    task: StageTask,
    cancel: CancellationToken,
    events: mpsc::Sender<StageEvent>,
) -> StageReport {
    let deadline = task.timeout.map(|t| Instant::now() + t);
    let stage_cancel = cancel.child_token();
    let timer = deadline.map(|d| {
        let token = stage_cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(d.into()).await;
            token.cancel();
        })
    });
    let mut report = run(&task, stage_cancel, &events).await;
    if let Some(t) = timer {
        t.abort();
    }
    if report.end == StageEnd::Cancelled
        && !cancel.is_cancelled()
        && deadline.is_some_and(|d| Instant::now() >= d)
    {
        report.end = StageEnd::TimedOut;
    }
    report
}

async fn run(
    task: &StageTask,
    cancel: CancellationToken,
    events: &mpsc::Sender<StageEvent>,
) -> StageReport {
    let mut report = StageReport {
        end: StageEnd::Succeeded,
        migrations: Vec::new(),
        exported: BTreeMap::new(),
        secret_exports: Vec::new(),
    };
    let mut notes = Vec::new();
    let mut ctx = match prepare(task, cancel, events, &mut notes) {
        Ok(ctx) => ctx,
        Err(msg) => {
            report.end = StageEnd::Failed(msg);
            return report;
        }
    };
    for line in notes {
        ctx.emit(StageEvent::Log {
            version: None,
            line,
        })
        .await;
    }
    // Variables extracted so far, oldest migration first; later values win.
    let mut extracted: BTreeMap<u64, BTreeMap<String, String>> = task
        .applied
        .iter()
        .map(|a| (a.version, a.vars.clone()))
        .collect();
    let result = match task.direction {
        Direction::Up => run_up(&mut ctx, &mut extracted, &mut report).await,
        Direction::Down {
            to,
            skip_missing_down,
        } => run_down(&mut ctx, to, skip_missing_down, &mut extracted, &mut report).await,
    };
    report.end = match result {
        Ok(()) => StageEnd::Succeeded,
        Err(StepError::Cancelled) => StageEnd::Cancelled,
        // A step that failed because it was being stopped (its request dropped, its process
        // group killed) was cancelled: whichever noticed first, the stage ends the same way.
        Err(StepError::Failed(_)) if ctx.cancel.is_cancelled() => StageEnd::Cancelled,
        Err(StepError::Failed(msg)) => StageEnd::Failed(ctx.mask(&msg)),
    };
    for vars in extracted.values() {
        report
            .exported
            .extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    report.secret_exports = report
        .exported
        .iter()
        .filter(|(k, v)| task.is_secret(k) || ctx.mask(v) != **v)
        .map(|(k, _)| k.clone())
        .collect();
    report
}

impl StageTask {
    /// Whether `name`'s value is secret: declared (stages.yaml or config `secrets`), or named
    /// like a secret (`db_password`, `apiKey`) and not listed in `not_secret`.
    pub fn is_secret(&self, name: &str) -> bool {
        self.secrets.iter().any(|s| s == name)
            || self.loaded.config.secrets.iter().any(|s| s.value == name)
            || (baton_common::mask::sensitive_name(name)
                && !self.not_secret.iter().any(|s| s == name))
    }
}

/// What the stage's log says about a secret value too short to mask. It does not fail the
/// stage (`REGION=eu` from the environment is a fine value); validation warns about short
/// literal secrets.
fn short_note(name: &str) -> String {
    format!("`{name}` is shorter than 4 characters, too short to be masked; it is shown as it is")
}

/// Builds the stage's base variables, its masker and its HTTP client; `notes` collects lines
/// for the stage's log.
fn prepare<'a>(
    task: &'a StageTask,
    cancel: CancellationToken,
    events: &'a mpsc::Sender<StageEvent>,
    notes: &mut Vec<String>,
) -> Result<StageCtx<'a>, String> {
    let mut masker = Masker::new();
    let mut config_env = BTreeMap::new();
    for entry in &task.loaded.config.env {
        let value = match &entry.secret_from {
            Some(var) => {
                let value = task.vars.process_env.vars().get(var).ok_or_else(|| {
                    format!(
                        "stage `{}`: `{}` comes from the environment variable `{var}`, which is not set where the stage runs",
                        task.stage, entry.name.value
                    )
                })?;
                if masker.add(&entry.name.value, value).is_err() {
                    notes.push(short_note(&entry.name.value));
                }
                value.clone()
            }
            None => entry.value.clone(),
        };
        config_env.insert(entry.name.value.clone(), value);
    }
    let mut layers = baton_common::stage::StageVars {
        global: task.vars.global.clone(),
        literal_globals: task.vars.literal_globals.clone(),
        stage: task.vars.stage.clone(),
        imported: task.vars.from_stages.clone(),
    }
    .layers(BTreeMap::new());
    // Values written in config.yaml are rendered; `valueFromEnv` values are not.
    let authored_config = task
        .loaded
        .config
        .env
        .iter()
        .filter(|e| e.secret_from.is_none() && vars::is_template(&e.value))
        .map(|e| e.name.value.clone())
        .collect();
    layers
        .set(Layer::ConfigEnv, config_env)
        .templated(Layer::ConfigEnv, authored_config);
    // Resolved beside the environment, not with a copy of it: every lookup in `base` falls
    // back to it (see `scope`).
    let env = &task.vars.process_env;
    let base = layers
        .resolve_beside(env.vars(), vars::STAGE)
        .map_err(|e| format!("stage `{}`: {e}", task.stage))?;
    // Every value a secret name has now or had in the stage's history (a rotated key's old
    // value stays masked too), and the values migrations and their steps set themselves.
    let own_env = task.loaded.migrations.iter().flat_map(|m| {
        m.env
            .iter()
            .chain(m.up.iter().flat_map(|s| &s.env))
            .chain(m.down.iter().flat_map(|s| &s.env))
            .map(|e| (&e.name.value, &e.value))
    });
    // The environment's variables the stage sees (no layer above replaces them) that are
    // secret: only a declared name or one named like a secret can be, so only those are
    // asked, not every name of the environment.
    let env_secrets = task
        .secrets
        .iter()
        .chain(task.loaded.config.secrets.iter().map(|s| &s.value))
        .chain(&env.sensitive)
        .filter(|name| !base.contains_key(*name) && task.is_secret(name))
        .filter_map(|name| env.vars().get_key_value(name));
    let mut secret_values: Vec<(&String, &String)> = Vec::new();
    for (name, value) in base
        .iter()
        .filter(|(name, _)| task.is_secret(name))
        .chain(env_secrets)
        .chain(
            task.applied
                .iter()
                .flat_map(|a| a.vars.iter())
                .chain(own_env)
                .filter(|(name, _)| task.is_secret(name)),
        )
    {
        if !secret_values.contains(&(name, value)) {
            secret_values.push((name, value));
        }
    }
    let mut short = BTreeSet::new();
    for (name, value) in secret_values {
        if masker.add(name, value).is_err() && short.insert(name.clone()) {
            notes.push(short_note(name));
        }
    }
    let client = build_client(
        &task.loaded.config.client,
        &task.loaded.config_file,
        task.files.as_ref(),
        &task.user_agent,
        task.clients.as_deref(),
    )
    .map_err(|e| format!("stage `{}`: {e}", task.stage))?;
    let max_response_bytes = task
        .loaded
        .config
        .max_response_bytes
        .map_or(DEFAULT_MAX_RESPONSE_BYTES, |b| {
            usize::try_from(b).unwrap_or(usize::MAX)
        });
    Ok(StageCtx {
        task,
        client,
        masker: std::sync::Mutex::new(masker),
        tokens: Tokens::default(),
        cancel,
        events,
        base,
        max_response_bytes,
    })
}

/// The variables in scope for a migration's step (see `baton_common::vars`): the stage's
/// layers, everything extracted by earlier migrations (those up to `upto` when rolling back),
/// then the migration's own `env`, then the step's (`up.env`, `down.env`).
fn scope_for<'c>(
    ctx: &'c StageCtx<'_>,
    extracted: &BTreeMap<u64, BTreeMap<String, String>>,
    upto: Option<u64>,
    m: &MigrationSpec,
    step: &StepSpec,
) -> Result<std::borrow::Cow<'c, BTreeMap<String, String>>, StepError> {
    let mut earlier = BTreeMap::new();
    for (version, e) in extracted {
        if upto.is_none_or(|u| *version <= u) {
            earlier.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    // Nothing above the stage's layers (a stage's first migration, without an `env` of its
    // own): its scope is the base, not a copy of it (which holds the whole environment).
    if earlier.is_empty() && m.env.is_empty() && step.env.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(&ctx.base));
    }
    // The stage's layers are resolved once, into `base`; a migration adds the layers above.
    let mut layers = Layers::new();
    layers.set(Layer::Extracted, earlier).set_authored(
        Layer::MigrationEnv,
        m.env
            .iter()
            .chain(&step.env)
            .map(|e| (e.name.value.clone(), e.value.clone()))
            .collect(),
    );
    let scope = layers
        .resolve_above_beside(ctx.base.clone(), ctx.process_env(), vars::MIGRATION_OWN)
        .map_err(|e| StepError::failed(format!("{}: {e}", m.file.display())))?;
    // A secret the migration renders from a template is masked as rendered too.
    let mut masker = ctx
        .masker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for e in m.env.iter().chain(&step.env) {
        if ctx.task.is_secret(&e.name.value) && vars::is_template(&e.value) {
            if let Some(v) = scope.get(&e.name.value) {
                let _ = masker.add(&e.name.value, v);
            }
        }
    }
    Ok(std::borrow::Cow::Owned(scope))
}

async fn run_up(
    ctx: &mut StageCtx<'_>,
    extracted: &mut BTreeMap<u64, BTreeMap<String, String>>,
    report: &mut StageReport,
) -> Result<(), StepError> {
    let task = ctx.task;
    let pending: Vec<&MigrationSpec> = task
        .loaded
        .migrations
        .iter()
        .filter(|m| !task.applied.iter().any(|a| a.version == m.version))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    http::wait_until_healthy(ctx).await?;
    let delay = task
        .loaded
        .config
        .delay_between_migrations
        .unwrap_or_default();
    for (i, m) in pending.into_iter().enumerate() {
        if i > 0 && !delay.is_zero() {
            sleep_or_cancel(&ctx.cancel, delay).await?;
        }
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let started = Instant::now();
        ctx.started(m, "up").await;
        // Cancelled while waiting for the start to be recorded: nothing was sent.
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let step = m.up.as_ref().ok_or_else(|| {
            StepError::failed(format!("{}: migration has no `up` step", m.file.display()))
        })?;
        let vars = scope_for(ctx, extracted, None, m, step)?;
        let span =
            tracing::info_span!("migration", version = m.version, name = %m.name, direction = "up");
        let got =
            tracing::Instrument::instrument(run_step(ctx, m, step, &vars, Direction::Up), span)
                .await
                .map_err(|e| in_migration(m, "up", e))?;
        let outcome = MigrationOutcome::of(m, "up", got.clone(), started.elapsed());
        extracted.insert(m.version, got);
        ctx.emit(StageEvent::MigrationFinished(outcome.clone()))
            .await;
        report.migrations.push(outcome);
    }
    Ok(())
}

async fn run_down(
    ctx: &mut StageCtx<'_>,
    to: u64,
    skip_missing_down: bool,
    extracted: &mut BTreeMap<u64, BTreeMap<String, String>>,
    report: &mut StageReport,
) -> Result<(), StepError> {
    let task = ctx.task;
    let mut targets: Vec<&AppliedMigration> =
        task.applied.iter().filter(|a| a.version > to).collect();
    targets.sort_by_key(|a| std::cmp::Reverse(a.version));
    for (i, applied) in targets.into_iter().enumerate() {
        if i > 0 {
            if let Some(delay) = task
                .loaded
                .config
                .delay_between_migrations
                .filter(|d| !d.is_zero())
            {
                sleep_or_cancel(&ctx.cancel, delay).await?;
            }
        }
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let m = task
            .loaded
            .migrations
            .iter()
            .find(|m| m.version == applied.version)
            .ok_or_else(|| {
                StepError::failed(format!(
                    "migration {:03}_{} was applied but its file is gone; it cannot be rolled back",
                    applied.version, applied.name
                ))
            })?;
        let Some(step) = m.down.as_ref() else {
            if !skip_missing_down {
                return Err(StepError::failed(format!(
                    "{}: migration has no `down` step, so it cannot be rolled back (--skip-missing-down passes over it)",
                    m.file.display()
                )));
            }
            ctx.emit(StageEvent::Log {
                version: Some(m.version),
                line: format!(
                    "{:03}_{} has no down step: passed over, nothing sent",
                    m.version, m.name
                ),
            })
            .await;
            extracted.remove(&m.version);
            let outcome = MigrationOutcome::of(m, "down", BTreeMap::new(), Duration::ZERO);
            ctx.emit(StageEvent::MigrationFinished(outcome.clone()))
                .await;
            report.migrations.push(outcome);
            continue;
        };
        let started = Instant::now();
        ctx.started(m, "down").await;
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let vars = scope_for(ctx, extracted, Some(m.version), m, step)?;
        let span = tracing::info_span!("migration", version = m.version, name = %m.name, direction = "down");
        let step = run_step(
            ctx,
            m,
            step,
            &vars,
            Direction::Down {
                to,
                skip_missing_down: false,
            },
        );
        tracing::Instrument::instrument(step, span)
            .await
            .map_err(|e| in_migration(m, "down", e))?;
        extracted.remove(&m.version);
        let outcome = MigrationOutcome::of(m, "down", BTreeMap::new(), started.elapsed());
        ctx.emit(StageEvent::MigrationFinished(outcome.clone()))
            .await;
        report.migrations.push(outcome);
    }
    Ok(())
}

fn in_migration(m: &MigrationSpec, dir: &str, e: StepError) -> StepError {
    match e {
        StepError::Failed(msg) => StepError::Failed(format!(
            "migration {:03}_{} ({dir}): {msg}",
            m.version, m.name
        )),
        other => other,
    }
}

/// Runs one step (`find` first when it has one) and returns the variables it extracted.
async fn run_step(
    ctx: &StageCtx<'_>,
    m: &MigrationSpec,
    step: &StepSpec,
    vars: &BTreeMap<String, String>,
    direction: Direction,
) -> Result<BTreeMap<String, String>, StepError> {
    let mut vars = std::borrow::Cow::Borrowed(vars);
    if let Some(find) = &step.find {
        let found = run_action(ctx, m, find, &vars, direction, "find").await?;
        ctx.mask_declared_secrets(m.version, &found).await;
        vars.to_mut().extend(found);
    }
    let got = run_action(ctx, m, step, &vars, direction, "").await?;
    ctx.mask_declared_secrets(m.version, &got).await;
    Ok(got)
}

async fn run_action(
    ctx: &StageCtx<'_>,
    m: &MigrationSpec,
    step: &StepSpec,
    vars: &BTreeMap<String, String>,
    direction: Direction,
    role: &str,
) -> Result<BTreeMap<String, String>, StepError> {
    let retry = ctx
        .task
        .retry
        .overlay(ctx.task.loaded.config.retry.as_ref())
        .overlay(m.retry.as_ref());
    match &step.action {
        Some(StepAction::Request(req)) => {
            http::run_request(ctx, m, req, &step.response, vars, retry, direction, role).await
        }
        Some(StepAction::Command(cmd)) => {
            command::run_command(ctx, m, cmd, &step.response, vars).await
        }
        None => Err(StepError::failed(
            "step has neither `request` nor `command`",
        )),
    }
}

/// A template error as a step failure naming the variable and the file.
pub(crate) fn template_failure(file: &Path, what: &str, e: &TemplateError) -> StepError {
    match &e.kind {
        TemplateErrorKind::MissingVariable(name) => StepError::failed(format!(
            "{}: {what}: variable `{name}` is not defined (define it in env, export it from a dependency, or use `default`)",
            file.display()
        )),
        _ => StepError::failed(format!("{}: {what}: {}", file.display(), e.message)),
    }
}

/// A scope over `vars` with the stage's tokens and environment. `vars` were resolved beside
/// the environment (see `prepare`): a name they lack is the environment's.
pub(crate) fn scope<'v>(
    vars: &'v BTreeMap<String, String>,
    auth: &'v BTreeMap<String, String>,
    env: &'v BTreeMap<String, String>,
) -> Scope<'v> {
    Scope {
        vars: Some(vars),
        auth: Some(auth),
        stage_outcomes: None,
        env: Some(env),
        below: Some(env),
    }
}

/// How long a request or program already running when its stage is cancelled (Ctrl-C,
/// SIGTERM, `runs cancel`, an expired lease) gets to finish: an answer that arrives in time is
/// recorded, so the migration is not left in doubt. Nothing new starts meanwhile.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// Completes [`CANCEL_GRACE`] after `cancel` fires.
pub(crate) async fn cancelled_with_grace(cancel: &CancellationToken) {
    cancel.cancelled().await;
    tokio::time::sleep(CANCEL_GRACE).await;
}

pub(crate) async fn sleep_or_cancel(
    cancel: &CancellationToken,
    d: Duration,
) -> Result<(), StepError> {
    tokio::select! {
        // Cancellation first: a cancelled stage never waits out a pause.
        () = cancel.cancelled() => Err(StepError::Cancelled),
        () = tokio::time::sleep(d) => Ok(()),
    }
}
