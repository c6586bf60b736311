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

/// Promoted through its environments after the examples above.
const ENVIRONMENTS_EXAMPLE: &str = "examples/environments/stages.yaml";

/// Loads a bundled example (with `api_base` provided by the demo); `None` after printing
/// why when it does not load (`command` names the demo in the hint).
fn load_example(
    file: &std::path::Path,
    command: &str,
    err: &mut dyn Write,
) -> std::io::Result<
    Option<(
        baton_common::spec::Project,
        crate::scheduler::driver::PlannedFiles,
    )>,
> {
    let (project, diags, files) = load_captured(&SpecArgs {
        config: file.to_path_buf(),
        strict: false,
        generated: None,
        provided: vec!["api_base".to_owned()],
        environment: None,
    });
    match project {
        Some(p) => Ok(Some((p, files))),
        None => {
            write!(err, "{diags}")?;
            writeln!(
                err,
                "hint: run `{command}` from the repository root, where examples/ is"
            )?;
            Ok(None)
        }
    }
}

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
    if args.distributed {
        return distributed(&files, env, out, err);
    }
    if args.api_only {
        return api_only(&args.listen, out, err);
    }
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
            let Some((project, files)) = load_example(file, "baton demo", err)? else {
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
            let key = local::key_of(&project);
            let history = match local::StoreHistory::of(store.as_ref(), &key, &project) {
                Ok(h) => h,
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_RUN_FAILED);
                }
            };
            let overrides = BTreeMap::from([("api_base".to_owned(), api.url.clone())]);
            let plan_vars = planner::PlanVars {
                overrides: overrides.clone(),
                env: env.clone(),
            };
            let plan = match planner::plan_with(&project, &Selection::All, &history, &plan_vars) {
                Ok(p) => p,
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_INVALID);
                }
            };
            let planned = local::LocalProject {
                project: project.clone(),
                files,
                plan,
                store: store.clone(),
                key: key.clone(),
                overrides,
                env: env.clone(),
                output: super::OutputFormat::Text,
                live: super::progress::live_wanted(super::progress::ProgressMode::Auto, &env),
                verbose: false,
                skip_promotion: None,
            };
            let c = local::up_async(planned, out, err).await?;
            if c != EXIT_OK {
                code = c;
            }
            writeln!(out, "\n=== baton stages status --config {}", file.display())?;
            local::status(
                &project,
                store.as_ref(),
                &key,
                true,
                super::OutputFormat::Text,
                out,
                err,
            )?;
        }
        if args.config.is_empty() {
            let c = promotion(&api.url, &state_root.join("environments"), &env, out, err).await?;
            if c != EXIT_OK {
                code = c;
            }
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

/// The bundled environments example promoted dev -> test -> prod, prod waiting for an
/// approval that a second identity (`demo-approver`, group `release-managers`) gives through
/// the running process, as `baton runs approve` would from another terminal.
async fn promotion(
    api: &str,
    state_dir: &std::path::Path,
    env: &BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let file = std::path::Path::new(ENVIRONMENTS_EXAMPLE);
    let store = match SledStore::open(state_dir) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_RUN_FAILED);
        }
    };
    let overrides = BTreeMap::from([("api_base".to_owned(), api.to_owned())]);
    for environment in ["dev", "test", "prod"] {
        writeln!(
            out,
            "\n=== baton stages up --config {} -e {environment} --set api_base={api}",
            file.display()
        )?;
        let (project, diags, files) = load_captured(&SpecArgs {
            config: file.to_path_buf(),
            strict: false,
            generated: None,
            provided: vec!["api_base".to_owned()],
            environment: Some(environment.to_owned()),
        });
        let Some(project) = project else {
            write!(err, "{diags}")?;
            writeln!(
                err,
                "hint: run `baton demo` from the repository root, where examples/ is"
            )?;
            return Ok(EXIT_INVALID);
        };
        let key = local::key_of(&project);
        let plan = match local::StoreHistory::of(store.as_ref(), &key, &project) {
            Ok(history) => planner::plan_with(
                &project,
                &Selection::All,
                &history,
                &planner::PlanVars {
                    overrides: overrides.clone(),
                    env: env.clone(),
                },
            ),
            Err(e) => {
                writeln!(err, "error: {e}")?;
                return Ok(EXIT_RUN_FAILED);
            }
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                writeln!(err, "error: {e}")?;
                return Ok(EXIT_INVALID);
            }
        };
        let approver = (environment == "prod").then(|| {
            let dir = state_dir.to_path_buf();
            tokio::task::spawn_blocking(move || approve_when_asked(&dir))
        });
        let planned = local::LocalProject {
            project,
            files,
            plan,
            store: store.clone(),
            key,
            overrides: overrides.clone(),
            env: env.clone(),
            output: super::OutputFormat::Text,
            live: super::progress::live_wanted(super::progress::ProgressMode::Auto, env),
            verbose: false,
            skip_promotion: None,
        };
        let code = local::up_async(planned, out, err).await?;
        if let Some(approver) = approver {
            match approver.await {
                Ok(Some(line)) => writeln!(out, "(meanwhile, in another terminal) {line}")?,
                _ => writeln!(err, "error: the demo's approver could not approve the run")?,
            }
        }
        if code != EXIT_OK {
            return Ok(code);
        }
    }
    writeln!(
        out,
        "\n=== baton stages status --config {} --all-environments",
        file.display()
    )?;
    let spec = SpecArgs {
        config: file.to_path_buf(),
        strict: false,
        generated: None,
        provided: vec!["api_base".to_owned()],
        environment: None,
    };
    let (project, _) = super::stages::load_and_check(&spec);
    if let Some(project) = project {
        super::environments::dashboard(
            &spec,
            &project,
            &mut super::environments::store_columns(Some(store.as_ref())),
            super::OutputFormat::Text,
            out,
            err,
        )?;
    }
    writeln!(out, "\n=== baton audit")?;
    super::environments::write_audit(
        store.as_ref(),
        &super::environments::AuditFilter::default(),
        false,
        super::OutputFormat::Text,
        out,
        err,
    )
}

