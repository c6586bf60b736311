//! Environments end to end (local mode), on seed 000's pattern as the bundled
//! `examples/environments` writes it: a prerequisite stage and three dependents, dev/test/prod
//! variables files, `#{token}#` parameter files, a production-only stage, and an approval
//! before production. Through the real binary, its real state directory and a recording
//! target: each environment creates its own resources with its own names and keeps its own
//! history; promotion order holds unless overridden (audited); production waits for an
//! approval by someone else and stops on a rejection or a timeout; an approval does not
//! carry over to changed files; the audit log detects an edited entry; no two runs share an
//! idempotency key.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use baton_e2e::schema::{load, violations};
use baton_e2e::target::Target;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_baton"))
}

/// `baton args` in `dir` as `user` (groups: `groups`).
async fn baton_as(dir: &Path, user: &str, groups: &str, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run_with_env(
        bin(),
        dir,
        args,
        &[("BATON_USER", user), ("BATON_GROUPS", groups)],
    )
    .await
}

async fn alice(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_as(dir, "alice", "", args).await
}

/// The bundled example in a fresh directory, its API pointed at `target`; `edit` changes
/// its stages file first.
fn example(name: &str, target: &Target, edit: impl Fn(String) -> String) -> PathBuf {
    let dir = baton_e2e::files::temp_dir(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/environments");
    baton_e2e::files::copy_dir(&src, &dir);
    let stages = dir.join("stages.yaml");
    let text = std::fs::read_to_string(&stages).unwrap();
    let text = text.replace("http://127.0.0.1:8080", &target.url());
    std::fs::write(&stages, edit(text)).unwrap();
    dir
}

/// Paths of the PUTs the target received, in order.
fn puts(target: &Target) -> Vec<String> {
    target
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.path)
        .collect()
}

/// Starts `baton args` as alice in the background (its output in `log`).
fn spawn_alice(dir: &Path, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env_remove("BATON_COORDINATOR")
        .env("BATON_USER", "alice")
        .env("BATON_GROUPS", "")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Waits (bounded) until `log` says the run awaits approval; returns the run's id.
async fn awaiting(log: &Path) -> u64 {
    let log = log.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut run = 0;
        baton_e2e::cluster::wait_for("the run to await approval", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let Some(at) = text.find("`baton runs approve ") else {
                return false;
            };
            let rest = &text[at + "`baton runs approve ".len()..];
            run = rest[..rest.find('`').unwrap()].parse().unwrap();
            true
        });
        run
    })
    .await
    .unwrap()
}

/// Waits (bounded) for `child` to exit; its exit code.
async fn exit_of(mut child: Child) -> i32 {
    tokio::task::spawn_blocking(move || {
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!("the run did not end within a minute");
    })
    .await
    .unwrap()
}

fn no_approval(text: String) -> String {
    let start = text.find("    approval:").unwrap();
    let end = text[start..].find("\nstages:").unwrap() + start;
    format!("{}\n{}", &text[..start], &text[end..])
}

