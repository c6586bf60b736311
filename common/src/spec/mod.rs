//! The user's files: `stages.yaml`, each stage's `config.yaml`, and migration files.
//!
//! [`load_project`] reads every file a stages file names (through [`SourceFiles`], so the
//! same code reads from disk, from memory in tests and fuzzing, and later from files a CLI
//! sent over gRPC), checks everything that does not need the dependency graph, and returns
//! a [`Project`] together with every [`Diagnostic`](crate::diag::Diagnostic) found. Graph
//! checks (cycles, transitive `env_from_stages`) are the planner's, which owns the graph.
//!
//! Paths in diagnostics are shown as the user would name them: the stages file as given,
//! and every other file joined onto the directory of the file that names it.

mod check;
mod config;
pub mod environments;
pub use config::MIN_WAIT_INTERVAL;
pub mod duration;
mod migration;
pub mod parameters;
mod read;
mod stages;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::condition::Condition;
use crate::diag::Diagnostics;
use crate::template::Template;
use crate::yaml::{self, Limits, Pos, ScalarStyle};

pub use migration::parse_file_name;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub pos: Pos,
}

/// A parsed template and where its text starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Tmpl {
    pub template: Template,
    pub pos: Pos,
    pub style: ScalarStyle,
}

impl Tmpl {
    pub fn source(&self) -> &str {
        self.template.source()
    }
}

/// `stages.yaml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StagesSpec {
    pub stages: Vec<StageSpec>,
    pub global: GlobalSpec,
    /// `environments:` in promotion order (a baton extension); empty: one implicit
    /// environment, as before environments existed.
    pub environments: Vec<EnvironmentSpec>,
    /// The environment this load is for (`--environment`), with its variables read.
    pub environment: Option<SelectedEnvironment>,
}

impl StagesSpec {
    /// The run's lowest layer of variables: `global.env`, then the selected environment's
    /// `env_file`, then its inline `env` (a later source wins). Values of `valueFromEnv`
    /// entries are empty here (they are read where the stage runs).
    pub fn global_vars(&self) -> BTreeMap<String, String> {
        self.global_entries()
            .map(|e| (e.name.value.clone(), e.value.clone()))
            .collect()
    }

    /// Every entry [`StagesSpec::global_vars`] is made of, lowest precedence first.
    pub fn global_entries(&self) -> impl Iterator<Item = &EnvEntry> {
        let env = self.environment.as_ref();
        self.global.env.iter().chain(
            env.into_iter()
                .flat_map(|e| e.file_env.iter().chain(&e.spec.env)),
        )
    }

    /// The agent labels stage `stage` needs: its own `runs_on` (else `global.runs_on`), plus
    /// the selected environment's `runs_on` for every label the stage does not set itself,
    /// so an environment's stages go to that environment's agents.
    pub fn runs_on_of(&self, stage: &StageSpec) -> Vec<(String, String)> {
        let mut labels = if stage.runs_on.is_empty() {
            self.global.runs_on.clone()
        } else {
            stage.runs_on.clone()
        };
        if let Some(env) = &self.environment {
            for (k, v) in &env.spec.runs_on {
                if !labels.iter().any(|(l, _)| l == k) {
                    labels.push((k.clone(), v.clone()));
                }
            }
        }
        labels
    }

    /// The approval stage `stage` needs before it starts (its own `approval:`; the selected
    /// environment's gates the run before its first stage instead).
    pub fn approval_of<'a>(&self, stage: &'a StageSpec) -> Option<&'a ApprovalSpec> {
        stage.approval.as_ref().filter(|a| a.required)
    }

    /// The selected environment's approval, when it requires one.
    pub fn environment_approval(&self) -> Option<&ApprovalSpec> {
        self.environment
            .as_ref()
            .and_then(|e| e.spec.approval.as_ref())
            .filter(|a| a.required)
    }

    /// The name of the environment this load is for.
    pub fn environment_name(&self) -> Option<&str> {
        self.environment
            .as_ref()
            .map(|e| e.spec.name.value.as_str())
    }

    /// The environment named `name`.
    pub fn environment_named(&self, name: &str) -> Option<&EnvironmentSpec> {
        self.environments.iter().find(|e| e.name.value == name)
    }

    /// Stage positions by name; with duplicate names (an error) a name means its first stage.
    pub fn index(&self) -> std::collections::HashMap<&str, usize> {
        let mut index = std::collections::HashMap::with_capacity(self.stages.len());
        for (i, s) in self.stages.iter().enumerate() {
            index.entry(s.name.value.as_str()).or_insert(i);
        }
        index
    }
}

/// One entry of `stages:`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub name: Located<String>,
    /// Where the stage's entry starts.
    pub pos: Pos,
    /// As written, relative to the stages file.
    pub config_path: Located<PathBuf>,
    pub depends_on: Vec<Located<String>>,
    pub env: Vec<EnvEntry>,
    pub env_from_stages: Vec<EnvFromStage>,
    pub timeout: Option<Located<Duration>>,
    pub on_failure: OnFailure,
    pub on_failure_pos: Option<Pos>,
    pub condition: Option<Located<Condition>>,
    /// Agent label selector (`runs_on: {env: prod}`); empty matches any agent.
    pub runs_on: Vec<(String, String)>,
    pub retry: Option<RetrySpec>,
    /// Variables whose values are secret (masked everywhere).
    pub secrets: Vec<Located<String>>,
    /// What happens when the stage's attempt is lost with a migration in doubt (`None`: the
    /// `global` setting, else `never`).
    pub retry_on_lost: Option<RetryOnLost>,
    /// Variables whose names say they are secret (`db_password`) but are not: not masked.
    pub not_secret: Vec<Located<String>>,
    /// An approval this stage needs before it starts (`approval:` on the stage).
    pub approval: Option<ApprovalSpec>,
    /// A parameters file (`#{name}#` tokens; ARM `parameters` or a flat mapping) whose
    /// parameters become the stage's variables, above its `env`.
    pub parameters_file: Option<Located<PathBuf>>,
}

