//! Distributed mode, measured (results in docs/benchmarks.md; nothing here is asserted):
//!
//! - `dispatch`: a 200-stage chain, one request per stage, through a coordinator (durable
//!   sled state, in this process) and two agents (in this process, real gRPC over loopback),
//!   and the same chain in local mode. Per stage boundary: the gap between the target's
//!   answer to a stage's last request and the arrival of the next stage's first request (a
//!   conservative bound on "dependency's result recorded -> dependent's first request": it
//!   also holds the agent's report of the result and its recording). p50 and p99.
//! - `dag`: a 500-stage layered DAG (`max_concurrent_stages: 16`, one request each, a target
//!   answering at once) through the coordinator and two agents (capacity 8 each), and locally.
//! - `memory`: the real `baton coordinator serve` process with 1,000 simulated agents attached
//!   (each its own TCP connection, hello then a heartbeat every 5 s): its resident memory
//!   after two heartbeat rounds.
//!
//! Run: `just bench-distributed` (= `cargo bench -p baton-coordinator --bench distributed`);
//! `BENCH_PARTS=dispatch,dag` picks parts, `BENCH_AGENTS=100` shrinks the memory part.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_agent::session::AgentConfig;
use baton_common::proto::{self, agent_message, control_service_client::ControlServiceClient};
use baton_common::spec::MemoryFiles;
use baton_coordinator::planner::{self, NoHistory, Selection};
use baton_coordinator::runner::in_process::InProcessRunner;
use baton_coordinator::runs::{Runs, Submission};
use baton_coordinator::server::{serve, ServeConfig};
use baton_coordinator::store::SledStore;
use baton_coordinator::synthetic;
use baton_e2e::target::Target;
use support::{percentile, temp};
use tokio_util::sync::CancellationToken;

/// The allocator of the `baton` and `baton-agent` binaries, so the in-process parts measure
/// what the commands do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Gaps between one request's answer and the next request's arrival, in arrival order.
fn gaps(target: &Target) -> Vec<Duration> {
    let mut t = target.timings();
    t.sort_by_key(|(_, arrived, _)| *arrived);
    let mut g: Vec<Duration> = t
        .windows(2)
        .map(|w| w[1].1.saturating_duration_since(w[0].2))
        .collect();
    g.sort();
    g
}

fn chain(n: usize) -> MemoryFiles {
    let edges: Vec<(usize, usize)> = (1..n).map(|i| (i, i - 1)).collect();
    synthetic::project_files(n, &edges)
}

fn dag(n: usize) -> MemoryFiles {
    let mut files = synthetic::project_files(n, &synthetic::layered_edges(n, 25));
    let stages = String::from_utf8(files.get("stages.yaml").expect("a stages file").to_vec())
        .expect("utf-8");
    files.insert(
        "stages.yaml",
        stages.replace("global:\n", "global:\n  max_concurrent_stages: 16\n"),
    );
    files
}

