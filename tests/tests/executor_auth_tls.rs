//! Auth providers against local token endpoints, and TLS options against a self-signed
//! HTTPS target.

use std::collections::BTreeMap;

use baton_agent::executor::{Direction, StageEnd};
use baton_e2e::stage::{event_text, run, StageDir};
use baton_e2e::target::{Reply, Target};
use baton_e2e::tls::TlsMaterial;
use serde_json::json;

fn failed(end: &StageEnd) -> &str {
    match end {
        StageEnd::Failed(msg) => msg,
        other => panic!("expected a failure, got {other:?}"),
    }
}

const CALL_WITH_AUTH: &str =
    "up:\n  request:\n    method: POST\n    url: '{{.api}}/deploy'\n    auth_name: main\n";

#[tokio::test]
async fn basic_auth_header() {
    let target = Target::start().await;
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: basic\n    name: main\n    config:\n      username: deployer\n      password: '{{.pw}}'\nenv:\n  - name: pw\n    valueFromEnv: DEPLOY_PW\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let env = BTreeMap::from([("DEPLOY_PW".to_owned(), "s3cret-pw".to_owned())]);
    let (report, events) = run(d.task_with_env(Direction::Up, vec![], env)).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    // base64("deployer:s3cret-pw")
    assert_eq!(
        target.requests()[0].header("authorization"),
        Some("Basic ZGVwbG95ZXI6czNjcmV0LXB3")
    );
}

#[tokio::test]
async fn request_authorization_header_wins_over_auth_name() {
    let target = Target::start().await;
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write("s/config.yaml", "migrate_dir: migration\nauth:\n  - type: basic\n    name: main\n    config: {username: u, password: p}\n");
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/deploy'\n    auth_name: main\n    headers:\n      Authorization: 'Token {{.auth.main}}'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded);
    assert_eq!(
        target.requests()[0].header("authorization"),
        Some("Token dTpw")
    );
}

#[tokio::test]
async fn oauth2_client_credentials_nested_config() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/oauth/token",
        vec![Reply::json(
            200,
            json!({"access_token": "tok-cc-123", "token_type": "Bearer"}),
        )],
    );
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: client_credentials\n      grant_config:\n        token_url: '{{.api}}/oauth/token'\n        client_id: cid\n        client_secret: csecret\n        scopes: [deploy, read]\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    d.migration("002_y.yaml", CALL_WITH_AUTH);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let token_reqs = target.requests_to("POST", "/oauth/token");
    assert_eq!(token_reqs.len(), 1, "the token is cached for the stage run");
    assert_eq!(
        token_reqs[0].body,
        "grant_type=client_credentials&client_id=cid&client_secret=csecret&scope=deploy+read"
    );
    for r in target.requests_to("POST", "/deploy") {
        assert_eq!(r.header("authorization"), Some("Bearer tok-cc-123"));
    }
    assert!(
        !event_text(&events).contains("tok-cc-123"),
        "tokens are masked in events"
    );
}

#[tokio::test]
async fn oauth2_password_flat_config() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/token",
        vec![Reply::json(200, json!({"access_token": "tok-pw-456"}))],
    );
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: password\n      token_url: '{{.api}}/token'\n      client_id: cli\n      username: alice\n      password: wonder land\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    assert_eq!(
        target.requests_to("POST", "/token")[0].body,
        "grant_type=password&client_id=cli&username=alice&password=wonder+land"
    );
    assert_eq!(
        target.requests_to("POST", "/deploy")[0].header("authorization"),
        Some("Bearer tok-pw-456")
    );
}

#[tokio::test]
async fn failing_token_endpoint_fails_the_stage_with_its_error() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/token",
        vec![Reply::json(401, json!({"error": "invalid_client"}))],
    );
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: client_credentials\n      token_url: '{{.api}}/token'\n      client_id: c\n      client_secret: wrong\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.contains("auth `main`: token request to"), "{msg}");
    assert!(
        msg.contains("failed with status 401: {\"error\":\"invalid_client\"}"),
        "{msg}"
    );
    assert!(
        target.requests_to("POST", "/deploy").is_empty(),
        "no request without a token"
    );
}

#[tokio::test]
async fn pocketbase_auth_falls_back_to_the_admins_endpoint() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/api/admins/auth-with-password",
        vec![Reply::json(200, json!({"token": "pb-token-789"}))],
    );
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: pocketbase\n    name: main\n    config:\n      base_url: '{{.api}}'\n      email: admin@example.com\n      password: pb-pass\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let su = target.requests_to("POST", "/api/collections/_superusers/auth-with-password");
    assert_eq!(su.len(), 1, "the current endpoint is tried first");
    assert_eq!(
        su[0].json(),
        json!({"identity": "admin@example.com", "password": "pb-pass"})
    );
    assert_eq!(
        target.requests_to("POST", "/deploy")[0].header("authorization"),
        Some("Bearer pb-token-789")
    );
}

