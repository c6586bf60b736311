//! Whole runs, measured against the floor (results in docs/benchmarks.md; nothing here is
//! asserted). The real `baton` binary runs generated projects against the recording target
//! with a latency knob. A bare async fan-out, with no durability, calls the same target for
//! the same DAG in the same run: that is the floor. Every measurement is taken at the target
//! (when a request arrived, when it was answered), so both sides are measured the same way.
//!
//! Workloads (each stage's calls are migrations of one POST each, run in order):
//! - `chain`: 4 stages in a chain, 5 calls each, `max_concurrent_stages: 1`;
//! - `fan`: 1 prerequisite and 50 dependents, 5 calls each, cap 8;
//! - `dag`: 500 stages in 20 layers of 25 (each depends on up to three of the layer before),
//!   1 call each, cap 16.
//!
//! Modes: `floor` (a child process of this bench running the fan-out), `durable` (the same
//! with one sled flush before each call: persist-then-act and nothing else), `local` (`baton stages
//! up`), `distributed` (`baton coordinator serve`, two `baton-agent`s, then `baton stages up
//! --coordinator`). Latencies: 0 and 20 ms.
//!
//! Reported per workload, mode and latency:
//! - span ÷ bound: first request's arrival to last answer, over the critical-path bound
//!   `max(longest chain in calls, ceil(stages ÷ cap) × calls) × latency` (20 ms only);
//! - gap p50/p99: a stage's first request minus the latest last answer of its dependencies;
//! - stages/s: stages ÷ span;
//! - CPU/stage: user + system time of the processes of the mode, ÷ stages;
//! - launch → first request: from starting the command to the target's first request;
//! - peak RSS: the largest resident set among the mode's processes.
//!
//! Run: `just bench-runs` (= `cargo bench -p baton-coordinator --bench runs`).
//! `BENCH_RUNS=chain,fan` picks workloads, `BENCH_MODES=floor,local` modes,
//! `BENCH_LATENCIES=0` latencies. CI runs `BENCH_RUNS=chain BENCH_LATENCIES=0` once.
//! `BENCH_WRAP="perf record -g -o /tmp/baton.perf --"` runs local mode's `baton` under a
//! profiler. `BENCH_DUMP=FILE` writes every request's path, arrival and answer (ms after the
//! first arrival) of the last run measured, to see where a run's slots stood idle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_e2e::target::Target;
use support::{percentile, temp};

mod support;

/// A generated project: `deps[i]` are stage `i`'s dependencies.
#[derive(Clone)]
struct Workload {
    name: &'static str,
    deps: Vec<Vec<usize>>,
    calls: usize,
    cap: usize,
}

impl Workload {
    fn chain() -> Workload {
        Workload {
            name: "chain",
            deps: (0..4)
                .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
                .collect(),
            calls: 5,
            cap: 1,
        }
    }

    fn fan() -> Workload {
        Workload {
            name: "fan",
            deps: (0..51)
                .map(|i| if i == 0 { vec![] } else { vec![0] })
                .collect(),
            calls: 5,
            cap: 8,
        }
    }

    fn dag() -> Workload {
        let n = 500;
        let mut deps = vec![Vec::new(); n];
        for (s, d) in baton_coordinator::synthetic::layered_edges(n, 25) {
            if !deps[s].contains(&d) {
                deps[s].push(d);
            }
        }
        Workload {
            name: "dag",
            deps,
            calls: 1,
            cap: 16,
        }
    }

    fn stages(&self) -> usize {
        self.deps.len()
    }

    /// The critical-path bound in units of one call's latency: no schedule with this cap
    /// finishes sooner. The longest chain; all stages over the cap; and, for each stage, the
    /// chain up to it followed by everything that depends on it (directly or not) over the
    /// cap (1 prerequisite and 50 dependents at cap 8: 1 + 7 stage lengths, not 7).
    fn bound_calls(&self) -> usize {
        let n = self.stages();
        let mut depth = vec![0usize; n];
        for i in 0..n {
            depth[i] = self.deps[i].iter().map(|d| depth[*d]).max().unwrap_or(0) + 1;
        }
        // Dependencies come before their dependents (deps[i] < i): one pass from the end.
        let mut below: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        for i in (0..n).rev() {
            let mine = below[i].clone();
            for &d in &self.deps[i] {
                below[d].insert(i);
                below[d].extend(mine.iter().copied());
            }
        }
        let longest = depth.iter().copied().max().unwrap_or(0);
        let then_dependents = (0..n)
            .map(|i| depth[i] + below[i].len().div_ceil(self.cap))
            .max()
            .unwrap_or(0);
        longest.max(n.div_ceil(self.cap)).max(then_dependents) * self.calls
    }

