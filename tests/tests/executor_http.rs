//! The stage executor against a recording target: HTTP migrations, extraction, retries,
//! down steps, injection safety. Every test talks real HTTP on 127.0.0.1.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_agent::executor::{AppliedMigration, Direction, StageEnd, StageEvent};
use baton_e2e::stage::{event_text, run, run_with_cancel, StageDir};
use baton_e2e::target::{Reply, Target};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn failed(end: &StageEnd) -> &str {
    match end {
        StageEnd::Failed(msg) => msg,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Seed 001's flow: create a VPC, extract `vpc_id` and `subnet_id` (`vpc.subnets.0.id`),
/// use them in the next request.
#[tokio::test]
async fn seed_flow_extracts_and_reuses_variables() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/vpc",
        vec![Reply::json(
            201,
            json!({"vpc": {"id": "vpc-123", "subnets": [{"id": "subnet-a"}, {"id": "subnet-b"}]}}),
        )],
    );
    target.on(
        "POST",
        "/database",
        vec![Reply::json(
            201,
            json!({"database": {"endpoint": "db.internal:5432"}}),
        )],
    );
    let mut d = StageDir::new(&target.url());
    d.global.insert("region".into(), "us-west-2".into());
    d.migration(
        "001_create_vpc.yaml",
        r#"up:
  name: create VPC
  request:
    method: POST
    url: "{{.api}}/vpc"
    body: |
      {
        "cidr": "10.0.0.0/16",
        "region": "{{.region}}"
      }
  response:
    result_code: ["201"]
    env_from:
      vpc_id: "vpc.id"
      subnet_id: "vpc.subnets.0.id"
"#,
    );
    d.migration(
        "002_create_database.yaml",
        r#"up:
  request:
    method: POST
    url: "{{.api}}/database"
    body:
      vpc_id: "{{.vpc_id}}"
      subnet_id: "{{.env.subnet_id}}"
  response:
    env_from:
      db_endpoint: database.endpoint
"#,
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let reqs = target.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].json(),
        json!({"cidr": "10.0.0.0/16", "region": "us-west-2"})
    );
    assert_eq!(reqs[0].header("content-type"), Some("application/json"));
    assert_eq!(
        reqs[1].json(),
        json!({"vpc_id": "vpc-123", "subnet_id": "subnet-a"})
    );
    assert_eq!(report.migrations.len(), 2);
    assert_eq!(
        report.migrations[0]
            .extracted
            .get("vpc_id")
            .map(String::as_str),
        Some("vpc-123")
    );
    assert_eq!(
        report.exported.get("db_endpoint").map(String::as_str),
        Some("db.internal:5432")
    );
    assert_eq!(report.migrations[0].digest.len(), 64);
    // One started and one finished event per migration, in order.
    let finished: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            StageEvent::MigrationFinished(m) => Some(m.version),
            _ => None,
        })
        .collect();
    assert_eq!(finished, [1, 2]);
}

#[tokio::test]
async fn methods_headers_queries_in_both_forms() {
    let target = Target::start().await;
    target.on("PUT", "/things/7", vec![Reply::status(204)]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_put.yaml",
        r#"up:
  request:
    method: put
    url: "{{.api}}/things/7"
    headers:
      X-One: "1"
    queries:
      - name: tag
        value: "a b&c"
      - name: n
        value: 2
"#,
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let r = &target.requests()[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.header("x-one"), Some("1"));
    assert_eq!(r.query, "tag=a+b%26c&n=2");
    assert!(r
        .header("idempotency-key")
        .is_some_and(|k| k.starts_with("baton-")));
}

#[tokio::test]
async fn server_error_then_success_is_retried_with_the_same_key() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/x",
        vec![Reply::text(503, "busy"), Reply::json(200, json!({"id": 1}))],
    );
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let reqs = target.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].header("idempotency-key"),
        reqs[1].header("idempotency-key")
    );
    assert_eq!(
        target.effect_counts().values().copied().collect::<Vec<_>>(),
        [2]
    );
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/x",
        vec![
            Reply::status(429).header("Retry-After", "1"),
            Reply::status(200),
        ],
    );
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded);
    assert_eq!(target.requests().len(), 2);
    // The pause came from Retry-After (1 s), not from the 10 ms backoff the task set.
    let text = event_text(&events);
    assert!(
        text.contains("answered 429; attempt 2 of 3 in 1s"),
        "{text}"
    );
}

