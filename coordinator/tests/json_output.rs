//! Every `-o json` output checked against its schema in `docs/schema/` (baton_e2e::schema),
//! locally and through a coordinator: what a pipeline reads is what the docs promise.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use baton_e2e::files::write;
use baton_e2e::schema::{load, violations};
use baton_e2e::target::{Reply, Target};
use serde_json::{json, Value};

async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args).await
}

/// Runs `baton args` and returns its stdout as JSON (stderr is separate: only stdout is
/// the document), checked against `schema`.
async fn json_of(dir: &Path, args: &[&str], schema: &str, want: i32) -> Value {
    let (bin, dir2) = (env!("CARGO_BIN_EXE_baton"), dir.to_path_buf());
    let argv: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(&argv)
            .current_dir(&dir2)
            .env_remove("BATON_COORDINATOR")
            .env_remove("BATON_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(want),
        "{args:?}\n{stdout}\n{stderr}"
    );
    let value: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}):\n{stdout}"));
    let bad = violations(&load(schema), &value);
    assert!(
        bad.is_empty(),
        "{args:?} breaks {schema}: {bad:?}\n{stdout}"
    );
    value
}

fn project(dir: &Path) {
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: net\n    config_path: net/config.yaml\n  - name: app\n    config_path: app/config.yaml\n    depends_on: [net]\n    condition: \"{{.go}} == yes\"\n    env_from_stages:\n      - stage: net\n        vars: [vpc_id]\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    go: \"yes\"\n",
    );
    write(&dir.join("net/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("net/migration/001_vpc.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc'\n  response:\n    env_from:\n      vpc_id: id\n      api_token: token\ndown:\n  method: DELETE\n  url: '{{.api}}/vpc/{{.vpc_id}}'\n",
    );
    write(&dir.join("app/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("app/migration/001_app.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/app/{{.vpc_id}}'\ndown:\n  method: DELETE\n  url: '{{.api}}/app/{{.vpc_id}}'\n",
    );
}

fn target_script(target: &Target) {
    target.on(
        "POST",
        "/vpc",
        vec![Reply::json(
            201,
            json!({"id": "vpc-7", "token": "tok-secret-9981"}),
        )],
    );
    target.answer_unscripted_like_a_cloud();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_output_matches_its_schema() {
    let target = Target::start().await;
    target_script(&target);
    let dir = baton_e2e::files::temp_dir("json-local");
    project(&dir);
    let set = format!("api={}", target.url());
    json_of(&dir, &["stages", "validate", "-o", "json"], "validation", 0).await;
    json_of(
        &dir,
        &["stages", "up", "--dry-run", "-o", "json", "--set", &set],
        "plan",
        0,
    )
    .await;
    let run = json_of(
        &dir,
        &["stages", "up", "-o", "json", "--set", &set],
        "run",
        0,
    )
    .await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["stages"][0]["exports"]["vpc_id"], "vpc-7");
    assert_eq!(run["stages"][0]["exports"]["api_token"], "***");
    let status = json_of(&dir, &["stages", "status", "-o", "json"], "status", 0).await;
    assert_eq!(status["stages"][1]["applied"][0]["version"], 1);
    let outputs = json_of(&dir, &["stages", "outputs", "-o", "json"], "outputs", 0).await;
    assert_eq!(outputs["stages"]["net"]["api_token"], "***");
    let revealed = json_of(
        &dir,
        &["stages", "outputs", "net", "--reveal", "-o", "json"],
        "outputs",
        0,
    )
    .await;
    assert_eq!(revealed["stages"]["net"]["api_token"], "tok-secret-9981");
    assert!(revealed["stages"].get("app").is_none());
    let (code, text) = baton(&dir, &["stages", "outputs", "net"]).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "api_token=***\nvpc_id=vpc-7\n");
    json_of(&dir, &["runs", "list", "-o", "json"], "runs", 0).await;
    let (code, lines) = baton(&dir, &["runs", "show", "1", "-o", "json"]).await;
    assert_eq!(code, 0, "{lines}");
    let event = load("event");
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(violations(&event, &v).is_empty(), "{line}");
    }
    json_of(
        &dir,
        &["stages", "down", "--dry-run", "-o", "json", "--set", &set],
        "plan",
        0,
    )
    .await;
    let down = json_of(
        &dir,
        &["stages", "down", "--yes", "-o", "json", "--set", &set],
        "run",
        0,
    )
    .await;
    assert_eq!(down["direction"], "down");
    let none = json_of(
        &dir,
        &["stages", "down", "--yes", "-o", "json", "--set", &set],
        "run",
        0,
    )
    .await;
    assert_eq!(none["status"], "nothing_to_do");
    // A failed run: its record says why.
    target.on(
        "POST",
        "/vpc",
        vec![Reply::json(400, json!({"error": "quota"}))],
    );
    let failed = json_of(
        &dir,
        &["stages", "up", "-o", "json", "--set", &set],
        "run",
        1,
    )
    .await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["stages"][0]["error"]
            .as_str()
            .unwrap()
            .contains("400"),
        "{failed}"
    );
    assert_eq!(failed["stages"][1]["outcome"], "not run");
}

/// The same records through a coordinator and an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_through_a_coordinator_matches_the_schemas() {
    use baton_e2e::cluster::{agent_binary, start_agent, start_coordinator};
    let bin = Path::new(env!("CARGO_BIN_EXE_baton"));
    let target = Target::start().await;
    target_script(&target);
    let root = baton_e2e::files::temp_dir("json-remote");
    let dir = root.join("project");
    project(&dir);
    let (_coordinator, url) = start_coordinator(bin, &root.join("data"), &[]);
    let _agent = start_agent(
        &agent_binary(bin),
        &url,
        "agent-j",
        &[],
        &root.join("agents"),
        &[],
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--coordinator", &url, "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let status = json_of(
        &dir,
        &["stages", "status", "-o", "json", "--coordinator", &url],
        "status",
        0,
    )
    .await;
    assert_eq!(status["stages"][0]["exports"]["api_token"], "***");
    json_of(
        &dir,
        &["stages", "outputs", "-o", "json", "--coordinator", &url],
        "outputs",
        0,
    )
    .await;
    json_of(
        &dir,
        &["runs", "list", "-o", "json", "--coordinator", &url],
        "runs",
        0,
    )
    .await;
    let (code, lines) = baton(
        &dir,
        &["runs", "show", "1", "-o", "json", "--coordinator", &url],
    )
    .await;
    assert_eq!(code, 0, "{lines}");
    let event = load("event");
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(violations(&event, &v).is_empty(), "{line}");
    }
    // --reveal never goes through a coordinator.
    let (code, out) = baton(
        &dir,
        &["stages", "outputs", "--reveal", "--coordinator", &url],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    // A run through the coordinator prints the same record as a local one.
    let up = [
        "stages",
        "up",
        "-o",
        "json",
        "--coordinator",
        &url,
        "--set",
        &set,
    ];
    let down = [
        "stages",
        "down",
        "--yes",
        "-o",
        "json",
        "--coordinator",
        &url,
        "--set",
        &set,
    ];
    let run = json_of(&dir, &up, "run", 0).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["run"], 2);
    assert_eq!(run["stages"][0]["exports"]["api_token"], "***", "{run}");
    let rolled = json_of(&dir, &down, "run", 0).await;
    assert_eq!(rolled["direction"], "down");
    assert_eq!(rolled["stages"][0]["outcome"], "succeeded", "{rolled}");
    let none = json_of(&dir, &down, "run", 0).await;
    assert_eq!(none["status"], "nothing_to_do");
    let _ = std::fs::remove_dir_all(&root);
}
