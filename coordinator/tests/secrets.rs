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
