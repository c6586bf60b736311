//! `baton demo`: the README's main job. Starts the demo cloud API on a free loopback port,
//! runs the bundled examples against it for real (state in a fresh temporary directory, so
//! the demo can run again and again), and shows `stages status` and what the API now holds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::run as local;
use super::stages::load_captured;
use super::{DemoArgs, SpecArgs, EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED};
use crate::demo::DemoApi;
use crate::planner::{self, Selection};
use crate::store::SledStore;

const EXAMPLES: &[&str] = &[
    "examples/stages/stages.yaml",
    "examples/multi-stage/stages.yaml",
];

pub(super) fn run(
    args: &DemoArgs,
    env: BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let files: Vec<PathBuf> = if args.config.is_empty() {
        EXAMPLES.iter().map(PathBuf::from).collect()
    } else {
        args.config.clone()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let api = DemoApi::start(stop.clone()).await?;
        let state_root = std::env::temp_dir().join(format!("baton-demo-{}", std::process::id()));
        writeln!(
            out,
            "demo cloud API on {} (state in {})",
            api.url,
            state_root.display()
        )?;
        let mut code = EXIT_OK;
        for (i, file) in files.iter().enumerate() {
            writeln!(
                out,
                "\n=== baton stages up --config {} --set api_base={}",
                file.display(),
                api.url
            )?;
            let (project, diags, files) = load_captured(&SpecArgs {
                config: file.clone(),
                strict: false,
                generated: None,
                provided: vec!["api_base".to_owned()],
            });
            let Some(project) = project else {
                write!(err, "{diags}")?;
                writeln!(
                    err,
                    "hint: run `baton demo` from the repository root, where examples/ is"
                )?;
                return Ok(EXIT_INVALID);
            };
            let state_dir = state_root.join(i.to_string());
            let store = match SledStore::open(&state_dir) {
                Ok(s) => std::sync::Arc::new(s),
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_RUN_FAILED);
                }
            };
            let key = local::project_key(&project.stages_file);
            let history = local::StoreHistory {
                store: store.as_ref(),
                project: key.clone(),
            };
            let plan = match planner::plan(&project, &Selection::All, &history) {
                Ok(p) => p,
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_INVALID);
                }
            };
            let overrides = BTreeMap::from([("api_base".to_owned(), api.url.clone())]);
            let planned = local::LocalProject {
                project: project.clone(),
                files,
                plan,
                store: store.clone(),
                key: key.clone(),
                overrides,
                env: env.clone(),
            };
            let c = local::up_async(planned, out, err).await?;
            if c != EXIT_OK {
                code = c;
            }
            writeln!(out, "\n=== baton stages status --config {}", file.display())?;
            local::status(&project, store.as_ref(), &key, true, out)?;
        }
        writeln!(
            out,
            "\nthe demo API now holds {} resources:",
            api.resources().len()
        )?;
        for r in api.resources() {
            writeln!(out, "  {r}")?;
        }
        stop.cancel();
        let _ = std::fs::remove_dir_all(&state_root);
        Ok(code)
    })
}
