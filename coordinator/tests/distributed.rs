//! Distributed mode end to end: the real `baton coordinator serve`, real `baton-agent`
//! processes with different labels on loopback, the real CLI, and a recording target API
//! that logs every request's `User-Agent` and `Idempotency-Key`.

// Helpers here are test code too: a failed file operation should stop the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_coordinator::store::{SledStore, StageKey, Store};
use baton_e2e::cluster::{agent_binary, start_agent, start_coordinator, wait_for, Proc};
use baton_e2e::files::{copy_dir, write};
use baton_e2e::target::{Reply, Target};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn baton_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

/// A fresh temporary directory for one test.
fn temp(name: &str) -> PathBuf {
    baton_e2e::files::temp_dir(&format!("dist-{name}"))
}

/// Runs `baton` in `dir` off the async runtime (the target must keep serving meanwhile).
async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(&baton_bin(), dir, args).await
}

/// Polls (off the runtime) until `check` holds.
async fn wait_until(what: &str, limit: Duration, check: impl FnMut() -> bool + Send + 'static) {
    let what = what.to_owned();
    tokio::task::spawn_blocking(move || wait_for(&what, limit, check))
        .await
        .unwrap();
}

/// The ids of the agents attached to `url` (with `token`, if any).
fn attached(url: &str, token: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(baton_bin());
    cmd.args(["agents", "list", "-o", "json", "--coordinator", url])
        .env_remove("BATON_TOKEN");
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    let out = cmd.output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

async fn wait_attached(url: &str, n: usize, token: Option<&str>) {
    let (url, token) = (url.to_owned(), token.map(str::to_owned));
    wait_until(
        &format!("{n} agent(s) to attach"),
        Duration::from_secs(30),
        move || attached(&url, token.as_deref()).len() >= n,
    )
    .await;
}

/// A coordinator with its data under `root/data` and one agent, `agent-a` (data under
/// `root/agent-a`, no labels), attached: the two processes and the coordinator's URL.
async fn one_agent(root: &Path) -> (Proc, String, Proc) {
    let (coordinator, url) = start_coordinator(&baton_bin(), &root.join("data"), &[]);
    let agent = start_agent(&agent_binary(&baton_bin()), &url, "agent-a", &[], root, &[]);
    wait_attached(&url, 1, None).await;
    (coordinator, url, agent)
}

/// Seed 000's prerequisite and three parallel dependents, each dependent routed by labels;
/// the prerequisite runs on the prod agent, so its variables must cross agents.
fn routed_project(dir: &Path) {
    copy_dir(&repo().join("examples/multi-stage"), dir);
    let stages = std::fs::read_to_string(dir.join("stages.yaml")).unwrap();
    let stages = stages
        .replace(
            "config_path: prerequisite/config.yaml",
            "config_path: prerequisite/config.yaml\n    runs_on: {env: prod}",
        )
        .replace(
            "config_path: dependent1/config.yaml",
            "config_path: dependent1/config.yaml\n    runs_on: {region: westeurope}",
        )
        .replace(
            "config_path: dependent2/config.yaml",
            "config_path: dependent2/config.yaml\n    runs_on: {region: \"{{.secondRegion}}\"}",
        )
        .replace(
            "config_path: dependent3/config.yaml",
            "config_path: dependent3/config.yaml\n    runs_on: {env: prod}",
        )
        .replace(
            "  max_concurrent_stages: 3",
            "    secondRegion: uksouth\n  max_concurrent_stages: 3",
        );
    std::fs::write(dir.join("stages.yaml"), stages).unwrap();
}

/// Which agent (from the `User-Agent`) sent the requests whose path contains `part`.
fn senders(target: &Target, part: &str) -> BTreeSet<String> {
    target
        .requests()
        .iter()
        .filter(|r| r.path.contains(part))
        .map(|r| {
            let ua = r.header("user-agent").unwrap_or_default();
            ua.rsplit('(')
                .next()
                .unwrap_or_default()
                .trim_end_matches(')')
                .to_owned()
        })
        .collect()
}

const STAGES: [&str; 4] = [
    "prerequisite_stage",
    "dependent_stage1",
    "dependent_stage2",
    "dependent_stage3",
];

/// Routing by labels (a templated `runs_on` too), variables across agents, and the same
/// target state and exported variables as local mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_go_to_the_agents_their_labels_select_and_match_local_mode() {
    let root = temp("routing");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let project = root.join("project");
    routed_project(&project);
    let (mut coordinator, url) = start_coordinator(&baton_bin(), &root.join("data"), &[]);
    let agent = agent_binary(&baton_bin());
    let _agents: Vec<Proc> = [
        ("agent-we", "region=westeurope"),
        ("agent-uk", "region=uksouth"),
        ("agent-prod", "env=prod"),
    ]
    .iter()
    .map(|(name, label)| start_agent(&agent, &url, name, &[label], &root, &[]))
    .collect();
    wait_attached(&url, 3, None).await;

    let set = format!("api_base={}", target.url());
    let (code, out) = baton(
        &project,
        &["stages", "up", "--coordinator", &url, "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run 1 succeeded"), "{out}");
    assert!(out.contains("runs on agent agent-we"), "{out}");

    assert_eq!(
        senders(&target, "prerequisite"),
        BTreeSet::from(["agent-prod".to_owned()])
    );
    assert_eq!(
        senders(&target, "stage1"),
        BTreeSet::from(["agent-we".to_owned()])
    );
    assert_eq!(
        senders(&target, "stage2"),
        BTreeSet::from(["agent-uk".to_owned()])
    );
    assert_eq!(
        senders(&target, "stage3"),
        BTreeSet::from(["agent-prod".to_owned()])
    );
    // The prerequisite's id, extracted on agent-prod, reached agent-we's request body.
    let stage1 = target
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("rg-myComplexApp-stage1-dev"))
        .unwrap();
    assert_eq!(
        stage1.json()["tags"]["DependsOn"],
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourcegroups/rg-myComplexApp-prerequisite-dev"
    );

    // The same files in local mode against a second target: the same requests, the same
    // exported variables.
    let local_target = Target::start().await;
    local_target.answer_unscripted_like_a_cloud();
    let local = root.join("local");
    routed_project(&local);
    let local_set = format!("api_base={}", local_target.url());
    let (code, out) = baton(&local, &["stages", "up", "--set", &local_set]).await;
    assert_eq!(code, 0, "{out}");
    let shape = |t: &Target| {
        let mut v: Vec<(String, String, String)> = t
            .requests()
            .into_iter()
            .map(|r| (r.method, r.path, r.body))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shape(&target), shape(&local_target));

    // `stages status` through the coordinator says what local mode's says.
    let (code, remote_status) = baton(
        &project,
        &["stages", "status", "--verbose", "--coordinator", &url],
    )
    .await;
    assert_eq!(code, 0, "{remote_status}");
    let (code, local_status) = baton(&local, &["stages", "status", "--verbose"]).await;
    assert_eq!(code, 0, "{local_status}");
    assert!(
        remote_status.contains("export   resourceGroupId="),
        "{remote_status}"
    );
    assert_eq!(
        remote_status.replace(&target.url(), "API"),
        local_status.replace(&local_target.url(), "API")
    );

    // `stages down` through the coordinator rolls every stage back on its agent.
    let (code, out) = baton(
        &project,
        &[
            "stages",
            "down",
            "--yes",
            "--coordinator",
            &url,
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let deletes = target
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 7, "one DELETE per applied migration:\n{out}");
    assert_eq!(
        senders(&target, "stage2"),
        BTreeSet::from(["agent-uk".to_owned()])
    );
    let (_, after) = baton(&project, &["stages", "status", "--coordinator", &url]).await;
    assert!(
        after.contains("dependent_stage1: 0 applied, 2 pending"),
        "{after}"
    );
    let (code, out) = baton(
        &project,
        &[
            "stages",
            "down",
            "--yes",
            "--coordinator",
            &url,
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to roll back"), "{out}");

    coordinator.signal(15);
    assert_eq!(
        coordinator.wait_exit(Duration::from_secs(20)),
        Some(0),
        "SIGTERM stops the coordinator cleanly"
    );
    // The coordinator's store holds no stage result after the rollback.
    let remote = SledStore::open(&root.join("data")).unwrap();
    for stage in STAGES {
        assert!(remote
            .result(&StageKey::new("stages.yaml", stage))
            .unwrap()
            .is_none());
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A one-stage project whose stage `s` runs `migrations` (file name -> YAML), with
/// `runs_on` when given.
fn one_stage(dir: &Path, file: &str, runs_on: Option<&str>, migrations: &[(&str, &str)]) {
    let runs_on = runs_on.map_or(String::new(), |r| format!("    runs_on: {r}\n"));
    write(
        &dir.join(file),
        &format!("stages:\n  - name: s\n    config_path: s/config.yaml\n{runs_on}global:\n  env:\n    api: http://127.0.0.1:9\n"),
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    for (name, yaml) in migrations {
        write(&dir.join("s/migration").join(name), yaml);
    }
}

fn put(path: &str) -> String {
    format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}{path}'\n")
}

/// `runs list` rows of a coordinator, by run id: status.
fn run_statuses(url: &str) -> BTreeMap<u64, String> {
    let out = Command::new(baton_bin())
        .args(["runs", "list", "-o", "json", "--coordinator", url])
        .env_remove("BATON_TOKEN")
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|r| Some((r["id"].as_u64()?, r["status"].as_str()?.to_owned())))
        .collect()
}

/// Submits with `--detach`; returns the run id.
async fn submit(dir: &Path, url: &str, file: &str, set: &str) -> u64 {
    let (code, out) = baton(
        dir,
        &[
            "stages",
            "up",
            "-c",
            file,
            "--coordinator",
            url,
            "--detach",
            "--set",
            set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    out.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no run id in: {out}"))
}

/// A stage whose `runs_on` no agent matches waits, says why, and starts as soon as a
/// matching agent attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_waits_for_a_matching_agent_and_starts_when_one_attaches() {
    let root = temp("waiting");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let project = root.join("project");
    one_stage(
        &project,
        "stages.yaml",
        Some("{region: norwayeast}"),
        &[("001_thing.yaml", &put("/things/one"))],
    );
    let (_coordinator, url) = start_coordinator(&baton_bin(), &root.join("data"), &[]);
    let agent = agent_binary(&baton_bin());
    let _we = start_agent(&agent, &url, "agent-we", &["region=westeurope"], &root, &[]);
    wait_attached(&url, 1, None).await;
    let set = format!("api={}", target.url());
    let run = submit(&project, &url, "stages.yaml", &set).await;
    let run_s = run.to_string();
    let (u, r) = (url.clone(), run_s.clone());
    wait_until(
        "the run to say why it waits",
        Duration::from_secs(30),
        move || {
            let out = Command::new(baton_bin())
                .args(["runs", "show", &r, "--coordinator", &u])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .contains("waiting for an agent with region=norwayeast")
        },
    )
    .await;
    assert!(
        target.requests().is_empty(),
        "nothing may run before a matching agent attaches"
    );
    assert_eq!(
        run_statuses(&url).get(&run).map(String::as_str),
        Some("running")
    );

    let _no = start_agent(&agent, &url, "agent-no", &["region=norwayeast"], &root, &[]);
    let (code, out) = baton(&project, &["runs", "watch", &run_s, "--coordinator", &url]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run succeeded"), "{out}");
    assert_eq!(
        senders(&target, "/things/"),
        BTreeSet::from(["agent-no".to_owned()])
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `runs watch` shows events while the run is still going, and `--from-seq` starts later in
/// the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_live_and_from_a_sequence_number() {
    let root = temp("watch");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "PUT",
        "/slow/1",
        vec![Reply::json(201, serde_json::json!({"id": "x"})).delayed(Duration::from_secs(3))],
    );
    let project = root.join("project");
    one_stage(
        &project,
        "stages.yaml",
        None,
        &[
            ("001_fast.yaml", &put("/fast/1")),
            ("002_slow.yaml", &put("/slow/1")),
        ],
    );
    let (_coordinator, url, _a) = one_agent(&root).await;
    let run = submit(
        &project,
        &url,
        "stages.yaml",
        &format!("api={}", target.url()),
    )
    .await;

    // A watcher process: each line as it arrives, with whether the run was still running.
    let (u, r) = (url.clone(), run.to_string());
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = Command::new(baton_bin())
            .args(["runs", "watch", &r, "-o", "json", "--coordinator", &u])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut live = None;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            if live.is_none()
                && e["kind"]["type"] == "migration_started"
                && e["kind"]["version"] == 2
            {
                live = Some(run_statuses(&u).get(&run).cloned());
            }
            lines.push(e);
        }
        (child.wait().unwrap().code(), live, lines)
    })
    .await
    .unwrap();
    let (code, live, events) = seen;
    assert_eq!(code, Some(0));
    assert_eq!(
        live,
        Some(Some("running".to_owned())),
        "the slow migration's start was shown while the run ran"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "every event once, in order"
    );

    let from = events
        .iter()
        .find(|e| e["kind"]["type"] == "migration_started" && e["kind"]["version"] == 2)
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let (code, out) = baton(
        &project,
        &[
            "runs",
            "watch",
            &run.to_string(),
            "--from-seq",
            &from.to_string(),
            "-o",
            "json",
            "--coordinator",
            &url,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let later: Vec<u64> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(later, (from..seqs.len() as u64).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&root);
}

/// Whether a process exists.
fn alive(pid: &str) -> bool {
    Command::new("kill")
        .args(["-0", pid])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `runs cancel` stops a stage running on an agent: its long command step is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_in_flight_stages_on_the_agents() {
    let root = temp("cancel");
    let pidfile = root.join("sleep.pid");
    let project = root.join("project");
    let step = format!(
        "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo going to sleep; echo $$ > {}; exec sleep 60\"]\n",
        pidfile.display()
    );
    one_stage(&project, "stages.yaml", None, &[("001_long.yaml", &step)]);
    let (_coordinator, url, _a) = one_agent(&root).await;
    let run = submit(&project, &url, "stages.yaml", "api=http://127.0.0.1:9").await;
    let p = pidfile.clone();
    wait_until(
        "the command step to start",
        Duration::from_secs(30),
        move || std::fs::read_to_string(&p).is_ok_and(|s| !s.trim().is_empty()),
    )
    .await;
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    assert!(alive(&pid));
    // The step's output is in the run's log while it runs.
    let (u, r) = (url.clone(), run.to_string());
    wait_until(
        "the step's output in `runs logs`",
        Duration::from_secs(15),
        move || {
            let out = Command::new(baton_bin())
                .args(["runs", "logs", &r, "--stage", "s", "--coordinator", &u])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("| going to sleep")
        },
    )
    .await;
    let (code, out) = baton(
        &project,
        &["runs", "cancel", &run.to_string(), "--coordinator", &url],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cancel requested"), "{out}");
    let p = pid.clone();
    wait_until(
        "the command step to be killed",
        Duration::from_secs(15),
        move || !alive(&p),
    )
    .await;
    let (code, out) = baton(
        &project,
        &["runs", "watch", &run.to_string(), "--coordinator", &url],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("run cancelled"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A command step runs beside the stage's files, written under the agent's workspace and
/// removed when the attempt ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_beside_its_files_on_the_agent() {
    let root = temp("command-files");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let project = root.join("project");
    let read = r#"up:
  command:
    program: sh
    args: ['-c', 'cat 002_put.yaml > /dev/null && printf ''{"dir": "%s"}'' "$PWD"']
  response:
    env_from:
      dir: dir
"#;
    let put = "up:\n  request:\n    method: PUT\n    url: '{{.api}}/ran{{.dir}}'\n";
    one_stage(
        &project,
        "stages.yaml",
        None,
        &[("001_read.yaml", read), ("002_put.yaml", put)],
    );
    let (_coordinator, url, _a) = one_agent(&root).await;
    let set = format!("api={}", target.url());
    let (code, out) = baton(
        &project,
        &["stages", "up", "--coordinator", &url, "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let paths: Vec<String> = target.requests().into_iter().map(|r| r.path).collect();
    let workspace = root.join("agent-a").join("work");
    assert!(
        paths.len() == 1 && paths[0].starts_with(&format!("/ran{}/", workspace.display())),
        "the command did not run in the agent's workspace: {paths:?}"
    );
    // The attempt's files are removed when it ends.
    let left: Vec<_> = std::fs::read_dir(&workspace)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A second run of the same project waits in a queue until the first ends; it never
/// overlaps or cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_project_is_queued() {
    let root = temp("queue");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "PUT",
        "/q/1",
        vec![Reply::json(201, serde_json::json!({"id": "q"})).delayed(Duration::from_secs(2))],
    );
    let project = root.join("project");
    one_stage(
        &project,
        "stages.yaml",
        None,
        &[("001_q.yaml", &put("/q/1"))],
    );
    let (_coordinator, url) = start_coordinator(&baton_bin(), &root.join("data"), &[]);
    let _a = start_agent(
        &agent_binary(&baton_bin()),
        &url,
        "agent-a",
        &[],
        &root,
        &["--capacity", "4"],
    );
    wait_attached(&url, 1, None).await;
    let set = format!("api={}", target.url());
    let first = submit(&project, &url, "stages.yaml", &set).await;
    let second = submit(&project, &url, "stages.yaml", &set).await;
    assert_ne!(first, second);
    let statuses = run_statuses(&url);
    assert_eq!(
        statuses.get(&second).map(String::as_str),
        Some("queued"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.get(&first).map(String::as_str),
        Some("running"),
        "{statuses:?}"
    );
    for run in [first, second] {
        let (code, out) = baton(
            &project,
            &["runs", "watch", &run.to_string(), "--coordinator", &url],
        )
        .await;
        assert_eq!(code, 0, "{out}");
    }
    // The second run found the migration recorded by the first and sent nothing.
    assert_eq!(target.requests_to("PUT", "/q/1").len(), 1);
    assert_eq!(target.max_in_flight(), 1);
    let _ = std::fs::remove_dir_all(&root);
}

/// With token files, agents and operators must present the right token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_wrong_ones_refused() {
    let root = temp("tokens");
    write(&root.join("agent.token"), "agent-secret-1\n");
    write(&root.join("operator.token"), "operator-secret-2\n");
    let (_coordinator, url) = start_coordinator(
        &baton_bin(),
        &root.join("data"),
        &[
            "--agent-token-file",
            root.join("agent.token").to_str().unwrap(),
            "--operator-token-file",
            root.join("operator.token").to_str().unwrap(),
        ],
    );
    let agent = agent_binary(&baton_bin());
    let mut none = start_agent(&agent, &url, "agent-none", &[], &root, &[]);
    let mut wrong = start_agent(
        &agent,
        &url,
        "agent-wrong",
        &[],
        &root,
        &["--token", "guess"],
    );
    let _right = start_agent(
        &agent,
        &url,
        "agent-right",
        &[],
        &root,
        &["--token-file", root.join("agent.token").to_str().unwrap()],
    );
    let (n, w) = tokio::task::spawn_blocking(move || {
        (
            none.wait_exit(Duration::from_secs(30)),
            wrong.wait_exit(Duration::from_secs(30)),
        )
    })
    .await
    .unwrap();
    assert_eq!(n, Some(1), "an agent without a token stops with an error");
    assert_eq!(
        w,
        Some(1),
        "an agent with a wrong token stops with an error"
    );

    let (code, out) = baton(&root, &["agents", "list", "--coordinator", &url]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("requires an operator token"), "{out}");
    let (code, out) = baton(
        &root,
        &[
            "agents",
            "list",
            "--coordinator",
            &url,
            "--token",
            "operator-secret-x",
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("token is wrong"), "{out}");
    wait_attached(&url, 1, Some("operator-secret-2")).await;
    assert_eq!(
        attached(&url, Some("operator-secret-2")),
        vec!["agent-right".to_owned()]
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The agent is killed with SIGKILL mid-migration and restarted (`retry_on_lost: safe`): no
/// recorded migration is sent again; the one in flight at most once more, with the same
/// `Idempotency-Key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_migration_resumes_without_duplicates() {
    let root = temp("crash");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let (_coordinator, url) = start_coordinator(&baton_bin(), &root.join("data"), &[]);
    let agent = agent_binary(&baton_bin());
    let project = root.join("project");
    // One round per migration the kill lands in; each round its own project (stages file).
    for round in 1..=3u64 {
        let file = format!("stages-{round}.yaml");
        let paths: Vec<String> = (1..=3).map(|v| format!("/r{round}/{v}")).collect();
        let migrations: Vec<(String, String)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("00{}_step.yaml", i + 1), put(p)))
            .collect();
        let refs: Vec<(&str, &str)> = migrations
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        one_stage(&project, &file, None, &refs);
        // The target honours keys: a lost attempt's migration may be sent again.
        let stages = std::fs::read_to_string(project.join(&file)).unwrap();
        write(
            &project.join(&file),
            &stages.replace(
                "    config_path: s/config.yaml\n",
                "    config_path: s/config.yaml\n    retry_on_lost: safe\n",
            ),
        );
        // The migration the kill lands in answers slowly.
        let slow = &paths[usize::try_from(round - 1).unwrap()];
        target.on(
            "PUT",
            slow,
            vec![Reply::json(201, serde_json::json!({"id": slow})).delayed(Duration::from_secs(2))],
        );
        let mut a = start_agent(&agent, &url, "agent-a", &[], &root, &[]);
        wait_attached(&url, 1, None).await;
        let run = submit(&project, &url, &file, &format!("api={}", target.url())).await;
        let t = target.clone_handle();
        let s = slow.clone();
        wait_until(
            "the slow migration to reach the target",
            Duration::from_secs(30),
            move || !t.requests_to("PUT", &s).is_empty(),
        )
        .await;
        a.signal(9);
        let _ = a.wait_exit(Duration::from_secs(10));
        drop(a);
        let _a = start_agent(&agent, &url, "agent-a", &[], &root, &[]);
        let (code, out) = baton(
            &project,
            &["runs", "watch", &run.to_string(), "--coordinator", &url],
        )
        .await;
        assert_eq!(code, 0, "round {round}: {out}");
        assert!(
            out.contains("was lost"),
            "round {round}: the log says the attempt was lost:\n{out}"
        );
        for (i, p) in paths.iter().enumerate() {
            let sent = target.requests_to("PUT", p);
            let keys: BTreeSet<String> = sent
                .iter()
                .map(|r| r.header("idempotency-key").unwrap().to_owned())
                .collect();
            assert_eq!(
                keys.len(),
                1,
                "round {round}: {p} carried one key: {keys:?}"
            );
            let before = i + 1 < usize::try_from(round).unwrap();
            if before {
                assert_eq!(sent.len(), 1, "round {round}: recorded {p} was sent again");
            } else if p == slow {
                assert!(
                    sent.len() <= 2,
                    "round {round}: in-flight {p} sent {} times",
                    sent.len()
                );
            } else {
                assert_eq!(
                    sent.len(),
                    1,
                    "round {round}: {p} sent {} times",
                    sent.len()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// TLS with a private CA: agents and the CLI that trust it get through; a client that does
/// not, or speaks plaintext, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let root = temp("tls");
    let tls = baton_e2e::tls::TlsMaterial::generate();
    write(&root.join("cert.pem"), &tls.server_cert_pem);
    write(&root.join("key.pem"), &tls.server_key_pem);
    write(&root.join("ca.pem"), &tls.ca_pem);
    let (cert, key, ca) = (
        root.join("cert.pem").display().to_string(),
        root.join("key.pem").display().to_string(),
        root.join("ca.pem").display().to_string(),
    );
    let (_coordinator, plain) = start_coordinator(
        &baton_bin(),
        &root.join("data"),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let url = plain.replace("http://127.0.0.1", "https://localhost");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let _a = start_agent(
        &agent_binary(&baton_bin()),
        &url,
        "agent-tls",
        &[],
        &root,
        &["--ca-file", &ca],
    );

    let (u, c) = (url.clone(), ca.clone());
    wait_until(
        "the agent to attach over TLS",
        Duration::from_secs(30),
        move || {
            let out = Command::new(baton_bin())
                .args([
                    "agents",
                    "list",
                    "-o",
                    "json",
                    "--coordinator",
                    &u,
                    "--ca-file",
                    &c,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("agent-tls")
        },
    )
    .await;
    let project = root.join("project");
    one_stage(
        &project,
        "stages.yaml",
        None,
        &[("001_thing.yaml", &put("/tls/1"))],
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(
        &project,
        &[
            "stages",
            "up",
            "--coordinator",
            &url,
            "--ca-file",
            &ca,
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("PUT", "/tls/1").len(), 1);

    // Not trusting the CA, or plaintext to a TLS port: refused.
    let (code, out) = baton(&project, &["agents", "list", "--coordinator", &url]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot reach the coordinator"), "{out}");
    let (code, out) = baton(&project, &["agents", "list", "--coordinator", &plain]).await;
    assert_ne!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Off loopback, plaintext and missing tokens need --insecure; the refusal names what is
/// missing and nothing is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_off_loopback_without_tls_and_tokens_is_refused() {
    let root = temp("insecure");
    let (code, out) = baton(
        &root,
        &[
            "coordinator",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            "data",
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is not a loopback address"), "{out}");
    assert!(out.contains("--insecure"), "{out}");
    assert!(!root.join("data").exists(), "nothing was started");
    let _ = std::fs::remove_dir_all(&root);
}