fn assert_keys_unique(target: &Target) {
    let counts = target.effect_counts();
    assert!(!counts.is_empty());
    let shared: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(shared.is_empty(), "idempotency keys sent twice: {shared:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_keep_their_own_resources_and_history_and_promote_in_order() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = example("env-promotion", &target, no_approval);

    // A project with environments needs one named.
    let (code, text) = alice(&dir, &["stages", "up"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("this project has environments (dev, test, prod)"),
        "{text}"
    );
    assert!(puts(&target).is_empty());

    // dev creates dev's resources, names from its variables file and parameter files.
    let (code, text) = alice(&dir, &["stages", "up", "-e", "dev", "--progress", "plain"]).await;
    assert_eq!(code, 0, "{text}");
    let dev = puts(&target);
    assert!(
        dev.iter()
            .any(|p| p.ends_with("/resourcegroups/rg-myComplexApp-prerequisite-dev")),
        "{dev:?}"
    );
    assert!(
        dev.iter()
            .any(|p| p.ends_with("/storageAccounts/stmcastg1devdev001")),
        "{dev:?}"
    );
    assert!(
        dev.iter().all(|p| !p.contains("prd") && !p.contains("tst")),
        "{dev:?}"
    );
    // dependent_stage3 runs only in production (eq(variables['environmentAbbreviation'], 'prd')).
    assert!(dev.iter().all(|p| !p.contains("stage3")), "{dev:?}");
    // The parameter file's tokens were rendered into the body (tags object included).
    let body = target
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("rg-myComplexApp-prerequisite-dev"))
        .unwrap()
        .json();
    assert_eq!(body["tags"]["Environment"], "dev");
    assert_eq!(body["tags"]["Owner"], "devops@company.com");

    // prod's history is its own: everything is still pending there.
    let (code, text) = alice(&dir, &["stages", "status", "-e", "prod", "-o", "json"]).await;
    assert_eq!(code, 0, "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    for s in status["stages"].as_array().unwrap() {
        assert!(s["applied"].as_array().unwrap().is_empty(), "{s}");
    }

    // prod before test succeeded: refused, nothing sent.
    let before = puts(&target).len();
    let (code, text) = alice(&dir, &["stages", "up", "-e", "prod"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("has not succeeded in test"), "{text}");
    assert_eq!(puts(&target).len(), before);

    // With an audited override it runs, with prod's names; stage 3 runs in production.
    let (code, text) = alice(
        &dir,
        &[
            "stages",
            "up",
            "-e",
            "prod",
            "--skip-promotion-check",
            "--reason",
            "hotfix 42",
            "--progress",
            "plain",
        ],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let prod: Vec<String> = puts(&target)[before..].to_vec();
    assert!(
        prod.iter()
            .any(|p| p.ends_with("rg-myComplexApp-prerequisite-prd")),
        "{prod:?}"
    );
    assert!(
        prod.iter()
            .any(|p| p.ends_with("/storageAccounts/stmcastg3prdprd001")),
        "{prod:?}"
    );

    // `promote` runs in test the release dev last ran (these files), with test's names.
    let (code, text) = alice(&dir, &["promote", "--to", "dev"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("`dev` is the first environment"), "{text}");
    let (code, text) = alice(&dir, &["promote", "--to", "test", "--progress", "plain"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("promoting release"), "{text}");
    assert!(
        text.contains("from dev (run 1, by alice) to test"),
        "{text}"
    );
    assert!(puts(&target)
        .iter()
        .any(|p| p.ends_with("rg-myComplexApp-prerequisite-tst")));
    // Each environment's runs, by itself.
    let (code, text) = alice(&dir, &["runs", "list", "-e", "prod", "-o", "json"]).await;
    assert_eq!(code, 0, "{text}");
    let runs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u64> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2]);
    assert_eq!(runs[0]["environment"], "prod");

    // The audit log has every submission and the override with its reason, and is intact.
    let (code, text) = alice(&dir, &["audit", "-o", "json"]).await;
    assert_eq!(code, 0, "{text}");
    let audit: serde_json::Value = serde_json::from_str(&text).unwrap();
    let broken = violations(&load("audit"), &audit);
    assert!(broken.is_empty(), "{broken:?}");
    let entries = audit["entries"].as_array().unwrap();
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["environment"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("submit", "dev"),
            ("submit", "prod"),
            ("override", "prod"),
            ("submit", "test")
        ]
    );
    assert!(entries[2]["reason"].as_str().unwrap().contains("hotfix 42"));
    assert!(entries.iter().all(|e| e["by"] == "alice"));
    let (code, text) = alice(&dir, &["audit", "verify"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("audit log intact: 4 entries"), "{text}");

    // The dashboard shows each environment's release and who ran it.
    let (code, text) = alice(&dir, &["stages", "status", "--all-environments"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.lines().next().unwrap().contains("dev"), "{text}");
    assert!(
        text.contains("1, alice") && text.contains("3, alice"),
        "{text}"
    );
    let (code, text) = alice(
        &dir,
        &["stages", "status", "--all-environments", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let board: serde_json::Value = serde_json::from_str(&text).unwrap();
    let broken = violations(&load("environments"), &board);
    assert!(broken.is_empty(), "{broken:?}");
    let names: Vec<&str> = board["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "test", "prod"]);
    // dev ran first (run 1), prod by override (run 2), test last (run 3).
    assert_eq!(board["environments"][1]["release"]["run"], 3);

    assert_keys_unique(&target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_waits_for_someone_else_to_approve_and_stops_on_rejection() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = example("env-approval", &target, |t| t);
    for env in ["dev", "test"] {
        let (code, text) = alice(&dir, &["stages", "up", "-e", env, "--progress", "plain"]).await;
        assert_eq!(code, 0, "{text}");
    }
    let prod_puts = |t: &Target| puts(t).into_iter().filter(|p| p.contains("prd")).count();

    // Rejected: the stages behind the approval fail and nothing reaches production.
    let log = dir.join("prod-1.log");
    let child = spawn_alice(
        &dir,
        &["stages", "up", "-e", "prod", "--progress", "plain"],
        &log,
    );
    let run = awaiting(&log).await;
    let run_arg = run.to_string();
    // Who may decide is shown; the submitter may not approve, nor someone outside the group.
    let (code, text) = alice(&dir, &["runs", "approve", &run_arg]).await;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("alice submitted this run and may not approve it"),
        "{text}"
    );
    let (code, text) = baton_as(
        &dir,
        "mallory",
        "developers",
        &["runs", "approve", &run_arg],
    )
    .await;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("approvers are group:release-managers"),
        "{text}"
    );
    let (code, text) = baton_as(
        &dir,
        "bob",
        "release-managers",
        &["runs", "reject", &run_arg, "--reason", "change freeze"],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(exit_of(child).await, 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("rejected by bob: change freeze"), "{text}");
    assert_eq!(prod_puts(&target), 0);

    // Approved by someone else: production proceeds.
    let log = dir.join("prod-2.log");
    let child = spawn_alice(
        &dir,
        &["stages", "up", "-e", "prod", "--progress", "plain"],
        &log,
    );
    let run = awaiting(&log).await.to_string();
    let (code, text) = baton_as(
        &dir,
        "bob",
        "release-managers",
        &["runs", "approve", &run, "--comment", "ship it"],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("environment prod approved"), "{text}");
    assert_eq!(
        exit_of(child).await,
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(prod_puts(&target) >= 7, "{:?}", puts(&target));

    // `runs show` keeps who approved, and the audit log has the decisions in order.
    let (code, text) = alice(&dir, &["runs", "show", &run]).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("approved (environment prod) by bob: ship it"),
        "{text}"
    );
    let (_, text) = alice(&dir, &["audit", "-e", "prod", "-o", "json"]).await;
    let audit: serde_json::Value = serde_json::from_str(&text).unwrap();
    let decided: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["by"].as_str().unwrap()))
        .collect();
    assert_eq!(
        decided,
        [
            ("submit", "alice"),
            ("reject", "bob"),
            ("submit", "alice"),
            ("approve", "bob")
        ]
    );
    assert_keys_unique(&target);

    // An edited audit entry is detected (rewritten with a valid record, so only the chain
    // can tell).
    {
        use baton_coordinator::store::{Op, Store, Transition};
        let store = reopen(&dir.join(".baton")).await;
        let mut entries = store.audit().unwrap();
        entries[3].by = "mallory".to_owned();
        let mut t = Transition::new();
        t.push(Op::AppendAudit(entries[3].clone()));
        store.commit(t).unwrap();
    }
    let (code, text) = once_unlocked(&dir, "alice", "", &["audit", "verify"]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("audit entry 3"), "{text}");
    assert!(text.contains("changed after it was written"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_times_out_and_does_not_carry_over_to_changed_files() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = example("env-timeout", &target, |t| {
        t.replace("timeout: 24h", "timeout: 2s")
    });
    for env in ["dev", "test"] {
        let (code, text) = alice(&dir, &["stages", "up", "-e", env, "--progress", "plain"]).await;
        assert_eq!(code, 0, "{text}");
    }
    // Nobody approves: the wait ends in a rejection, nothing reaches production.
    let log = dir.join("prod-timeout.log");
    let child = spawn_alice(
        &dir,
        &["stages", "up", "-e", "prod", "--progress", "plain"],
        &log,
    );
    awaiting(&log).await;
    assert_eq!(exit_of(child).await, 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("REJECTED (environment prod) by baton"),
        "{text}"
    );
    assert!(text.contains("no approval before the timeout"), "{text}");
    assert!(puts(&target).iter().all(|p| !p.contains("prd")));

    // An approval given to a run whose files then change does not let the changed run go.
    std::fs::write(
        dir.join("stages.yaml"),
        std::fs::read_to_string(dir.join("stages.yaml"))
            .unwrap()
            .replace("timeout: 2s", "timeout: 1h"),
    )
    .unwrap();
    // That changed the release: `promote` will not run these files as what dev ran; they go
    // through dev and test first.
    let (code, text) = alice(&dir, &["promote", "--to", "test"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("but these files are release"), "{text}");
    for env in ["dev", "test"] {
        let (code, text) = alice(&dir, &["stages", "up", "-e", env, "--progress", "plain"]).await;
        assert_eq!(code, 0, "{text}");
    }
    let log = dir.join("prod-killed.log");
    let mut child = spawn_alice(
        &dir,
        &["stages", "up", "-e", "prod", "--progress", "plain"],
        &log,
    );
    let run = awaiting(&log).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Resumed, the run asks again (who may decide, how), still the same run.
    let log = dir.join("prod-resumed.log");
    let mut child = spawn_alice(&dir, &["runs", "resume", "-e", "prod"], &log);
    assert_eq!(awaiting(&log).await, run);
    child.kill().unwrap();
    child.wait().unwrap();
    let run_arg = run.to_string();
    let (code, text) = once_unlocked(
        &dir,
        "bob",
        "release-managers",
        &["runs", "approve", &run_arg],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("goes on with `baton runs resume"), "{text}");
    // prod's variables change (part of prod's plan, not of the release).
    let vars = dir.join("vars/vars-production.yml");
    let changed = std::fs::read_to_string(&vars)
        .unwrap()
        .replace("prd001", "prd002");
    std::fs::write(&vars, changed).unwrap();
    let log = dir.join("prod-changed.log");
    let mut child = spawn_alice(
        &dir,
        &["stages", "up", "-e", "prod", "--progress", "plain"],
        &log,
    );
    let new_run = awaiting(&log).await;
    assert_ne!(new_run, run, "the changed files make a new run");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("run {run} was interrupted, but the files changed")),
        "{text}"
    );
    assert!(
        puts(&target).iter().all(|p| !p.contains("prd")),
        "nothing sent without a new approval"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `baton args` as `user` once no other process holds the state (a killed one lets go
/// shortly after; bounded).
async fn once_unlocked(dir: &Path, user: &str, groups: &str, args: &[&str]) -> (i32, String) {
    let mut result = (0, String::new());
    for _ in 0..100 {
        result = baton_as(dir, user, groups, args).await;
        if !result.1.contains("in use by another baton process") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result
}

/// Opens the state directory once the last process let go of it (bounded).
async fn reopen(dir: &Path) -> baton_coordinator::store::SledStore {
    use baton_coordinator::store::{SledStore, StoreError};
    for _ in 0..100 {
        match SledStore::open(dir) {
            Err(StoreError::Locked { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => return other.unwrap(),
        }
    }
    SledStore::open(dir).unwrap()
}

/// A coordinator on `data` (with `extra` flags) and one agent per environment of the
/// example, labelled `subscription=ENV` as its `runs_on` asks; its URL.
fn environment_cluster(
    dir: &Path,
    data: &Path,
    extra: &[&str],
) -> (
    baton_e2e::cluster::Proc,
    String,
    Vec<baton_e2e::cluster::Proc>,
) {
    use baton_e2e::cluster;
    let (coordinator, url) = cluster::start_coordinator(bin(), data, extra);
    let agent_bin = cluster::agent_binary(bin());
    let agents = ["dev", "test", "prod"]
        .iter()
        .map(|env| {
            cluster::start_agent(
                &agent_bin,
                &url,
                &format!("agent-{env}"),
                &[&format!("subscription={env}")],
                &dir.join("agents"),
                &[],
            )
        })
        .collect();
    (coordinator, url, agents)
}

/// Through a coordinator with named operator tokens and one agent per environment
/// (`subscription=dev|test|prod`): each environment's stages run on its own agents, promotion
/// order holds, production waits for an approver with the `approve` role who is not the
/// submitter, and the audit log records who did what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_coordinator_environments_route_to_their_agents_and_need_an_approver() {
    use baton_e2e::cluster;
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = example("env-remote", &target, |t| t);
    let data = dir.join("coordinator-data");
    baton_e2e::files::write(
        &dir.join("operators.yaml"),
        "operators:\n  - name: alice\n    token: alice-0123456789abcdef\n    roles: [submit]\n  - name: bob\n    token: bob-0123456789abcdef\n    roles: [approve]\n    groups: [release-managers]\n  - name: carol\n    token: carol-0123456789abcdef\n    roles: [approve]\n    groups: [developers]\n  - name: root\n    token: root-0123456789abcdef\n    roles: [admin]\n",
    );
    let ops = dir.join("operators.yaml");
    let (_coordinator, url, agents) = environment_cluster(
        &dir,
        &data,
        &["--operator-token-file", ops.to_str().unwrap()],
    );
    let remote = |token: &'static str| -> Vec<String> {
        vec![
            "--coordinator".into(),
            url.clone(),
            "--token".into(),
            token.into(),
        ]
    };
    let run = |args: Vec<String>| {
        let dir = dir.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            baton_e2e::cli::run(bin(), &dir, &args).await
        }
    };
    let with = |base: &[&str], token: &'static str| -> Vec<String> {
        base.iter()
            .map(|s| (*s).to_owned())
            .chain(remote(token))
            .collect()
    };
    let alice_t = "alice-0123456789abcdef";
    let bob_t = "bob-0123456789abcdef";
    let carol_t = "carol-0123456789abcdef";
    let root_t = "root-0123456789abcdef";

    let (code, text) = run(with(
        &["stages", "up", "-e", "dev", "--progress", "plain"],
        alice_t,
    ))
    .await;
    assert_eq!(code, 0, "{text}");
    // prod before test: refused by the coordinator, nothing sent.
    let (code, text) = run(with(&["stages", "up", "-e", "prod"], alice_t)).await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("has not succeeded in test"), "{text}");
    // Skipping the check needs the admin role.
    let (code, text) = run(with(
        &[
            "stages",
            "up",
            "-e",
            "prod",
            "--skip-promotion-check",
            "--reason",
            "x",
        ],
        alice_t,
    ))
    .await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("needs the `admin` role"), "{text}");
    // dev left prod pending on the coordinator too.
    let (code, text) = run(with(
        &["stages", "status", "-e", "prod", "-o", "json"],
        carol_t,
    ))
    .await;
    assert_eq!(code, 0, "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    for s in status["stages"].as_array().unwrap() {
        assert!(s["applied"].as_array().unwrap().is_empty(), "{s}");
    }

    // Submits detached; returns the run once it awaits approval (bounded).
    let awaiting_remote = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let (code, text) = run(args).await;
            assert_eq!(code, 0, "{text}");
            let id: u64 = text
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no run id in {text}"));
            tokio::task::spawn_blocking(move || {
                cluster::wait_for("prod to await approval", Duration::from_secs(60), || {
                    cluster::events_as(bin(), &url, id, Some(alice_t))
                        .iter()
                        .any(|e| cluster::kind_of(e) == "awaiting_approval")
                });
            })
            .await
            .unwrap();
            id
        }
    };
    // An admin overrides the promotion order (audited); prod still waits for its approval,
    // and a release manager rejects it: nothing reaches production.
    let hotfix = awaiting_remote(with(
        &[
            "stages",
            "up",
            "-e",
            "prod",
            "--skip-promotion-check",
            "--reason",
            "hotfix 7",
            "--detach",
        ],
        root_t,
    ))
    .await;
    let (code, text) = run(with(
        &[
            "runs",
            "reject",
            &hotfix.to_string(),
            "--reason",
            "not like this",
        ],
        bob_t,
    ))
    .await;
    assert_eq!(code, 0, "{text}");
    {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            cluster::wait_for("the rejected run to fail", Duration::from_secs(60), || {
                cluster::run_status_as(bin(), &url, hotfix, Some(alice_t)).as_deref()
                    == Some("failed")
            });
        })
        .await
        .unwrap();
    }
    assert!(puts(&target).iter().all(|p| !p.contains("prd")));

    let (code, text) = run(with(
        &["stages", "up", "-e", "test", "--progress", "plain"],
        alice_t,
    ))
    .await;
    assert_eq!(code, 0, "{text}");

    // prod, detached: it waits for an approval.
    let run_id = awaiting_remote(with(&["stages", "up", "-e", "prod", "--detach"], alice_t)).await;
    let id = run_id.to_string();
    // alice may not approve (no approve role); carol is not a release manager.
    let (code, text) = run(with(&["runs", "approve", &id], alice_t)).await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("needs the `approve` role"), "{text}");
    let (code, text) = run(with(&["runs", "approve", &id], carol_t)).await;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("approvers are group:release-managers"),
        "{text}"
    );
    assert!(puts(&target).iter().all(|p| !p.contains("prd")));
    let (code, text) = run(with(&["runs", "approve", &id, "--comment", "go"], bob_t)).await;
    assert_eq!(code, 0, "{text}");
    {
        let (url, id) = (url.clone(), run_id);
        tokio::task::spawn_blocking(move || {
            cluster::wait_for("prod to succeed", Duration::from_secs(60), || {
                cluster::run_status_as(bin(), &url, id, Some(alice_t)).as_deref()
                    == Some("succeeded")
            });
        })
        .await
        .unwrap();
    }

    // Every request went out from the agent of its environment.
    for r in target.requests() {
        let agent = r.header("user-agent").unwrap_or_default().to_owned();
        let env = if r.path.contains("-dev") {
            "dev"
        } else if r.path.contains("-tst") {
            "test"
        } else {
            assert!(r.path.contains("-prd"), "{}", r.path);
            "prod"
        };
        assert!(
            agent.contains(&format!("agent-{env}")),
            "{} from {agent}",
            r.path
        );
    }
    assert_keys_unique(&target);

    // The dashboard, from the coordinator's history.
    let (code, text) = run(with(
        &["stages", "status", "--all-environments", "-o", "json"],
        carol_t,
    ))
    .await;
    assert_eq!(code, 0, "{text}");
    let board: serde_json::Value = serde_json::from_str(&text).unwrap();
    let broken = violations(&load("environments"), &board);
    assert!(broken.is_empty(), "{broken:?}");
    assert_eq!(board["environments"][2]["release"]["run"], run_id);
    assert_eq!(board["environments"][2]["release"]["by"], "alice");
    assert_eq!(
        board["environments"][2]["stages"][3]["applied"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "dependent_stage3 ran in prod: {board}"
    );

    let (code, text) = run(with(&["audit", "-o", "json"], carol_t)).await;
    assert_eq!(code, 0, "{text}");
    let audit: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entries: Vec<(&str, &str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["by"].as_str().unwrap(),
                e["environment"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("submit", "alice", "dev"),
            ("submit", "root", "prod"),
            ("override", "root", "prod"),
            ("reject", "bob", "prod"),
            ("submit", "alice", "test"),
            ("submit", "alice", "prod"),
            ("approve", "bob", "prod"),
        ]
    );
    let (code, text) = run(with(&["audit", "verify"], carol_t)).await;
    assert_eq!(code, 0, "{text}");
    drop(agents);
}

/// A stage's own `approval:` holds that stage only (here in a project without
/// environments): the stage before it runs, the gated one waits for its approver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_its_own_approval_waits_for_it_alone() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("env-stage-gate");
    baton_e2e::files::write(
        &dir.join("stages.yaml"),
        &format!(
            "stages:\n  - name: build\n    config_path: s/config.yaml\n    env: {{what: build}}\n  - name: release\n    config_path: s/config.yaml\n    depends_on: [build]\n    env: {{what: release}}\n    approval:\n      approvers: [bob]\nglobal:\n  env:\n    api: {}\n",
            target.url()
        ),
    );
    baton_e2e::files::write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    baton_e2e::files::write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/{{.what}}'\n",
    );
    let log = dir.join("up.log");
    let child = spawn_alice(&dir, &["stages", "up", "--progress", "plain"], &log);
    let run = awaiting(&log).await.to_string();
    assert_eq!(puts(&target), ["/build"], "only the gated stage waits");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("AWAITING APPROVAL (stage release)"), "{text}");
    assert!(text.contains("[release: 001_x]"), "{text}");
    let (code, text) = baton_as(&dir, "carol", "", &["runs", "approve", &run]).await;
    assert_eq!(code, 2, "{text}");
    let (code, text) = baton_as(&dir, "bob", "", &["runs", "approve", &run]).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(exit_of(child).await, 0);
    assert_eq!(puts(&target), ["/build", "/release"]);
}

