//! Files written in the forms apirun documents run unchanged (issue 12, section 1): each test
//! writes a project the way apirun's docs show it, runs the real `baton` binary against a
//! recording target, and checks what the target received.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use baton_e2e::files::write;
use baton_e2e::target::{Reply, Target};
use serde_json::json;

async fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    baton_e2e::cli::run(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args).await
}

fn one_stage(dir: &Path) {
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
}

/// `up.env` and `down.env` are step-scoped variables over the migration's `env`; validation
/// knows them (no "unknown key", no undefined variable), and a secret-named one is masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_scoped_env() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-step-env");
    one_stage(&dir);
    write(
        &dir.join("s/migration/001_item.yaml"),
        "env:\n  kind: widget\n  tier: base\nup:\n  env:\n    tier: gold\n    api_token: step-token-9931\n  request:\n    method: POST\n    url: '{{.api}}/items/{{.kind}}'\n    headers:\n      - name: Authorization\n        value: 'Bearer {{.api_token}}'\n    body:\n      tier: '{{.tier}}'\ndown:\n  env:\n    reason: cleanup\n  method: DELETE\n  url: '{{.api}}/items/{{.kind}}'\n  queries:\n    reason: '{{.reason}}'\n    tier: '{{.tier}}'\n",
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("unknown key"), "{out}");
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let post = &target.requests_to("POST", "/items/widget")[0];
    assert_eq!(
        post.json()["tier"],
        "gold",
        "up.env overrides the migration's env"
    );
    assert_eq!(post.header("authorization"), Some("Bearer step-token-9931"));
    let (_, shown) = baton(&dir, &["runs", "show", "1"]).await;
    assert!(
        !format!("{out}{shown}").contains("step-token-9931"),
        "{out}{shown}"
    );
    let (code, out) = baton(&dir, &["stages", "down", "--yes", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let delete = &target.requests_to("DELETE", "/items/widget")[0];
    // down.env is in scope for down; up.env is not (down sees the migration's `tier`).
    assert_eq!(delete.query, "reason=cleanup&tier=base", "{out}");
}

/// `result_code: []` accepts any status; a JSON `null` extracts as the empty string; a plain
/// text body is sent as `text/plain; charset=utf-8`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_status_null_values_and_text_bodies() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/probe",
        vec![Reply::json(404, json!({"id": null, "name": "n1"}))],
    );
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-any-status");
    one_stage(&dir);
    write(
        &dir.join("s/migration/001_probe.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/probe'\n    body: 'hello {{.api}}'\n  response:\n    result_code: []\n    env_missing: fail\n    env_from:\n      probe_id: id\n      probe_name: name\n",
    );
    write(
        &dir.join("s/migration/002_use.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/use'\n    body:\n      id: '[{{.probe_id}}]'\n      name: '{{.probe_name}}'\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "a 404 under `result_code: []` is accepted:\n{out}");
    let probe = &target.requests_to("POST", "/probe")[0];
    assert_eq!(
        probe.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let used = target.requests_to("PUT", "/use")[0].json();
    assert_eq!(used["id"], "[]", "null extracts as the empty string");
    assert_eq!(used["name"], "n1");
    assert_eq!(
        target.requests_to("PUT", "/use")[0].header("content-type"),
        Some("application/json")
    );
}

/// Conditions: `env "KEY"` reads global.env first, then the process environment; `contains`
/// exists; an unknown function is a validation error (nothing runs), not a run-time failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_functions() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-conditions");
    let stages = |extra: &str| {
        format!(
            "stages:\n  - name: by_env\n    config_path: s/config.yaml\n    condition: '{{{{ eq (env \"TIER\") \"gold\" }}}}'\n  - name: by_contains\n    config_path: s/config.yaml\n    condition: '{{{{ contains \"prod\" .region }}}}'\n{extra}global:\n  env:\n    api: http://127.0.0.1:9\n    TIER: gold\n    region: eu-prod-1\n"
        )
    };
    write(&dir.join("stages.yaml"), &stages(""));
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n",
    );
    let set = format!("api={}", target.url());
    // TIER is set differently in the process environment: global.env wins.
    let (code, out) = baton_e2e::cli::run_with_env(
        Path::new(env!("CARGO_BIN_EXE_baton")),
        &dir,
        &["stages", "up", "--set", &set],
        &[("TIER", "bronze")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("PUT", "/x").len(), 2, "both ran:\n{out}");

    write(
        &dir.join("stages.yaml"),
        &stages(
            "  - name: typo\n    config_path: s/config.yaml\n    condition: '{{ frob .region }}'\n",
        ),
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown function `frob`"), "{out}");
    assert!(
        out.contains("stages.yaml:"),
        "the error names the file:\n{out}"
    );
}

/// Values written in the files may be templates (`vpc_name: "{{.project_name}}-vpc"`), in
/// global.env, a stage's env, a config's env list, a migration's and a step's env: each is
/// rendered once against the layers below it. Values from outside the files (`--set`,
/// `valueFromEnv`, extracted) are inserted as they are, never rendered. `stages validate`
/// checks the templates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_in_variable_values() {
    let target = Target::start().await;
    target.on(
        "POST",
        "/first",
        vec![Reply::json(201, json!({"id": "{{.project_name}}"}))],
    );
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-value-templates");
    let stages = |vpc: &str| {
        format!(
            "stages:\n  - name: s\n    config_path: s/config.yaml\n    env:\n      label: '{{{{.vpc_name}}}}-label'\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    project_name: shop\n    vpc_name: '{vpc}'\n"
        )
    };
    write(&dir.join("stages.yaml"), &stages("{{.project_name}}-vpc"));
    write(
        &dir.join("s/config.yaml"),
        "migrate_dir: migration\nenv:\n  - name: cidr_name\n    value: '{{.vpc_name}}-cidr'\n  - name: region\n    valueFromEnv: REGION_X\n",
    );
    write(
        &dir.join("s/migration/001_first.yaml"),
        "env:\n  item: '{{.label}}-item'\nup:\n  env:\n    full: '{{.item}}/{{.cidr_name}}'\n  request:\n    method: POST\n    url: '{{.api}}/first'\n    body:\n      full: '{{.full}}'\n      region: '{{.region}}'\n      extra: '{{.extra}}'\n  response:\n    env_from:\n      got: id\n",
    );
    write(
        &dir.join("s/migration/002_second.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/second'\n    body:\n      got: '{{.got}}'\n",
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    // Only `extra` is unknown to validation (it comes with --set at run time).
    assert_eq!(out.matches("warning:").count(), 1, "{out}");
    assert!(out.contains("variable `extra`"), "{out}");
    let set = format!("api={}", target.url());
    let (code, out) = baton_e2e::cli::run_with_env(
        Path::new(env!("CARGO_BIN_EXE_baton")),
        &dir,
        &[
            "stages",
            "up",
            "--set",
            &set,
            "--set",
            "extra={{.project_name}}",
        ],
        &[("REGION_X", "{{.project_name}}")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let first = target.requests_to("POST", "/first")[0].json();
    assert_eq!(first["full"], "shop-vpc-label-item/shop-vpc-cidr");
    assert_eq!(
        first["region"], "{{.project_name}}",
        "valueFromEnv is not rendered"
    );
    assert_eq!(first["extra"], "{{.project_name}}", "--set is not rendered");
    let second = target.requests_to("PUT", "/second")[0].json();
    assert_eq!(
        second["got"], "{{.project_name}}",
        "extracted values are not rendered"
    );

    // A typo and a syntax error in a value are reported with the file and line.
    write(&dir.join("stages.yaml"), &stages("{{.projct_name}}-vpc"));
    let (_, out) = baton(&dir, &["stages", "validate"]).await;
    assert!(
        out.contains("stages.yaml:10:") && out.contains("variable `projct_name`"),
        "{out}"
    );
    write(&dir.join("stages.yaml"), &stages("{{.project_name"));
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("stages.yaml:10:") && out.contains("not a valid template"),
        "{out}"
    );
}

/// Config-level `render_body` is the default for the stage's requests; the env-list forms
/// apirun accepts (`value: ""` beside `valueFromEnv`, both set, a name alone); `down.auth`
/// also authenticates the `down.find` lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_defaults_env_list_forms_and_find_auth() {
    let target = Target::start().await;
    target.on(
        "GET",
        "/lookup",
        vec![Reply::json(200, json!({"items": [{"id": "it-7"}]}))],
    );
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-config-forms");
    one_stage(&dir);
    write(
        &dir.join("s/config.yaml"),
        "migrate_dir: migration\nrender_body: false\nenv:\n  - name: from_env\n    value: \"\"\n    valueFromEnv: FORM_VAR\n  - name: both\n    value: written\n    valueFromEnv: FORM_VAR\n  - name: nothing\nauth:\n  - type: basic\n    name: admin\n    config: {username: deployer, password: pw-123456}\n",
    );
    write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n    queries:\n      a: '{{.from_env}}'\n      b: '{{.both}}'\n      c: '[{{.nothing}}]'\n    body: 'kept {{.as_written}}'\ndown:\n  auth: admin\n  find:\n    request:\n      method: GET\n      url: '{{.api}}/lookup'\n    response:\n      env_from:\n        item: items.0.id\n  method: DELETE\n  url: '{{.api}}/x/{{.item}}'\n",
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the value is used"), "{out}");
    let set = format!("api={}", target.url());
    let (code, out) = baton_e2e::cli::run_with_env(
        Path::new(env!("CARGO_BIN_EXE_baton")),
        &dir,
        &["stages", "up", "--set", &set],
        &[("FORM_VAR", "from-the-env")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let put = &target.requests_to("PUT", "/x")[0];
    assert_eq!(put.query, "a=from-the-env&b=written&c=%5B%5D", "{out}");
    assert_eq!(
        put.body, "kept {{.as_written}}",
        "render_body: false from the config"
    );
    let (code, out) = baton_e2e::cli::run_with_env(
        Path::new(env!("CARGO_BIN_EXE_baton")),
        &dir,
        &["stages", "down", "--yes", "--set", &set],
        &[("FORM_VAR", "from-the-env")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let basic = "Basic ZGVwbG95ZXI6cHctMTIzNDU2";
    assert_eq!(
        target.requests_to("GET", "/lookup")[0].header("authorization"),
        Some(basic)
    );
    assert_eq!(
        target.requests_to("DELETE", "/x/it-7")[0].header("authorization"),
        Some(basic)
    );
}

/// `baton up --to VERSION` and `baton down --to VERSION`, as apirun's README uses them
/// (`up --to 3 --dry-run`, `down --to 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_and_down_to_a_version() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-to-version").join("net");
    write(&dir.join("config.yaml"), "migrate_dir: migration\n");
    for v in 1..=3 {
        write(
            &dir.join(format!("migration/00{v}_m.yaml")),
            &format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}/m/{v}'\ndown:\n  method: DELETE\n  url: '{{{{.api}}}}/m/{v}'\n"),
        );
    }
    let set = format!("api={}", target.url());
    let (code, plan) = baton(&dir, &["up", "--to", "2", "--dry-run", "--set", &set]).await;
    assert_eq!(code, 0, "{plan}");
    assert!(plan.contains("2 pending: 001_m, 002_m"), "{plan}");
    let (code, out) = baton(&dir, &["up", "--to", "2", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("PUT", "/m/2").len(), 1, "{out}");
    assert!(target.requests_to("PUT", "/m/3").is_empty(), "{out}");
    let (_, status) = baton(&dir, &["status"]).await;
    assert!(status.contains("2 applied, 1 pending"), "{status}");
    let (code, out) = baton(&dir, &["up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("PUT", "/m/3").len(), 1, "{out}");
    let (code, out) = baton(&dir, &["down", "--to", "1", "--yes", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("DELETE", "/m/3").len(), 1, "{out}");
    assert_eq!(target.requests_to("DELETE", "/m/2").len(), 1, "{out}");
    assert!(target.requests_to("DELETE", "/m/1").is_empty(), "{out}");
    let (_, status) = baton(&dir, &["status"]).await;
    assert!(status.contains("1 applied, 2 pending"), "{status}");
    let (code, out) = baton(&dir, &["down", "--to", "0", "--yes", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("DELETE", "/m/1").len(), 1, "{out}");
    let (code, out) = baton(&dir, &["status", "--to", "1"]).await;
    assert_eq!(code, 2, "{out}");
}

/// `body_file` names and `result_code` entries may be templates: the body file is chosen
/// when the request is sent, among the files the plan read (every file its name can
/// match); a rendered name cannot leave the directory; a result code renders to a status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templated_body_file_and_result_code() {
    let target = Target::start().await;
    target.on("POST", "/vpc", vec![Reply::json(409, json!({}))]);
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("apirun-templated-paths");
    let stages = |env_name: &str| {
        format!("stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    env_name: {env_name}\n    accepted: \"409\"\n")
    };
    write(&dir.join("stages.yaml"), &stages("prod"));
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/bodies/vpc-dev.json"),
        "{\"cidr\": \"10.1.0.0/16\"}",
    );
    write(
        &dir.join("s/bodies/vpc-prod.json"),
        "{\"cidr\": \"10.9.0.0/16\", \"by\": \"{{.env_name}}\"}",
    );
    write(
        &dir.join("s/migration/001_vpc.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc'\n    body_file: '../bodies/vpc-{{.env_name}}.json'\n  response:\n    result_code: ['{{.accepted}}']\n",
    );
    let (code, out) = baton(&dir, &["stages", "validate"]).await;
    assert_eq!(code, 0, "{out}");
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 0, "{out}");
    let sent = target.requests_to("POST", "/vpc")[0].json();
    assert_eq!(sent, json!({"cidr": "10.9.0.0/16", "by": "prod"}));

    // A value cannot make the name leave the directory, and a name no file matches is
    // refused before anything runs.
    let dir2 = baton_e2e::files::temp_dir("apirun-templated-paths-hostile");
    for (path, text) in [
        ("s/config.yaml", "migrate_dir: migration\n".to_owned()),
        ("s/bodies/vpc-dev.json", "{}".to_owned()),
        ("s/migration/001_vpc.yaml", "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc2'\n    body_file: '../bodies/vpc-{{.env_name}}.json'\n".to_owned()),
        ("stages.yaml", stages("x/../../../etc/passwd")),
    ] {
        write(&dir2.join(path), &text);
    }
    let (code, out) = baton(&dir2, &["stages", "up", "--set", &set]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not a file name beside it"), "{out}");
    assert!(target.requests_to("POST", "/vpc2").is_empty());
    write(
        &dir2.join("s/migration/001_vpc.yaml"),
        "up:\n  request:\n    method: POST\n    url: '{{.api}}/vpc2'\n    body_file: '../bodies/net-{{.env_name}}.json'\n",
    );
    let (code, out) = baton(&dir2, &["stages", "validate"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("names no file"), "{out}");
}

/// In distributed mode a value written in the files may read the agent's environment (the
/// coordinator cannot see it): the engine leaves it for the agent, which renders it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_templates_read_the_agents_environment() {
    use baton_e2e::cluster::{agent_binary, start_agent_with_env, start_coordinator};
    let bin = Path::new(env!("CARGO_BIN_EXE_baton"));
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let root = baton_e2e::files::temp_dir("apirun-agent-env");
    let dir = root.join("project");
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\n    env:\n      label: '{{.AGENT_REGION}}-web'\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/items/{{.label}}'\n",
    );
    let (_coordinator, url) = start_coordinator(bin, &root.join("data"), &[]);
    let _agent = start_agent_with_env(
        &agent_binary(bin),
        &url,
        "agent-env",
        &root.join("agents"),
        &[("AGENT_REGION", "westeu")],
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(
        &dir,
        &["stages", "up", "--coordinator", &url, "--set", &set],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        target.requests_to("PUT", "/items/westeu-web").len(),
        1,
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