impl StageSpec {
    fn empty(pos: Pos) -> Self {
        StageSpec {
            name: Located {
                value: String::new(),
                pos,
            },
            pos,
            config_path: Located {
                value: PathBuf::new(),
                pos,
            },
            depends_on: Vec::new(),
            env: Vec::new(),
            env_from_stages: Vec::new(),
            timeout: None,
            on_failure: OnFailure::Stop,
            on_failure_pos: None,
            condition: None,
            runs_on: Vec::new(),
            retry: None,
            secrets: Vec::new(),
            retry_on_lost: None,
            not_secret: Vec::new(),
            approval: None,
            parameters_file: None,
        }
    }
}

/// One entry of `environments:`.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentSpec {
    pub name: Located<String>,
    /// Inline variables (above the `env_file`'s).
    pub env: Vec<EnvEntry>,
    /// A variables file in the `variables:` form (`vars-production.yml`).
    pub env_file: Option<Located<PathBuf>>,
    /// Agent labels every stage of this environment needs.
    pub runs_on: Vec<(String, String)>,
    pub approval: Option<ApprovalSpec>,
}

/// `approval:` on an environment or a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalSpec {
    pub pos: Pos,
    pub required: bool,
    /// Who may approve: identities, or `group:NAME` (a group of named operator tokens;
    /// locally, of `BATON_GROUPS`). Empty: anyone but, with `separate_from_submitter`, the
    /// submitter.
    pub approvers: Vec<Located<String>>,
    /// How long the run waits; then it is rejected (`on_timeout: reject`, the only choice).
    pub timeout: Option<Located<Duration>>,
    /// The identity that submitted the run may not approve it.
    pub separate_from_submitter: bool,
}

/// The environment a project was loaded for, with its variables file read.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectedEnvironment {
    pub spec: EnvironmentSpec,
    /// The entries of its `env_file` (positions in that file).
    pub file_env: Vec<EnvEntry>,
    /// The `env_file`'s path as the loader read it.
    pub file: Option<PathBuf>,
}

/// One variable definition.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvEntry {
    pub name: Located<String>,
    /// The literal value; empty when `secret_from` is set.
    pub value: String,
    /// `valueFromEnv`: read from this environment variable where the stage runs; secret.
    pub secret_from: Option<String>,
    pub value_pos: Pos,
    pub style: ScalarStyle,
}

/// `env_from_stages: - stage: X  vars: [...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvFromStage {
    pub stage: Located<String>,
    pub vars: Vec<Located<String>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalSpec {
    pub env: Vec<EnvEntry>,
    pub wait_between_stages: Option<Located<Duration>>,
    pub max_concurrent_stages: Option<Located<u64>>,
    pub rollback_on_failure: bool,
    pub retry: Option<RetrySpec>,
    /// The agent label selector of stages that set no `runs_on` of their own.
    pub runs_on: Vec<(String, String)>,
    /// The `retry_on_lost` of stages that set none.
    pub retry_on_lost: Option<RetryOnLost>,
    /// `not_secret` for every stage.
    pub not_secret: Vec<Located<String>>,
}

impl RetryOnLost {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOnLost::Never => "never",
            RetryOnLost::Safe => "safe",
        }
    }
}

/// What a stage's failure does to the rest of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// No new stage starts; running ones finish; the run fails.
    #[default]
    Stop,
    /// Recorded; every other stage, dependents included, still runs.
    Continue,
    /// Every transitive dependent is skipped; others continue.
    SkipDependents,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Stop => "stop",
            OnFailure::Continue => "continue",
            OnFailure::SkipDependents => "skip_dependents",
        }
    }
}

/// Retry policy overrides; unset fields inherit from the next level out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetrySpec {
    pub max_attempts: Option<u32>,
    pub initial_backoff: Option<Duration>,
    pub multiplier: Option<f64>,
    pub max_backoff: Option<Duration>,
}

