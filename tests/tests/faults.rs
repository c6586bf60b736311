//! The fault-injection suite: every scenario of the Agents, Coordinator and Network groups of
//! baton's reliability promises (docs/reliability.md, 1 to 15) and scenario 21, each its own
//! test, on the real `baton coordinator serve` and `baton-agent` binaries. Faults are real:
//! SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restarts on the same data directory, and an in-process
//! TCP proxy between agent and coordinator that delays, blackholes, resets or accepts then
//! closes. Every test asserts on the target API's request log (requests per
//! `Idempotency-Key`) and on the run's event log, not only on the final status.
//!
//! Timings are short so the suite is quick: heartbeat 250 ms, lease L 3 s, grace G 1 s (an
//! attempt is lost at 4 s), failover grace F 6 s, keepalive 1 s. No assertion is about how
//! fast something happened, only about what happened; waits have generous bounds.

// Test code: a failed file operation or parse should stop the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_e2e::cluster::{
    agent_binary, attached, baton_binary, events, fast_coordinator, kind_of, run_status,
    start_agent, start_agent_logged, start_coordinator, start_coordinator_at, wait_for, Lines,
    Proc,
};
use baton_e2e::files::write;
use baton_e2e::proxy::{Mode, Proxy};
use baton_e2e::target::{Reply, Target};

/// Coordinator timings for the suite (lease 3 s).
fn coordinator_flags() -> Vec<&'static str> {
    fast_coordinator("3s")
}

/// With a longer lease (6 s), for restarts: the agent must keep its attempt while the
/// coordinator is down and it reconnects with backoff.
fn restart_timings() -> Vec<&'static str> {
    fast_coordinator("6s")
}

/// Agent flags for the suite.
const AGENT: &[&str] = &["--keepalive", "1s", "--shutdown-grace", "2s"];

/// One test's world: a directory, the binaries, a recording target that honours keys.
struct World {
    root: PathBuf,
    baton: PathBuf,
    agent: PathBuf,
    target: Target,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn world(name: &str) -> World {
    let root = baton_e2e::files::temp_dir(&format!("faults-{name}"));
    let baton = baton_binary();
    let agent = agent_binary(&baton);
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.honour_idempotency_keys();
    World {
        root,
        baton,
        agent,
        target,
    }
}

/// One stage of a test project.
struct Stage<'a> {
    name: &'a str,
    deps: &'a [&'a str],
    /// `retry_on_lost` in stages.yaml, if set.
    retry_on_lost: Option<&'a str>,
    /// Paths the stage's migrations PUT, in order.
    paths: Vec<String>,
}

fn stage<'a>(name: &'a str, deps: &'a [&'a str], migrations: usize) -> Stage<'a> {
    Stage {
        name,
        deps,
        retry_on_lost: None,
        paths: (1..=migrations).map(|m| format!("/{name}/{m}")).collect(),
    }
}

impl World {
    fn project(&self) -> PathBuf {
        self.root.join("project")
    }

    /// Writes stages.yaml and every stage's config and migrations.
    fn write_project(&self, stages: &[Stage<'_>]) {
        let dir = self.project();
        let mut yaml = String::from("stages:\n");
        for s in stages {
            yaml.push_str(&format!(
                "  - name: {}\n    config_path: {}/config.yaml\n",
                s.name, s.name
            ));
            if !s.deps.is_empty() {
                yaml.push_str(&format!("    depends_on: [{}]\n", s.deps.join(", ")));
            }
            if let Some(r) = s.retry_on_lost {
                yaml.push_str(&format!("    retry_on_lost: {r}\n"));
            }
            write(
                &dir.join(s.name).join("config.yaml"),
                "migrate_dir: migration\n",
            );
            for (i, p) in s.paths.iter().enumerate() {
                write(
                    &dir.join(s.name).join("migration").join(format!(
                        "{:03}_m{}.yaml",
                        i + 1,
                        i + 1
                    )),
                    &format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}{p}'\n"),
                );
            }
        }
        yaml.push_str("global:\n  env:\n    api: http://127.0.0.1:9\n");
        write(&dir.join("stages.yaml"), &yaml);
    }

    /// Makes `PUT path` answer after `delay`.
    fn slow(&self, path: &str, delay: Duration) {
        self.target.on(
            "PUT",
            path,
            vec![Reply::json(201, serde_json::json!({ "id": path })).delayed(delay)],
        );
    }

    fn coordinator(&self, data: &str) -> (Proc, String) {
        start_coordinator(&self.baton, &self.root.join(data), &coordinator_flags())
    }

    fn agent(&self, url: &str, name: &str, labels: &[&str]) -> Proc {
        start_agent(&self.agent, url, name, labels, &self.root, AGENT)
    }

    fn agent_logged(&self, url: &str, name: &str) -> (Proc, Lines) {
        start_agent_logged(
            &self.agent,
            url,
            name,
            &self.root,
            AGENT,
            "baton_agent=info",
        )
    }

    /// Runs the CLI (off the runtime).
    async fn cli(&self, args: &[&str]) -> (i32, String) {
        let dir = self.project();
        std::fs::create_dir_all(&dir).unwrap();
        baton_e2e::cli::run(&self.baton, &dir, args).await
    }

