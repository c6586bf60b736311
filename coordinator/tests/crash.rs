//! Crash and signal tests: the real `baton` process is killed with SIGKILL, interrupted with
//! SIGINT (Ctrl-C) or stopped with SIGTERM at pseudo-random points of a run, 20 times each;
//! each time the next `stages up` completes the run. Checked against the recording target,
//! which counts requests per `Idempotency-Key`:
//! - no migration recorded before the kill is sent again (every key is seen at most twice,
//!   and twice only for a migration that was in flight);
//! - a migration in flight at the kill or signal is sent at most once more, with the same
//!   key (a signal lets it finish within a short grace first), and the next run's output
//!   names it;
//! - the target ends up with exactly the effects of an uninterrupted run;
//! - after SIGINT or SIGTERM, the command step never runs twice at once (its copies note the
//!   pids of the others still alive).

// Helpers here are test code too: a failed file operation should stop the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_e2e::target::{Reply, Target};
use serde_json::json;

const STAGES: [&str; 3] = ["net", "db", "app"];
const MIGRATIONS: u64 = 3;

fn write_project(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let mut stages = String::from("stages:\n");
    for (i, s) in STAGES.iter().enumerate() {
        stages.push_str(&format!(
            "  - name: {s}\n    config_path: {s}/config.yaml\n"
        ));
        if i > 0 {
            stages.push_str(&format!("    depends_on: [{}]\n", STAGES[i - 1]));
        }
        std::fs::create_dir_all(dir.join(s).join("migration")).unwrap();
        std::fs::write(dir.join(s).join("config.yaml"), "migrate_dir: migration\n").unwrap();
        for v in 1..=MIGRATIONS {
            std::fs::write(
                dir.join(s).join(format!("migration/{v:03}_step.yaml")),
                format!("retry_on_lost: safe\nup:\n  request:\n    method: POST\n    url: '{{{{.api}}}}/{s}/{v}'\n    body:\n      step: '{s}-{v}'\n"),
            )
            .unwrap();
        }
    }
    // A command step that notes every start and any other copy of itself still running
    // (the pids it finds alive), so two at once are seen.
    std::fs::write(
        dir.join("db/migration/004_cmd.yaml"),
        format!(
            "retry_on_lost: safe\nup:\n  command:\n    program: sh\n    args: [\"-c\", \"for p in $(cat {pids} 2>/dev/null); do kill -0 $p 2>/dev/null && echo $p >> {overlaps}; done; echo $$ >> {pids}; sleep 0.3; echo ok >> {done}\"]\n",
            pids = dir.join("cmd.pids").display(),
            overlaps = dir.join("cmd.overlaps").display(),
            done = dir.join("cmd.done").display(),
        ),
    )
    .unwrap();
    stages.push_str("global:\n  env:\n    api: http://127.0.0.1:9\n  max_concurrent_stages: 1\n");
    std::fs::write(dir.join("stages.yaml"), stages).unwrap();
}

