//! Command steps (real processes) and secret masking in every emitted event.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_agent::executor::{Direction, StageEnd, StageEvent};
use baton_common::template::{base64_encode, json_escape, query_escape};
use baton_e2e::stage::{event_text, run, StageDir};
use baton_e2e::target::{Reply, Target};

fn failed(end: &StageEnd) -> &str {
    match end {
        StageEnd::Failed(msg) => msg,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn logs(events: &[StageEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            StageEvent::Log { line, .. } => Some(line.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn command_exports_json_outputs() {
    let d = StageDir::new("http://127.0.0.1:9");
    d.migration(
        "001_tf.yaml",
        r#"up:
  command:
    program: sh
    args: ["-c", "echo 'applying {{.region}}' >&2; printf '{\"outputs\": {\"vpc_id\": {\"value\": \"vpc-%s\"}, \"n\": 3}}' \"$SUFFIX\""]
    env:
      SUFFIX: "{{.region}}"
  response:
    env_from:
      vpc_id: outputs.vpc_id.value
      count: outputs.n
"#,
    );
    let mut task = d.task(Direction::Up, vec![]);
    task.vars.stage.insert("region".into(), "eu1".into());
    let (report, events) = run(task).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    assert_eq!(
        report.exported.get("vpc_id").map(String::as_str),
        Some("vpc-eu1")
    );
    assert_eq!(report.exported.get("count").map(String::as_str), Some("3"));
    assert!(
        logs(&events).contains(&"stderr: applying eu1".to_owned()),
        "{:?}",
        logs(&events)
    );
}

#[tokio::test]
async fn failing_command_fails_the_step_with_its_stderr() {
    let d = StageDir::new("http://127.0.0.1:9");
    d.migration("001_x.yaml", "up:\n  command:\n    program: sh\n    args: ['-c', 'echo plan failed: quota >&2; exit 3']\n");
    d.migration(
        "002_never.yaml",
        "up:\n  command:\n    program: sh\n    args: ['-c', 'echo should not run']\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(
        msg.contains("`sh` exited with code 3: plan failed: quota"),
        "{msg}"
    );
    assert!(!logs(&events).iter().any(|l| l.contains("should not run")));
}

#[tokio::test]
async fn command_timeout_kills_the_process_group() {
    let d = StageDir::new("http://127.0.0.1:9");
    let marker = d.path().join("child-survived");
    // The shell starts a background child that would write the marker after 2 s; killing
    // the whole group must stop it too.
    d.migration(
        "001_slow.yaml",
        &format!(
            "up:\n  command:\n    program: sh\n    args: ['-c', '(sleep 2; touch {}) & sleep 30']\n    timeout: 300ms\n",
            marker.display()
        ),
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(
        msg.contains("did not finish within 300ms; it was killed"),
        "{msg}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !marker.exists(),
        "a child of the command outlived the timeout"
    );
}

#[tokio::test]
async fn missing_program_is_a_clear_error() {
    let d = StageDir::new("http://127.0.0.1:9");
    d.migration(
        "001_x.yaml",
        "up:\n  command:\n    program: no-such-program-baton\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end).contains("cannot start `no-such-program-baton`"));
}

/// RELIABILITY.md scenario 18 for the executor: a secret never appears in events, in any of
/// its forms, including split across two output chunks.
#[tokio::test]
async fn secrets_are_masked_in_every_form() {
    let secret = "Sup3r/Secret+Value \"q\"";
    let target = Target::start().await;
    // The target echoes the secret back in several encodings in an error body.
    let echoed = format!(
        "raw={secret} b64={} url={} json={}",
        base64_encode(secret.as_bytes()),
        query_escape(secret),
        json_escape(secret)
    );
    target.on("POST", "/fail", vec![Reply::text(400, &echoed)]);
    target.on("GET", "/ok", vec![Reply::status(200)]);
    let mut d = StageDir::new(&target.url());
    d.secrets = vec!["declared".into()];
    d.global
        .insert("declared".into(), "declared-secret-42".into());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nenv:\n  - name: token\n    valueFromEnv: API_TOKEN\n",
    );
    d.migration(
        "001_get.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/ok?t={{.token}}&d={{.declared}}'\n",
    );
    d.migration(
        "002_cmd.yaml",
        r#"up:
  command:
    program: sh
    args: ["-c", "printf 'one %s\n' \"$T\"; printf 'b64 %s\n' \"$(printf %s \"$T\" | base64)\"; printf 'split %s' \"${T%???????????}\"; sleep 0.05; printf '%s\n' \"${T#???????????}\"; echo declared=$D"]
    env:
      T: "{{.token}}"
      D: "{{.declared}}"
"#,
    );
    d.migration(
        "003_fail.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/fail?t={{.token}}'\n",
    );
    let env = BTreeMap::from([("API_TOKEN".to_owned(), secret.to_owned())]);
    let (report, events) = run(d.task_with_env(Direction::Up, vec![], env)).await;
    let msg = failed(&report.end).to_owned();
    let text = format!("{}\n{msg}", event_text(&events));
    for form in [
        secret.to_owned(),
        base64_encode(secret.as_bytes()),
        query_escape(secret),
        query_escape(secret).replace('+', "%20"),
        json_escape(secret),
        "declared-secret-42".to_owned(),
    ] {
        assert!(
            !text.contains(&form),
            "secret form {form:?} leaked:\n{text}"
        );
    }
    // The request really carried it (URL-encoded), and the logs really had the lines.
    assert!(target.requests_to("GET", "/ok")[0]
        .query
        .contains("declared-secret-42"));
    let lines = logs(&events);
    assert!(lines.contains(&"one ***".to_owned()), "{lines:?}");
    assert!(lines.contains(&"declared=***".to_owned()), "{lines:?}");
    assert!(
        lines.contains(&"split ***".to_owned()),
        "written in two chunks, masked as one: {lines:?}"
    );
    assert!(lines.contains(&"b64 ***".to_owned()), "{lines:?}");
    assert!(msg.contains("raw=*** b64=*** url=*** json=***"), "{msg}");
}

/// A value from the environment too short to mask (`PIN=123`) used to fail the stage; a
/// short value is a fine value (`REGION=eu`), so the stage runs and its log says the value
/// is not masked.
#[tokio::test]
async fn secrets_shorter_than_four_characters_are_noted_not_fatal() {
    let d = StageDir::new("http://127.0.0.1:9");
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nenv:\n  - name: pin\n    valueFromEnv: PIN\n",
    );
    d.migration("001_x.yaml", "up:\n  command:\n    program: 'true'\n");
    let env = BTreeMap::from([("PIN".to_owned(), "123".to_owned())]);
    let (report, events) = run(d.task_with_env(Direction::Up, vec![], env)).await;
    assert_eq!(report.end, StageEnd::Succeeded);
    assert!(format!("{events:?}").contains("`pin` is shorter than 4 characters"));
}

#[tokio::test]
async fn extracted_values_of_declared_secrets_are_masked_from_then_on() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/db",
        vec![Reply::text(201, r#"{"password": "pw-extracted-123"}"#)],
    );
    target.on(
        "POST",
        "/echo",
        vec![Reply::text(400, "got pw-extracted-123")],
    );
    let mut d = StageDir::new(&target.url());
    d.secrets = vec!["db_password".into()];
    d.migration("001_db.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/db'\n  response:\n    env_from:\n      db_password: password\n");
    d.migration(
        "002_use.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/echo?p={{.db_password}}'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end).to_owned();
    let text = format!("{}{msg}", event_text(&events));
    // The value appears only in the MigrationFinished event's extracted map (the caller stores
    // it); never in a URL, a log line or an error.
    let leaked: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pw-extracted-123") && !l.starts_with("MigrationFinished"))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    assert!(msg.contains("got ***"), "{msg}");
    assert_eq!(report.secret_exports, vec!["db_password".to_owned()]);
}

/// The environment where a stage runs is read beside the stage's variables, not copied into
/// them: its values still reach templates, and its secrets (named like one, or declared)
/// are still masked, while a name a stage's own layer sets wins over it.
#[tokio::test]
async fn environment_values_reach_templates_and_its_secrets_stay_masked() {
    let mut d = StageDir::new("http://127.0.0.1:9");
    d.secrets = vec!["REGION_CODE".into()];
    d.global.insert("PLAIN".into(), "from-global".into());
    d.global.insert("OWN".into(), "own-global".into());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nenv:\n  - name: OWN\n    value: 'own-{{.PLAIN}}'\n",
    );
    d.migration(
        "001_x.yaml",
        r#"up:
  command:
    program: sh
    args: ["-c", "printf 'env %s %s %s\n' \"$API_TOKEN\" \"$REGION_CODE\" \"$PLAIN\"; printf 'tmpl %s %s %s\n' '{{.API_TOKEN}}' '{{.REGION_CODE}}' '{{.PLAIN}}'; echo 'own {{.OWN}}'"]
"#,
    );
    let env = BTreeMap::from([
        ("API_TOKEN".to_owned(), "env-token-5150".to_owned()),
        ("REGION_CODE".to_owned(), "weu-declared-77".to_owned()),
        ("PLAIN".to_owned(), "plain-value-99".to_owned()),
    ]);
    let (report, events) = run(d.task_with_env(Direction::Up, vec![], env)).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{events:?}");
    let lines = logs(&events);
    assert!(
        lines.contains(&"env *** *** plain-value-99".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"tmpl *** *** plain-value-99".to_owned()),
        "the environment wins over global.env, and reaches templates: {lines:?}"
    );
    assert!(
        lines.contains(&"own own-plain-value-99".to_owned()),
        "a config value rendered from the environment: {lines:?}"
    );
    let text = event_text(&events);
    assert!(!text.contains("env-token-5150") && !text.contains("weu-declared-77"));
}