/// A resolved retry policy for transient HTTP failures (connection errors, 408, 429, 5xx).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// COMPAT.md: 3 attempts, 1 s doubling (capped at 30 s).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// This policy with the fields `spec` sets replaced; apply global, stage, config and
    /// migration levels in that order.
    pub fn overlay(self, spec: Option<&RetrySpec>) -> Self {
        let Some(spec) = spec else { return self };
        RetryPolicy {
            max_attempts: spec.max_attempts.unwrap_or(self.max_attempts),
            initial_backoff: spec.initial_backoff.unwrap_or(self.initial_backoff),
            multiplier: spec.multiplier.unwrap_or(self.multiplier),
            max_backoff: spec.max_backoff.unwrap_or(self.max_backoff),
        }
    }

    /// The pause after failed attempt `n` (1-based): initial x multiplier^(n-1), capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX));
        let secs = self.initial_backoff.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            self.max_backoff
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// A stage's `config.yaml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageConfigSpec {
    pub migrate_dir: Option<Located<PathBuf>>,
    pub env: Vec<EnvEntry>,
    pub auth: Vec<AuthSpec>,
    pub wait: Option<WaitSpec>,
    pub client: ClientSpec,
    pub delay_between_migrations: Option<Duration>,
    pub retry: Option<RetrySpec>,
    pub secrets: Vec<Located<String>>,
    pub max_response_bytes: Option<u64>,
    /// `render_body` for every request of the stage that does not set its own.
    pub render_body: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthSpec {
    pub name: Located<String>,
    pub kind: AuthKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthKind {
    Basic {
        username: Tmpl,
        password: Tmpl,
    },
    /// `fields` holds token_url, client_id, client_secret, username, password, scope(s).
    OAuth2 {
        grant_type: String,
        fields: Vec<(String, Tmpl)>,
    },
    PocketBase {
        base_url: Tmpl,
        email: Tmpl,
        password: Tmpl,
    },
}

impl AuthKind {
    /// Every template of the auth config.
    pub fn templates(&self) -> Vec<&Tmpl> {
        match self {
            AuthKind::Basic { username, password } => vec![username, password],
            AuthKind::OAuth2 { fields, .. } => fields.iter().map(|(_, t)| t).collect(),
            AuthKind::PocketBase {
                base_url,
                email,
                password,
            } => vec![base_url, email, password],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaitSpec {
    pub url: Option<Tmpl>,
    pub method: Option<String>,
    pub status: Option<u16>,
    pub timeout: Option<Duration>,
    pub interval: Option<Duration>,
    pub headers: Vec<(String, Tmpl)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientSpec {
    pub insecure: bool,
    pub min_tls_version: Option<TlsVersion>,
    pub max_tls_version: Option<TlsVersion>,
    /// Relative to the config file.
    pub ca_file: Option<Located<PathBuf>>,
    pub timeout: Option<Duration>,
}

/// One migration file.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationSpec {
    /// As shown to the user.
    pub file: PathBuf,
    pub version: u64,
    pub name: String,
    /// SHA-256 of the file's bytes, hex.
    pub digest: String,
    pub up: Option<StepSpec>,
    pub down: Option<StepSpec>,
    pub env: Vec<EnvEntry>,
    pub retry: Option<RetrySpec>,
    pub retry_on_lost: RetryOnLost,
}

impl MigrationSpec {
    /// Variables this migration's `up` extracts.
    pub fn exports(&self) -> impl Iterator<Item = &str> {
        self.up
            .iter()
            .flat_map(|s| s.response.env_from.iter().map(|(n, _)| n.value.as_str()))
    }
}

/// What the coordinator does when an attempt is lost (its agent died, was cut off past its
/// lease, or gave it up) while a migration was in flight, so whether that migration took
/// effect is unknown. An attempt lost with nothing in flight is always started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RetryOnLost {
    /// Start the stage again, re-sending the migration in doubt with the same
    /// Idempotency-Key (for targets that honour it).
    Safe,
    /// The stage needs attention: the run waits for `baton runs resolve`. The default.
    #[default]
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepSpec {
    pub name: Option<String>,
    /// `None` only while diagnostics hold an error for it.
    pub action: Option<StepAction>,
    pub response: ResponseSpec,
    /// `down.find`: a lookup whose extracted variables are in scope for the down request.
    pub find: Option<Box<StepSpec>>,
    /// `up.env` / `down.env`: variables for this step only, over the migration's `env`.
    pub env: Vec<EnvEntry>,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepAction {
    Request(RequestSpec),
    Command(CommandSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Upper case.
    pub method: Located<String>,
    pub url: Option<Tmpl>,
    pub headers: Vec<(String, Tmpl)>,
    pub queries: Vec<(String, Tmpl)>,
    pub body: Option<BodySpec>,
    /// As written in the request; see [`RequestSpec::renders_body`].
    pub render_body: Option<bool>,
    pub auth_name: Option<Located<String>>,
}

impl RequestSpec {
    /// Whether the body's templates are rendered: the request's `render_body`, else the stage
    /// config's, else true.
    pub fn renders_body(&self, config: &StageConfigSpec) -> bool {
        self.render_body.or(config.render_body).unwrap_or(true)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodySpec {
    Text(Tmpl),
    /// YAML written in the file, sent as JSON; string leaves are templates.
    Json(JsonTemplate),
    /// Relative to the migration file.
    File(Located<PathBuf>),
}

/// A JSON document whose strings are templates. Rendering fills each string leaf, so a
/// value can never change the document's structure.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonTemplate {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(Tmpl),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseSpec {
    /// Accepted status codes; empty means any 2xx, unless `any_status`.
    pub result_code: Vec<u16>,
    /// `result_code: []` written out: any status is accepted (apirun's documented meaning).
    pub any_status: bool,
    /// Entries written as templates (`"{{.expected_status}}"`), rendered when the answer
    /// comes; each must give a status code.
    pub result_code_templates: Vec<Tmpl>,
    /// Variable name to gjson path.
    pub env_from: Vec<(Located<String>, String)>,
    pub env_missing: EnvMissing,
}

/// What happens when an `env_from` path finds nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EnvMissing {
    /// The variable is left unset (apirun's behaviour).
    #[default]
    Skip,
    /// The step fails.
    Fail,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    pub program: Option<Tmpl>,
    pub args: Vec<Tmpl>,
    pub env: Vec<(String, Tmpl)>,
    pub workdir: Option<Tmpl>,
    pub timeout: Option<Duration>,
}

/// Reads files for the loader.
/// `Sync`: a large project's stages are loaded on several threads at once.
pub trait SourceFiles: Sync {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// File names (not paths) directly inside `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Reads at most `limit + 1` bytes, so a caller that refuses more than `limit` never
    /// holds much more (sources that are already in memory just read).
    fn read_limited(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        let _ = limit;
        self.read(path)
    }
}

/// The local file system. Only regular files are read (a device, a FIFO or a directory
/// named as a spec, body or CA file is an error, not an endless read or a hang); symbolic
/// links are followed to what they point at.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFiles;

impl SourceFiles for DiskFiles {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.read_limited(path, usize::MAX - 1)
    }

    fn read_limited(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        // Before opening: opening a FIFO blocks until someone writes to it.
        let meta = std::fs::metadata(path)?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a regular file (a device, FIFO or directory cannot be read as one)",
            ));
        }
        let mut file = std::fs::File::open(path)?;
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        if meta.len() == 0 {
            // Empty, or a file whose size is not known ahead (procfs says 0): read to the end.
            let mut bytes = Vec::new();
            file.take(cap).read_to_end(&mut bytes)?;
            return Ok(bytes);
        }
        // Reads what the file held when it was looked at (or one byte past the limit), with
        // one read call for a file of ordinary size: a project reads a thousand files at
        // start, and asking again for the end of each was a third of the calls.
        let want = usize::try_from(meta.len().min(cap)).unwrap_or(usize::MAX);
        let mut bytes = vec![0; want];
        let mut got = 0;
        while got < want {
            match file.read(&mut bytes[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        bytes.truncate(got);
        Ok(bytes)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // The directory listing says what an entry is (no call per file); a symbolic
            // link is followed: a linked migration file counts like any other.
            let is_file = match entry.file_type() {
                Ok(t) if t.is_symlink() => {
                    std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file())
                }
                Ok(t) => t.is_file(),
                Err(_) => false,
            };
            if is_file {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }
}

/// Files held in memory, keyed by normalised path (tests, fuzzing, files sent over gRPC).
///
/// Keys are compared as bytes, not path by path: a 10,000-stage project makes 30,000 lookups,
/// and comparing paths component by component was a tenth of its load. Byte order still
/// keeps a directory's entries together (everything under `dir/` follows `dir/`), which is
/// all [`SourceFiles::list`] needs.
#[derive(Debug, Clone, Default)]
pub struct MemoryFiles(BTreeMap<OsString, Vec<u8>>);

impl MemoryFiles {
    pub fn insert(&mut self, path: impl AsRef<Path>, content: impl Into<Vec<u8>>) {
        self.0
            .insert(normalize(path.as_ref()).into_os_string(), content.into());
    }

    /// The content of the file at `path`, if there is one.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<&[u8]> {
        self.0
            .get(normalize(path.as_ref()).as_os_str())
            .map(Vec::as_slice)
    }

    /// Every file, by normalised path, in byte order of the paths.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &[u8])> {
        self.0.iter().map(|(p, c)| (Path::new(p), c.as_slice()))
    }
}

impl SourceFiles for MemoryFiles {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.get(path)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let dir = normalize(dir);
        // Everything under `dir/` follows it contiguously in byte order; `.` is the root,
        // whose entries have no prefix.
        let mut prefix = OsString::new();
        if dir != Path::new(".") {
            prefix.push(dir.as_os_str());
            if !prefix.as_encoded_bytes().ends_with(b"/") {
                prefix.push("/");
            }
        }
        let start = prefix.as_encoded_bytes();
        let names: Vec<String> = self
            .0
            .range::<OsStr, _>((
                std::ops::Bound::Included(prefix.as_os_str()),
                std::ops::Bound::Unbounded,
            ))
            .map(|(p, _)| p.as_encoded_bytes())
            .take_while(|p| p.starts_with(start))
            .map(|p| &p[start.len()..])
            .filter(|name| !name.is_empty() && !name.contains(&b'/'))
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect();
        if names.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(names)
    }
}

/// Reads through `base` and keeps the bytes of every file read, so a run can ship exactly
/// what its plan digested (a file edited on disk during the run changes nothing).
pub struct CapturingFiles<'a> {
    base: &'a dyn SourceFiles,
    read: std::sync::Mutex<BTreeMap<PathBuf, Vec<u8>>>,
}

impl std::fmt::Debug for CapturingFiles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturingFiles").finish_non_exhaustive()
    }
}

