//! Local mode end to end: the real `baton` binary runs projects against a recording target
//! API on 127.0.0.1, with durable state in a temporary `.baton/`.

// Helpers here are test code too: a failed file operation should stop the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use baton_e2e::files::copy_dir;
use baton_e2e::target::{Reply, Target};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of `src` in a fresh temporary directory.
fn copy_project(src: &Path, name: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("baton-local-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(src, &dst);
    dst
}

/// Runs `baton` in `dir` off the async runtime (the target must keep serving meanwhile).
async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args).await
}

/// `baton args` in `dir`, retried (bounded) while the state is still locked by a process
/// that was just killed (sled lets go of its lock shortly after the process is gone).
async fn once_unlocked(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut result = (0, String::new());
    for _ in 0..100 {
        result = baton(dir, args).await;
        if !result.1.contains("in use by another baton process") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    result
}

/// Starts `baton args` in `dir` and returns it once the file `flag` exists (a step of the
/// run creates it), bounded.
async fn start_until(dir: &Path, args: &[&str], flag: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let seen = flag.to_path_buf();
    tokio::task::spawn_blocking(move || {
        baton_e2e::cluster::wait_for(
            "the run to start",
            std::time::Duration::from_secs(30),
            || seen.exists(),
        )
    })
    .await
    .unwrap();
    child
}

/// Starts `baton args` in `dir` and kills it (SIGKILL) once `ready` holds (bounded).
async fn kill_when(
    dir: &Path,
    args: &[&str],
    what: &'static str,
    ready: impl FnMut() -> bool + Send + 'static,
) {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(&args)
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        baton_e2e::cluster::wait_for(what, std::time::Duration::from_secs(30), ready);
        child.kill().unwrap();
        child.wait().unwrap();
    })
    .await
    .unwrap();
}

fn script_seed001(target: &Target) {
    target.on(
        "POST",
        "/vpc",
        vec![Reply::json(
            201,
            json!({"vpc": {"id": "vpc-1", "subnets": [{"id": "subnet-1"}]}}),
        )],
    );
    target.on(
        "POST",
        "/vpc/vpc-1/security-groups",
        vec![Reply::json(201, json!({"security_group": {"id": "sg-1"}}))],
    );
    target.on(
        "POST",
        "/database",
        vec![Reply::json(201, json!({"database": {"id": "db-1", "endpoint": "db.internal:5432", "password": "pw-98765"}}))],
    );
    target.on(
        "POST",
        "/database/db-1/users",
        vec![Reply::json(201, json!({"user": {"name": "app"}}))],
    );
    target.on(
        "POST",
        "/services",
        vec![
            Reply::json(
                201,
                json!({"service": {"id": "svc-1", "url": "http://api.internal"}}),
            ),
            Reply::json(
                201,
                json!({"service": {"id": "svc-2", "url": "http://auth.internal"}}),
            ),
        ],
    );
    target.on(
        "PUT",
        "/load-balancer/targets",
        vec![Reply::json(200, json!({}))],
    );
    target.on(
        "POST",
        "/monitoring/checks",
        vec![Reply::json(201, json!({"check": {"id": "chk-1"}}))],
    );
    target.on(
        "POST",
        "/monitoring/alerts",
        vec![Reply::json(201, json!({"alert": {"id": "alr-1"}}))],
    );
}