/// Through a coordinator: an approval nobody gives times out into a rejection; an approval
/// binds to its run's plan, so a submission with changed files waits for its own; and an
/// edited audit entry is detected after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_coordinator_approvals_time_out_and_bind_to_their_plan() {
    use baton_e2e::cluster;
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = example("env-remote-bind", &target, |t| {
        t.replace("timeout: 24h", "timeout: 10s")
    });
    let data = dir.join("coordinator-data");
    let (mut coordinator, url, agents) = environment_cluster(&dir, &data, &[]);
    // No named tokens: the coordinator records who the CLI says it is (BATON_USER).
    let as_user = |user: &'static str, groups: &'static str, args: Vec<String>| {
        let dir = dir.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            baton_as(&dir, user, groups, &args).await
        }
    };
    let remote = |base: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| (*s).to_owned())
            .chain(["--coordinator".to_owned(), url.clone()])
            .collect()
    };
    for env in ["dev", "test"] {
        let (code, text) = as_user("alice", "", remote(&["stages", "up", "-e", env])).await;
        assert_eq!(code, 0, "{text}");
    }
    let submit = || async {
        let (code, text) = as_user(
            "alice",
            "",
            remote(&["stages", "up", "-e", "prod", "--detach"]),
        )
        .await;
        assert_eq!(code, 0, "{text}");
        text.split_whitespace()
            .find_map(|w| w.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no run id in {text}"))
    };
    let events = |run: u64| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || cluster::events(bin(), &url, run))
                .await
                .unwrap()
        }
    };
    let until = |what: &'static str, run: u64, kind: &'static str| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                cluster::wait_for(what, Duration::from_secs(60), || {
                    cluster::events(bin(), &url, run)
                        .iter()
                        .any(|e| cluster::kind_of(e) == kind)
                });
            })
            .await
            .unwrap();
        }
    };

    // Nobody approves: after 10 s the run is rejected by baton and fails, nothing sent.
    let timed_out = submit().await;
    until("the approval to time out", timed_out, "rejected").await;
    until("the run to finish", timed_out, "run_finished").await;
    let log = events(timed_out).await;
    let rejected = log
        .iter()
        .find(|e| cluster::kind_of(e) == "rejected")
        .unwrap();
    assert_eq!(rejected["kind"]["by"], "baton", "{rejected}");
    assert!(puts(&target).iter().all(|p| !p.contains("prd")));

    // Run A awaits approval; then prod's variables change and B is submitted: it queues.
    let a = submit().await;
    until("A to await approval", a, "awaiting_approval").await;
    let vars = dir.join("vars/vars-production.yml");
    let changed = std::fs::read_to_string(&vars)
        .unwrap()
        .replace("prd001", "prd002");
    std::fs::write(&vars, changed).unwrap();
    let b = submit().await;
    let (code, text) = as_user(
        "bob",
        "release-managers",
        remote(&["runs", "approve", &a.to_string()]),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    // A ran as approved (its own files); B waits for an approval of its own plan.
    until("B to await approval", b, "awaiting_approval").await;
    let digest = |log: &[serde_json::Value]| {
        log.iter()
            .find(|e| cluster::kind_of(e) == "awaiting_approval")
            .map(|e| e["kind"]["digest"].clone())
            .unwrap()
    };
    assert_ne!(digest(&events(a).await), digest(&events(b).await));
    let sent = puts(&target);
    assert!(
        sent.iter().any(|p| p.contains("stmcastg1prdprd001")),
        "{sent:?}"
    );
    assert!(
        sent.iter().all(|p| !p.contains("prd002")),
        "B sent nothing: {sent:?}"
    );
    let (code, text) = as_user(
        "bob",
        "release-managers",
        remote(&["runs", "reject", &b.to_string(), "--reason", "not this one"]),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    until("B to finish", b, "run_finished").await;

    // An audit entry edited while the coordinator is down is detected once it is back.
    let port = url.rsplit(':').next().unwrap().to_owned();
    coordinator.signal(15);
    coordinator.wait_exit(Duration::from_secs(30));
    {
        use baton_coordinator::store::{Op, Store, Transition};
        let store = reopen(&data).await;
        let mut entries = store.audit().unwrap();
        let approve = entries.iter().position(|e| e.action == "approve").unwrap();
        entries[approve].by = "mallory".to_owned();
        let mut t = Transition::new();
        t.push(Op::AppendAudit(entries[approve].clone()));
        store.commit(t).unwrap();
    }
    let (_coordinator, url) =
        cluster::start_coordinator_at(bin(), &data, &format!("127.0.0.1:{port}"), &[]);
    let (code, text) = as_user(
        "carol",
        "",
        vec!["audit".into(), "verify".into(), "--coordinator".into(), url],
    )
    .await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("changed after it was written"), "{text}");
    drop(agents);
}