#[tokio::test]
async fn client_error_is_not_retried() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/x",
        vec![Reply::text(400, "{\"error\":\"bad cidr\"}")],
    );
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.contains("migration 001_x (up)"), "{msg}");
    assert!(
        msg.contains("answered 400, expected a 2xx status: {\"error\":\"bad cidr\"}"),
        "{msg}"
    );
    assert_eq!(target.requests().len(), 1);
    assert!(report.migrations.is_empty());
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let target = Target::start().await;
    target.on("POST", "/x", vec![Reply::status(502)]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "retry:\n  max_attempts: 2\nup:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end).contains("answered 502"));
    assert_eq!(target.requests().len(), 2);
}

#[tokio::test]
async fn connection_refused_is_retried_then_fails() {
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = StageDir::new(&format!("http://127.0.0.1:{port}"));
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/x'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.contains("failed after 3 attempt(s)"), "{msg}");
    let attempts = events
        .iter()
        .filter(|e| matches!(e, StageEvent::RequestSent { status: None, .. }))
        .count();
    assert_eq!(attempts, 3);
}

#[tokio::test]
async fn env_missing_fail_and_skip() {
    let target = Target::start().await;
    target.on("POST", "/x", vec![Reply::json(200, json!({"other": 1}))]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n  response:\n    env_missing: fail\n    env_from:\n      id: thing.id\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end)
        .contains("the response has no value at `thing.id` for `id` (env_missing: fail)"));

    let d = StageDir::new(&target.url());
    d.migration("001_x.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n  response:\n    env_from:\n      id: thing.id\n");
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded);
    assert!(report.exported.is_empty());
}

#[tokio::test]
async fn missing_variable_names_itself_and_the_file_and_sends_nothing() {
    let target = Target::start().await;
    let d = StageDir::new(&target.url());
    d.migration("001_x.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/{{.vpc_id | default \"v\"}}'\n    body:\n      a: '{{.nope}}'\n");
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    let msg = failed(&report.end);
    assert!(msg.contains("variable `nope` is not defined"), "{msg}");
    assert!(msg.contains("s/migration/001_x.yaml"), "{msg}");
    assert!(target.requests().is_empty());
}

#[tokio::test]
async fn down_uses_values_stored_at_up() {
    let target = Target::start().await;
    target.on("DELETE", "/vpc/vpc-9", vec![Reply::status(204)]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_vpc.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc'\n  response:\n    env_from: {vpc_id: id}\ndown:\n  method: DELETE\n  url: '{{.api}}/vpc/{{.vpc_id}}'\n  result_code: [204]\n",
    );
    let applied = vec![AppliedMigration {
        version: 1,
        name: "vpc".into(),
        digest: "d".into(),
        vars: BTreeMap::from([("vpc_id".to_owned(), "vpc-9".to_owned())]),
    }];
    let (report, events) = run(d.task(
        Direction::Down {
            to: 0,
            skip_missing_down: false,
        },
        applied,
    ))
    .await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    assert_eq!(target.requests_to("DELETE", "/vpc/vpc-9").len(), 1);
    assert_eq!(report.migrations[0].direction, "down");
    assert!(
        report.exported.is_empty(),
        "rolled-back migrations export nothing"
    );
}

#[tokio::test]
async fn down_result_code_is_honoured() {
    let target = Target::start().await;
    target.on("DELETE", "/vpc/v", vec![Reply::status(200)]);
    let d = StageDir::new(&target.url());
    d.migration("001_vpc.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc'\ndown:\n  method: DELETE\n  url: '{{.api}}/vpc/v'\n  result_code: [204]\n");
    let applied = vec![AppliedMigration {
        version: 1,
        name: "vpc".into(),
        digest: "d".into(),
        vars: BTreeMap::new(),
    }];
    let (report, _) = run(d.task(
        Direction::Down {
            to: 0,
            skip_missing_down: false,
        },
        applied,
    ))
    .await;
    assert!(failed(&report.end).contains("answered 200, expected 204"));
}