    /// Writes the project under `dir`.
    fn write(&self, dir: &Path) {
        let mut stages = format!(
            "apiVersion: baton/v1\nkind: StageOrchestration\nglobal:\n  max_concurrent_stages: {}\n  env:\n    api: http://127.0.0.1:9\nstages:\n",
            self.cap
        );
        for (i, d) in self.deps.iter().enumerate() {
            stages.push_str(&format!(
                "  - name: s{i}\n    config_path: s{i}/config.yaml\n"
            ));
            if !d.is_empty() {
                let list: Vec<String> = d.iter().map(|j| format!("s{j}")).collect();
                stages.push_str(&format!("    depends_on: [{}]\n", list.join(", ")));
                stages.push_str(&format!(
                    "    env_from_stages:\n      - stage: s{}\n        vars: [out]\n",
                    d[0]
                ));
            }
            baton_e2e::files::write(
                &dir.join(format!("s{i}/config.yaml")),
                "migrate_dir: migration\n",
            );
            for c in 1..=self.calls {
                baton_e2e::files::write(
                    &dir.join(format!("s{i}/migration/{c:03}_call.yaml")),
                    &format!("up:\n  request:\n    method: POST\n    url: '{{{{.api}}}}/s{i}/c{c}'\n  response:\n    env_from:\n      out: id\n"),
                );
            }
        }
        baton_e2e::files::write(&dir.join("stages.yaml"), &stages);
    }
}

/// What one run measured.
struct Measured {
    span: Duration,
    gaps: Vec<Duration>,
    first_request: Duration,
    cpu: Duration,
    peak_rss_kib: i64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time (user + system) of the waited-for children so far.
fn children() -> Duration {
    support::usage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).0
}

/// Span and dependency gaps from the target's timings (paths `/s{i}/c{k}`).
fn from_target(
    w: &Workload,
    target: &Target,
    launched: Instant,
) -> (Duration, Vec<Duration>, Duration) {
    let timings = target.timings();
    let mut first: Vec<Option<Instant>> = vec![None; w.stages()];
    let mut last: Vec<Option<Instant>> = vec![None; w.stages()];
    for (path, arrived, answered) in &timings {
        let Some(i) = path
            .strip_prefix("/s")
            .and_then(|r| r.split('/').next())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        first[i] = Some(first[i].map_or(*arrived, |f| f.min(*arrived)));
        last[i] = Some(last[i].map_or(*answered, |l| l.max(*answered)));
    }
    let start = timings
        .iter()
        .map(|t| t.1)
        .min()
        .expect("requests were made");
    let end = timings
        .iter()
        .map(|t| t.2)
        .max()
        .expect("requests were made");
    // `BENCH_DUMP=FILE`: every request's path, arrival and answer (ms from the first).
    if let Ok(file) = std::env::var("BENCH_DUMP") {
        let mut out = String::new();
        for (path, arrived, answered) in &timings {
            out.push_str(&format!(
                "{path} {:.3} {:.3}\n",
                ms(arrived.saturating_duration_since(start)),
                ms(answered.saturating_duration_since(start))
            ));
        }
        let _ = std::fs::write(file, out);
    }
    let mut gaps: Vec<Duration> = (0..w.stages())
        .filter_map(|i| {
            let ready = w.deps[i].iter().filter_map(|d| last[*d]).max()?;
            Some(first[i]?.saturating_duration_since(ready))
        })
        .collect();
    gaps.sort();
    (end - start, gaps, start.saturating_duration_since(launched))
}

fn baton() -> PathBuf {
    baton_e2e::cluster::baton_binary()
}