    /// Submits the project with `--detach`; returns the run id.
    async fn submit(&self, url: &str) -> u64 {
        let api = format!("api={}", self.target.url());
        let (code, out) = self
            .cli(&[
                "stages",
                "up",
                "--coordinator",
                url,
                "--detach",
                "--set",
                &api,
            ])
            .await;
        assert_eq!(code, 0, "{out}");
        out.lines()
            .rev()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no run id in: {out}"))
    }

    /// Waits until `check` holds (off the runtime, so the target keeps serving).
    async fn wait(
        &self,
        what: &str,
        limit: Duration,
        check: impl FnMut() -> bool + Send + 'static,
    ) {
        let what = what.to_owned();
        tokio::task::spawn_blocking(move || wait_for(&what, limit, check))
            .await
            .unwrap();
    }

    /// Waits until a request to `PUT path` reached the target.
    async fn reached(&self, path: &str) {
        let log = self.target.clone_handle();
        let p = path.to_owned();
        self.wait(
            &format!("PUT {path} at the target"),
            Duration::from_secs(60),
            move || !log.requests_to("PUT", &p).is_empty(),
        )
        .await;
    }

    /// Waits until run `run` has `status` on the coordinator at `url`.
    async fn wait_status(&self, url: &str, run: u64, status: &'static str) {
        let (baton, url) = (self.baton.clone(), url.to_owned());
        self.wait(
            &format!("run {run} to be {status}"),
            Duration::from_secs(60),
            move || run_status(&baton, &url, run).as_deref() == Some(status),
        )
        .await;
    }

    /// Waits until the run's log has an event of `kind`.
    async fn wait_event(&self, url: &str, run: u64, kind: &'static str) {
        let (baton, url) = (self.baton.clone(), url.to_owned());
        self.wait(
            &format!("a `{kind}` event in run {run}"),
            Duration::from_secs(60),
            move || events(&baton, &url, run).iter().any(|e| kind_of(e) == kind),
        )
        .await;
    }

