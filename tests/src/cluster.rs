//! Real processes for distributed-mode tests: `baton coordinator serve` and `baton-agent`
//! started as the binaries users run, on 127.0.0.1 with free ports, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Sends `signal` (e.g. `libc`'s SIGTERM = 15, SIGKILL = 9) via `kill`.
    pub fn signal(&self, signal: i32) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit, at most `limit`; its exit code (`None`: still
    /// running, or killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cargo build -q -p PACKAGE --bin BIN`, without the variables cargo sets for the test or
/// bench process that runs it. A build script that tracks one of them (ring's tracks
/// `CARGO_MANIFEST_DIR`) would otherwise see it change between this build and the outer
/// `cargo test`, and each would rebuild it and everything above it for the other.
fn cargo_build(package: &str, bin: &str) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", bin]);
    const SET_FOR_TESTS: [&str; 7] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if SET_FOR_TESTS.iter().any(|p| n.starts_with(p)) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// The `baton-agent` binary beside `baton` (same target directory), brought up to date
/// first: `cargo test` builds a package's binaries only for that package's own tests, so
/// the one there may be missing or stale. Built once per test process.
pub fn agent_binary(baton: &Path) -> PathBuf {
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = BUILT.get_or_init(|| {
        let mut cmd = cargo_build("baton-agent", "baton-agent");
        if baton.components().any(|c| c.as_os_str() == "release") {
            cmd.arg("--release");
        }
        cmd.status().is_ok_and(|s| s.success())
    });
    assert!(*ok, "building baton-agent failed");
    baton.with_file_name("baton-agent")
}

/// The `baton` binary, built first, for tests outside its own package (which get no
/// `CARGO_BIN_EXE_baton`): beside this test executable's `deps/` directory. Built once per
/// test process.
pub fn baton_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test executable's path");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/PROFILE/deps/TEST")
                .to_path_buf();
            let mut cmd = cargo_build("baton-coordinator", "baton");
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().is_ok_and(|s| s.success()),
                "building baton failed"
            );
            profile_dir.join("baton")
        })
        .clone()
}

