//! Runs one [`Assignment`]: loads the stage from the files it carries, adds what only the
//! place where the stage runs knows (its environment: `valueFromEnv`, credentials), and hands
//! the stage to the [executor](crate::executor). Both transports call [`run`]: the
//! coordinator's in-process runner in local mode and the agent's session in distributed mode,
//! so a stage behaves the same wherever it runs.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_common::spec::{load_stage_files, normalize, LoadOptions, SourceFiles};
use baton_common::stage::{Assignment, StageEnd, StageEvent, StageReport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::{execute, StageTask, StepGate, VarLayers};

/// Where the stage runs, as the executor needs to know it.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The environment of the process that runs the stage: the only source of
    /// `valueFromEnv` values and of `env` in conditions and templates.
    pub env: BTreeMap<String, String>,
    /// `User-Agent` of every request the stage sends.
    pub user_agent: String,
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
            None if path.is_absolute() => std::fs::read(path),
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

/// Runs `a` to its end. Every failure, including files that do not load, is a
/// [`StageEnd::Failed`] naming the stage; nothing panics.
pub async fn run(
    a: Assignment,
    host: &Host,
    cancel: CancellationToken,
    events: mpsc::Sender<StageEvent>,
    gate: Option<StepGate>,
) -> StageReport {
    let files = Arc::new(ShippedFiles::new(a.files));
    let stage = match load_stage_files(
        &a.attempt.stage,
        &a.config_file,
        files.as_ref(),
        LoadOptions::default(),
    ) {
        Ok(s) => s,
        Err(diags) => {
            return StageReport::ended(StageEnd::Failed(format!(
                "stage `{}`: its files do not load where it runs:\n{diags}",
                a.attempt.stage
            )))
        }
    };
    let task = StageTask {
        key_scope: a.key_scope,
        stage: a.attempt.stage,
        config_file: stage.config_file,
        config: stage.config,
        migrations: stage.migrations,
        vars: VarLayers {
            global: a.vars.global,
            process_env: host.env.clone(),
            stage: a.vars.stage,
            from_stages: a.vars.imported,
        },
        applied: a.applied,
        secrets: a.secrets,
        retry: a.retry,
        direction: a.direction,
        timeout: a.timeout,
        files,
        gate,
        user_agent: host.user_agent.clone(),
    };
    execute(task, cancel, events).await
}
