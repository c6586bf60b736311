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
use baton_e2e::target::{Reply, Target};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn baton_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

/// A fresh temporary directory for one test.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != ".baton" {
                copy_dir(&entry.path(), &to);
            }
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// Runs `baton` in `dir` off the async runtime (the target must keep serving meanwhile).
async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(baton_bin())
            .args(&args)
            .current_dir(&dir)
            .env_remove("BATON_COORDINATOR")
            .env_remove("BATON_TOKEN")
            .output()
            .expect("baton runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    })
    .await
    .unwrap()
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

/// Every stage's exported variables, from a store (the target's URL stripped).
fn exports(
    store_dir: &Path,
    project: &str,
    stages: &[&str],
    api: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let store = SledStore::open(store_dir).unwrap();
    stages
        .iter()
        .map(|s| {
            let r = store.result(&StageKey::new(project, s)).unwrap().unwrap();
            let vars = r
                .exports
                .into_iter()
                .map(|(k, v)| (k, v.replace(api, "API")))
                .collect();
            ((*s).to_owned(), vars)
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

    coordinator.signal(15);
    assert_eq!(
        coordinator.wait_exit(Duration::from_secs(20)),
        Some(0),
        "SIGTERM stops the coordinator cleanly"
    );
    let remote = exports(&root.join("data"), "stages.yaml", &STAGES, &target.url());
    let here = exports(
        &local.join(".baton"),
        "stages.yaml",
        &STAGES,
        &local_target.url(),
    );
    assert_eq!(remote, here);
    let _ = std::fs::remove_dir_all(&root);
}