#[tokio::test]
async fn unset_value_from_env_fails_before_anything_is_sent() {
    let target = Target::start().await;
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nenv:\n  - name: key\n    valueFromEnv: NOT_SET_ANYWHERE\n",
    );
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x?k={{.key}}'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end).contains(
        "`key` comes from the environment variable `NOT_SET_ANYWHERE`, which is not set"
    ));
    assert!(target.requests().is_empty());
}

const TLS_CALL: &str = "up:\n  request:\n    method: GET\n    url: '{{.api}}/ping'\n";

#[tokio::test]
async fn tls_with_a_custom_ca() {
    let tls = TlsMaterial::generate();
    let target = Target::start_tls(&tls).await;
    target.on("GET", "/ping", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write("s/ca.pem", &tls.ca_pem);
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nclient:\n  ca_file: ca.pem\n  min_tls_version: '1.2'\n",
    );
    d.migration("001_x.yaml", TLS_CALL);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    assert_eq!(target.requests().len(), 1);
}

#[tokio::test]
async fn tls_insecure_accepts_an_unknown_certificate() {
    let tls = TlsMaterial::generate();
    let target = Target::start_tls(&tls).await;
    target.on("GET", "/ping", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nclient:\n  insecure: true\n",
    );
    d.migration("001_x.yaml", TLS_CALL);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
}

#[tokio::test]
async fn tls_refuses_an_unknown_certificate_by_default() {
    let tls = TlsMaterial::generate();
    let target = Target::start_tls(&tls).await;
    target.on("GET", "/ping", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.migration("001_x.yaml", TLS_CALL);
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.to_ascii_lowercase().contains("certificate"), "{msg}");
    assert!(target.requests().is_empty());
}

#[tokio::test]
async fn tls_auth_requests_use_the_stage_client_too() {
    let tls = TlsMaterial::generate();
    let target = Target::start_tls(&tls).await;
    target.on(
        "POST",
        "/token",
        vec![Reply::json(200, json!({"access_token": "tls-token"}))],
    );
    target.on("POST", "/deploy", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.write("s/ca.pem", &tls.ca_pem);
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nclient:\n  ca_file: ca.pem\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: client_credentials\n      token_url: '{{.api}}/token'\n      client_id: c\n      client_secret: s\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    assert_eq!(target.requests().len(), 2);
}

#[tokio::test]
async fn tls_version_bounds_apply() {
    let tls = TlsMaterial::generate();
    let target = Target::start_tls_with(&tls, true).await;
    target.on("GET", "/ping", vec![Reply::status(200)]);
    // A client capped at TLS 1.2 cannot talk to a 1.3-only server ...
    let d = StageDir::new(&target.url());
    d.write("s/ca.pem", &tls.ca_pem);
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nclient:\n  ca_file: ca.pem\n  maxtlsversion: '1.2'\n",
    );
    d.migration("001_x.yaml", TLS_CALL);
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(
        matches!(report.end, StageEnd::Failed(_)),
        "{:?}",
        report.end
    );
    assert!(target.requests().is_empty());
    // ... and one that asks for at least 1.3 can.
    let d = StageDir::new(&target.url());
    d.write("s/ca.pem", &tls.ca_pem);
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nclient:\n  ca_file: ca.pem\n  min_tls_version: '1.3'\n",
    );
    d.migration("001_x.yaml", TLS_CALL);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
}

/// Credentials written in the config are secrets too, not only the tokens made from them:
/// a token endpoint that echoes the client secret in its error does not put it in the
/// stage's error, and a basic-auth password in a URL is masked in the events.
#[tokio::test]
async fn literal_auth_credentials_are_masked() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/token",
        vec![Reply::json(
            401,
            json!({"error": "invalid_client", "got": "sekrit-client-42"}),
        )],
    );
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: client_credentials\n      token_url: '{{.api}}/token'\n      client_id: c\n      client_secret: sekrit-client-42\n",
    );
    d.migration("001_x.yaml", CALL_WITH_AUTH);
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.contains("failed with status 401"), "{msg}");
    assert!(!msg.contains("sekrit-client-42"), "{msg}");
    assert!(!format!("{events:?}").contains("sekrit-client-42"));
}

/// `REGION=eu` read with `valueFromEnv` is a fine value: too short to mask, it does not fail
/// the stage; the stage's log says it is not masked.
#[tokio::test]
async fn a_short_value_from_env_does_not_fail_the_stage() {
    let target = Target::start().await;
    target.on("POST", "/x", vec![Reply::status(201)]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nenv:\n  - name: region\n    valueFromEnv: REGION\n",
    );
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x?r={{.region}}'\n",
    );
    let env = BTreeMap::from([("REGION".to_owned(), "eu".to_owned())]);
    let (report, events) = run(d.task_with_env(Direction::Up, vec![], env)).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{events:?}");
    assert_eq!(target.requests_to("POST", "/x")[0].query, "r=eu");
    assert!(
        format!("{events:?}").contains("`region` is shorter than 4 characters"),
        "{events:?}"
    );
}