impl<'a> CapturingFiles<'a> {
    pub fn new(base: &'a dyn SourceFiles) -> Self {
        CapturingFiles {
            base,
            read: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Every file read so far, by the path it was read with (normalized).
    pub fn into_files(self) -> BTreeMap<PathBuf, Vec<u8>> {
        self.read
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl CapturingFiles<'_> {
    fn captured(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Vec<u8>>> {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl SourceFiles for CapturingFiles<'_> {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let bytes = self.base.read(path)?;
        self.captured().insert(normalize(path), bytes.clone());
        Ok(bytes)
    }

    fn read_limited(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        let bytes = self.base.read_limited(path, limit)?;
        self.captured().insert(normalize(path), bytes.clone());
        Ok(bytes)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.base.list(dir)
    }
}

/// Files from `extra` first, then from `base`: a real directory plus a few generated files
/// (the single-stage commands give a lone `config.yaml` a one-stage stages file).
pub struct OverlayFiles<'a> {
    pub base: &'a dyn SourceFiles,
    pub extra: MemoryFiles,
}

impl std::fmt::Debug for OverlayFiles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayFiles")
            .field("extra", &self.extra)
            .finish_non_exhaustive()
    }
}

impl SourceFiles for OverlayFiles<'_> {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.extra.read(path).or_else(|_| self.base.read(path))
    }

    fn read_limited(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        self.extra
            .read(path)
            .or_else(|_| self.base.read_limited(path, limit))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = self.base.list(dir).unwrap_or_default();
        for n in self.extra.list(dir).unwrap_or_default() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        if names.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(names)
    }
}