/// A coordinator (in this process) with two agents attached; stopped when dropped.
struct Cluster {
    url: String,
    stop: CancellationToken,
    root: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn cluster(name: &str, capacity: u32) -> Cluster {
    let root = temp(name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        ServeConfig::new(root.join("data")),
        listener,
        stop.clone(),
    ));
    for i in 0..2 {
        let mut config = AgentConfig::new(
            &url,
            &format!("bench-agent-{i}"),
            root.join(format!("agent-{i}")),
        );
        config.capacity = capacity;
        config.backoff_initial = Duration::from_millis(20);
        config.backoff_max = Duration::from_millis(200);
        tokio::spawn(baton_agent::session::run(config, stop.clone()));
    }
    // Both agents attached before timing starts.
    let mut client = control(&url).await;
    for _ in 0..500 {
        let agents = client
            .list_agents(proto::ListAgentsRequest {})
            .await
            .expect("list agents")
            .into_inner()
            .agents;
        if agents.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Cluster { url, stop, root }
}

async fn control(url: &str) -> ControlServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    ControlServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Runs `files` through the cluster; returns the wall time from submission to the run's end.
async fn run_distributed(c: &Cluster, files: &MemoryFiles, api: &str) -> Duration {
    let mut client = control(&c.url).await;
    let started = Instant::now();
    let submitted = client
        .submit_run(proto::SubmitRunRequest {
            files: files
                .iter()
                .map(|(p, b)| (p.to_string_lossy().into_owned(), b.to_vec()))
                .collect::<HashMap<_, _>>(),
            stages_file: "stages.yaml".into(),
            set: [("api".to_owned(), api.to_owned())].into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner();
    let mut events = client
        .watch_run(proto::WatchRunRequest {
            run_id: submitted.run_id,
            from_seq: 0,
            follow: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut last = String::new();
    while let Some(e) = events.message().await.expect("events") {
        last = e.record_json;
    }
    let took = started.elapsed();
    assert!(
        last.contains("\"succeeded\""),
        "the run did not succeed: {last}"
    );
    took
}

/// Runs `files` in local mode (in-process runner, sled state); returns the wall time.
async fn run_local(name: &str, files: &MemoryFiles, api: &str) -> Duration {
    let root = temp(name);
    let store = Arc::new(SledStore::open(&root).expect("store"));
    let runs = Runs::local(store, Arc::new(InProcessRunner::new(BTreeMap::new())));
    let started = Instant::now();
    let loaded = baton_coordinator::project::load(
        Path::new("stages.yaml"),
        files,
        ["api".to_owned()].into(),
        None,
        false,
    );
    let project = loaded.project.expect("valid");
    let plan = planner::plan(&project, &Selection::All, &NoHistory).expect("plans");
    let sub = Submission {
        project: Arc::new(project),
        files: Arc::new(loaded.files),
        plan,
        project_key: "stages.yaml".into(),
        overrides: [("api".to_owned(), api.to_owned())].into(),
        condition_env: BTreeMap::new(),
        request: None,
        by: "bench".into(),
        skip_promotion: None,
    };
    let submitted = runs.submit_up(sub).await.expect("submit");
    let outcome = runs.outcome(submitted.run_id).await.expect("outcome");
    let took = started.elapsed();
    assert_eq!(outcome.status.map(|s| s.as_str()), Some("succeeded"));
    runs.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    took
}

async fn dispatch() {
    let n = 200;
    let files = chain(n);
    for mode in ["distributed", "local"] {
        let target = Target::start().await;
        target.answer_unscripted_like_a_cloud();
        let took = if mode == "distributed" {
            let c = cluster("dispatch", 4).await;
            run_distributed(&c, &files, &target.url()).await
        } else {
            run_local("dispatch-local", &files, &target.url()).await
        };
        let g = gaps(&target);
        println!(
            "dispatch/{mode}: {n}-stage chain in {:.2} s; stage boundary gap p50 {} p99 {} max {} ({} gaps)",
            took.as_secs_f64(),
            ms(percentile(&g, 0.5)),
            ms(percentile(&g, 0.99)),
            ms(g.last().copied().unwrap_or_default()),
            g.len()
        );
    }
}

async fn dag_part() {
    let n = 500;
    let files = dag(n);
    for mode in ["distributed", "local"] {
        let target = Target::start().await;
        target.answer_unscripted_like_a_cloud();
        let took = if mode == "distributed" {
            let c = cluster("dag", 8).await;
            run_distributed(&c, &files, &target.url()).await
        } else {
            run_local("dag-local", &files, &target.url()).await
        };
        println!(
            "dag/{mode}: {n} stages (cap 16) in {:.2} s = {:.0} stages/s ({} requests)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            target.requests().len()
        );
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn memory() {
    let agents: usize = std::env::var("BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let root = temp("memory");
    let baton = PathBuf::from(env!("CARGO_BIN_EXE_baton"));
    let (mut coordinator, url) =
        baton_e2e::cluster::start_coordinator(&baton, &root.join("data"), &[]);
    let pid = coordinator.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, _) = rss_kib(pid);
    let stop = CancellationToken::new();
    let mut attached = 0;
    let mut tasks = Vec::new();
    for i in 0..agents {
        let channel = match tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("agent {i}: {e}");
                break;
            }
        };
        let mut client = proto::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = proto::AgentMessage {
            kind: Some(agent_message::Kind::Hello(proto::AgentHello {
                agent_id: format!("sim-{i}"),
                labels: [("region".to_owned(), format!("r{}", i % 10))].into(),
                capacity: 4,
                held_attempts: Vec::new(),
                version: "bench".into(),
            })),
        };
        tx.send(hello).await.expect("queue hello");
        let mut inbound = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("attach")
            .into_inner();
        inbound.message().await.expect("welcome").expect("welcome");
        attached += 1;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let beat = proto::AgentMessage {
                            kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat { running: Vec::new() })),
                        };
                        if tx.send(beat).await.is_err() { return; }
                    }
                    m = inbound.message() => if !matches!(m, Ok(Some(_))) { return },
                }
            }
        }));
    }
    // Two heartbeat rounds at the default interval.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (rss, peak) = rss_kib(pid);
    println!(
        "memory: coordinator resident {:.1} MiB idle; with {attached} agents attached and heartbeating: {:.1} MiB (peak {:.1} MiB)",
        idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    coordinator.signal(15);
    let _ = coordinator.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&root);
}

fn main() {
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "dispatch,dag,memory".into());
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for part in parts.split(',') {
            match part.trim() {
                "dispatch" => dispatch().await,
                "dag" => dag_part().await,
                "memory" => memory().await,
                other => eprintln!("unknown part `{other}` (dispatch, dag, memory)"),
            }
        }
    });
}
