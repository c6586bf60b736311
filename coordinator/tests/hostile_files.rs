//! Odd files and hostile values are refused or read as written, never followed into a hang,
//! a huge read or another resource: devices and FIFOs named as spec files, a UTF-8
//! byte-order mark, symlinked migrations, a body file edited while its run is going, and an
//! id from a target's answer that would send a `down` elsewhere. Through the real `baton`
//! binary.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_e2e::files::write;
use baton_e2e::target::{Reply, Target};

fn temp(name: &str) -> PathBuf {
    baton_e2e::files::temp_dir(&format!("hostile-{name}"))
}

/// Runs `baton` in `dir`, off the async runtime, with a time limit (a hang fails the test).
async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args).await
}

fn stage_project(dir: &Path, config_path: &str) {
    write(
        &dir.join("stages.yaml"),
        &format!("stages:\n  - name: s\n    config_path: {config_path}\n"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_fifos_are_not_read_as_files() {
    let dir = temp("devices");
    stage_project(&dir, "/dev/zero");
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("/dev/zero") && out.contains("not a regular file"),
        "{out}"
    );

    let fifo = dir.join("config.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    stage_project(&dir, "config.fifo");
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("config.fifo") && out.contains("not a regular file"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_is_not_content() {
    let dir = temp("bom");
    write(
        &dir.join("stages.yaml"),
        "\u{feff}stages:\n  - name: s\n    config_path: s/config.yaml\n",
    );
    write(
        &dir.join("s/config.yaml"),
        "\u{feff}migrate_dir: migration\n",
    );
    write(
        &dir.join("s/migration/001_a.yaml"),
        "\u{feff}up:\n  request:\n    method: GET\n    url: http://127.0.0.1:9/a\n",
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid: 1 stages, 1 migrations"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_migrations_are_followed() {
    let dir = temp("symlink");
    stage_project(&dir, "s/config.yaml");
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("shared/002_b.yaml"),
        "up:\n  request:\n    method: GET\n    url: http://127.0.0.1:9/b\n",
    );
    write(
        &dir.join("s/migration/001_a.yaml"),
        "up:\n  request:\n    method: GET\n    url: http://127.0.0.1:9/a\n",
    );
    std::os::unix::fs::symlink(
        dir.join("shared/002_b.yaml"),
        dir.join("s/migration/002_b.yaml"),
    )
    .unwrap();
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid: 1 stages, 2 migrations"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The run sends the body file's bytes as they were when the run was planned, not as they
/// are when the request goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_file_edited_during_the_run_is_sent_as_planned() {
    let dir = temp("body");
    let target = Target::start().await;
    target.on(
        "POST",
        "/slow",
        vec![Reply::json(201, serde_json::json!({})).delayed(Duration::from_secs(2))],
    );
    target.on(
        "POST",
        "/body",
        vec![Reply::json(201, serde_json::json!({}))],
    );
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_slow.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/slow'\n",
    );
    write(
        &dir.join("s/migration/002_body.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/body'\n    body_file: body.json\n",
    );
    write(&dir.join("s/migration/body.json"), "{\"planned\": true}");
    let set = format!("api={}", target.url());
    let run = {
        let dir = dir.clone();
        tokio::spawn(async move { baton(&dir, &["stages", "up", "--set", &set]).await })
    };
    // While the first migration waits for its answer, the body file changes.
    let log = target.clone_handle();
    tokio::task::spawn_blocking(move || {
        baton_e2e::cluster::wait_for("the slow request", Duration::from_secs(30), || {
            !log.requests_to("POST", "/slow").is_empty()
        })
    })
    .await
    .unwrap();
    write(&dir.join("s/migration/body.json"), "{\"edited\": true}");
    let (code, out) = run.await.unwrap();
    assert_eq!(code, 0, "{out}");
    let sent = target.requests_to("POST", "/body");
    assert_eq!(sent.len(), 1, "{out}");
    assert_eq!(sent[0].body, "{\"planned\": true}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An id a target returned, `../../leak?code=201&`, would have turned the stage's
/// `DELETE /items/{{.item_id}}` into `DELETE /leak?code=201&`: the value may not change which
/// resource the URL names, so the down fails naming the variable and nothing is deleted.
/// Values in the query are encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inserted_value_cannot_redirect_a_request() {
    let dir = temp("url");
    let target = Target::start().await;
    target.honour_idempotency_keys();
    target.on(
        "POST",
        "/items",
        vec![Reply::json(
            201,
            serde_json::json!({"id": "../../leak?code=201&"}),
        )],
    );
    target.answer_unscripted_like_a_cloud();
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    owner: a&b=c\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_item.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/items?owner={{.owner}}'\n  response:\n    env_from:\n      item_id: id\ndown:\n  request:\n    method: DELETE\n    url: '{{.api}}/items/{{.item_id}}'\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let posted = target.requests_to("POST", "/items");
    assert_eq!(posted.len(), 1);
    assert_eq!(
        posted[0].query, "owner=a%26b%3Dc",
        "query values are encoded"
    );
    let (code, out) = baton(&dir, &["stages", "down", "--yes", "--set", &set]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("variable `item_id` inserted into the URL adds"),
        "{out}"
    );
    assert!(
        target.requests().iter().all(|r| r.method != "DELETE"),
        "nothing was deleted: {:?}",
        target.requests()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