/// Removes `.` and resolves `..` lexically, so displayed paths read as the user wrote them.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                // `dir/..` is where `dir` is.
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                // Above the start of a relative path: keep climbing.
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// `rel` as seen from the directory of `file`.
pub fn beside(file: &Path, rel: &Path) -> PathBuf {
    normalize(&file.parent().unwrap_or(Path::new("")).join(rel))
}

/// A stage's files, loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedStage {
    pub config_file: PathBuf,
    pub config: StageConfigSpec,
    pub migrate_dir: PathBuf,
    /// Sorted by version.
    pub migrations: Vec<MigrationSpec>,
    /// Every file loading the stage read (config, migrations, body files), in read order:
    /// what an assignment ships so the stage runs elsewhere exactly as planned.
    pub inputs: Vec<PathBuf>,
}

impl LoadedStage {
    /// Every variable the stage's migrations extract, in version order, without repeats.
    pub fn exports(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.migrations
            .iter()
            .flat_map(MigrationSpec::exports)
            .filter(|e| seen.insert(*e))
            .collect()
    }
}

/// A stages file and everything it names. Present only when loading found no error.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub stages_file: PathBuf,
    pub spec: StagesSpec,
    /// Parallel to `spec.stages`. Shared: local mode's executor runs a stage as the plan
    /// parsed it instead of parsing the same bytes again.
    pub stages: Vec<std::sync::Arc<LoadedStage>>,
    /// Every file read, with the SHA-256 of its bytes: one entry per path (a file read twice
    /// has the digest of its last read), sorted by the path's bytes (not component by
    /// component, which was a tenth of a 10,000-stage load).
    pub inputs: Vec<(PathBuf, String)>,
}

/// Options for loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub limits: Limits,
    /// Variables given on the command line (`--set`): sources for the variable checks.
    pub provided: std::collections::BTreeSet<String>,
    /// `--environment NAME`: the environment whose variables (and agent labels) the load is
    /// for. Required to name one of `environments:` when given.
    pub environment: Option<String>,
}

/// Result of loading: the project when there was no error, and every finding.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub project: Option<Project>,
    /// When `project` is `None` but the stages file itself could be read: its stages, so
    /// graph checks (cycles) can still report on a project that has other errors.
    pub partial: Option<StagesSpec>,
    pub diagnostics: Diagnostics,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// The text of files read while loading, by normalised path, for the cross-file checks.
/// Keyed by the path's bytes: hashing a `Path` walks its components, and a 10,000-stage
/// project's checks look up 30,000 paths. One map per loader that read them: the parts of a
/// parallel load are appended, not merged entry by entry, and a later map wins, as a later
/// insert would.
#[derive(Debug, Default)]
pub(super) struct Sources(Vec<HashMap<OsString, String>>);

impl Sources {
    pub(super) fn get(&self, path: &Path) -> Option<&str> {
        let key = path.as_os_str();
        self.0
            .iter()
            .rev()
            .find_map(|m| m.get(key))
            .map(String::as_str)
    }

    fn insert(&mut self, path: PathBuf, text: String) {
        self.last().insert(path.into_os_string(), text);
    }

    fn reserve(&mut self, n: usize) {
        self.last().reserve(n);
    }

    fn append(&mut self, other: Sources) {
        self.0.extend(other.0);
    }

    fn last(&mut self) -> &mut HashMap<OsString, String> {
        if self.0.is_empty() {
            self.0.push(HashMap::new());
        }
        let last = self.0.len() - 1;
        &mut self.0[last]
    }
}

struct Loader<'f> {
    files: &'f dyn SourceFiles,
    opts: LoadOptions,
    diags: Diagnostics,
    /// Every file read with its digest, in read order (a file read twice is here twice);
    /// sorted into [`Project::inputs`] once at the end, which is cheaper than keeping a map
    /// sorted by path while reading 20,000 files.
    inputs: Vec<(PathBuf, String)>,
    /// Text of every config and migration file read, for the cross-file checks.
    sources: Sources,
    /// Files read while loading the current stage.
    stage_reads: Vec<PathBuf>,
}

impl<'f> Loader<'f> {
    fn new(files: &'f dyn SourceFiles, opts: LoadOptions) -> Self {
        Loader {
            files,
            opts,
            diags: Diagnostics::new(),
            inputs: Vec::new(),
            sources: Sources::default(),
            stage_reads: Vec::new(),
        }
    }