    /// Requests per `Idempotency-Key` to `PUT path`.
    fn sent(&self, path: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in self.target.requests_to("PUT", path) {
            *counts
                .entry(r.header("idempotency-key").unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    /// The `User-Agent`s that sent `PUT path`.
    fn senders(&self, path: &str) -> BTreeSet<String> {
        self.target
            .requests_to("PUT", path)
            .iter()
            .filter_map(|r| r.header("user-agent").map(str::to_owned))
            .collect()
    }
}

/// Events of `kind` about `stage`.
fn of<'e>(events: &'e [serde_json::Value], kind: &str, stage: &str) -> Vec<&'e serde_json::Value> {
    events
        .iter()
        .filter(|e| kind_of(e) == kind && e["stage"].as_str() == Some(stage))
        .collect()
}

async fn wait_attached(w: &World, url: &str, agents: &[&str]) {
    let (baton, url) = (w.baton.clone(), url.to_owned());
    let want: BTreeSet<String> = agents.iter().map(|a| (*a).to_owned()).collect();
    w.wait(
        &format!("agents {agents:?} attached"),
        Duration::from_secs(30),
        move || {
            let now: BTreeSet<String> = attached(&baton, &url).into_iter().collect();
            want.is_subset(&now)
        },
    )
    .await;
}

/// Every key was sent at most `max` times, and `path` carried exactly one key.
fn one_key(w: &World, path: &str, max: usize) -> usize {
    let sent = w.sent(path);
    assert_eq!(
        sent.len(),
        1,
        "{path} carried one Idempotency-Key: {sent:?}"
    );
    let n = *sent.values().next().unwrap();
    assert!(n <= max, "{path} was sent {n} times (at most {max})");
    n
}

/// The tokens of the stage's attempts, in order.
fn tokens(events: &[serde_json::Value], stage: &str) -> Vec<u64> {
    of(events, "stage_started", stage)
        .iter()
        .map(|e| e["kind"]["token"].as_u64().unwrap_or(0))
        .collect()
}

fn texts(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Agents

/// 1. Agent killed mid-stage, `retry_on_lost: safe`: the attempt is lost, a new attempt
/// with a larger token goes to the other agent, requests carry the same key, and the
/// migration is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s01_agent_killed_mid_stage_retry_safe() {
    let w = world("s01").await;
    let mut s = stage("s", &[], 2);
    s.retry_on_lost = Some("safe");
    w.write_project(&[s]);
    w.slow("/s/1", Duration::from_secs(2));
    let (_c, url) = w.coordinator("data");
    let a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    let _b = w.agent(&url, "agent-b", &[]);
    a.signal(9);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    let t = tokens(&ev, "s");
    assert_eq!(t.len(), 2, "two attempts: {}", texts(&ev));
    assert!(t[1] > t[0], "the new attempt's token is larger: {t:?}");
    assert_eq!(of(&ev, "attempt_lost", "s").len(), 1, "{}", texts(&ev));
    // Same key both times; the target applied it once.
    assert_eq!(one_key(&w, "/s/1", 2), 2);
    assert_eq!(one_key(&w, "/s/2", 1), 1);
    assert!(w.senders("/s/2").iter().all(|u| u.contains("agent-b")));
    let done: Vec<_> = of(&ev, "migration_done", "s");
    assert_eq!(
        done.len(),
        2,
        "each migration recorded once: {}",
        texts(&ev)
    );
}

/// 2. Same with `retry_on_lost: never` (the default): the stage needs attention, the run
/// waits, nothing is re-sent; `baton runs resolve` decides succeeded, failed or retry, each
/// recorded with who decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s02_agent_killed_mid_stage_needs_attention_then_resolve() {
    let w = world("s02").await;
    w.write_project(&[stage("a", &[], 2), stage("b", &[], 1), stage("c", &[], 1)]);
    for p in ["/a/1", "/b/1", "/c/1"] {
        w.slow(p, Duration::from_secs(2));
    }
    let (_c, url) = w.coordinator("data");
    let a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    for p in ["/a/1", "/b/1", "/c/1"] {
        w.reached(p).await;
    }
    a.signal(9);
    for _ in 0..3 {
        w.wait_event(&url, run, "needs_attention").await;
    }
    let (baton, u) = (w.baton.clone(), url.clone());
    w.wait(
        "three stages needing attention",
        Duration::from_secs(30),
        move || {
            events(&baton, &u, run)
                .iter()
                .filter(|e| kind_of(e) == "needs_attention")
                .count()
                == 3
        },
    )
    .await;
    // The run waits; nothing was sent again, even with an agent back.
    let _b = w.agent(&url, "agent-b", &[]);
    wait_attached(&w, &url, &["agent-b"]).await;
    assert_eq!(run_status(&w.baton, &url, run).as_deref(), Some("running"));
    for p in ["/a/1", "/b/1", "/c/1"] {
        assert_eq!(one_key(&w, p, 1), 1);
    }
    let r = run.to_string();
    let resolve = |stage: &'static str, how: &'static str| {
        [
            "runs",
            "resolve",
            r.as_str(),
            "--stage",
            stage,
            "--as",
            how,
            "--by",
            "oncall@example",
            "--coordinator",
            url.as_str(),
        ]
    };
    for (stage, how) in [("a", "succeeded"), ("b", "failed"), ("c", "retry")] {
        let (code, out) = w.cli(&resolve(stage, how)).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("resolved as {how}")), "{out}");
    }
    // A second decision for the same stage is refused.
    let (code, out) = w.cli(&resolve("a", "retry")).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("does not need attention"), "{out}");
    w.wait_status(&url, run, "failed").await;
    let ev = events(&w.baton, &url, run);
    for (stage, how) in [("a", "succeeded"), ("b", "failed"), ("c", "retry")] {
        let r = of(&ev, "stage_resolved", stage);
        assert_eq!(r.len(), 1, "{}", texts(&ev));
        assert_eq!(r[0]["kind"]["resolution"], how);
        assert_eq!(r[0]["kind"]["by"], "oncall@example");
    }
    // a: its migration in doubt is recorded, the rest stays pending (never sent again);
    // b: not sent again; c: sent again once with the same key.
    assert_eq!(one_key(&w, "/a/1", 1), 1);
    assert!(w.sent("/a/2").is_empty());
    assert_eq!(of(&ev, "stage_succeeded", "a").len(), 1);
    assert_eq!(one_key(&w, "/b/1", 1), 1);
    assert_eq!(of(&ev, "stage_failed", "b").len(), 1);
    assert_eq!(one_key(&w, "/c/1", 2), 2);
    assert_eq!(of(&ev, "stage_succeeded", "c").len(), 1);
}

