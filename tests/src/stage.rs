//! Stage fixtures for executor tests: a one-stage project written to a temporary directory,
//! loaded through the real spec loader, turned into a [`StageTask`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use baton_agent::executor::{
    execute, AppliedMigration, Direction, StageEvent, StageReport, StageTask, VarLayers,
};
use baton_common::spec::{load_project, DiskFiles, LoadOptions, RetryPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A temporary project with one stage `s`; removed when dropped.
#[derive(Debug)]
pub struct StageDir {
    pub dir: PathBuf,
    /// `global.env` of the generated stages file.
    pub global: BTreeMap<String, String>,
    pub secrets: Vec<String>,
}

impl Drop for StageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl StageDir {
    /// A project whose `global.env` has `api` = the target's URL.
    pub fn new(api: &str) -> StageDir {
        let dir = std::env::temp_dir().join(format!(
            "baton-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("s/migration")).expect("create temp project");
        let mut global = BTreeMap::new();
        global.insert("api".to_owned(), api.to_owned());
        let d = StageDir {
            dir,
            global,
            secrets: Vec::new(),
        };
        d.write("s/config.yaml", "migrate_dir: migration\n");
        d
    }

    /// Writes a file of the project (path relative to the project root).
    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(path, content).expect("write fixture file");
        self
    }

    /// Writes `s/migration/NAME`.
    pub fn migration(&self, name: &str, content: &str) -> &Self {
        self.write(&format!("s/migration/{name}"), content)
    }

    /// Loads the project (failing the test on any validation error) and builds the task.
    pub fn task(&self, direction: Direction, applied: Vec<AppliedMigration>) -> StageTask {
        self.task_with_env(direction, applied, BTreeMap::new())
    }

    pub fn task_with_env(
        &self,
        direction: Direction,
        applied: Vec<AppliedMigration>,
        process_env: BTreeMap<String, String>,
    ) -> StageTask {
        let mut stages = String::from("stages:\n  - name: s\n    config_path: s/config.yaml\n");
        if !self.secrets.is_empty() {
            stages.push_str(&format!("    secrets: [{}]\n", self.secrets.join(", ")));
        }
        stages.push_str("global:\n  env:\n");
        for (k, v) in &self.global {
            stages.push_str(&format!(
                "    {k}: {}\n",
                serde_json::Value::String(v.clone())
            ));
        }
        self.write("stages.yaml", &stages);
        let loaded = load_project(
            &self.dir.join("stages.yaml"),
            &DiskFiles,
            LoadOptions::default(),
        );
        let Some(project) = loaded.project else {
            panic!("fixture project is invalid:\n{}", loaded.diagnostics);
        };
        let stage = project.stages.into_iter().next().expect("one stage");
        let spec = &project.spec.stages[0];
        StageTask {
            key_scope: "store-1/run-1".to_owned(),
            user_agent: String::new(),
            clients: None,
            stage: "s".to_owned(),
            loaded: stage,
            vars: VarLayers {
                global: self.global.clone(),
                literal_globals: Vec::new(),
                process_env: std::sync::Arc::new(process_env.into()),
                stage: spec
                    .env
                    .iter()
                    .map(|e| (e.name.value.clone(), e.value.clone()))
                    .collect(),
                from_stages: BTreeMap::new(),
            },
            applied,
            secrets: spec.secrets.iter().map(|s| s.value.clone()).collect(),
            not_secret: spec.not_secret.iter().map(|s| s.value.clone()).collect(),
            retry: RetryPolicy {
                initial_backoff: std::time::Duration::from_millis(10),
                ..RetryPolicy::default()
            },
            direction,
            timeout: None,
            files: Arc::new(DiskFiles),
            gate: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Runs a task to its end and returns the report and every event it emitted.
pub async fn run(task: StageTask) -> (StageReport, Vec<StageEvent>) {
    run_with_cancel(task, CancellationToken::new()).await
}

pub async fn run_with_cancel(
    task: StageTask,
    cancel: CancellationToken,
) -> (StageReport, Vec<StageEvent>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    });
    let report = execute(task, cancel, tx).await;
    let events = collector.await.expect("collector");
    (report, events)
}

/// Every text an event carries, one line each, for "never contains" assertions.
pub fn event_text(events: &[StageEvent]) -> String {
    events.iter().map(|e| format!("{e:?}\n")).collect()
}