    /// Reads a text file, recording its digest; problems become diagnostics.
    fn read_text(
        &mut self,
        path: &Path,
        named_at: Option<(&Path, Pos)>,
        what: &str,
    ) -> Option<String> {
        let bytes = match self.files.read_limited(path, self.opts.limits.max_bytes) {
            Ok(b) => b,
            Err(e) => {
                let (file, pos) = named_at.unwrap_or((path, Pos::FILE));
                let reason = if e.kind() == io::ErrorKind::NotFound {
                    "not found".to_owned()
                } else {
                    e.to_string()
                };
                self.diags
                    .error(
                        file,
                        pos,
                        format!("{what} `{}` cannot be read: {reason}", path.display()),
                    )
                    .with_help(if named_at.is_some() {
                        "check the path; it is relative to the file that names it"
                    } else {
                        "check the path given to --config (default: stages.yaml in the current directory)"
                    });
                return None;
            }
        };
        self.inputs.push((path.to_path_buf(), sha256_hex(&bytes)));
        self.stage_reads.push(path.to_path_buf());
        if bytes.len() > self.opts.limits.max_bytes {
            self.diags
                .error(
                    path,
                    Pos::FILE,
                    // Reading stopped one byte past the limit, so the real size is not known.
                    format!(
                        "file is larger than the limit: more than the limit of {} bytes",
                        self.opts.limits.max_bytes
                    ),
                )
                .with_help("split it up; spec files this large are almost always a mistake");
            return None;
        }
        match String::from_utf8(bytes) {
            // A UTF-8 byte-order mark (editors on Windows write one) is not content.
            Ok(s) => Some(match s.strip_prefix('\u{feff}') {
                Some(rest) => rest.to_owned(),
                None => s,
            }),
            Err(e) => {
                self.diags.error(
                    path,
                    Pos::FILE,
                    format!(
                        "file is not UTF-8 text (invalid byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                );
                None
            }
        }
    }

    fn parse_yaml(&mut self, path: &Path, text: &str) -> Option<yaml::Node> {
        match yaml::parse(text, self.opts.limits) {
            Ok(n) => Some(n),
            Err(e) => {
                let d = self.diags.error(path, e.pos(), e.to_string());
                if matches!(e, yaml::YamlError::Syntax { .. }) {
                    d.with_help("check indentation, and that every `[`, `{` and quote is closed; the cause may be on an earlier line");
                }
                None
            }
        }
    }
}

/// Loads and checks a stages file and every file it names.
pub fn load_project(stages_file: &Path, files: &dyn SourceFiles, opts: LoadOptions) -> Loaded {
    let stages_file = normalize(stages_file);
    let mut l = Loader::new(files, opts);
    let Some(text) = l.read_text(&stages_file, None, "stages file") else {
        return Loaded {
            project: None,
            partial: None,
            diagnostics: l.diags,
        };
    };
    let Some(doc) = l.parse_yaml(&stages_file, &text) else {
        return Loaded {
            project: None,
            partial: None,
            diagnostics: l.diags,
        };
    };
    let mut spec = {
        let mut r = read::Reader::new(&stages_file, &text, &mut l.diags);
        stages::read(&mut r, &doc)
    };
    if let Some(name) = l.opts.environment.clone() {
        spec.environment = select_environment(&mut l, &stages_file, &spec, &name);
        if spec.environment.is_none() {
            // Checking the stages without the environment asked for would only add noise.
            return Loaded {
                project: None,
                partial: Some(spec),
                diagnostics: l.diags,
            };
        }
    }
    let loaded_stages = load_stages(&mut l, &stages_file, &spec.stages);
    let mut stages = Vec::with_capacity(loaded_stages.len());
    let mut complete = true;
    for s in loaded_stages {
        match s {
            Some(s) => stages.push(s),
            None => complete = false,
        }
    }
    if complete {
        check::variables(
            &mut l.diags,
            &l.sources,
            &spec,
            &stages,
            &stages_file,
            &text,
            &l.opts.provided,
        );
    }
    if !complete || l.diags.has_errors() {
        return Loaded {
            project: None,
            partial: Some(spec),
            diagnostics: l.diags,
        };
    }
    let project = Project {
        stages_file: stages_file.clone(),
        spec,
        stages: stages.into_iter().map(std::sync::Arc::new).collect(),
        inputs: sorted_inputs(std::mem::take(&mut l.inputs)),
    };
    Loaded {
        project: Some(project),
        partial: None,
        diagnostics: l.diags,
    }
}

/// Every `(path, digest)` read, in read order, sorted by the paths' bytes with the last read
/// of each path kept. The sort is stable, so equal paths stay in read order; a parallel load
/// sorts each part first (see [`load_stages`]), which leaves only sorted runs to merge here.
fn sorted_inputs(mut inputs: Vec<(PathBuf, String)>) -> Vec<(PathBuf, String)> {
    inputs.sort_by(by_path_bytes);
    // `later` is removed when it has `kept`'s path; its digest, the later read's, stays.
    inputs.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        same
    });
    inputs
}

fn by_path_bytes(a: &(PathBuf, String), b: &(PathBuf, String)) -> std::cmp::Ordering {
    a.0.as_os_str()
        .as_encoded_bytes()
        .cmp(b.0.as_os_str().as_encoded_bytes())
}

/// A project with at least this many stages loads and checks them on several threads.
const PARALLEL_FROM: usize = 64;

/// Runs `work` over `0..n`: split into one contiguous part per core (at most 8), each on its
/// own scoped thread, when there are at least [`PARALLEL_FROM`] items and more than one
/// core; otherwise as one part on this thread. The parts' results come back in order, so a
/// caller that joins them in order gets what one pass in order would give.
pub(super) fn in_parts<T: Send>(
    n: usize,
    work: impl Fn(std::ops::Range<usize>) -> T + Sync,
) -> Vec<T> {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if n < PARALLEL_FROM || workers < 2 {
        return vec![work(0..n)];
    }
    let size = n.div_ceil(workers.min(8));
    let work = &work;
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..n)
            .step_by(size)
            .map(|start| scope.spawn(move || work(start..n.min(start + size))))
            .collect();
        running
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Loads every stage's files, in order: in parts (see [`in_parts`]), each part with its own
/// loader; the parts' results, diagnostics, digests and texts are then joined in stage
/// order, so the outcome is the same as loading them one by one.
fn load_stages(
    l: &mut Loader<'_>,
    stages_file: &Path,
    stages: &[StageSpec],
) -> Vec<Option<LoadedStage>> {
    let (files, opts) = (l.files, &l.opts);
    let parts = in_parts(stages.len(), |range| {
        let mut sub = Loader::new(files, opts.clone());
        // A config and a migration per stage, at least.
        sub.inputs.reserve(2 * range.len());
        sub.sources.reserve(2 * range.len());
        let loaded: Vec<_> = stages[range]
            .iter()
            .map(|s| load_listed_stage(&mut sub, stages_file, s))
            .collect();
        // Sorted on the part's thread, so that `sorted_inputs` only merges sorted runs.
        sub.inputs.sort_by(by_path_bytes);
        (loaded, sub.diags, sub.inputs, sub.sources)
    });
    let mut out = Vec::with_capacity(stages.len());
    for (loaded, diags, inputs, sources) in parts {
        out.extend(loaded);
        l.diags.extend(diags);
        l.inputs.extend(inputs);
        l.sources.append(sources);
    }
    out
}