/// Waits (bounded: one minute) for the run in `dir` to await approval, then approves it as
/// `demo-approver` through the running process; the command and its answer, or `None`.
fn approve_when_asked(dir: &std::path::Path) -> Option<String> {
    use super::readonly::{ask, Request};
    for _ in 0..600 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (mut listed, mut sink) = (Vec::new(), Vec::new());
        let request = Request::RunsList {
            json: true,
            environment: Some("prod".to_owned()),
        };
        if ask(dir, &request, &mut listed, &mut sink).ok().flatten() != Some(EXIT_OK) {
            continue;
        }
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed).unwrap_or_default();
        let Some(run) = rows
            .iter()
            .find(|r| r["status"] == "running")
            .and_then(|r| r["id"].as_u64())
        else {
            continue;
        };
        let decide = Request::Decide {
            run,
            approve: true,
            by: crate::runs::Identity {
                name: "demo-approver".to_owned(),
                groups: vec!["release-managers".to_owned()],
            },
            comment: "approved by the demo".to_owned(),
        };
        let (mut said, mut why) = (Vec::new(), Vec::new());
        if ask(dir, &decide, &mut said, &mut why).ok().flatten() == Some(EXIT_OK) {
            return Some(format!(
                "BATON_USER=demo-approver BATON_GROUPS=release-managers baton runs approve {run}: {}",
                String::from_utf8_lossy(&said).trim()
            ));
        }
    }
    None
}

/// `baton demo --distributed`: the same examples through a coordinator and two agents, all
/// in this process tree and talking real gRPC over loopback: the coordinator serves on a free
/// port with its state in a temporary directory, the agents dial out to it, and each example
/// is submitted and watched exactly as `stages up --coordinator` does.
fn distributed(
    files: &[PathBuf],
    env: BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    use baton_agent::session::AgentConfig;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let api = DemoApi::start(stop.clone()).await?;
        let root = std::env::temp_dir().join(format!("baton-demo-dist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let mut config = crate::server::ServeConfig::new(root.join("coordinator"));
        config.shutdown_grace = std::time::Duration::from_secs(5);
        let server = tokio::spawn(crate::server::serve(config, listener, stop.clone()));
        let mut agents = Vec::new();
        for (id, region) in [("demo-agent-1", "westeurope"), ("demo-agent-2", "uksouth")] {
            let mut agent = AgentConfig::new(&url, id, root.join(id));
            agent.labels = BTreeMap::from([("region".to_owned(), region.to_owned())]);
            agent.env = env.clone();
            agent.backoff_initial = std::time::Duration::from_millis(100);
            agent.backoff_max = std::time::Duration::from_secs(2);
            agents.push(tokio::spawn(baton_agent::session::run(agent, stop.clone())));
        }
        writeln!(
            out,
            "demo cloud API on {}; coordinator on {url} (state in {}); agents demo-agent-1 (region=westeurope) and demo-agent-2 (region=uksouth)",
            api.url,
            root.display()
        )?;
        let remote = super::RemoteArgs {
            coordinator: Some(url.clone()),
            ..super::RemoteArgs::default()
        };
        let mut code = EXIT_OK;
        for file in files {
            writeln!(
                out,
                "\n=== baton stages up --coordinator {url} --config {} --set api_base={}",
                file.display(),
                api.url
            )?;
            let Some((project, captured)) = load_example(file, "baton demo --distributed", err)?
            else {
                code = EXIT_INVALID;
                break;
            };
            let submission = super::remote::Submit {
                stages_file: &project.stages_file,
                files: captured,
                stage_names: project.spec.stages.iter().map(|s| s.name.value.clone()).collect(),
                selection: (Vec::new(), String::new(), String::new()),
                set: [("api_base".to_owned(), api.url.clone())].into(),
                detach: false,
                down: None,
                json: false,
                environment: String::new(),
                skip_promotion: None,
            };
            let result = match super::remote::connect(&remote).await {
                Ok(mut client) => super::remote::submit_and_watch(&mut client, submission, out, err).await,
                Err(e) => Err(e),
            };
            let c = super::remote::finish(err, result)?;
            if c != EXIT_OK {
                code = c;
            }
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
        for a in agents {
            let _ = a.await;
        }
        if let Ok(Err(e)) = server.await {
            writeln!(err, "error: the coordinator stopped: {e}")?;
            code = EXIT_RUN_FAILED;
        }
        let _ = std::fs::remove_dir_all(&root);
        Ok(code)
    })
}

/// `baton demo --api-only`: the demo cloud API alone, until Ctrl-C.
fn api_only(listen: &str, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let loopback = listen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    if !loopback {
        writeln!(
            err,
            "error: --listen `{listen}` must be a loopback address such as 127.0.0.1:8080 (the demo API is for this machine only)"
        )?;
        return Ok(EXIT_INVALID);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let api = match DemoApi::start_on(listen, stop.clone()).await {
            Ok(a) => a,
            Err(e) => {
                writeln!(err, "error: cannot listen on {listen}: {e}")?;
                return Ok(EXIT_RUN_FAILED);
            }
        };
        writeln!(out, "demo cloud API on {}; Ctrl-C stops it", api.url)?;
        out.flush()?;
        let _ = tokio::signal::ctrl_c().await;
        writeln!(out, "the demo API held {} resources", api.resources().len())?;
        stop.cancel();
        Ok(EXIT_OK)
    })
}