fn baton(dir: &Path, set: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_baton"));
    c.args(["stages", "up", "--set", set])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A fixed pseudo-random sequence, so a failure can be reproduced.
fn delays(n: usize) -> Vec<u64> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            50 + x % 900
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runs_resume_without_repeating_effects() {
    interrupted_runs("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_runs_go_on_without_repeating_effects() {
    interrupted_runs("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_runs_go_on_without_repeating_effects() {
    interrupted_runs("TERM").await;
}

/// 20 rounds: a run interrupted by `signal` (`kill -SIGNAL`), then completed.
async fn interrupted_runs(signal: &str) {
    let target = Target::start().await;
    for s in STAGES {
        for v in 1..=MIGRATIONS {
            // Slow answers widen the window in which a kill lands mid-request.
            target.on(
                "POST",
                &format!("/{s}/{v}"),
                vec![Reply::json(201, json!({"id": format!("{s}-{v}")}))
                    .delayed(Duration::from_millis(60))],
            );
        }
    }
    let set = format!("api={}", target.url());
    let root: PathBuf =
        std::env::temp_dir().join(format!("baton-crash-{signal}-{}", std::process::id()));
    let mut kills_mid_run = 0;
    let mut resent = 0;
    for (round, delay) in delays(20).into_iter().enumerate() {
        let dir = root.join(round.to_string());
        write_project(&dir);
        let before = target.requests().len();

        let child = baton(&dir, &set).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let pid = child.id().to_string();
        let first = tokio::task::spawn_blocking({
            let signal = signal.to_owned();
            move || {
                let mut child = child;
                let finished = child.try_wait().unwrap().is_some();
                let _ = Command::new("kill")
                    .args([format!("-{signal}"), pid])
                    .status();
                let out = child.wait_with_output().unwrap();
                (finished, String::from_utf8_lossy(&out.stderr).into_owned())
            }
        })
        .await
        .unwrap();
        let (finished_before_kill, first_err) = first;

        // Odd rounds resume with `baton runs resume` (it refuses when the kill came before the
        // run was recorded; then `stages up` starts it), even rounds with `stages up`.
        let dir2 = dir.clone();
        let set2 = set.clone();
        let resume_cmd = round % 2 == 1;
        let out = tokio::task::spawn_blocking(move || {
            if resume_cmd {
                let out = Command::new(env!("CARGO_BIN_EXE_baton"))
                    .args(["runs", "resume", "--set", &set2])
                    .current_dir(&dir2)
                    .output()
                    .unwrap();
                if out.status.code() != Some(2) {
                    return out;
                }
                assert!(String::from_utf8_lossy(&out.stderr).contains("no interrupted run"));
            }
            baton(&dir2, &set2).output().unwrap()
        })
        .await
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: the resumed run did not complete:\n{text}"
        );

        // Effects of this round, per idempotency key.
        let reqs = &target.requests()[before..];
        let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in reqs {
            per_key
                .entry(r.header("idempotency-key").unwrap().to_owned())
                .or_default()
                .push(r.path.clone());
        }
        let paths: BTreeSet<String> = reqs.iter().map(|r| r.path.clone()).collect();
        let expected: BTreeSet<String> = STAGES
            .iter()
            .flat_map(|s| (1..=MIGRATIONS).map(move |v| format!("/{s}/{v}")))
            .collect();
        assert_eq!(
            paths, expected,
            "round {round}: the target's effects differ from an uninterrupted run:\n{text}"
        );
        assert_eq!(
            per_key.len(),
            expected.len(),
            "round {round}: one key per migration:\n{text}"
        );
        let twice: Vec<&String> = per_key
            .iter()
            .filter(|(_, p)| p.len() > 1)
            .map(|(_, p)| &p[0])
            .collect();
        assert!(
            twice.len() <= 1,
            "round {round}: more than one migration was sent twice: {twice:?}\n{text}"
        );
        for p in per_key.values() {
            assert!(
                p.len() <= 2,
                "round {round}: {} was sent {} times",
                p[0],
                p.len()
            );
            assert!(
                p.iter().all(|x| x == &p[0]),
                "round {round}: one key, several migrations: {p:?}"
            );
        }
        if let Some(path) = twice.first() {
            resent += 1;
            // `/db/2` is stage db, migration 002.
            let mut parts = path.trim_start_matches('/').split('/');
            let (stage, version) = (parts.next().unwrap(), parts.next().unwrap());
            let said = format!(
                "stage {stage}: migration {:03}_step was in flight when the run stopped",
                version.parse::<u64>().unwrap()
            );
            assert!(text.contains(&said), "round {round}: the resume output does not name the re-sent migration {path}:\n{text}");
        }
        // The command step completed, and (unless the kill was -9, which leaves the step
        // running as an orphan) never ran alongside another copy of itself.
        assert!(
            std::fs::read_to_string(dir.join("cmd.done")).is_ok_and(|d| !d.is_empty()),
            "round {round}: the command step never completed:\n{text}"
        );
        if signal != "KILL" {
            let overlaps = std::fs::read_to_string(dir.join("cmd.overlaps")).unwrap_or_default();
            assert!(
                overlaps.is_empty(),
                "round {round}: the command step ran twice at once (still running: {overlaps}):\n{first_err}\n{text}"
            );
        }
        let interrupted = if signal == "KILL" {
            text.contains("resuming run")
        } else {
            // A signal cancels the run, which says how to go on.
            first_err.contains("was cancelled; `baton stages up` runs what is left")
        };
        if !finished_before_kill && interrupted {
            kills_mid_run += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&root);
    // The sequence of delays must actually interrupt runs, or the test proves nothing.
    assert!(
        kills_mid_run >= 8,
        "only {kills_mid_run} of 20 SIG{signal}s landed mid-run"
    );
    eprintln!("{kills_mid_run} of 20 SIG{signal}s interrupted a run; {resent} in-flight migration(s) were sent once more");
}

/// A request that outlives the grace a signal gives it is in doubt: the run ends cancelled,
/// says how to go on, and the next `stages up` sends that migration again with the same
/// `Idempotency-Key` (never under a new one), naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_by_a_signal_keeps_its_key() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "POST",
        "/db/1",
        vec![
            Reply::json(201, json!({"id": "db-1"})).delayed(Duration::from_secs(8)),
            Reply::json(201, json!({"id": "db-1"})),
        ],
    );
    let set = format!("api={}", target.url());
    let dir = std::env::temp_dir().join(format!("baton-cutoff-{}", std::process::id()));
    write_project(&dir);
    let child = baton(&dir, &set).spawn().unwrap();
    let log = target.clone_handle();
    let pid = child.id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        baton_e2e::cluster::wait_for("POST /db/1 in flight", Duration::from_secs(60), || {
            !log.requests_to("POST", "/db/1").is_empty()
        });
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let first = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        first.contains("was cancelled; `baton stages up` runs what is left and sends db 001_step again with the same Idempotency-Key"),
        "{first}"
    );
    let d = dir.clone();
    let again = tokio::task::spawn_blocking(move || baton(&d, &set).output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(again.status.code(), Some(0), "{text}");
    assert!(
        text.contains("stage db: migration 001_step was in flight when the run stopped; it is sent again with the same Idempotency-Key"),
        "{text}"
    );
    let sent = target.requests_to("POST", "/db/1");
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].header("idempotency-key"),
        sent[1].header("idempotency-key"),
        "the in-doubt migration keeps its key"
    );
    // Nothing recorded before the signal was sent again.
    assert_eq!(target.requests_to("POST", "/net/1").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