/// The peak resident set of process `pid` so far (`VmHWM`), in KiB; 0 once it is gone.
fn peak_kib(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `cmd` to its end (bounded: 10 minutes); its peak resident set in KiB, as last seen.
fn finish(mut cmd: Command, what: &str) -> i64 {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        peak = peak.max(peak_kib(child.id()));
        if let Some(status) = child.try_wait().expect("wait") {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{what} failed: {status}\n{err}");
            }
            return peak;
        }
        assert!(Instant::now() < deadline, "{what} took over 10 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn measure(w: &Workload, mode: &str, latency: Duration, rt: &tokio::runtime::Runtime) -> Measured {
    let target = rt.block_on(Target::start());
    target.answer_unscripted_like_a_cloud();
    target.set_cloud_latency(latency);
    let dir = temp(&format!("runs-{}-{mode}-{}", w.name, latency.as_millis()));
    w.write(&dir);
    // Written files and the previous run's removed state go to disk now, not during the run:
    // on a file system mounted with `discard`, the first fsync after a large removal waits
    // for the journal to commit it and trim the freed blocks (100 ms and more here), which
    // would be charged to whichever mode runs next.
    let _ = Command::new("sync").status();
    let api = format!("api={}", target.url());
    let mut cpu0 = children();
    let launched;
    let peak;
    match mode {
        "floor" | "durable" => {
            let mut cmd = Command::new(std::env::current_exe().expect("this bench"));
            cmd.args(["--floor", w.name, &target.url()]);
            if mode == "durable" {
                cmd.arg(dir.join("state"));
            }
            launched = Instant::now();
            peak = finish(cmd, "the floor");
        }
        "local" => {
            // `BENCH_WRAP="perf record -g -o /tmp/baton.perf --"`: run `baton` under a
            // profiler (its CPU then counts in CPU/stage).
            let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
            let mut words = wrap.split_whitespace();
            let mut cmd = match words.next() {
                Some(first) => {
                    let mut c = Command::new(first);
                    c.args(words).arg(baton());
                    c
                }
                None => Command::new(baton()),
            };
            cmd.args(["stages", "up", "--progress", "plain", "--set", &api])
                .arg("--config")
                .arg(dir.join("stages.yaml"))
                .env_remove("BATON_COORDINATOR");
            launched = Instant::now();
            peak = finish(cmd, "baton stages up");
        }
        _ => {
            let data = dir.join("coordinator");
            let (mut coordinator, url) =
                baton_e2e::cluster::start_coordinator(&baton(), &data, &[]);
            let agent_bin = baton_e2e::cluster::agent_binary(&baton());
            let agents: Vec<_> = (1..=2)
                .map(|n| {
                    baton_e2e::cluster::start_agent(
                        &agent_bin,
                        &url,
                        &format!("bench-{n}"),
                        &[],
                        &dir.join("agents"),
                        &["--capacity", "16"],
                    )
                })
                .collect();
            let b = baton();
            baton_e2e::cluster::wait_for("both agents", Duration::from_secs(30), || {
                baton_e2e::cluster::attached(&b, &url).len() == 2
            });
            // Not the CLI calls that waited for the agents; the coordinator's and the agents'
            // whole lives are counted when they are reaped below.
            cpu0 = children();
            let mut cmd = Command::new(baton());
            cmd.args(["stages", "up", "--progress", "plain", "--set", &api])
                .arg("--config")
                .arg(dir.join("stages.yaml"))
                .args(["--coordinator", &url]);
            launched = Instant::now();
            let cli = finish(cmd, "baton stages up --coordinator");
            // The largest process of the mode (the CLI, the coordinator or an agent).
            peak = agents
                .iter()
                .map(|a| peak_kib(a.pid()))
                .chain([peak_kib(coordinator.pid()), cli])
                .max()
                .unwrap_or(0);
            drop(agents);
            coordinator.signal(15);
            coordinator.wait_exit(Duration::from_secs(30));
        }
    }
    let cpu1 = children();
    let (span, gaps, first_request) = from_target(w, &target, launched);
    let _ = std::fs::remove_dir_all(&dir);
    Measured {
        span,
        gaps,
        first_request,
        cpu: cpu1.saturating_sub(cpu0),
        peak_rss_kib: peak,
    }
}

/// The floor: the same DAG as plain async tasks sharing one HTTP client, no durability.
///
/// With `state`, the durable floor: the least a persist-then-act orchestrator on sled must
/// do. Each call's start is written to a sled database (configured as baton's store) and
/// flushed before the call is sent, and its answer is written after it without a flush of
/// its own (the next start's flush covers it: sled's log is recovered as a prefix). Tasks
/// flush on their own, concurrently, as sled allows; nothing else is recorded.
fn floor(name: &str, url: &str, state: Option<&str>) {
    let w = match name {
        "chain" => Workload::chain(),
        "fan" => Workload::fan(),
        _ => Workload::dag(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = state.map(|dir| {
        baton_coordinator::store::SledStore::sled_config(Path::new(dir))
            .open()
            .expect("the durable floor's state opens")
    });
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(w.cap));
        let done: Vec<_> = (0..w.stages())
            .map(|_| tokio::sync::watch::channel(false))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..w.stages() {
            let waits: Vec<_> = w.deps[i].iter().map(|d| done[*d].1.clone()).collect();
            let finished = done[i].0.clone();
            let (client, slots, url, calls, db) = (
                client.clone(),
                slots.clone(),
                url.to_owned(),
                w.calls,
                db.clone(),
            );
            tasks.spawn(async move {
                for mut rx in waits {
                    while !*rx.borrow_and_update() {
                        rx.changed().await.expect("dependency");
                    }
                }
                let _slot = slots.acquire().await.expect("slot");
                for c in 1..=calls {
                    if let Some(db) = &db {
                        db.insert(format!("s{i}/c{c}/start"), &b"started"[..])
                            .expect("written");
                        let db = db.clone();
                        tokio::task::spawn_blocking(move || db.flush())
                            .await
                            .expect("flush task")
                            .expect("flushed");
                    }
                    let r = client
                        .post(format!("{url}/s{i}/c{c}"))
                        .send()
                        .await
                        .expect("the target answers");
                    let body = r.bytes().await.unwrap_or_default();
                    if let Some(db) = &db {
                        db.insert(format!("s{i}/c{c}/end"), body.as_ref())
                            .expect("written");
                    }
                }
                let _ = finished.send(true);
            });
        }
        while tasks.join_next().await.is_some() {}
    });
}