#[tokio::test]
async fn find_then_delete() {
    let target = Target::start().await;
    target.on(
        "GET",
        "/databases",
        vec![Reply::json(200, json!({"items": [{"engine": "mysql", "id": "db-1"}, {"engine": "postgres", "id": "db-2"}]}))],
    );
    target.on("DELETE", "/databases/db-2", vec![Reply::status(204)]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_db.yaml",
        r#"up:
  request:
    method: POST
    url: "{{.api}}/databases"
down:
  find:
    request:
      method: GET
      url: "{{.api}}/databases"
    response:
      env_from:
        db_id: 'items.#(engine=="postgres").id'
  request:
    method: DELETE
    url: "{{.api}}/databases/{{.db_id}}"
"#,
    );
    let applied = vec![AppliedMigration {
        version: 1,
        name: "db".into(),
        digest: "d".into(),
        vars: BTreeMap::new(),
    }];
    let (report, events) = run(d.task(
        Direction::Down {
            to: 0,
            skip_missing_down: false,
        },
        applied,
    ))
    .await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let methods: Vec<String> = target
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(methods, ["GET /databases", "DELETE /databases/db-2"]);
}

#[tokio::test]
async fn rolling_back_a_migration_without_down_names_it() {
    let target = Target::start().await;
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let applied = vec![AppliedMigration {
        version: 1,
        name: "x".into(),
        digest: "d".into(),
        vars: BTreeMap::new(),
    }];
    let (report, _) = run(d.task(
        Direction::Down {
            to: 0,
            skip_missing_down: false,
        },
        applied,
    ))
    .await;
    assert!(failed(&report.end).contains("001_x.yaml: migration has no `down` step"));
}

#[tokio::test]
async fn applied_migrations_are_not_sent_again() {
    let target = Target::start().await;
    target.on("POST", "/two", vec![Reply::status(201)]);
    let d = StageDir::new(&target.url());
    d.migration(
        "001_one.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/one'\n",
    );
    d.migration(
        "002_two.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/two?x={{.from_one}}'\n",
    );
    let applied = vec![AppliedMigration {
        version: 1,
        name: "one".into(),
        digest: "d".into(),
        vars: BTreeMap::from([("from_one".to_owned(), "kept".to_owned())]),
    }];
    let (report, _) = run(d.task(Direction::Up, applied)).await;
    assert_eq!(report.end, StageEnd::Succeeded);
    let reqs = target.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].path.as_str(), reqs[0].query.as_str()),
        ("/two", "x=kept")
    );
    assert_eq!(
        report.exported.get("from_one").map(String::as_str),
        Some("kept")
    );
}

/// RELIABILITY.md scenario 17: a variable cannot change a JSON body's structure.
#[tokio::test]
async fn injection_in_a_json_body_stays_one_string() {
    let target = Target::start().await;
    target.on("POST", "/users", vec![Reply::status(201)]);
    let mut d = StageDir::new(&target.url());
    d.global
        .insert("name".into(), r#""}, "admin": true, "x": {""#.into());
    d.global.insert("other".into(), "SECRET-OTHER".into());
    d.global.insert("templ".into(), "{{.other}}".into());
    d.migration(
        "001_text_body.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/users'\n    body: '{\"name\": \"{{.name}}\", \"raw\": {{.name}}, \"t\": \"{{.templ}}\"}'\n",
    );
    d.migration(
        "002_yaml_body.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/users'\n    body:\n      name: '{{.name}}'\n      t: '{{.templ}}'\n",
    );
    // `templ` comes from outside the files (as with `--set templ={{.other}}`): inserted as it
    // is. (Values written in the files are rendered once; see the apirun-forms tests.)
    let mut task = d.task(Direction::Up, vec![]);
    task.vars.literal_globals = vec!["name".into(), "templ".into()];
    let (report, events) = run(task).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let reqs = target.requests();
    let first = reqs[0].json();
    assert_eq!(
        first,
        json!({"name": r#""}, "admin": true, "x": {""#, "raw": r#""}, "admin": true, "x": {""#, "t": "{{.other}}"})
    );
    let second = reqs[1].json();
    assert_eq!(
        second,
        json!({"name": r#""}, "admin": true, "x": {""#, "t": "{{.other}}"})
    );
    for r in &reqs {
        assert!(
            !r.body.contains("SECRET-OTHER"),
            "a value was rendered twice: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn line_breaks_in_headers_fail_before_sending() {
    let target = Target::start().await;
    let mut d = StageDir::new(&target.url());
    d.global.insert("evil".into(), "x\r\nX-Admin: true".into());
    d.migration("001_x.yaml", "up:\n  request:\n    method: GET\n    url: '{{.api}}/x'\n    headers:\n      X-Tag: '{{.evil}}'\n");
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end)
        .contains("header `X-Tag` contains a line break (CR or LF); nothing was sent"));
    assert!(target.requests().is_empty());
}

#[tokio::test]
async fn oversized_response_fails_cleanly() {
    let target = Target::start().await;
    target.on("GET", "/big", vec![Reply::text(200, &"x".repeat(5000))]);
    let d = StageDir::new(&target.url());
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nmax_response_bytes: 1024\n",
    );
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/big'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(failed(&report.end).contains("the response is larger than 1024 bytes"));
}

#[tokio::test]
async fn cancel_aborts_the_request_in_flight() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/slow",
        vec![Reply::status(200).delayed(Duration::from_secs(30))],
    );
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/slow'\n",
    );
    d.migration(
        "002_y.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/never'\n",
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = async {
        // Cancel once the target has the request: bounded wait on a condition, not a sleep.
        for _ in 0..500 {
            if !target.requests().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trigger.cancel();
    };
    let ((report, _), ()) = tokio::join!(
        run_with_cancel(d.task(Direction::Up, vec![]), cancel),
        watcher
    );
    assert_eq!(report.end, StageEnd::Cancelled);
    assert!(target.requests_to("POST", "/never").is_empty());
}

#[tokio::test]
async fn stage_timeout_ends_as_timed_out() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/slow",
        vec![Reply::status(200).delayed(Duration::from_secs(30))],
    );
    let d = StageDir::new(&target.url());
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/slow'\n",
    );
    let mut task = d.task(Direction::Up, vec![]);
    task.timeout = Some(Duration::from_millis(300));
    let (report, _) = run(task).await;
    assert_eq!(report.end, StageEnd::TimedOut);
}

