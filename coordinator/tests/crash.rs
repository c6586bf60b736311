//! Crash test: the real `baton` process is killed with SIGKILL at pseudo-random points of a
//! run, 20 times; each time the next `stages up` completes the run. Checked against the
//! recording target, which counts requests per `Idempotency-Key`:
//! - no migration recorded before the kill is sent again (every key is seen at most twice,
//!   and twice only for a migration that was in flight);
//! - a migration in flight at the kill is sent at most once more, with the same key, and the
//!   resume output names it;
//! - the target ends up with exactly the effects of an uninterrupted run.

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
    let root: PathBuf = std::env::temp_dir().join(format!("baton-crash-{}", std::process::id()));
    let mut kills_mid_run = 0;
    let mut resent = 0;
    for (round, delay) in delays(20).into_iter().enumerate() {
        let dir = root.join(round.to_string());
        write_project(&dir);
        let before = target.requests().len();

        let mut child = baton(&dir, &set).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let finished_before_kill = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

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
        if !finished_before_kill && text.contains("resuming run") {
            kills_mid_run += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&root);
    // The sequence of delays must actually interrupt runs, or the test proves nothing.
    assert!(
        kills_mid_run >= 8,
        "only {kills_mid_run} of 20 kills landed mid-run"
    );
    eprintln!("{kills_mid_run} of 20 kills interrupted a run; {resent} in-flight migration(s) were sent once more");
}