/// Loads one stage the stages file lists, and its parameters file.
fn load_listed_stage(
    l: &mut Loader<'_>,
    stages_file: &Path,
    stage: &StageSpec,
) -> Option<LoadedStage> {
    let config_file = beside(stages_file, &stage.config_path.value);
    let named_at = (stages_file, stage.config_path.pos);
    let loaded = load_stage(l, &stage.name.value, config_file, Some(named_at));
    // The engine reads a stage's parameters file (its tokens take the environment's
    // variables), so it is digested with the plan but not shipped with the stage.
    if let Some(rel) = &stage.parameters_file {
        let path = beside(stages_file, &rel.value);
        if let Some(text) = l.read_text(&path, Some((stages_file, rel.pos)), "parameters_file") {
            parameters::check_shape(&mut l.diags, &path, &text);
            l.sources.insert(path, text);
        }
    }
    loaded
}

/// Reads the environment `name` of `spec` (its `env_file`) for a load with `--environment`;
/// `None` (with an error) when the project has no such environment.
fn select_environment(
    l: &mut Loader<'_>,
    stages_file: &Path,
    spec: &StagesSpec,
    name: &str,
) -> Option<SelectedEnvironment> {
    let Some(env) = spec.environment_named(name) else {
        let known: Vec<&str> = spec
            .environments
            .iter()
            .map(|e| e.name.value.as_str())
            .collect();
        let d = l.diags.error(
            stages_file,
            Pos::FILE,
            if known.is_empty() {
                format!("--environment `{name}`: the stages file declares no environments")
            } else {
                format!("--environment `{name}`: the stages file declares no such environment")
            },
        );
        if known.is_empty() {
            d.with_help(
                "add an `environments:` list to the stages file, or leave out --environment",
            );
        } else {
            d.with_help(environments::unknown_environment_help(name, &known));
        }
        return None;
    };
    let mut selected = SelectedEnvironment {
        spec: env.clone(),
        file_env: Vec::new(),
        file: None,
    };
    if let Some(rel) = &env.env_file {
        let path = beside(stages_file, &rel.value);
        let text = l.read_text(&path, Some((stages_file, rel.pos)), "env_file")?;
        let doc = l.parse_yaml(&path, &text)?;
        selected.file_env = {
            let mut r = read::Reader::new(&path, &text, &mut l.diags);
            environments::read_variables_file(&mut r, &doc)
        };
        l.sources.insert(path.clone(), text);
        selected.file = Some(path);
    }
    Some(selected)
}

/// Loads one stage from its config file alone: what an agent does with the files an
/// assignment carries. The same parsing and per-file checks as [`load_project`]; the
/// cross-stage checks ran where the run was planned.
pub fn load_stage_files(
    name: &str,
    config_file: &Path,
    files: &dyn SourceFiles,
    opts: LoadOptions,
) -> Result<LoadedStage, Diagnostics> {
    let mut l = Loader::new(files, opts);
    match load_stage(&mut l, name, normalize(config_file), None) {
        Some(stage) if !l.diags.has_errors() => Ok(stage),
        _ => Err(l.diags),
    }
}