fn list(var: &str, default: &[&str]) -> Vec<String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--floor") {
        floor(
            &args[i + 1],
            &args[i + 2],
            args.get(i + 3).map(String::as_str),
        );
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is taken. The binaries are built before
    // anything is measured (a build is a child process too).
    let _ = baton_e2e::cluster::agent_binary(&baton());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let workloads = list("BENCH_RUNS", &["chain", "fan", "dag"]);
    let modes = list("BENCH_MODES", &["floor", "durable", "local", "distributed"]);
    let latencies = list("BENCH_LATENCIES", &["0", "20"]);
    println!(
        "| workload | latency | mode | span | span ÷ bound | gap p50 / p99 | stages/s | CPU/stage | launch → first request | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut summary: BTreeMap<String, f64> = BTreeMap::new();
    for name in &workloads {
        let w = match name.as_str() {
            "chain" => Workload::chain(),
            "fan" => Workload::fan(),
            _ => Workload::dag(),
        };
        for l in &latencies {
            let latency = Duration::from_millis(l.parse().expect("a latency in ms"));
            for mode in &modes {
                let m = measure(&w, mode, latency, &rt);
                let bound = latency * u32::try_from(w.bound_calls()).unwrap_or(u32::MAX);
                let ratio = if bound.is_zero() {
                    "-".to_owned()
                } else {
                    let r = m.span.as_secs_f64() / bound.as_secs_f64();
                    summary.insert(format!("{} {mode}", w.name), r);
                    format!("{r:.2}×")
                };
                println!(
                    "| {} | {} ms | {mode} | {:.3} s | {ratio} | {:.2} / {:.2} ms | {:.0} | {:.2} ms | {:.3} s | {:.1} MiB |",
                    w.name,
                    latency.as_millis(),
                    m.span.as_secs_f64(),
                    ms(percentile(&m.gaps, 0.5)),
                    ms(percentile(&m.gaps, 0.99)),
                    w.stages() as f64 / m.span.as_secs_f64().max(1e-9),
                    ms(m.cpu) / w.stages() as f64,
                    m.first_request.as_secs_f64(),
                    m.peak_rss_kib as f64 / 1024.0,
                );
            }
        }
    }
    for (what, r) in summary {
        println!("span ÷ bound at 20 ms, {what}: {r:.2}");
    }
}