/// `coordinator serve` flags with short lease timings for fault tests: heartbeat 250 ms,
/// lease `lease`, grace 1 s, failover grace 6 s, keepalive 1 s, shutdown grace 3 s.
pub fn fast_coordinator(lease: &'static str) -> Vec<&'static str> {
    vec![
        "--heartbeat",
        "250ms",
        "--lease",
        lease,
        "--grace",
        "1s",
        "--failover-grace",
        "6s",
        "--keepalive",
        "1s",
        "--shutdown-grace",
        "3s",
    ]
}

/// Lines a child process wrote to stderr, collected as they come.
pub type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `baton coordinator serve` on a free loopback port with state in `data_dir`;
/// returns the process and its URL (read from its first line of output).
pub fn start_coordinator(baton: &Path, data_dir: &Path, extra: &[&str]) -> (Proc, String) {
    start_coordinator_at(baton, data_dir, "127.0.0.1:0", extra)
}

/// [`start_coordinator`] on a given `listen` address (e.g. the port of a coordinator that
/// was killed, so its agents find the new one where the old one was).
pub fn start_coordinator_at(
    baton: &Path,
    data_dir: &Path,
    listen: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut cmd = Command::new(baton);
    cmd.args(["coordinator", "serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env(
            "BATON_LOG",
            std::env::var("BATON_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stderr(Stdio::inherit());
    spawn_coordinator(cmd)
}

/// [`start_coordinator`] with its log (at `filter`, e.g. `debug`) written to `log`.
pub fn start_coordinator_logged(
    baton: &Path,
    data_dir: &Path,
    log: &Path,
    filter: &str,
) -> (Proc, String) {
    let mut cmd = Command::new(baton);
    cmd.args([
        "coordinator",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data_dir)
    .env("BATON_LOG", filter)
    .stderr(std::fs::File::create(log).expect("the log file"));
    spawn_coordinator(cmd)
}

/// Starts a coordinator command; returns it and its URL, read from its first line.
fn spawn_coordinator(mut cmd: Command) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("baton coordinator starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        // Keep draining so the coordinator never blocks on a full pipe.
        for _ in lines {}
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the coordinator says where it listens within 30 s");
    let addr = first
        .rsplit(' ')
        .next()
        .expect("an address on the first line")
        .to_owned();
    (
        Proc {
            child,
            name: "coordinator".to_owned(),
        },
        format!("http://{addr}"),
    )
}

/// Starts `baton-agent` named `name` with `labels` (`k=v`), state under `data_dir`.
pub fn start_agent(
    agent: &Path,
    url: &str,
    name: &str,
    labels: &[&str],
    data_dir: &Path,
    extra: &[&str],
) -> Proc {
    agent_command(agent, url, name, labels, data_dir, extra)
        .stderr(Stdio::inherit())
        .spawn()
        .map(|child| Proc {
            child,
            name: name.to_owned(),
        })
        .expect("baton-agent starts")
}

/// [`start_agent`] with `env` added to the agent's environment (what its stages see).
pub fn start_agent_with_env(
    agent: &Path,
    url: &str,
    name: &str,
    data_dir: &Path,
    env: &[(&str, &str)],
) -> Proc {
    agent_command(agent, url, name, &[], data_dir, &[])
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .spawn()
        .map(|child| Proc {
            child,
            name: name.to_owned(),
        })
        .expect("baton-agent starts")
}

/// [`start_agent`] with its log (at `filter`, e.g. `baton_agent=debug`) collected.
pub fn start_agent_logged(
    agent: &Path,
    url: &str,
    name: &str,
    data_dir: &Path,
    extra: &[&str],
    filter: &str,
) -> (Proc, Lines) {
    let mut child = agent_command(agent, url, name, &[], data_dir, extra)
        .env("BATON_LOG", filter)
        .stderr(Stdio::piped())
        .spawn()
        .expect("baton-agent starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = Lines::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    (
        Proc {
            child,
            name: name.to_owned(),
        },
        lines,
    )
}

fn agent_command(
    agent: &Path,
    url: &str,
    name: &str,
    labels: &[&str],
    data_dir: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(agent);
    cmd.args(["--coordinator", url, "--name", name, "--data-dir"])
        .arg(data_dir.join(name))
        .env(
            "BATON_LOG",
            std::env::var("BATON_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env_remove("BATON_TOKEN")
        .stdout(Stdio::null());
    for l in labels {
        cmd.args(["--label", l]);
    }
    cmd.args(extra);
    cmd
}

/// Polls `check` every 50 ms until it holds or `limit` passes; the test fails with `what`.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A run's event log from the coordinator at `url`, as JSON records.
pub fn events(baton: &Path, url: &str, run: u64) -> Vec<serde_json::Value> {
    events_as(baton, url, run, None)
}

/// [`events`] presenting the operator `token`.
pub fn events_as(baton: &Path, url: &str, run: u64, token: Option<&str>) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(baton);
    cmd.args([
        "runs",
        "show",
        &run.to_string(),
        "-o",
        "json",
        "--coordinator",
        url,
    ])
    .env_remove("BATON_TOKEN");
    if let Some(t) = token {
        cmd.env("BATON_TOKEN", t);
    }
    let out = cmd.output().expect("baton runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `type` of an event record (`stage_started`, `needs_attention`, ...).
pub fn kind_of(e: &serde_json::Value) -> &str {
    e["kind"]["type"].as_str().unwrap_or_default()
}

/// The run's status in `runs list`.
pub fn run_status(baton: &Path, url: &str, run: u64) -> Option<String> {
    run_status_as(baton, url, run, None)
}

/// [`run_status`] presenting the operator `token`.
pub fn run_status_as(baton: &Path, url: &str, run: u64, token: Option<&str>) -> Option<String> {
    let mut cmd = Command::new(baton);
    cmd.args(["runs", "list", "-o", "json", "--coordinator", url])
        .env_remove("BATON_TOKEN");
    if let Some(t) = token {
        cmd.env("BATON_TOKEN", t);
    }
    let out = cmd.output().ok()?;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    rows.iter()
        .find(|r| r["id"].as_u64() == Some(run))
        .and_then(|r| r["status"].as_str().map(str::to_owned))
}

/// Agent ids attached to `url`.
pub fn attached(baton: &Path, url: &str) -> Vec<String> {
    let out = Command::new(baton)
        .args(["agents", "list", "-o", "json", "--coordinator", url])
        .env_remove("BATON_TOKEN")
        .output()
        .expect("baton runs");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}