/// 3. Agent killed after the target answered but before its result was acknowledged: the
/// restarted agent re-sends from its outbox; applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s03_agent_killed_before_its_result_is_acknowledged() {
    let w = world("s03").await;
    w.write_project(&[stage("s", &[], 1)]);
    w.slow("/s/1", Duration::from_millis(500));
    let (_c, url) = w.coordinator("data");
    let proxy = Proxy::start(url.trim_start_matches("http://").parse().unwrap()).await;
    let (mut a, log) = w.agent_logged(&proxy.url(), "agent-a");
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    // Nothing the agent sends from now on reaches the coordinator.
    proxy.set(Mode::Blackhole);
    let l = log.clone();
    w.wait("the result journaled", Duration::from_secs(30), move || {
        l.lock()
            .unwrap()
            .iter()
            .any(|x| x.contains("result journaled"))
    })
    .await;
    a.signal(9);
    let _ = a.wait_exit(Duration::from_secs(10));
    proxy.reset();
    proxy.set(Mode::Pass);
    let _a = w.agent(&proxy.url(), "agent-a", &[]);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(
        one_key(&w, "/s/1", 1),
        1,
        "the answered request is not sent again"
    );
    assert_eq!(of(&ev, "migration_done", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(of(&ev, "stage_succeeded", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(
        tokens(&ev, "s").len(),
        1,
        "no second attempt: {}",
        texts(&ev)
    );
}

/// 4. Agent frozen (SIGSTOP) with its connection open: the coordinator loses the attempt at
/// L + G; on SIGCONT the agent sees its expired lease and sends nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s04_frozen_agent_sends_nothing_new_after_its_lease() {
    let w = world("s04").await;
    w.write_project(&[stage("s", &[], 2)]);
    w.slow("/s/1", Duration::from_secs(1));
    let (_c, url) = w.coordinator("data");
    let a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    a.signal(19); // SIGSTOP
    w.wait_event(&url, run, "needs_attention").await;
    // The coordinator also closed the frozen agent's session.
    let (baton, u) = (w.baton.clone(), url.clone());
    w.wait(
        "the frozen agent's session closed",
        Duration::from_secs(30),
        move || attached(&baton, &u).is_empty(),
    )
    .await;
    a.signal(18); // SIGCONT
                  // Give it time to wake, notice, and (wrongly) carry on if it would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        w.sent("/s/2").is_empty(),
        "nothing new after the lease expired"
    );
    assert_eq!(one_key(&w, "/s/1", 1), 1);
    let ev = events(&w.baton, &url, run);
    assert!(of(&ev, "migration_done", "s").is_empty(), "{}", texts(&ev));
    assert_eq!(run_status(&w.baton, &url, run).as_deref(), Some("running"));
}

/// 5. Agent drained: no new assignments, its running stage finishes, it disconnects cleanly
/// and exits 0, and nothing is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s05_drained_agent_finishes_and_leaves_cleanly() {
    let w = world("s05").await;
    w.write_project(&[stage("first", &[], 1), stage("second", &["first"], 1)]);
    w.slow("/first/1", Duration::from_secs(2));
    let (_c, url) = w.coordinator("data");
    let mut a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/first/1").await;
    let (code, out) = w
        .cli(&["agents", "drain", "agent-a", "--coordinator", &url])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("draining"), "{out}");
    let code = tokio::task::spawn_blocking(move || {
        let code = a.wait_exit(Duration::from_secs(30));
        (code, a)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(code, Some(0), "the drained agent exits cleanly");
    // The dependent stage waits for another agent and runs there.
    let _b = w.agent(&url, "agent-b", &[]);
    w.wait_status(&url, run, "succeeded").await;
    assert!(w.senders("/first/1").iter().all(|u| u.contains("agent-a")));
    assert!(w.senders("/second/1").iter().all(|u| u.contains("agent-b")));
    let ev = events(&w.baton, &url, run);
    assert!(
        ev.iter()
            .all(|e| kind_of(e) != "attempt_lost" && kind_of(e) != "needs_attention"),
        "never lost: {}",
        texts(&ev)
    );
    assert_eq!(one_key(&w, "/first/1", 1), 1);
    assert_eq!(one_key(&w, "/second/1", 1), 1);
}

// ---------------------------------------------------------------------------------------
// Coordinator

/// The port of `http://127.0.0.1:PORT`.
fn listen_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// 6. Coordinator killed with stages running: on restart the run resumes from the store,
/// the agent reattaches and reports what it holds, a stage that finished during the outage
/// is accepted, nothing is re-dispatched and completed stages never rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s06_coordinator_killed_with_stages_running() {
    let w = world("s06").await;
    w.write_project(&[
        stage("done", &[], 1),
        stage("busy", &["done"], 2),
        stage("after", &["busy"], 1),
    ]);
    w.slow("/busy/1", Duration::from_millis(1500));
    let flags = restart_timings();
    let (mut c, url) = start_coordinator(&w.baton, &w.root.join("data"), &flags);
    let _a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/busy/1").await;
    c.signal(9);
    let _ = c.wait_exit(Duration::from_secs(10));
    // The migration finishes while the coordinator is down (its end waits in the outbox).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_c2, url2) =
        start_coordinator_at(&w.baton, &w.root.join("data"), &listen_of(&url), &flags);
    assert_eq!(url2, url);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    for s in ["done", "busy", "after"] {
        assert_eq!(
            tokens(&ev, s).len(),
            1,
            "{s} dispatched once: {}",
            texts(&ev)
        );
        assert_eq!(of(&ev, "stage_succeeded", s).len(), 1, "{}", texts(&ev));
    }
    for p in ["/done/1", "/busy/1", "/busy/2", "/after/1"] {
        assert_eq!(one_key(&w, p, 1), 1, "{p}");
    }
    assert!(texts(&ev).contains("was running when the coordinator stopped"));
}