fn load_stage(
    l: &mut Loader<'_>,
    name: &str,
    config_file: PathBuf,
    named_at: Option<(&Path, Pos)>,
) -> Option<LoadedStage> {
    l.stage_reads.clear();
    let text = l.read_text(
        &config_file,
        named_at,
        &format!("stage `{name}`: config file"),
    )?;
    let doc = l.parse_yaml(&config_file, &text)?;
    let config = {
        let mut r = read::Reader::new(&config_file, &text, &mut l.diags);
        config::read(&mut r, &doc)
    };
    l.sources.insert(config_file.clone(), text);
    // The CA bundle is part of what the stage runs with: read (and digested) with the plan,
    // so it travels with the stage to wherever it runs.
    if let Some(ca) = &config.client.ca_file {
        let path = beside(&config_file, &ca.value);
        let _ = l.read_text(&path, Some((&config_file, ca.pos)), "client.ca_file");
    }
    let (dir_rel, dir_pos) = match &config.migrate_dir {
        Some(d) => (d.value.clone(), d.pos),
        None => (PathBuf::from("migration"), Pos::FILE),
    };
    let migrate_dir = beside(&config_file, &dir_rel);
    let names = match l.files.list(&migrate_dir) {
        Ok(n) => n,
        Err(_) => {
            let d = l.diags.error(
                &config_file,
                dir_pos,
                format!(
                    "migration directory `{}` does not exist",
                    migrate_dir.display()
                ),
            );
            d.with_help(if config.migrate_dir.is_none() {
                "set `migrate_dir:` in the config (default `./migration`) or create the directory"
                    .to_owned()
            } else {
                "check the path; it is relative to this config file".to_owned()
            });
            return None;
        }
    };
    let mut candidates: Vec<(u64, String, String)> = Vec::new();
    for file_name in names {
        if !(file_name.ends_with(".yaml") || file_name.ends_with(".yml")) {
            continue;
        }
        match parse_file_name(&file_name) {
            Ok((v, n)) => candidates.push((v, n, file_name)),
            // A numbered file that does not parse is a broken migration.
            Err(why) if file_name.starts_with(|c: char| c.is_ascii_digit()) => {
                l.diags.error(
                    &migrate_dir.join(&file_name),
                    Pos::FILE,
                    format!("bad migration file name `{file_name}`: {why}"),
                );
            }
            // Anything else (the config file itself, notes) is not a migration: apirun
            // passes over such files, and so does baton, saying so.
            Err(_) => {
                l.diags.notice(
                    &migrate_dir.join(&file_name),
                    Pos::FILE,
                    format!(
                        "`{file_name}` is not a migration file (`NNN_name.yaml`); it is ignored"
                    ),
                );
            }
        }
    }
    candidates.sort();
    // Sized once: a migration's spec is large, and growing the list copied it.
    let mut migrations: Vec<MigrationSpec> = Vec::with_capacity(candidates.len());
    let mut ok = true;
    for (i, (version, name, file_name)) in candidates.iter().enumerate() {
        let path = migrate_dir.join(file_name);
        if i > 0 && candidates[i - 1].0 == *version {
            l.diags
                .error(
                    &path,
                    Pos::FILE,
                    format!(
                        "duplicate migration version {version}: `{}` and `{file_name}`",
                        candidates[i - 1].2
                    ),
                )
                .with_help("give each migration its own version number");
            ok = false;
            continue;
        }
        let Some(text) = l.read_text(&path, None, "migration") else {
            ok = false;
            continue;
        };
        // `read_text` recorded the digest last.
        let digest = l.inputs.last().map(|(_, d)| d.clone()).unwrap_or_default();
        let Some(doc) = l.parse_yaml(&path, &text) else {
            ok = false;
            continue;
        };
        let m = {
            let mut r = read::Reader::new(&path, &text, &mut l.diags);
            migration::read(&mut r, &doc, &path, *version, name.clone(), digest)
        };
        l.sources.insert(path.clone(), text);
        match m {
            Some(m) => {
                for step in [&m.up, &m.down].into_iter().flatten() {
                    load_body_files(l, &m.file, step);
                }
                migrations.push(m);
            }
            None => ok = false,
        }
    }
    ok.then(|| LoadedStage {
        config_file,
        config,
        migrate_dir,
        migrations,
        inputs: std::mem::take(&mut l.stage_reads),
    })
}

fn load_body_files(l: &mut Loader<'_>, migration_file: &Path, step: &StepSpec) {
    if let Some(StepAction::Request(RequestSpec {
        body: Some(BodySpec::File(f)),
        ..
    })) = &step.action
    {
        let path = beside(migration_file, &f.value);
        if crate::vars::is_template(&f.value.to_string_lossy()) {
            load_templated_body_files(l, migration_file, f.pos, &path);
        } else if let Some(text) = l.read_text(&path, Some((migration_file, f.pos)), "body_file") {
            // Its `#{name}#` tokens are checked against the step's variables.
            if crate::tokens::has_tokens(&text) {
                l.sources.insert(path, text);
            }
        }
    }
    if let Some(find) = &step.find {
        load_body_files(l, migration_file, find);
    }
}

/// The literal pieces around a file name's template actions (`vpc-{{.env}}.json` gives
/// `vpc-` and `.json`), or `None` when the name is not a template.
pub fn body_file_pattern(name: &str) -> Option<Vec<&str>> {
    if !crate::vars::is_template(name) {
        return None;
    }
    let mut pieces = Vec::new();
    let mut rest = name;
    while let Some(open) = rest.find("{{") {
        pieces.push(&rest[..open]);
        rest = rest[open..]
            .find("}}")
            .map_or("", |close| &rest[open + close + 2..]);
    }
    pieces.push(rest);
    Some(pieces)
}

/// Whether `name` can be what a template with these literal `pieces` renders to.
pub fn matches_pattern(name: &str, pieces: &[&str]) -> bool {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return false;
    };
    if pieces.len() < 2 || !name.starts_with(first) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..];
    if !rest.ends_with(last) {
        return false;
    }
    rest = &rest[..rest.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// `body_file: bodies/{{.env}}.json`: the name is rendered when the request is sent, so
/// every file of the directory it can name is read now, and the run sends one of exactly
/// those bytes. A template in a directory part is refused (a value could then reach
/// anywhere).
fn load_templated_body_files(l: &mut Loader<'_>, migration_file: &Path, pos: Pos, path: &Path) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new(""));
    let Some(pieces) =
        body_file_pattern(&name).filter(|_| !crate::vars::is_template(&dir.to_string_lossy()))
    else {
        l.diags
            .error(
                migration_file,
                pos,
                format!(
                    "body_file `{}`: a template may only be in the file name",
                    path.display()
                ),
            )
            .with_help("keep the directories literal, e.g. `bodies/vpc-{{.env}}.json`");
        return;
    };
    let mut names = l.files.list(dir).unwrap_or_default();
    names.sort();
    let mut found = false;
    for n in names.iter().filter(|n| matches_pattern(n, &pieces)) {
        found = true;
        let _ = l.read_text(&dir.join(n), Some((migration_file, pos)), "body_file");
    }
    if !found {
        l.diags
            .error(
                migration_file,
                pos,
                format!(
                    "body_file `{}` names no file: nothing in {} matches it",
                    path.display(),
                    dir.display()
                ),
            )
            .with_help("add the files it can name beside the migration, or fix the name");
    }
}

#[cfg(test)]
mod tests;
