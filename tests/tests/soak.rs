//! The randomized soak: runs of a generated 30-stage DAG on the real coordinator and two real
//! agents while agents and the coordinator are killed (SIGKILL), stopped (SIGTERM) and
//! restarted at random. After every run it asserts: no migration recorded as applied is ever
//! sent again, every run ends succeeded (stages that explicitly needed attention are resolved
//! with `retry`, and counted), and no acknowledged result is lost (every migration recorded
//! exactly once, every stage succeeded exactly once).
//!
//! Bounded and reproducible: `BATON_SOAK_SECS` (default 120) and `BATON_SOAK_SEED` (default:
//! from the clock; printed first). `just soak SECS SEED` runs it; CI runs 2 minutes.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use baton_e2e::cluster::{
    agent_binary, baton_binary, events, fast_coordinator, kind_of, run_status, start_agent,
    start_coordinator, start_coordinator_at, Proc,
};
use baton_e2e::files::write;
use baton_e2e::target::{Reply, Target};

const AGENT: &[&str] = &[
    "--keepalive",
    "1s",
    "--shutdown-grace",
    "2s",
    "--capacity",
    "4",
];
const STAGES: usize = 30;

/// splitmix64: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes run `n`'s project (`stages-N.yaml`): a random DAG of [`STAGES`] stages, 1 or 2 migrations each, most
/// stages `retry_on_lost: safe`. Returns each migration's path by (stage, version).
fn project(dir: &Path, n: usize, rng: &mut Rng) -> BTreeMap<(String, u64), String> {
    let mut yaml = String::from("stages:\n");
    let mut paths = BTreeMap::new();
    for i in 0..STAGES {
        let name = format!("s{i:02}");
        yaml.push_str(&format!(
            "  - name: {name}\n    config_path: {name}/config.yaml\n"
        ));
        let mut deps = BTreeSet::new();
        for _ in 0..rng.below(3) {
            if i > 0 {
                let back = 1 + rng.below(8.min(i as u64));
                deps.insert(format!("s{:02}", i - back as usize));
            }
        }
        if !deps.is_empty() {
            yaml.push_str(&format!(
                "    depends_on: [{}]\n",
                deps.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        let policy = if rng.below(10) < 7 { "safe" } else { "never" };
        yaml.push_str(&format!("    retry_on_lost: {policy}\n"));
        write(
            &dir.join(&name).join("config.yaml"),
            "migrate_dir: migration\n",
        );
        for v in 1..=(1 + rng.below(2)) {
            let path = format!("/r{n}/{name}/{v}");
            write(
                &dir.join(&name)
                    .join("migration")
                    .join(format!("{v:03}_m.yaml")),
                &format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}{path}'\n"),
            );
            paths.insert((name.clone(), v), path);
        }
    }
    yaml.push_str("global:\n  max_concurrent_stages: 6\n  env:\n    api: http://127.0.0.1:9\n");
    // Its own stages file name: the coordinator keys history by it, so runs do not share.
    write(&dir.join(format!("stages-{n}.yaml")), &yaml);
    paths
}

struct Cluster {
    baton: std::path::PathBuf,
    agent: std::path::PathBuf,
    root: std::path::PathBuf,
    listen: String,
    url: String,
    coordinator: Option<Proc>,
    agents: Vec<Option<Proc>>,
}

impl Cluster {
    fn restart_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            a.signal(9);
            let _ = a.wait_exit(Duration::from_secs(10));
        }
        self.agents[i] = Some(start_agent(
            &self.agent,
            &self.url,
            &format!("soak-{i}"),
            &[],
            &self.root,
            AGENT,
        ));
    }

    fn restart_coordinator(&mut self, signal: i32) {
        if let Some(mut c) = self.coordinator.take() {
            c.signal(signal);
            let _ = c.wait_exit(Duration::from_secs(20));
        }
        let (c, _) = start_coordinator_at(
            &self.baton,
            &self.root.join("data"),
            &self.listen,
            &fast_coordinator("4s"),
        );
        self.coordinator = Some(c);
    }
}