/// 7. Coordinator killed between its store write and its acknowledgement: the agent sends
/// the result again; the coordinator answers "already applied"; it is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s07_result_recorded_but_not_acknowledged() {
    let w = world("s07").await;
    w.write_project(&[stage("s", &[], 1)]);
    w.slow("/s/1", Duration::from_millis(800));
    let (mut c, url) = w.coordinator("data");
    let proxy = Proxy::start(listen_of(&url).parse().unwrap()).await;
    let (_a, log) = w.agent_logged(&proxy.url(), "agent-a");
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    // Acknowledgements never reach the agent; its messages still reach the coordinator.
    proxy.set(Mode::BlackholeDown);
    w.wait_status(&url, run, "succeeded").await;
    c.signal(9);
    let _ = c.wait_exit(Duration::from_secs(10));
    proxy.reset();
    proxy.set(Mode::Pass);
    let (_c2, _) = start_coordinator_at(
        &w.baton,
        &w.root.join("data"),
        &listen_of(&url),
        &coordinator_flags(),
    );
    let l = log.clone();
    w.wait(
        "the agent told its result was already applied",
        Duration::from_secs(30),
        move || {
            l.lock()
                .unwrap()
                .iter()
                .any(|x| x.contains("had already recorded this result"))
        },
    )
    .await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(of(&ev, "stage_succeeded", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(of(&ev, "migration_done", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(one_key(&w, "/s/1", 1), 1);
}

/// 8. A second coordinator on the same data directory is refused; the first is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s08_second_coordinator_on_the_same_data_dir_is_refused() {
    let w = world("s08").await;
    w.write_project(&[stage("s", &[], 1)]);
    let (_c, url) = w.coordinator("data");
    let data = w.root.join("data");
    let out = Command::new(&w.baton)
        .args([
            "coordinator",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another baton process"), "{err}");
    assert!(
        err.contains(&data.display().to_string()),
        "names the directory: {err}"
    );
    // The first still works.
    let _a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.wait_status(&url, run, "succeeded").await;
    assert_eq!(one_key(&w, "/s/1", 1), 1);
    let ev = events(&w.baton, &url, run);
    assert_eq!(of(&ev, "stage_succeeded", "s").len(), 1);
}

/// A small tmpfs at `dir` (unmounted when dropped), so the disk can be filled for real.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs at {} failed: this scenario needs root (it fills a real disk)",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Writes zeros until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// 9. Disk full during a transition: nothing is acknowledged, dispatch stops, health says
/// degraded; after space is freed and the coordinator restarted, the state is consistent and
/// the run finishes with nothing applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09_disk_full_during_a_transition() {
    let w = world("s09").await;
    w.write_project(&[stage("a", &[], 1), stage("b", &["a"], 1)]);
    w.slow("/a/1", Duration::from_secs(1));
    let disk = SmallDisk::mount(&w.root.join("disk"), "16m");
    let data = w.root.join("disk").join("data");
    let flags = restart_timings();
    let (mut c, url) = start_coordinator(&w.baton, &data, &flags);
    let (_a, log) = w.agent_logged(&url, "agent-a");
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/a/1").await;
    let filler = disk.fill();
    // The migration's end cannot be recorded: the coordinator says so and stops.
    let (baton, u) = (w.baton.clone(), url.clone());
    w.wait(
        "health to say degraded",
        Duration::from_secs(60),
        move || {
            let out = Command::new(&baton)
                .args(["coordinator", "health", "--coordinator", &u])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).starts_with("degraded")
        },
    )
    .await;
    assert!(w.sent("/b/1").is_empty(), "dispatch stopped");
    assert!(
        !log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("result recorded")),
        "nothing was acknowledged"
    );
    // Space again, a restart: the run goes on from what was durable.
    std::fs::remove_file(filler).unwrap();
    let listen = listen_of(&url);
    c.signal(9);
    let _ = c.wait_exit(Duration::from_secs(10));
    let (_c2, _) = start_coordinator_at(&w.baton, &data, &listen, &flags);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(one_key(&w, "/a/1", 1), 1, "{}", texts(&ev));
    assert_eq!(one_key(&w, "/b/1", 1), 1);
    assert_eq!(of(&ev, "migration_done", "a").len(), 1, "{}", texts(&ev));
    assert_eq!(of(&ev, "stage_succeeded", "a").len(), 1, "{}", texts(&ev));
    drop(disk);
}

/// 10. SIGTERM with agent streams open: dispatch stops, state is flushed, the coordinator
/// exits within its deadline; after a restart the run goes on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_sigterm_with_agent_streams_open() {
    let w = world("s10").await;
    w.write_project(&[stage("one", &[], 1), stage("two", &["one"], 1)]);
    w.slow("/one/1", Duration::from_secs(1));
    let flags = restart_timings();
    let (mut c, url) = start_coordinator(&w.baton, &w.root.join("data"), &flags);
    let _a = w.agent(&url, "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/one/1").await;
    c.signal(15);
    let started = Instant::now();
    let code = tokio::task::spawn_blocking(move || (c.wait_exit(Duration::from_secs(20)), c))
        .await
        .unwrap()
        .0;
    assert_eq!(code, Some(0), "clean exit");
    // --shutdown-grace is 3 s; generous bound for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        w.sent("/two/1").is_empty(),
        "nothing dispatched after SIGTERM"
    );
    let (_c2, _) = start_coordinator_at(&w.baton, &w.root.join("data"), &listen_of(&url), &flags);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(tokens(&ev, "one").len(), 1, "{}", texts(&ev));
    assert_eq!(one_key(&w, "/one/1", 1), 1);
    assert_eq!(one_key(&w, "/two/1", 1), 1);
}

// ---------------------------------------------------------------------------------------
// Network

