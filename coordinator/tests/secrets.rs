//! Secrets stay out of every output and out of the state directory: a variable named like a
//! secret is masked without being declared, `not_secret` opts one out, once a stage's export
//! was secret it stays masked after the declaration is removed, and values are encrypted at
//! rest. Through the real `baton` binary and a recording target.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use baton_e2e::files::write;
use baton_e2e::target::{Reply, Target};

async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args).await
}

fn stages(dir: &Path, declared: bool) {
    let secrets = if declared {
        "    secrets: [vpc_ref]\n"
    } else {
        ""
    };
    write(
        &dir.join("stages.yaml"),
        &format!(
            "stages:\n  - name: s\n    config_path: s/config.yaml\n{secrets}    not_secret: [public_token]\n    env:\n      db_password: hunter2-db-pass\n      public_token: visible-public-value\nglobal:\n  env:\n    api: http://127.0.0.1:9\n"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_by_name_not_secret_and_once_secret_always_secret() {
    let dir = baton_e2e::files::temp_dir("secrets");
    let target = Target::start().await;
    target.on(
        "POST",
        "/things",
        vec![Reply::json(
            201,
            serde_json::json!({"api_key": "ak-live-12345678", "vpc": "vpc-0a1b2c3d4e", "pub": "visible-public-value"}),
        )],
    );
    stages(&dir, true);
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_thing.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/things'\n    body: '{\"p\": \"{{.db_password}}\", \"t\": \"{{.public_token}}\"}'\n  response:\n    env_from:\n      api_key: api_key\n      vpc_ref: vpc\n      public_token: pub\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    // The target got the real values.
    let body = &target.requests_to("POST", "/things")[0].body;
    assert!(body.contains("hunter2-db-pass") && body.contains("visible-public-value"));
    let mut shown = out;
    for args in [
        vec!["stages", "status", "--verbose"],
        vec!["runs", "show", "1"],
        vec!["runs", "list"],
        vec!["stages", "validate", "--verbose"],
    ] {
        let (_, o) = baton(&dir, &args).await;
        shown.push_str(&o);
    }
    for secret in ["hunter2-db-pass", "ak-live-12345678", "vpc-0a1b2c3d4e"] {
        assert!(!shown.contains(secret), "{secret} in clear:\n{shown}");
    }
    // Not secret, and said so.
    assert!(shown.contains("visible-public-value"), "{shown}");
    assert!(
        shown.contains("db_password (named like a secret)"),
        "{shown}"
    );
    assert!(shown.contains("not secret: public_token"), "{shown}");

    // The declaration goes away and the stage runs again (a new migration): the export that
    // was secret stays masked.
    stages(&dir, false);
    write(
        &dir.join("s/migration/002_more.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/more'\n",
    );
    target.answer_unscripted_like_a_cloud();
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        target.requests_to("PUT", "/more").len(),
        1,
        "the stage ran again"
    );
    let (_, status) = baton(&dir, &["stages", "status", "--verbose"]).await;
    assert!(status.contains("vpc_ref"), "{status}");
    assert!(
        !format!("{out}{status}").contains("vpc-0a1b2c3d4e"),
        "{out}{status}"
    );
    // Nor in the state directory: secret values are encrypted at rest, events are masked.
    let raw = baton_e2e::files::all_bytes(&dir.join(".baton"));
    for secret in ["hunter2-db-pass", "ak-live-12345678", "vpc-0a1b2c3d4e"] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in clear in the state directory"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const DECLARED: &str = "decl-S3CRET-1111";
const BY_NAME: &str = "name-S3CRET-2222";
const IMPORTED: &str = "imp-S3CRET-3333";
const ROTATED: [&str; 3] = ["decl-S3CRET-ROT1", "name-S3CRET-ROT2", "imp-S3CRET-ROT3"];

/// `stages.yaml` with the declared and the named secret set to `declared` and `by_name`.
fn secret_project(dir: &Path, declared: &str, by_name: &str) {
    write(
        &dir.join("stages.yaml"),
        &format!(
            "stages:\n  - name: base\n    config_path: base/config.yaml\n    secrets: [deploy_word, vpc_ref]\n    env:\n      deploy_word: {declared}\n  - name: app\n    config_path: app/config.yaml\n    depends_on: [base]\n    env_from_stages:\n      - stage: base\n        vars: [vpc_ref]\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    db_password: {by_name}\n"
        ),
    );
}

/// The migrations of [`secret_project`]: base sends the declared and the named secret and
/// exports the imported one; app sends and prints them.
fn secret_migrations(dir: &Path) {
    let files = [
        ("base/config.yaml", "migrate_dir: migration\n".to_owned()),
        ("base/migration/001_create.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/base'\n    headers:\n      - name: X-Word\n        value: '{{.deploy_word}}'\n    body:\n      pw: '{{.db_password}}'\n  response:\n    env_from:\n      vpc_ref: vpc\ndown:\n  method: DELETE\n  url: '{{.api}}/base'\n  headers:\n    - name: X-Word\n      value: '{{.deploy_word}}'\n".to_owned()),
        ("app/config.yaml", "migrate_dir: migration\n".to_owned()),
        ("app/migration/001_use.yaml", "up:\n  request:\n    method: PUT\n    url: '{{.api}}/app'\n    body:\n      vpc: '{{.vpc_ref}}'\n      pw: '{{.db_password}}'\ndown:\n  method: DELETE\n  url: '{{.api}}/app'\n  body:\n    vpc: '{{.vpc_ref}}'\n".to_owned()),
        ("app/migration/002_echo.yaml", "up:\n  command:\n    program: sh\n    args: [\"-c\", \"echo using $V and $P\"]\n    env:\n      V: '{{.vpc_ref}}'\n      P: '{{.db_password}}'\n".to_owned()),
    ];
    for (path, content) in &files {
        write(&dir.join(path), content);
    }
}

/// Every output format, the run logs, the diagnostics log (`BATON_LOG=debug`) and every byte
/// of the state directory, after a run, a failed run, a resume after `kill -9`, a rotation of
/// all three secrets and a `stages down`: no secret (declared, secret by its name, imported
/// from another stage), old or new, appears in clear. The target gets the real values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_log_or_state_file() {
    let bin = Path::new(env!("CARGO_BIN_EXE_baton"));
    let dir = baton_e2e::files::temp_dir("secrets-everywhere");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "POST",
        "/base",
        vec![Reply::json(201, serde_json::json!({"vpc": IMPORTED}))],
    );
    target.on(
        "PUT",
        "/base/rotate",
        vec![Reply::json(201, serde_json::json!({"vpc": ROTATED[2]}))],
    );
    // The failing step's answer quotes a secret back, as some APIs do in their errors.
    target.on(
        "POST",
        "/fail",
        vec![
            Reply::json(
                422,
                serde_json::json!({"error": format!("bad password {BY_NAME}")}),
            ),
            Reply::json(201, serde_json::json!({"ok": true})),
        ],
    );
    secret_project(&dir, DECLARED, BY_NAME);
    let (pidfile, slow) = (dir.join("step.pid"), dir.join("slow"));
    secret_migrations(&dir);
    let set = format!("api={}", target.url());
    let logged = [("BATON_LOG", "debug")];
    let mut shown = String::new();
    let step = |code: i32, out: String, want: i32, what: &str, shown: &mut String| {
        assert_eq!(code, want, "{what}:\n{out}");
        shown.push_str(&format!("\n=== {what}\n{out}"));
    };

    // 1. A run.
    let (code, out) =
        baton_e2e::cli::run_with_env(bin, &dir, &["stages", "up", "--set", &set], &logged).await;
    step(code, out, 0, "run", &mut shown);

    // 2. A failed run: the target refuses a step and echoes a secret.
    write(
        &dir.join("app/migration/003_fail.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/fail'\n    body:\n      pw: '{{.db_password}}'\n      vpc: '{{.vpc_ref}}'\n",
    );
    let (code, out) =
        baton_e2e::cli::run_with_env(bin, &dir, &["stages", "up", "--set", &set], &logged).await;
    step(code, out, 1, "failed run", &mut shown);

    // 3. A run killed (-9) in a command step that prints secrets, then `runs resume`.
    write(
        &dir.join("app/migration/004_slow.yaml"),
        &format!(
            "retry_on_lost: safe\nup:\n  command:\n    program: sh\n    args: [\"-c\", \"echo $$ > {}; echo slow with $P; if [ -f {} ]; then exec sleep 30; fi; echo done with $V\"]\n    env:\n      V: '{{{{.vpc_ref}}}}'\n      P: '{{{{.db_password}}}}'\n",
            pidfile.display(),
            slow.display()
        ),
    );
    write(&slow, "");
    let (dir2, pid2, set2) = (dir.clone(), pidfile.clone(), set.clone());
    let killed = tokio::task::spawn_blocking(move || {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["stages", "up", "--set", &set2])
            .env("BATON_LOG", "debug")
            .current_dir(&dir2)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        baton_e2e::cluster::wait_for("the slow step", std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(&pid2).is_ok_and(|s| !s.trim().is_empty())
        });
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
        // The step itself was orphaned by the kill; end it too.
        let step_pid = std::fs::read_to_string(&pid2).unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", step_pid.trim()])
            .status();
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap();
    shown.push_str(&format!("\n=== killed run\n{killed}"));
    std::fs::remove_file(&slow).unwrap();
    let (code, out) =
        baton_e2e::cli::run_with_env(bin, &dir, &["runs", "resume", "--set", &set], &logged).await;
    assert!(out.contains("resuming run"), "{out}");
    step(code, out, 0, "resume", &mut shown);

    // 4. Every secret rotated: base runs a new step (a new imported value), app imports it.
    secret_project(&dir, ROTATED[0], ROTATED[1]);
    write(
        &dir.join("base/migration/002_rotate.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/base/rotate'\n    headers:\n      - name: X-Word\n        value: '{{.deploy_word}}'\n    body:\n      pw: '{{.db_password}}'\n  response:\n    env_from:\n      vpc_ref: vpc\n",
    );
    write(
        &dir.join("app/migration/005_again.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/app/again'\n    body:\n      vpc: '{{.vpc_ref}}'\n      pw: '{{.db_password}}'\n",
    );
    let (code, out) =
        baton_e2e::cli::run_with_env(bin, &dir, &["stages", "up", "--set", &set], &logged).await;
    step(code, out, 0, "rotation", &mut shown);

    // Every way of looking at the state, in every format.
    let look = |runs: u64| {
        let mut views: Vec<Vec<String>> = [
            vec!["stages", "status", "--verbose"],
            vec!["status", "--verbose"],
            vec!["runs", "list"],
            vec!["runs", "list", "-o", "json"],
            vec!["stages", "validate", "--verbose"],
            vec!["stages", "validate", "-o", "json"],
            vec!["stages", "up", "--dry-run", "--set", &set],
            vec!["stages", "up", "--dry-run", "-o", "json", "--set", &set],
            vec!["stages", "down", "--dry-run", "--set", &set],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(str::to_owned).collect())
        .collect();
        for run in 1..=runs {
            views.push(vec!["runs".into(), "show".into(), run.to_string()]);
            views.push(vec!["runs".into(), "logs".into(), run.to_string()]);
        }
        views
    };
    for view in look(4) {
        let args: Vec<&str> = view.iter().map(String::as_str).collect();
        let (_, out) = baton_e2e::cli::run_with_env(bin, &dir, &args, &logged).await;
        shown.push_str(&format!("\n=== {}\n{out}", view.join(" ")));
    }

    // 5. `stages down`: every down step sends the secrets again.
    let (code, out) = baton_e2e::cli::run_with_env(
        bin,
        &dir,
        &[
            "stages",
            "down",
            "--yes",
            "--skip-missing-down",
            "--set",
            &set,
        ],
        &logged,
    )
    .await;
    step(code, out, 0, "stages down", &mut shown);
    for view in look(5) {
        let args: Vec<&str> = view.iter().map(String::as_str).collect();
        let (_, out) = baton_e2e::cli::run_with_env(bin, &dir, &args, &logged).await;
        shown.push_str(&format!("\n=== {}\n{out}", view.join(" ")));
    }

    // The target got the real values, so the masking is not hiding an empty variable.
    let sent: String = target
        .requests()
        .iter()
        .map(|r| format!("{:?} {}\n", r.headers, r.body))
        .collect();
    let all = [
        DECLARED, BY_NAME, IMPORTED, ROTATED[0], ROTATED[1], ROTATED[2],
    ];
    for secret in all {
        assert!(sent.contains(secret), "{secret} never reached the target");
    }
    assert_eq!(target.requests_to("DELETE", "/base").len(), 1);
    // The outputs mentioned the steps that used the secrets.
    assert!(shown.contains("using *** and ***"), "{shown}");
    assert!(shown.contains("slow with ***"), "{shown}");
    let raw = baton_e2e::files::all_bytes(&dir.join(".baton"));
    for secret in all {
        assert!(!shown.contains(secret), "{secret} in clear:\n{shown}");
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in clear in the state directory"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The state key from `--state-key-file` or `BATON_STATE_KEY`: the state opens with the key
/// it was written with and with no other; a missing or wrong key is a clear error that
/// creates and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_key_comes_from_a_flag_or_the_environment() {
    let bin = Path::new(env!("CARGO_BIN_EXE_baton"));
    let dir = baton_e2e::files::temp_dir("secrets-key-file");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    stages(&dir, true);
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_thing.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/things'\n    body: '{\"p\": \"{{.db_password}}\"}'\n",
    );
    let key = "5a".repeat(32);
    let (key_file, other) = (dir.join("ops.key"), dir.join("other.key"));
    write(&key_file, &format!("{key}\n"));
    write(&other, &"a5".repeat(32));
    let set = format!("api={}", target.url());
    let kf = key_file.to_str().unwrap();
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--set", &set, "--state-key-file", kf],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let state = dir.join(".baton");
    assert!(
        !state.join("state.key").exists(),
        "a key was generated although one was given"
    );
    let listed = |dir: std::path::PathBuf| async move {
        baton(
            &dir,
            &["runs", "list", "-o", "json", "--state-key-file", kf],
        )
        .await
    };
    let before = listed(dir.clone()).await;

    // No key given: refused, naming the ways to give it; no key file is made.
    let (code, out) = baton(&dir, &["stages", "status"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("state.key is missing"), "{out}");
    assert!(out.contains("--state-key-file"), "{out}");
    assert!(!state.join("state.key").exists());
    // Another key: refused.
    let (code, out) = baton(
        &dir,
        &[
            "stages",
            "status",
            "--state-key-file",
            other.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does not open this state"), "{out}");
    assert_eq!(
        listed(dir.clone()).await,
        before,
        "a refused key changed the state"
    );
    // The same key, as a flag or in the environment.
    let (code, out) = baton(&dir, &["stages", "status", "--state-key-file", kf]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 applied"), "{out}");
    let (code, out) = baton_e2e::cli::run_with_env(
        bin,
        &dir,
        &["runs", "show", "1"],
        &[("BATON_STATE_KEY", &key)],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("hunter2-db-pass"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same in distributed mode: the CLI's output, the coordinator's and the agent's logs
/// (`BATON_LOG=debug`) and every byte of both their data directories (the agent's outbox
/// holds results, exports among them) are free of the three secrets after a run and a
/// `stages down` through a coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_clear_in_distributed_mode() {
    use baton_e2e::cluster::{agent_binary, start_agent_logged, start_coordinator_logged};
    let bin = Path::new(env!("CARGO_BIN_EXE_baton"));
    let root = baton_e2e::files::temp_dir("secrets-distributed");
    let dir = root.join("project");
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    target.on(
        "POST",
        "/base",
        vec![Reply::json(201, serde_json::json!({"vpc": IMPORTED}))],
    );
    secret_project(&dir, DECLARED, BY_NAME);
    secret_migrations(&dir);
    let coordinator_log = root.join("coordinator.log");
    let (_coordinator, url) =
        start_coordinator_logged(bin, &root.join("data"), &coordinator_log, "debug");
    let (_agent, agent_log) = start_agent_logged(
        &agent_binary(bin),
        &url,
        "agent-s",
        &root.join("agents"),
        &[],
        "debug",
    );
    let set = format!("api={}", target.url());
    let mut shown = String::new();
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--coordinator", &url, "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    shown.push_str(&out);
    let (code, out) = baton(
        &dir,
        &[
            "stages",
            "down",
            "--yes",
            "--skip-missing-down",
            "--coordinator",
            &url,
            "--set",
            &set,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    shown.push_str(&out);
    for args in [
        vec!["runs", "show", "1"],
        vec!["runs", "show", "1", "-o", "json"],
        vec!["runs", "logs", "1"],
        vec!["runs", "show", "2"],
        vec!["runs", "list", "-o", "json"],
        vec!["stages", "status", "--verbose"],
    ] {
        let mut args = args.clone();
        args.extend(["--coordinator", &url]);
        let (_, out) = baton(&dir, &args).await;
        shown.push_str(&format!("\n=== {}\n{out}", args.join(" ")));
    }
    assert!(shown.contains("using *** and ***"), "{shown}");
    assert_eq!(target.requests_to("DELETE", "/base").len(), 1, "{shown}");
    let sent: String = target
        .requests()
        .iter()
        .map(|r| format!("{:?} {}\n", r.headers, r.body))
        .collect();
    let logs = format!(
        "{}\n{}",
        std::fs::read_to_string(&coordinator_log).unwrap(),
        agent_log.lock().unwrap().join("\n")
    );
    assert!(logs.contains("DEBUG"), "the logs are at debug level");
    for (place, dir) in [
        ("coordinator", root.join("data")),
        ("agent", root.join("agents")),
    ] {
        let raw = baton_e2e::files::all_bytes(&dir);
        for secret in [DECLARED, BY_NAME, IMPORTED] {
            assert!(sent.contains(secret), "{secret} never reached the target");
            assert!(!shown.contains(secret), "{secret} in clear:\n{shown}");
            assert!(!logs.contains(secret), "{secret} in clear in a log");
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in clear in the {place}'s data directory"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
