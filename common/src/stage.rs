//! The stage contract: what one stage attempt carries to whoever runs it, and what comes
//! back. Defined once, here, and used by both transports: the in-process runner of local
//! mode hands these types over a channel, the gRPC transport converts them to and from
//! `proto/baton/v1/agent.proto` in [`wire`] (the only place that names the generated types).
//!
//! Invariants:
//! - an [`Assignment`] is self-contained: the stage's file bytes travel with it (the bytes
//!   the run's plan digest covered), so a remote agent runs exactly what was planned;
//! - nothing from the runner's own environment travels in it (`valueFromEnv` and
//!   credentials are read where the stage runs);
//! - texts in [`StageEvent`]s and [`StageReport`]s are masked before they leave the runner.

pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::spec::{MigrationSpec, RetryPolicy};

/// Names one attempt of one stage of one run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptId {
    pub run: u64,
    pub stage: String,
    /// From 1; a stage dispatched again in the same run gets the next number.
    pub attempt: u32,
    /// Fencing token from the coordinator's store: strictly larger for every new attempt, so
    /// a message from a replaced attempt is recognised as stale. 0 in local mode (one
    /// process, nothing to fence).
    pub token: u64,
}

impl std::fmt::Display for AttemptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} stage `{}` attempt {}",
            self.run, self.stage, self.attempt
        )
    }
}

/// Which way a stage moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Apply every migration not yet applied, lowest version first.
    Up,
    /// Roll back applied migrations with a version above `to`, newest first (`to: 0`: all).
    /// With `skip_missing_down`, a migration without a `down` step is passed over: nothing is
    /// sent and it leaves the history; otherwise it is an error naming it.
    Down { to: u64, skip_missing_down: bool },
}

impl Direction {
    /// `up` or `down`.
    pub fn word(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down { .. } => "down",
        }
    }
}

/// A migration recorded in the stage's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: u64,
    pub name: String,
    pub digest: String,
    /// What its `up` extracted; in scope for its `down` and for later migrations.
    pub vars: BTreeMap<String, String>,
}

/// The variables the engine gives a stage, by precedence layer (lowest first). The runner
/// adds its own environment (between `global` and `stage`), the stage config's `env`, values
/// extracted during the stage and each migration's own `env`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageVars {
    /// `global.env`, with the run's `--set` overrides on top.
    pub global: BTreeMap<String, String>,
    /// Names in `global` whose values came from `--set`: never rendered as templates.
    pub literal_globals: Vec<String>,
    /// The stage's `env` in stages.yaml.
    pub stage: BTreeMap<String, String>,
    /// Values imported with `env_from_stages`.
    pub imported: BTreeMap<String, String>,
}

impl StageVars {
    /// The layers these variables fill, with `environment` (where the stage runs) between
    /// `global` and `stage`. Values written in the files are marked as templates to render
    /// (`--set` values and imports are not); see [`crate::vars::Layers::resolve`].
    pub fn layers(
        &self,
        environment: BTreeMap<String, String>,
    ) -> crate::vars::Layers<BTreeMap<String, String>> {
        use crate::vars::{is_template, Layer, Layers};
        let mut layers = Layers::new();
        let authored_globals = self
            .global
            .iter()
            .filter(|(k, v)| is_template(v) && !self.literal_globals.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        layers
            .set(Layer::Global, self.global.clone())
            .templated(Layer::Global, authored_globals)
            .set(Layer::Environment, environment)
            .set_authored(Layer::StageEnv, self.stage.clone())
            .set(Layer::Imported, self.imported.clone());
        layers
    }

    /// What a stage's `condition` is evaluated with: the flat variables of the engine's
    /// scope, and what `env "KEY"` reads (`global.env` over `environment`, as apirun). A
    /// value whose template needs what is unknown here (the agent's environment, on a
    /// coordinator) is left out: a condition reading it says so, others are unaffected.
    pub fn condition_inputs(
        &self,
        environment: &BTreeMap<String, String>,
    ) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let vars = self
            .layers(environment.clone())
            .resolve_known(crate::vars::ENGINE);
        let mut env = environment.clone();
        env.extend(
            self.layers(BTreeMap::new())
                .resolve_known(&[crate::vars::Layer::Global]),
        );
        (vars, env)
    }
}