/// 11. A slow link, then a partition shorter than L: no reassignment, the same token, effect
/// count 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11_short_partition_changes_nothing() {
    let w = world("s11").await;
    w.write_project(&[stage("s", &[], 2)]);
    w.slow("/s/1", Duration::from_secs(2));
    let (_c, url) = w.coordinator("data");
    let proxy = Proxy::start(listen_of(&url).parse().unwrap()).await;
    let mut a = w.agent(&proxy.url(), "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    // Every chunk between agent and coordinator 100 ms late for a while...
    proxy.set(Mode::Delay(Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...then nothing gets through for 1.2 s.
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.set(Mode::Pass);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(tokens(&ev, "s").len(), 1, "no reassignment: {}", texts(&ev));
    assert!(of(&ev, "attempt_lost", "s").is_empty(), "{}", texts(&ev));
    assert_eq!(one_key(&w, "/s/1", 1), 1);
    assert_eq!(one_key(&w, "/s/2", 1), 1);
    // The agent, too, stops cleanly on SIGTERM within its grace (2 s).
    a.signal(15);
    let code = tokio::task::spawn_blocking(move || (a.wait_exit(Duration::from_secs(15)), a))
        .await
        .unwrap()
        .0;
    assert_eq!(code, Some(0));
}

/// 12. A partition longer than L + G: the attempt is reassigned; the old agent's late
/// result is rejected as stale and shown; effect count at most 2 with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12_long_partition_reassigns_and_rejects_the_late_result() {
    let w = world("s12").await;
    let mut s = stage("s", &[], 2);
    s.retry_on_lost = Some("safe");
    w.write_project(&[s]);
    w.slow("/s/1", Duration::from_millis(700));
    // The new attempt's second migration takes a while: the old agent's late messages
    // arrive while the run is still live.
    w.slow("/s/2", Duration::from_secs(3));
    let (_c, url) = w.coordinator("data");
    let proxy = Proxy::start(listen_of(&url).parse().unwrap()).await;
    let _a = w.agent(&proxy.url(), "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    proxy.set(Mode::Blackhole);
    // agent-b takes the attempt once agent-a's is lost.
    let _b = w.agent(&url, "agent-b", &[]);
    w.wait_event(&url, run, "attempt_lost").await;
    proxy.set(Mode::Pass);
    w.wait_event(&url, run, "stale_result").await;
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    let t = tokens(&ev, "s");
    assert_eq!(t.len(), 2, "{}", texts(&ev));
    assert!(t[1] > t[0]);
    let stale = of(&ev, "stale_result", "s");
    assert_eq!(
        stale[0]["kind"]["token"].as_u64(),
        Some(t[0]),
        "the old token"
    );
    assert!(one_key(&w, "/s/1", 2) <= 2);
    assert_eq!(one_key(&w, "/s/2", 1), 1);
    assert!(w.senders("/s/2").iter().all(|u| u.contains("agent-b")));
    assert_eq!(of(&ev, "migration_done", "s").len(), 2, "{}", texts(&ev));
}

/// 13. A half-open connection (packets silently dropped) is noticed by keepalive, long
/// before the lease would: the coordinator drops the session; when the link heals the agent
/// reattaches with its attempt, which finishes without a reassignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13_half_open_connection_is_detected() {
    let w = world("s13").await;
    w.write_project(&[stage("s", &[], 2)]);
    w.slow("/s/1", Duration::from_secs(2));
    // A long lease, so only keepalive (1 s ping, 0.5 s timeout) can explain the detection.
    let data = w.root.join("data");
    let flags = fast_coordinator("60s");
    let (_c, url) = start_coordinator(&w.baton, &data, &flags);
    let proxy = Proxy::start(listen_of(&url).parse().unwrap()).await;
    let _a = w.agent(&proxy.url(), "agent-a", &[]);
    wait_attached(&w, &url, &["agent-a"]).await;
    let run = w.submit(&url).await;
    w.reached("/s/1").await;
    proxy.set(Mode::Blackhole);
    let (baton, u) = (w.baton.clone(), url.clone());
    // Within 30 s: keepalive noticed it, not the 61 s lease (which would close it too).
    w.wait(
        "the coordinator to drop the half-open session",
        Duration::from_secs(30),
        move || attached(&baton, &u).is_empty(),
    )
    .await;
    proxy.set(Mode::Pass);
    wait_attached(&w, &url, &["agent-a"]).await;
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(tokens(&ev, "s").len(), 1, "no reassignment: {}", texts(&ev));
    assert_eq!(of(&ev, "migration_done", "s").len(), 2, "{}", texts(&ev));
    assert_eq!(one_key(&w, "/s/1", 1), 1);
    assert_eq!(one_key(&w, "/s/2", 1), 1);
}

/// 14. Coordinator down when agents start: jittered backoff, no hot loop, reconnects spread
/// out; all attach once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_agents_wait_for_a_coordinator_with_jittered_backoff() {
    let w = world("s14").await;
    // Nothing listens behind the proxies yet: each accepts and closes at once.
    let (_c, url) = w.coordinator("data");
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let p = Proxy::start(listen_of(&url).parse().unwrap()).await;
        p.set(Mode::AcceptThenClose);
        agents.push(w.agent_logged(&p.url(), &format!("agent-{i}")));
        proxies.push(p);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut firsts = Vec::new();
    for (p, (_, log)) in proxies.iter().zip(&agents) {
        // Each failed try is logged with the wait the agent drew before the next one.
        let waits: Vec<u64> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("cannot reach the coordinator; retrying"))
            .map(|l| {
                let n = l.split("retry_in_ms=").nth(1).expect("the wait is logged");
                n.split_whitespace().next().unwrap().parse().unwrap()
            })
            .collect();
        // Backoff from 0.5 s doubling: a handful of tries in 5 s, not a hot loop.
        assert!(waits.len() >= 2, "the agent kept trying: {waits:?}");
        assert!(
            waits.len() <= 12,
            "{} tries in 5 s is a hot loop: {waits:?}",
            waits.len()
        );
        for (i, ms) in waits.iter().enumerate() {
            let bound = (500u64 << i.min(6)).min(30_000);
            assert!(
                *ms <= bound,
                "wait {i} is {ms} ms, above its bound {bound} ms"
            );
        }
        // And the agent really tried: the proxy saw connections, and not a hot loop of
        // them. One try may open several connections back to back (connect, then the
        // call's own); connections within 50 ms of each other count as one try.
        let mut tries: Vec<Instant> = Vec::new();
        for at in p.accepted() {
            if tries
                .last()
                .is_none_or(|t| at - *t > Duration::from_millis(50))
            {
                tries.push(at);
            }
        }
        assert!(
            (1..=24).contains(&tries.len()),
            "{} tries seen in 5 s",
            tries.len()
        );
        firsts.push(waits[0]);
    }
    // Full jitter: the first retry comes after a random part of 0.5 s, so the agents'
    // retries do not line up (three draws within 10 ms of each other: ~0.1 %). The waits
    // are read from the agents' logs, not from when connections arrived: a loaded machine
    // delays those by as much as the draws differ.
    let spread = firsts.iter().max().unwrap() - firsts.iter().min().unwrap();
    assert!(spread > 10, "retries line up: {firsts:?} ms");
    for p in &proxies {
        p.set(Mode::Pass);
    }
    wait_attached(&w, &url, &["agent-0", "agent-1", "agent-2"]).await;
    // And they work: a run of three stages succeeds, each migration sent once.
    w.write_project(&[stage("a", &[], 1), stage("b", &[], 1), stage("c", &[], 1)]);
    let run = w.submit(&url).await;
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    for s in ["a", "b", "c"] {
        assert_eq!(of(&ev, "stage_succeeded", s).len(), 1, "{}", texts(&ev));
        assert_eq!(one_key(&w, &format!("/{s}/1"), 1), 1);
    }
}