#[tokio::test]
async fn wait_health_check_runs_before_migrations() {
    let target = Target::start().await;
    target.on(
        "GET",
        "/health",
        vec![Reply::status(503), Reply::status(503), Reply::status(200)],
    );
    target.on("POST", "/x", vec![Reply::status(201)]);
    let d = StageDir::new(&target.url());
    d.write("s/config.yaml", "migrate_dir: migration\nwait:\n  url: '{{.api}}/health'\n  status: 200\n  interval: 100ms\n  timeout: 10s\n");
    d.migration(
        "001_x.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/x'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let order: Vec<String> = target.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(order, ["/health", "/health", "/health", "/x"]);
}

#[tokio::test]
async fn body_file_rendered_and_render_body_false() {
    let target = Target::start().await;
    target.on("PUT", "/settings", vec![Reply::status(200)]);
    let mut d = StageDir::new(&target.url());
    d.global.insert("theme".into(), "dark".into());
    d.write(
        "s/bodies/settings.json",
        "{\"theme\": \"{{.theme}}\", \"n\": 1}\n",
    );
    d.migration("001_file.yaml", "up:\n  request:\n    method: PUT\n    url: '{{.api}}/settings'\n    body_file: ../bodies/settings.json\n");
    d.migration(
        "002_literal.yaml",
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/settings'\n    render_body: false\n    body: 'keep {{.theme}} as written'\n",
    );
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    assert_eq!(report.end, StageEnd::Succeeded, "{}", event_text(&events));
    let reqs = target.requests();
    assert_eq!(reqs[0].json(), json!({"theme": "dark", "n": 1}));
    assert_eq!(reqs[0].header("content-type"), Some("application/json"));
    assert_eq!(reqs[1].body, "keep {{.theme}} as written");
}

#[tokio::test]
async fn retry_policy_levels_config_then_migration() {
    let target = Target::start().await;
    target.on("POST", "/a", vec![Reply::status(500)]);
    target.on("POST", "/b", vec![Reply::status(500)]);
    let d = StageDir::new(&target.url());
    // The stage config allows 4 attempts; migration 2 narrows that to 1.
    d.write(
        "s/config.yaml",
        "migrate_dir: migration\nretry:\n  max_attempts: 4\n  initial_backoff: 1ms\n",
    );
    d.migration(
        "001_a.yaml",
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/a'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(matches!(report.end, StageEnd::Failed(_)));
    assert_eq!(target.requests_to("POST", "/a").len(), 4);
    d.migration(
        "001_a.yaml",
        "retry:\n  max_attempts: 1\nup:\n  request:\n    method: POST\n    url: '{{.api}}/b'\n",
    );
    let (report, _) = run(d.task(Direction::Up, vec![])).await;
    assert!(matches!(report.end, StageEnd::Failed(_)));
    assert_eq!(target.requests_to("POST", "/b").len(), 1);
}