fn wall_ms(at: SystemTime) -> u64 {
    u64::try_from(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: `just soak` runs it (CI runs a 2-minute version)"]
async fn soak() {
    let secs: u64 = std::env::var("BATON_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("BATON_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| wall_ms(SystemTime::now()));
    eprintln!(
        "soak: seed {seed}, {secs} s (reproduce: BATON_SOAK_SEED={seed} BATON_SOAK_SECS={secs})"
    );
    let mut rng = Rng(seed);
    let root = baton_e2e::files::temp_dir("soak");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.honour_idempotency_keys();
    // The target's clock against the wall clock, to compare arrivals with recorded events.
    let (t0, w0) = (Instant::now(), wall_ms(SystemTime::now()));
    let baton = baton_binary();
    let agent = agent_binary(&baton);
    let (c, url) = start_coordinator(&baton, &root.join("data"), &fast_coordinator("4s"));
    let mut cl = Cluster {
        listen: url.trim_start_matches("http://").to_owned(),
        url,
        baton,
        agent,
        root: root.clone(),
        coordinator: Some(c),
        agents: vec![None, None],
    };
    cl.restart_agent(0);
    cl.restart_agent(1);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut runs, mut faults, mut attention) = (0usize, 0usize, 0usize);
    while runs == 0 || Instant::now() < end {
        runs += 1;
        let dir = root.join(format!("p{runs}"));
        let paths = project(&dir, runs, &mut rng);
        for p in paths.values() {
            if rng.below(3) == 0 {
                let delay = Duration::from_millis(200 + rng.below(800));
                target.on(
                    "PUT",
                    p,
                    vec![Reply::json(201, serde_json::json!({"id": p})).delayed(delay)],
                );
            }
        }
        let api = format!("api={}", target.url());
        let file = format!("stages-{runs}.yaml");
        // Submit (the coordinator may be restarting: try again).
        let run = {
            let mut tries = 0;
            loop {
                let (code, out) = baton_e2e::cli::run(
                    &cl.baton,
                    &dir,
                    &[
                        "stages",
                        "up",
                        "-c",
                        &file,
                        "--coordinator",
                        &cl.url,
                        "--detach",
                        "--set",
                        &api,
                    ],
                )
                .await;
                if code == 0 {
                    break out
                        .lines()
                        .rev()
                        .find_map(|l| l.trim().parse::<u64>().ok())
                        .unwrap();
                }
                tries += 1;
                assert!(tries < 60, "seed {seed}: cannot submit: {out}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let run_deadline = Instant::now() + Duration::from_secs(240);
        loop {
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
            match rng.below(10) {
                0 | 1 => {
                    let i = usize::try_from(rng.below(2)).unwrap();
                    cl.restart_agent(i);
                    faults += 1;
                }
                2 => {
                    cl.restart_coordinator(9);
                    faults += 1;
                }
                3 => {
                    cl.restart_coordinator(15);
                    faults += 1;
                }
                _ => {}
            }
            let status = tokio::task::spawn_blocking({
                let (b, u) = (cl.baton.clone(), cl.url.clone());
                move || run_status(&b, &u, run)
            })
            .await
            .unwrap();
            match status.as_deref() {
                Some("succeeded") => break,
                Some("running" | "queued") | None => {}
                Some(other) => {
                    let ev = events(&cl.baton, &cl.url, run);
                    panic!(
                        "seed {seed}: run {run} ended {other}:\n{}",
                        ev.iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
            // Stages that explicitly need attention: the target honours keys, so retry.
            let ev = events(&cl.baton, &cl.url, run);
            let mut waiting: BTreeMap<String, bool> = BTreeMap::new();
            for e in &ev {
                let stage = e["stage"].as_str().unwrap_or_default().to_owned();
                match kind_of(e) {
                    "needs_attention" => {
                        waiting.insert(stage, true);
                    }
                    "stage_resolved" | "stage_started" => {
                        waiting.remove(&stage);
                    }
                    _ => {}
                }
            }
            for stage in waiting.keys() {
                let (code, _) = baton_e2e::cli::run(
                    &cl.baton,
                    &dir,
                    &[
                        "runs",
                        "resolve",
                        &run.to_string(),
                        "--stage",
                        stage,
                        "--as",
                        "retry",
                        "--by",
                        "soak",
                        "--coordinator",
                        &cl.url,
                    ],
                )
                .await;
                if code == 0 {
                    attention += 1;
                }
            }
            assert!(
                Instant::now() < run_deadline,
                "seed {seed}: run {run} did not finish in 240 s"
            );
        }
        // After the run: what the target saw against what was recorded.
        let ev = events(&cl.baton, &cl.url, run);
        let log = || {
            ev.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut done: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
        let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
        for e in &ev {
            let stage = e["stage"].as_str().unwrap_or_default().to_owned();
            match kind_of(e) {
                "migration_done" => done
                    .entry((stage, e["kind"]["version"].as_u64().unwrap()))
                    .or_default()
                    .push(e["at_ms"].as_u64().unwrap()),
                "stage_succeeded" => *succeeded.entry(stage).or_default() += 1,
                _ => {}
            }
        }
        assert_eq!(
            succeeded.len(),
            STAGES,
            "seed {seed}: every stage succeeded:\n{}",
            log()
        );
        assert!(
            succeeded.values().all(|n| *n == 1),
            "seed {seed}: a stage succeeded twice:\n{}",
            log()
        );
        let timings = target.timings();
        for (key, path) in &paths {
            let at = done.get(key).unwrap_or_else(|| {
                panic!("seed {seed}: {key:?} was never recorded (lost):\n{}", log())
            });
            assert_eq!(
                at.len(),
                1,
                "seed {seed}: {key:?} recorded {} times:\n{}",
                at.len(),
                log()
            );
            let keys: BTreeSet<String> = target
                .requests_to("PUT", path)
                .iter()
                .map(|r| r.header("idempotency-key").unwrap_or_default().to_owned())
                .collect();
            assert_eq!(keys.len(), 1, "seed {seed}: {path} carried {keys:?}");
            for (p, arrived, _) in &timings {
                if p == path {
                    let ms = w0 + u64::try_from(arrived.duration_since(t0).as_millis()).unwrap();
                    assert!(
                        ms <= at[0] + 2,
                        "seed {seed}: {path} was sent again at {ms}, after it was recorded at {}",
                        at[0]
                    );
                }
            }
        }
        eprintln!("soak: run {runs} (id {run}) ok; {faults} faults so far, {attention} stages resolved after needing attention");
    }
    eprintln!("soak: seed {seed}: {runs} runs, {faults} faults injected, {attention} needs-attention resolved, all checks held");
    drop(cl);
    let _ = std::fs::remove_dir_all(&root);
}