/// 15. Duplicate and out-of-order result messages: one transition; a result sent again is
/// acknowledged as already applied; an older token is rejected and shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s15_duplicate_and_out_of_order_results() {
    use baton_common::proto::{
        self, agent_message, agent_service_client::AgentServiceClient, coordinator_message,
    };
    use tokio_stream::wrappers::ReceiverStream;

    let w = world("s15").await;
    w.write_project(&[stage("s", &[], 1)]);
    let (_c, url) = w.coordinator("data");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let msg = |k| proto::AgentMessage { kind: Some(k) };
    tx.send(msg(agent_message::Kind::Hello(proto::AgentHello {
        agent_id: "scripted".into(),
        capacity: 1,
        version: "test".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    fn next(want: &'static str) -> impl Fn(&proto::CoordinatorMessage) -> bool {
        move |m| {
            matches!(
                (&m.kind, want),
                (Some(coordinator_message::Kind::Assignment(_)), "assignment")
                    | (Some(coordinator_message::Kind::StepAck(_)), "step_ack")
                    | (Some(coordinator_message::Kind::ResultAck(_)), "result_ack")
                    | (Some(coordinator_message::Kind::Rejected(_)), "rejected")
            )
        }
    }
    async fn expect(
        inbound: &mut tonic::Streaming<proto::CoordinatorMessage>,
        f: impl Fn(&proto::CoordinatorMessage) -> bool,
    ) -> proto::CoordinatorMessage {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), inbound.message())
                .await
                .expect("a message within 20 s")
                .unwrap()
                .unwrap();
            if f(&m) {
                return m;
            }
        }
    }
    let run = w.submit(&url).await;
    let Some(coordinator_message::Kind::Assignment(a)) =
        expect(&mut inbound, next("assignment")).await.kind
    else {
        unreachable!()
    };
    let attempt = a.attempt.unwrap();
    assert!(attempt.fencing_token > 0, "a real fencing token");
    // Keep the lease while the script runs.
    let beats = tx.clone();
    let held = attempt.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            let beat = proto::AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {
                    running: vec![held.clone()],
                })),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let event = |k| {
        msg(agent_message::Kind::StageEvent(proto::StageEvent {
            attempt: Some(attempt.clone()),
            kind: Some(k),
        }))
    };
    let started = proto::stage_event::Kind::MigrationStarted(proto::MigrationStarted {
        version: 1,
        name: "m1".into(),
        direction: "up".into(),
    });
    // The start twice (as after a reconnect): recorded once, acknowledged both times.
    tx.send(event(started.clone())).await.unwrap();
    tx.send(event(started)).await.unwrap();
    expect(&mut inbound, next("step_ack")).await;
    expect(&mut inbound, next("step_ack")).await;
    let finished = proto::stage_event::Kind::MigrationFinished(proto::MigrationFinished {
        migration: Some(proto::AppliedMigration {
            version: 1,
            name: "m1".into(),
            digest: "d".into(),
            variables: Default::default(),
        }),
        direction: "up".into(),
        duration_ms: 1,
    });
    tx.send(event(finished.clone())).await.unwrap();
    tx.send(event(finished)).await.unwrap();
    let result = msg(agent_message::Kind::StageResult(proto::StageResult {
        attempt: Some(attempt.clone()),
        outcome: proto::StageOutcome::Succeeded as i32,
        ..Default::default()
    }));
    tx.send(result.clone()).await.unwrap();
    let Some(coordinator_message::Kind::ResultAck(ack)) =
        expect(&mut inbound, next("result_ack")).await.kind
    else {
        unreachable!()
    };
    assert!(!ack.already_applied);
    // Sent again after it was recorded: acknowledged as already applied.
    tx.send(result).await.unwrap();
    let Some(coordinator_message::Kind::ResultAck(ack)) =
        expect(&mut inbound, next("result_ack")).await.kind
    else {
        unreachable!()
    };
    assert!(ack.already_applied);
    // An older token for the same stage: rejected, shown in the run's log.
    let mut old = attempt.clone();
    old.fencing_token -= 1;
    tx.send(msg(agent_message::Kind::StageResult(proto::StageResult {
        attempt: Some(old),
        outcome: proto::StageOutcome::Failed as i32,
        error: "late".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let Some(coordinator_message::Kind::Rejected(r)) =
        expect(&mut inbound, next("rejected")).await.kind
    else {
        unreachable!()
    };
    assert!(r.reason.contains("token"), "{}", r.reason);
    w.wait_status(&url, run, "succeeded").await;
    let ev = events(&w.baton, &url, run);
    assert_eq!(of(&ev, "migration_started", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(of(&ev, "migration_done", "s").len(), 1, "{}", texts(&ev));
    assert_eq!(of(&ev, "stage_succeeded", "s").len(), 1, "{}", texts(&ev));
    assert!(of(&ev, "stage_failed", "s").is_empty(), "{}", texts(&ev));
    // The scripted agent never called the target.
    assert!(w.target.requests().is_empty());
    heartbeat.abort();
}

// ---------------------------------------------------------------------------------------
// Cancel

/// 21. Cancel with stages in flight: a reachable agent aborts and reports; nothing new
/// starts; an unreachable agent's attempt ends `cancelled (unconfirmed)` at L + G.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s21_cancel_with_stages_in_flight() {
    let w = world("s21").await;
    w.write_project(&[
        stage("near", &[], 1),
        stage("far", &[], 1),
        stage("later", &["near", "far"], 1),
    ]);
    // Only `far` runs on the agent behind the proxy.
    let stages = std::fs::read_to_string(w.project().join("stages.yaml")).unwrap();
    write(
        &w.project().join("stages.yaml"),
        &stages
            .replace(
                "  - name: near\n",
                "  - name: near\n    runs_on: {side: near}\n",
            )
            .replace(
                "  - name: far\n",
                "  - name: far\n    runs_on: {side: far}\n",
            ),
    );
    w.slow("/near/1", Duration::from_secs(20));
    w.slow("/far/1", Duration::from_secs(20));
    let (_c, url) = w.coordinator("data");
    let proxy = Proxy::start(listen_of(&url).parse().unwrap()).await;
    let _n = w.agent(&url, "agent-near", &["side=near"]);
    let _f = w.agent(&proxy.url(), "agent-far", &["side=far"]);
    wait_attached(&w, &url, &["agent-near", "agent-far"]).await;
    let run = w.submit(&url).await;
    w.reached("/near/1").await;
    w.reached("/far/1").await;
    proxy.set(Mode::Blackhole);
    let (code, out) = w
        .cli(&["runs", "cancel", &run.to_string(), "--coordinator", &url])
        .await;
    assert_eq!(code, 0, "{out}");
    w.wait_status(&url, run, "cancelled").await;
    let ev = events(&w.baton, &url, run);
    let near_end = of(&ev, "stage_failed", "near");
    assert_eq!(near_end.len(), 1, "{}", texts(&ev));
    assert_eq!(near_end[0]["kind"]["message"], "cancelled");
    let far_end = of(&ev, "stage_failed", "far");
    assert_eq!(far_end.len(), 1, "{}", texts(&ev));
    assert!(
        far_end[0]["kind"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cancelled (unconfirmed)"),
        "{}",
        texts(&ev)
    );
    assert!(
        of(&ev, "stage_started", "later").is_empty(),
        "nothing new starts"
    );
    assert!(w.sent("/later/1").is_empty());
    assert_eq!(one_key(&w, "/near/1", 1), 1);
    assert_eq!(one_key(&w, "/far/1", 1), 1);
}