/// Seed 001's four stages with variables flowing across them; a second `up` sends nothing;
/// a new migration runs alone; `--stage` uses stored variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_runs_and_reruns_only_what_is_new() {
    let target = Target::start().await;
    script_seed001(&target);
    let dir = copy_project(&repo().join("examples/stages"), "seed001");
    let set = format!("api_base={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run 1 succeeded"), "{out}");
    let reqs = target.requests();
    assert_eq!(reqs.len(), 9, "{out}");
    let api = &target.requests_to("POST", "/services")[0];
    assert_eq!(
        api.json(),
        json!({"name": "api", "vpc_id": "vpc-1", "database": "db.internal:5432", "database_password": "pw-98765"})
    );
    let checks = &target.requests_to("POST", "/monitoring/checks")[0];
    assert_eq!(
        checks.json()["targets"],
        json!(["http://api.internal/health", "http://auth.internal/health"])
    );
    assert_eq!(checks.query, "environment=production");

    // Nothing pending: nothing is sent.
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        target.requests().len(),
        9,
        "a second up sent requests:\n{out}"
    );

    // A new migration in one stage runs alone.
    std::fs::write(
        dir.join("services/migration/004_scale.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api_base}}/services/{{.api_service_id}}/scale'\n    body:\n      replicas: 3\n",
    )
    .unwrap();
    target.on(
        "PUT",
        "/services/svc-1/scale",
        vec![Reply::json(200, json!({}))],
    );
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let new: Vec<String> = target.requests()[9..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(new, ["PUT /services/svc-1/scale"], "{out}");

    // `--stage services` uses the stored variables of its dependencies.
    std::fs::write(
        dir.join("services/migration/005_register.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api_base}}/registry'\n    body:\n      vpc: '{{.vpc_id}}'\n      db: '{{.db_endpoint}}'\n",
    )
    .unwrap();
    target.on("POST", "/registry", vec![Reply::status(201)]);
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--stage", "services", "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run 4: 1 stage(s) to run"), "{out}");
    assert_eq!(
        target.requests_to("POST", "/registry")[0].json(),
        json!({"vpc": "vpc-1", "db": "db.internal:5432"})
    );
    assert_eq!(
        target.requests().len(),
        11,
        "only the new migration was sent"
    );

    let (code, status) = baton(&dir, &["stages", "status", "--verbose"]).await;
    assert_eq!(code, 0);
    assert!(
        status.contains("services: 5 applied, 0 pending"),
        "{status}"
    );
    assert!(status.contains("export   vpc_id=vpc-1"), "{status}");
    let (code, out) = baton(&dir, &["runs", "resume"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("no interrupted run of stages.yaml to resume"),
        "{out}"
    );
    let (_, runs) = baton(&dir, &["runs", "list"]).await;
    assert_eq!(runs.lines().count(), 4, "{runs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_selection_refuses_when_a_dependency_never_ran() {
    let target = Target::start().await;
    let dir = copy_project(&repo().join("examples/stages"), "refuse");
    let set = format!("api_base={}", target.url());
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--stage", "services", "--set", &set],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("stage services: dependent stage database has not been executed"),
        "{out}"
    );
    assert!(target.requests().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A condition skips a stage (the mixed variant's stage 3 runs only in production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_skips_a_stage() {
    let target = Target::start().await;
    for n in ["prerequisite", "stage1", "stage2", "stage3"] {
        let rg = format!("/subscriptions/00000000-0000-0000-0000-000000000001/resourcegroups/rg-myComplexApp-{n}-dev");
        target.on("PUT", &rg, vec![Reply::json(200, json!({"id": rg}))]);
        let sa = format!(
            "{rg}/providers/Microsoft.Storage/storageAccounts/stmcastg{}devdev001",
            n.trim_start_matches("stage")
        );
        target.on("PUT", &sa, vec![Reply::json(200, json!({"id": sa}))]);
    }
    let dir = copy_project(&repo().join("examples/multi-stage"), "condition");
    let set = format!("api_base={}", target.url());
    let (code, out) = baton(
        &dir,
        &[
            "stages",
            "up",
            "--config",
            "stages.mixed.yaml",
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dependent_stage3 skipped (condition)"),
        "{out}"
    );
    assert!(
        target.requests().iter().all(|r| !r.path.contains("stage3")),
        "a skipped stage sent requests"
    );
    assert_eq!(target.requests().len(), 5, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn failure_project(on_failure: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "baton-local-fail-{on_failure}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (stage, path) in [("a", "/a"), ("b", "/b"), ("c", "/c"), ("d", "/d")] {
        std::fs::create_dir_all(dir.join(stage).join("migration")).unwrap();
        std::fs::write(
            dir.join(stage).join("config.yaml"),
            "migrate_dir: migration\n",
        )
        .unwrap();
        std::fs::write(
            dir.join(stage).join("migration/001_call.yaml"),
            format!("up:\n  request:\n    method: POST\n    url: '{{{{.api}}}}{path}'\n"),
        )
        .unwrap();
    }
    // a fails; b depends on a; c depends on b; d is independent.
    std::fs::write(
        dir.join("stages.yaml"),
        format!(
            "stages:\n  - name: a\n    config_path: a/config.yaml\n    on_failure: {on_failure}\n  - name: b\n    config_path: b/config.yaml\n    depends_on: [a]\n  - name: c\n    config_path: c/config.yaml\n    depends_on: [b]\n  - name: d\n    config_path: d/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n  max_concurrent_stages: 1\n"
        ),
    )
    .unwrap();
    dir
}

async fn failure_run(on_failure: &str) -> (i32, String, Vec<String>) {
    let target = Target::start().await;
    target.on("POST", "/a", vec![Reply::text(400, "nope")]);
    for p in ["/b", "/c", "/d"] {
        target.on("POST", p, vec![Reply::status(201)]);
    }
    let dir = failure_project(on_failure);
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    let _ = std::fs::remove_dir_all(&dir);
    (
        code,
        out,
        target.requests().iter().map(|r| r.path.clone()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_modes() {
    let (code, out, paths) = failure_run("stop").await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(paths, ["/a"], "stop starts nothing new:\n{out}");
    assert!(out.contains("run failed"), "{out}");

    let (code, out, paths) = failure_run("continue").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(paths, ["/a", "/b", "/c", "/d"], "{out}");
    assert!(out.contains("run succeeded with failures"), "{out}");

    let (code, out, paths) = failure_run("skip_dependents").await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(paths, ["/a", "/d"], "{out}");
    assert!(
        out.contains("b                skipped (a dependency failed (skip_dependents))"),
        "{out}"
    );
    assert!(out.contains("c                skipped"), "{out}");
}

/// `stages down` of a range restores the target to its state before the run: the demo API
/// (stateful: creating adds a resource, deleting removes it) proves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_restores_the_target() {
    let stop = tokio_util::sync::CancellationToken::new();
    let api = baton_coordinator::demo::DemoApi::start(stop.clone())
        .await
        .unwrap();
    let dir = copy_project(&repo().join("examples/stages"), "down");
    let set = format!("api_base={}", api.url);
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let after_up = api.resources();
    assert_eq!(after_up.len(), 9, "{after_up:?}");

    // services still has configuration applied on top of it: refused, nothing sent.
    let (code, out) = baton(
        &dir,
        &[
            "stages", "down", "--stage", "services", "--yes", "--set", &set,
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("stage services cannot be rolled back while stages that depend on it are applied: configuration"), "{out}");
    assert_eq!(api.resources(), after_up);

    // Destructive commands ask; without a terminal they need --yes.
    let (code, out) = baton(&dir, &["stages", "down", "--set", &set]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("add --yes"), "{out}");

    // configuration back to services: their resources go, the rest stays.
    let (code, out) = baton(
        &dir,
        &[
            "stages",
            "down",
            "--from",
            "configuration",
            "--to",
            "services",
            "--yes",
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let left = api.resources();
    assert!(
        left.iter()
            .all(|r| !r.starts_with("/services") && !r.starts_with("/monitoring")),
        "{left:?}"
    );
    assert!(left.iter().any(|r| r.starts_with("/database")), "{left:?}");
    assert!(
        out.find("configuration    succeeded").unwrap()
            < out.find("services         succeeded").unwrap(),
        "{out}"
    );

    // The rest, with a cascade-free full down: the target is back to empty.
    let (code, out) = baton(&dir, &["stages", "down", "--yes", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert!(api.resources().is_empty(), "{:?}", api.resources());
    let (_, status) = baton(&dir, &["stages", "status"]).await;
    assert!(
        status.contains("infrastructure: 0 applied, 2 pending; last run 3: succeeded (down)"),
        "{status}"
    );

    // And up again brings everything back: history was truly rolled back.
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(api.resources().len(), 9);
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rollback_on_failure: true` undoes what the failed run applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_on_failure_undoes_the_run() {
    let stop = tokio_util::sync::CancellationToken::new();
    let api = baton_coordinator::demo::DemoApi::start(stop.clone())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("baton-local-rollback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |p: &str, c: &str| {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    };
    write(
        "stages.yaml",
        "stages:\n  - name: base\n    config_path: base/config.yaml\n  - name: app\n    config_path: app/config.yaml\n    depends_on: [base]\n    env_from_stages:\n      - stage: base\n        vars: [net_id]\nglobal:\n  env:\n    api: http://127.0.0.1:9\n  rollback_on_failure: true\n",
    );
    write("base/config.yaml", "migrate_dir: migration\n");
    write(
        "base/migration/001_net.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/networks'\n  response:\n    env_from:\n      net_id: network.id\ndown:\n  method: DELETE\n  url: '{{.api}}/networks/{{.net_id}}'\n",
    );
    write("app/config.yaml", "migrate_dir: migration\n");
    write(
        "app/migration/001_vm.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/networks/{{.net_id}}/vms'\n  response:\n    env_from:\n      vm_id: vm.id\ndown:\n  method: DELETE\n  url: '{{.api}}/networks/{{.net_id}}/vms/{{.vm_id}}'\n",
    );
    write(
        "app/migration/002_broken.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/no-such-thing'\n",
    );
    let set = format!("api={}", api.url);
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("rollback_on_failure: rolling back what run 1 applied in app, base"),
        "{out}"
    );
    assert!(out.contains("rollback run 2 succeeded"), "{out}");
    assert!(
        api.resources().is_empty(),
        "the rollback left {:?}\n{out}",
        api.resources()
    );
    let (_, status) = baton(&dir, &["stages", "status"]).await;
    assert!(status.contains("base: 0 applied, 1 pending"), "{status}");
    assert!(status.contains("app: 0 applied, 2 pending"), "{status}");
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prerequisite and four dependents with `max_concurrent_stages: 2`: the dependents run in
/// parallel, never more than two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_dependents_respect_max_concurrent_stages() {
    let target = Target::start().await;
    let dir = std::env::temp_dir().join(format!("baton-local-parallel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut stages = String::from("stages:\n  - name: pre\n    config_path: pre/config.yaml\n");
    for s in ["pre", "d1", "d2", "d3", "d4"] {
        std::fs::create_dir_all(dir.join(s).join("migration")).unwrap();
        std::fs::write(dir.join(s).join("config.yaml"), "migrate_dir: migration\n").unwrap();
        std::fs::write(
            dir.join(s).join("migration/001_deploy.yaml"),
            format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}/{s}'\n"),
        )
        .unwrap();
        target.on(
            "PUT",
            &format!("/{s}"),
            vec![Reply::status(200).delayed(std::time::Duration::from_millis(300))],
        );
        if s != "pre" {
            stages.push_str(&format!(
                "  - name: {s}\n    config_path: {s}/config.yaml\n    depends_on: [pre]\n"
            ));
        }
    }
    stages.push_str("global:\n  env:\n    api: http://127.0.0.1:9\n  max_concurrent_stages: 2\n");
    std::fs::write(dir.join("stages.yaml"), stages).unwrap();
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        target.requests()[0].path,
        "/pre",
        "the prerequisite runs first"
    );
    assert_eq!(target.requests().len(), 5);
    assert_eq!(
        target.max_in_flight(),
        2,
        "dependents must run two at a time:\n{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The single-stage commands apirun users know: `baton up|status|down --config config.yaml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_stage_commands() {
    let stop = tokio_util::sync::CancellationToken::new();
    let api = baton_coordinator::demo::DemoApi::start(stop.clone())
        .await
        .unwrap();
    let dir = copy_project(&repo().join("examples/stages/infrastructure"), "single");
    let sets = [
        format!("api_base={}", api.url),
        "region=eu-west-1".to_owned(),
        "project_name=solo".to_owned(),
    ];
    let mut args = vec!["up", "--config", "config.yaml"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (code, out) = baton(&dir, &args).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(api.resources().len(), 2, "{out}");
    let (_, status) = baton(&dir, &["status", "--verbose"]).await;
    assert!(status.contains("2 applied, 0 pending"), "{status}");
    assert!(status.contains("export   vpc_id=vpc-1"), "{status}");
    args[0] = "down";
    args.push("--yes");
    let (code, out) = baton(&dir, &args).await;
    assert_eq!(code, 0, "{out}");
    assert!(api.resources().is_empty(), "{:?}", api.resources());
    // No internal file name in what people read.
    let mut shown = String::new();
    for view in [
        vec!["up", "--dry-run", "--config", "config.yaml"],
        vec!["runs", "list"],
        vec!["runs", "show", "1"],
    ] {
        shown.push_str(&baton(&dir, &view).await.1);
    }
    assert!(shown.contains("single stage"), "{shown}");
    assert!(!shown.contains(".baton-stage"), "{shown}");
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An interrupted run is never silently replaced: another selection is refused until it is
/// resumed, and `runs resume` completes it under its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_run_must_be_resumed_first() {
    use baton_coordinator::planner::{plan_with, NoHistory, PlanVars, Selection};
    use baton_coordinator::store::{
        Op, RunRecord, RunStatus, SledStore, Store, Transition, FORMAT,
    };

    let stop = tokio_util::sync::CancellationToken::new();
    let api = baton_coordinator::demo::DemoApi::start(stop.clone())
        .await
        .unwrap();
    let dir = copy_project(&repo().join("examples/stages"), "interrupted");
    // A run of all stages that died before doing anything, as the store would hold it.
    {
        let loaded = baton_common::spec::load_project(
            &dir.join("stages.yaml"),
            &baton_common::spec::DiskFiles,
            Default::default(),
        );
        let project = loaded.project.unwrap();
        // Planned with the --set value the run below is given (the digest covers it).
        let vars = PlanVars {
            overrides: [("api_base".to_owned(), api.url.clone())].into(),
            ..PlanVars::default()
        };
        let planned = plan_with(&project, &Selection::All, &NoHistory, &vars).unwrap();
        let store = SledStore::open(&dir.join(".baton")).unwrap();
        let id = store.next_id().unwrap();
        let run = RunRecord {
            v: FORMAT,
            id,
            uid: "0123456789abcdef0123456789abcdef".into(),
            project: "stages.yaml".into(),
            direction: "up".into(),
            selection: Selection::All,
            plan_digest: planned.digest.clone(),
            plan: serde_json::Value::Null,
            created_at_ms: 1,
            status: RunStatus::Running,
            finished_at_ms: None,
            down: None,
            by: String::new(),
            release: String::new(),
        };
        let mut t = Transition::new();
        t.push(Op::PutRun(run));
        store.commit(t).unwrap();
    }
    // The store above is closed; sled lets go of its lock shortly after (bounded wait).
    let set = format!("api_base={}", api.url);
    let refused = once_unlocked(
        &dir,
        &["stages", "up", "--stage", "infrastructure", "--set", &set],
    )
    .await;
    assert_eq!(refused.0, 2, "{}", refused.1);
    assert!(
        refused
            .1
            .contains("run 1 (all stages) was interrupted before it finished; resume it first"),
        "{}",
        refused.1
    );
    assert!(api.resources().is_empty());

    let (code, out) = baton(&dir, &["runs", "resume", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("resuming run 1"), "{out}");
    assert!(out.contains("run 1 succeeded"), "{out}");
    assert_eq!(api.resources().len(), 9);
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two state directories (two environments, two CI runners, a reset `.baton`) never send the
/// same `Idempotency-Key`: against a target that honours keys, the second run would otherwise
/// "succeed" while creating nothing and record the first run's resources as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_state_directories_never_share_an_idempotency_key() {
    let target = Target::start().await;
    script_seed001(&target);
    target.honour_idempotency_keys();
    let dir = copy_project(&repo().join("examples/stages"), "two-state-dirs");
    let set = format!("api_base={}", target.url());
    for state in ["state-staging", "state-production"] {
        let (code, out) = baton(&dir, &["stages", "up", "--state-dir", state, "--set", &set]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("run 1 succeeded"), "{out}");
    }
    let counts = target.effect_counts();
    assert_eq!(
        counts.values().sum::<usize>(),
        18,
        "both runs send every mutating request: {counts:?}"
    );
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "keys sent by both runs: {repeated:?}");
}

/// `baton stages up | head -1`: the reader goes away after one line; the run still runs to
/// its end (every request sent, the run recorded as succeeded) and the exit code is its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_never_stops_a_run() {
    use std::io::BufRead;
    let target = Target::start().await;
    script_seed001(&target);
    let dir = copy_project(&repo().join("examples/stages"), "closed-stdout");
    let set = format!("api_base={}", target.url());
    let code = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
                .args(["stages", "up", "--set", &set])
                .current_dir(&dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut first = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            // The reader (and with it the pipe) is gone now, like `head -1` exiting.
            child.wait().unwrap().code()
        })
        .await
        .unwrap()
    };
    assert_eq!(code, Some(0));
    assert_eq!(target.requests().len(), 9, "the run stopped half-way");
    let (_, status) = baton(&dir, &["stages", "status"]).await;
    assert!(!status.contains("interrupted"), "{status}");
    assert_eq!(
        status.matches("0 pending; last run 1: succeeded").count(),
        4,
        "{status}"
    );
}

/// Ctrl-C (SIGINT) or SIGTERM in the middle of a stage: the run always ends `cancelled`, the
/// stage's command is stopped (not orphaned), and
/// `rollback_on_failure` never rolls back a cancelled run. Several rounds, since the race
/// between the cancel and the step's own failure is what is being ruled out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_always_cancels_and_never_rolls_back() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    for round in 0..5 {
        let dir =
            std::env::temp_dir().join(format!("baton-local-sigint-{round}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pidfile = dir.join("sleep.pid");
        let files = [
            ("stages.yaml".to_owned(), "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n  rollback_on_failure: true\n".to_owned()),
            ("s/config.yaml".to_owned(), "migrate_dir: migration\n".to_owned()),
            ("s/migration/001_put.yaml".to_owned(), "up:\n  request:\n    method: PUT\n    url: '{{.api}}/things/1'\ndown:\n  method: DELETE\n  url: '{{.api}}/things/1'\n".to_owned()),
            ("s/migration/002_sleep.yaml".to_owned(), format!("up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo $$ > {}; exec sleep 30\"]\n", pidfile.display())),
        ];
        for (path, content) in &files {
            baton_e2e::files::write(&dir.join(path), content);
        }
        let set = format!("api={}", target.url());
        let (dir2, pid2) = (dir.clone(), pidfile.clone());
        let (code, text) = tokio::task::spawn_blocking(move || {
            let child = Command::new(env!("CARGO_BIN_EXE_baton"))
                .args(["stages", "up", "--set", &set])
                .current_dir(&dir2)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            baton_e2e::cluster::wait_for(
                "the command step",
                std::time::Duration::from_secs(30),
                || std::fs::read_to_string(&pid2).is_ok_and(|s| !s.trim().is_empty()),
            );
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let out = child.wait_with_output().unwrap();
            (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
        .await
        .unwrap();
        assert_eq!(code, Some(1), "round {round}: {text}");
        assert!(text.contains("run 1 cancelled"), "round {round}: {text}");
        assert!(
            !text.contains("rolling back"),
            "round {round}: a cancel was rolled back:\n{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        target.requests().iter().all(|r| r.method != "DELETE"),
        "nothing was rolled back"
    );
}

/// After a crash with a migration in flight, editing the files (here, a comment) starts a
/// new run; the in-flight migration is sent again with the key it was first sent with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_after_a_crash_keeps_the_in_flight_key() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "PUT",
        "/a/1",
        vec![Reply::json(201, json!({"id": "a1"})).delayed(std::time::Duration::from_secs(3))],
    );
    let dir = std::env::temp_dir().join(format!("baton-local-edit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stages = "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n";
    baton_e2e::files::write(&dir.join("stages.yaml"), stages);
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    for v in 1..=2 {
        baton_e2e::files::write(
            &dir.join(format!("s/migration/00{v}_put.yaml")),
            &format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}/a/{v}'\n"),
        );
    }
    let set = format!("api={}", target.url());
    let (d, s, log) = (dir.clone(), set.clone(), target.clone_handle());
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["stages", "up", "--set", &s])
            .current_dir(&d)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        baton_e2e::cluster::wait_for(
            "the first request",
            std::time::Duration::from_secs(30),
            || !log.requests_to("PUT", "/a/1").is_empty(),
        );
        child.kill().unwrap();
        child.wait().unwrap();
    })
    .await
    .unwrap();
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        &format!("# edited after the crash\n{stages}"),
    );
    let result = once_unlocked(&dir, &["stages", "up", "--set", &set]).await;
    let (code, out) = result;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("files changed"), "{out}");
    let first = target.requests_to("PUT", "/a/1");
    assert_eq!(first.len(), 2, "{out}");
    assert_eq!(
        first[0].header("idempotency-key"),
        first[1].header("idempotency-key"),
        "the in-flight migration was re-sent under a new key"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `runs_on` picks agents; local mode has none, and says so instead of ignoring it silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_in_local_mode_gets_a_notice() {
    let dir = std::env::temp_dir().join(format!("baton-local-runs-on-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\n    runs_on: {env: prod}\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_a.yaml"),
        "up:\n  request:\n    method: GET\n    url: http://127.0.0.1:9/a\n",
    );
    let (code, out) = baton(&dir, &["stages", "up", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("notice: s set runs_on; local mode runs every stage on this machine"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `stages down` killed mid-way is not forgotten: `stages up` refuses until it is resumed,
/// `runs resume` finishes it (the in-flight DELETE again with its key, nothing rolled back
/// twice), and the history then matches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_down_is_resumed_not_forgotten() {
    killed_down_is_resumed(false).await;
}

/// An automatic rollback (`rollback_on_failure`) killed half-way is a down run like any
/// other: `stages up` refuses until it is resumed, and `runs resume` finishes it, re-sending
/// the step in flight with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rollback_is_resumed_not_forgotten() {
    killed_down_is_resumed(true).await;
}

/// Two migrations whose second DELETE is slow; a down run (`stages down`, or with
/// `rollback` the automatic rollback of an up run that fails at a third migration) is killed
/// during that DELETE, then resumed.
async fn killed_down_is_resumed(rollback: bool) {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on("POST", "/fail", vec![Reply::json(400, json!({}))]);
    target.on(
        "DELETE",
        "/x/2",
        vec![Reply::json(200, json!({})).delayed(std::time::Duration::from_secs(3))],
    );
    let dir = baton_e2e::files::temp_dir(if rollback {
        "local-rollback-resume"
    } else {
        "local-down-resume"
    });
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        &format!(
            "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n  rollback_on_failure: {rollback}\n"
        ),
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    for v in 1..=2 {
        baton_e2e::files::write(
            &dir.join(format!("s/migration/00{v}_x.yaml")),
            &format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}/x/{v}'\ndown:\n  method: DELETE\n  url: '{{{{.api}}}}/x/{v}'\n"),
        );
    }
    let set = format!("api={}", target.url());
    let (killed, migrations): (&[&str], usize) = if rollback {
        baton_e2e::files::write(
            &dir.join("s/migration/003_fail.yaml"),
            "up:\n  request:\n    method: POST\n    url: '{{.api}}/fail'\n",
        );
        (&["stages", "up", "--set", &set], 3)
    } else {
        let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
        assert_eq!(code, 0, "{out}");
        (&["stages", "down", "--yes", "--set", &set], 2)
    };
    let log = target.clone_handle();
    kill_when(&dir, killed, "the slow DELETE", move || {
        !log.requests_to("DELETE", "/x/2").is_empty()
    })
    .await;

    let refused = once_unlocked(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(refused.0, 2, "{}", refused.1);
    let what = if rollback {
        "(the rollback of a failed run) was interrupted"
    } else {
        "(stages down) was interrupted"
    };
    assert!(refused.1.contains(what), "{}", refused.1);
    assert_eq!(
        target.requests_to("PUT", "/x/1").len(),
        1,
        "nothing re-applied"
    );

    let (code, out) = baton(&dir, &["runs", "resume", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("resuming run 2"), "{out}");
    let second = target.requests_to("DELETE", "/x/2");
    assert_eq!(second.len(), 2, "{out}");
    assert_eq!(
        second[0].header("idempotency-key"),
        second[1].header("idempotency-key")
    );
    assert_eq!(target.requests_to("DELETE", "/x/1").len(), 1, "{out}");
    let (_, status) = baton(&dir, &["stages", "status"]).await;
    assert!(
        status.contains(&format!("s: 0 applied, {migrations} pending")),
        "{status}"
    );
}

/// A secret imported with `env_from_stages` stays secret in the importing stage: its command
/// output, the run's log and `runs show` mask it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_secret_stays_secret() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/db",
        vec![Reply::json(201, json!({"password": "imported-pw-7731"}))],
    );
    let dir = baton_e2e::files::temp_dir("local-imported-secret");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: db\n    config_path: db/config.yaml\n    secrets: [db_password]\n  - name: app\n    config_path: app/config.yaml\n    depends_on: [db]\n    env_from_stages:\n      - stage: db\n        vars: [db_password]\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    baton_e2e::files::write(&dir.join("db/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("db/migration/001_db.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/db'\n  response:\n    env_from:\n      db_password: password\n",
    );
    baton_e2e::files::write(&dir.join("app/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("app/migration/001_use.yaml"),
        "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo connecting with $P\"]\n    env:\n      P: '{{.db_password}}'\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("imported-pw-7731"), "{out}");
    let (_, shown) = baton(&dir, &["runs", "show", "1"]).await;
    assert!(shown.contains("connecting with ***"), "{shown}");
    assert!(!shown.contains("imported-pw-7731"), "{shown}");
}

/// `runs show -o json` works in local mode as against a coordinator (one event per line); a
/// flag a local command cannot honour is refused, never silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runs_show_json_and_refused_flags() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("local-show-json");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = baton(&dir, &["runs", "show", "1", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events[0]["seq"], 0, "{out}");
    assert_eq!(events[0]["kind"]["type"], "run_started", "{out}");
    assert_eq!(
        events.last().unwrap()["kind"]["type"],
        "run_finished",
        "{out}"
    );
    for args in [
        vec!["runs", "logs", "1", "--follow"],
        vec!["runs", "list", "--ca-file", "ca.pem"],
        vec!["runs", "list", "--token-file", "token"],
    ] {
        let (code, out) = baton(&dir, &args).await;
        assert_eq!(code, 2, "{args:?} was not refused: {out}");
    }
}

/// A failed run says why in words and what to do next: a refused connection reads
/// `connection refused` (not "no answer in 0 ms"), the summary carries the stage's error, and
/// the next command to try is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_says_why_and_what_next() {
    let dir = baton_e2e::files::temp_dir("local-failed-why");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n  retry: {max_attempts: 1}\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n",
    );
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    let (code, out) = baton(&dir, &["stages", "up"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PUT http://127.0.0.1:9/x -> connection refused"),
        "{out}"
    );
    assert!(!out.contains("no answer"), "{out}");
    assert!(out.contains("  s  failed: migration 001_x (up)"), "{out}");
    assert!(out.contains("to go on: fix what failed"), "{out}");
    assert!(out.contains("`baton runs show 1`"), "{out}");
}

/// How progress is shown: plain lines in a pipe (command output streamed, prefixed); on a
/// terminal (a real pty, through `script`) the live view, unless NO_COLOR, TERM=dumb, CI or
/// `--progress plain` ask for lines; `--verbose` prints log lines above the live view; a
/// failed run ends the live view with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_modes() {
    let dir = baton_e2e::files::temp_dir("local-progress");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo hello from the step; exit $FAIL\"]\n    env:\n      FAIL: '{{.fail}}'\n",
    );
    let bin = env!("CARGO_BIN_EXE_baton");
    // In a pipe: plain lines, command output included.
    let (code, out) = baton(&dir, &["stages", "up", "--set", "fail=0"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("s                  | hello from the step"),
        "{out}"
    );
    // On a pseudo-terminal.
    let pty = |args: &str, env: &[(&str, &str)]| {
        let _ = std::fs::remove_dir_all(dir.join(".baton"));
        let out = Command::new("script")
            .args(["-qec", &format!("{bin} stages up {args}"), "/dev/null"])
            .current_dir(&dir)
            .env_remove("NO_COLOR")
            .env_remove("CI")
            .env("TERM", "xterm")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let live = pty("--set fail=0", &[]);
    assert!(
        live.contains("1/1 stages"),
        "no live view on a terminal:\n{live}"
    );
    assert!(!live.contains("| hello from the step"), "{live}");
    let verbose = pty("--verbose --set fail=0", &[]);
    assert!(
        verbose.contains("1/1 stages") && verbose.contains("| hello from the step"),
        "{verbose}"
    );
    for (args, env) in [
        ("--set fail=0", vec![("NO_COLOR", "1")]),
        ("--set fail=0", vec![("TERM", "dumb")]),
        ("--set fail=0", vec![("CI", "true")]),
        ("--progress plain --set fail=0", vec![]),
    ] {
        let plain = pty(args, &env);
        assert!(
            !plain.contains("stages  "),
            "{args} {env:?} drew the live view:\n{plain}"
        );
        assert!(
            plain.contains("| hello from the step"),
            "{args} {env:?}:\n{plain}"
        );
    }
    let failed = pty("--set fail=3", &[]);
    assert!(failed.contains("run failed: s failed:"), "{failed}");
}

/// A writer refused because a run holds the state names that run's process and command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_names_the_process_holding_the_state() {
    let dir = baton_e2e::files::temp_dir("local-holder");
    let flag = dir.join("started");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_x.yaml"),
        &format!(
            "up:\n  command:\n    program: sh\n    args: [\"-c\", \"touch {}; sleep 3\"]\n",
            flag.display()
        ),
    );
    let args = [
        "stages",
        "up",
        "--set",
        "secret_token=never-in-the-holder-file",
    ];
    let mut child = start_until(&dir, &args, &flag).await;
    // A writer (a second run) is refused; read-only commands are answered by the run.
    let (code, out) = baton(&dir, &["stages", "up"]).await;
    let pid = child.id();
    let _ = child.wait();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("(pid {pid}: baton stages up, since ")),
        "{out}"
    );
    let raw = baton_e2e::files::all_bytes(&dir.join(".baton"));
    let secret = b"never-in-the-holder-file";
    assert!(!raw.windows(secret.len()).any(|w| w == secret));
}

/// While a run holds the state directory, read-only commands are answered by that run's
/// process (sled lets one process open a store): status (its stages show as running), runs
/// list/show/logs, outputs and a dry run, each as it would print them; revealing secrets is
/// never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_work_while_a_run_holds_the_state() {
    let dir = baton_e2e::files::temp_dir("local-read-only");
    let flag = dir.join("started");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\n",
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_a.yaml"),
        "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo first step\"]\n",
    );
    baton_e2e::files::write(
        &dir.join("s/migration/002_b.yaml"),
        &format!(
            "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo second step; touch {}; sleep 4\"]\n",
            flag.display()
        ),
    );
    let mut child = start_until(&dir, &["stages", "up"], &flag).await;
    let (code, status) = baton(&dir, &["stages", "status"]).await;
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("s: 1 applied, 1 pending; last run 1: running"),
        "{status}"
    );
    let (code, list) = baton(&dir, &["runs", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{list}");
    assert!(list.contains("\"status\": \"running\""), "{list}");
    let (code, shown) = baton(&dir, &["runs", "show", "1"]).await;
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("001_a up done"), "{shown}");
    let (code, logs) = baton(&dir, &["runs", "logs", "1"]).await;
    assert_eq!(code, 0, "{logs}");
    assert!(logs.contains("| second step"), "{logs}");
    let (code, outputs) = baton(&dir, &["stages", "outputs", "-o", "json"]).await;
    assert_eq!(code, 0, "{outputs}");
    let (code, plan) = baton(&dir, &["stages", "up", "--dry-run"]).await;
    assert_eq!(code, 0, "{plan}");
    assert!(plan.contains("1 pending: 002_b"), "{plan}");
    let (code, plan) = baton(
        &dir,
        &["stages", "down", "--dry-run", "--skip-missing-down"],
    )
    .await;
    assert_eq!(code, 0, "{plan}");
    assert!(plan.contains("1 to roll back: 001_a"), "{plan}");
    let (code, out) = baton(&dir, &["stages", "outputs", "--reveal"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("in use by another baton process"), "{out}");
    assert!(child.wait().unwrap().success());
    // The run is over: the socket is gone and commands open the state themselves.
    assert!(!dir.join(".baton/baton.sock").exists());
    let (code, status) = once_unlocked(&dir, &["stages", "status"]).await;
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("s: 2 applied, 0 pending; last run 1: succeeded"),
        "{status}"
    );
}

/// The summary at a run's end lists every stage's outcome from the run's events: succeeded
/// (with its duration), failed (with its error) and not run, in plan order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_lists_how_every_stage_ended() {
    let dir = baton_e2e::files::temp_dir("local-summary");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: ok\n    config_path: ok/config.yaml\n  - name: bad\n    config_path: bad/config.yaml\n    depends_on: [ok]\n  - name: after\n    config_path: after/config.yaml\n    depends_on: [bad]\n",
    );
    for (stage, script) in [
        ("ok", "true"),
        ("bad", "echo no quota >&2; exit 3"),
        ("after", "true"),
    ] {
        baton_e2e::files::write(
            &dir.join(format!("{stage}/config.yaml")),
            "migrate_dir: migration\n",
        );
        baton_e2e::files::write(
            &dir.join(format!("{stage}/migration/001_x.yaml")),
            &format!("up:\n  command:\n    program: sh\n    args: [\"-c\", \"{script}\"]\n"),
        );
    }
    let (code, out) = baton(&dir, &["stages", "up"]).await;
    assert_eq!(code, 1, "{out}");
    let summary = out
        .split("\nrun 1 failed\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary: {out}"));
    let lines: Vec<&str> = summary.lines().take(3).collect();
    assert!(lines[0].starts_with("  ok     succeeded in "), "{out}");
    assert!(lines[1].starts_with("  bad    failed: "), "{out}");
    assert!(lines[1].contains("no quota"), "{out}");
    assert_eq!(lines[2], "  after  not run", "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