/// One stage attempt, as the engine hands it to a runner.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub attempt: AttemptId,
    /// The stage's files (config, migrations, body files) by path as the plan read them.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    /// The stage's config file, a key of `files`.
    pub config_file: PathBuf,
    pub vars: StageVars,
    /// Names of variables whose values are secret (stages.yaml `secrets:`, what was secret
    /// where an import came from, and what was secret in the stage's earlier results).
    pub secrets: Vec<String>,
    /// Names that say they are secret but are not (`not_secret`); every other variable whose
    /// name says so (see `mask::sensitive_name`) is secret.
    pub not_secret: Vec<String>,
    /// The stage's history, lowest version first.
    pub applied: Vec<AppliedMigration>,
    pub direction: Direction,
    /// After the global and stage levels; the config and migration levels come from `files`.
    pub retry: RetryPolicy,
    /// Bounds the whole attempt.
    pub timeout: Option<Duration>,
    /// Store id and run id: what makes the run's idempotency keys unique everywhere.
    pub key_scope: String,
    /// W3C trace context of the attempt's span; empty when tracing is off.
    pub traceparent: String,
    /// The stage as the plan parsed it from exactly `files`, for a runner in the same
    /// process (local mode), which then does not parse the same bytes again. Never sent:
    /// an agent parses `files`.
    pub parsed: Option<std::sync::Arc<crate::spec::LoadedStage>>,
}

/// What happened, as it happens. Texts are already masked.
#[derive(Debug, Clone, PartialEq)]
pub enum StageEvent {
    MigrationStarted {
        version: u64,
        name: String,
        direction: &'static str,
    },
    RequestSent {
        version: u64,
        method: String,
        url: String,
        status: Option<u16>,
        duration: Duration,
        attempt: u32,
        /// Why no answer came (`connection refused`); `None` with a status.
        error: Option<String>,
    },
    Log {
        version: Option<u64>,
        line: String,
    },
    MigrationFinished(MigrationOutcome),
}

/// A migration that completed (applied, or rolled back).
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationOutcome {
    pub version: u64,
    pub name: String,
    pub direction: &'static str,
    /// SHA-256 of the migration file that ran.
    pub digest: String,
    /// Variables extracted (up only). Secret values are included: the caller stores them and
    /// masks them on display.
    pub extracted: BTreeMap<String, String>,
    pub duration: Duration,
}

impl MigrationOutcome {
    /// The outcome of `m`, run in `direction`.
    pub fn of(
        m: &MigrationSpec,
        direction: &'static str,
        extracted: BTreeMap<String, String>,
        duration: Duration,
    ) -> Self {
        MigrationOutcome {
            version: m.version,
            name: m.name.clone(),
            direction,
            digest: m.digest.clone(),
            extracted,
            duration,
        }
    }
}

/// How a stage ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageEnd {
    Succeeded,
    Failed(String),
    Cancelled,
    TimedOut,
    /// The runner gave the attempt up without finishing it (an agent whose lease expired, or
    /// that restarted mid-way); a migration it had started is in doubt.
    Lost(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub end: StageEnd,
    /// Migrations completed by this call, in order.
    pub migrations: Vec<MigrationOutcome>,
    /// Every variable the stage exports after this call (history and this run).
    pub exported: BTreeMap<String, String>,
    /// Names of exported variables whose values are secret.
    pub secret_exports: Vec<String>,
}

impl StageReport {
    /// A report for an attempt that ended before running anything.
    pub fn ended(end: StageEnd) -> Self {
        StageReport {
            end,
            migrations: Vec::new(),
            exported: BTreeMap::new(),
            secret_exports: Vec::new(),
        }
    }
}
