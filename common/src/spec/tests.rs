use super::*;
use crate::diag::Severity;

fn project(files: &[(&str, &str)]) -> Loaded {
    let mut mem = MemoryFiles::default();
    for (p, c) in files {
        mem.insert(p, c.as_bytes());
    }
    load_project(Path::new("stages.yaml"), &mem, LoadOptions::default())
}

const STAGES: &str = "\
apiVersion: apirun/v1
kind: StageOrchestration
stages:
  - name: infra
    config_path: infra/config.yaml
    env:
      region: us-west-2
      count: 3
  - name: db
    config_path: db/config.yaml
    depends_on: [infra]
    env_from_stages:
      - stage: infra
        vars: [vpc_id]
    timeout: 1m30s
    on_failure: skip_dependents
    condition: \"{{.environment}} == 'production'\"
global:
  env:
    environment: production
    api: http://127.0.0.1:1
  wait_between_stages: 10s
  max_concurrent_stages: 2
";

const INFRA_CONFIG: &str = "\
migrate_dir: ./migration
auth:
  - type: basic
    name: api
    config:
      username: u
      password: '{{.secret}}'
env:
  - name: secret
    valueFromEnv: API_SECRET
  - name: vpc_cidr
    value: 10.0.0.0/16
store:
  type: sqlite
";

const CREATE_VPC: &str = "\
up:
  name: create VPC
  request:
    method: post
    url: '{{.api}}/vpc'
    auth_name: api
    headers:
      - name: X-Region
        value: '{{.region}}'
    body: |
      {\"cidr\": \"{{.vpc_cidr}}\"}
  response:
    result_code: [\"201\", 200]
    env_from:
      vpc_id: vpc.id
down:
  method: DELETE
  url: '{{.api}}/vpc/{{.vpc_id}}'
";

const DB_CONFIG: &str = "env:\n  engine: postgres\n";
const CREATE_DB: &str = "\
up:
  request:
    method: POST
    url: '{{.api}}/db'
    body:
      vpc: '{{.vpc_id}}'
      engine: '{{.engine}}'
      size: 10
";

fn good() -> Vec<(&'static str, &'static str)> {
    vec![
        ("stages.yaml", STAGES),
        ("infra/config.yaml", INFRA_CONFIG),
        ("infra/migration/001_create_vpc.yaml", CREATE_VPC),
        ("db/config.yaml", DB_CONFIG),
        ("db/migration/001_create_db.yaml", CREATE_DB),
    ]
}

#[test]
fn loads_a_valid_project() {
    let loaded = project(&good());
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    let p = loaded.project.expect("project");
    assert_eq!(p.stages.len(), 2);
    let infra = &p.spec.stages[0];
    assert_eq!(infra.env[1].value, "3");
    let db = &p.spec.stages[1];
    assert_eq!(db.timeout.as_ref().unwrap().value, Duration::from_secs(90));
    assert_eq!(db.on_failure, OnFailure::SkipDependents);
    assert_eq!(
        p.spec.global.max_concurrent_stages.as_ref().unwrap().value,
        2
    );
    let m = &p.stages[0].migrations[0];
    assert_eq!((m.version, m.name.as_str()), (1, "create_vpc"));
    let Some(StepAction::Request(req)) = &m.up.as_ref().unwrap().action else {
        panic!("request")
    };
    assert_eq!(req.method.value, "POST");
    assert_eq!(m.up.as_ref().unwrap().response.result_code, vec![201, 200]);
    let Some(StepAction::Request(down)) = &m.down.as_ref().unwrap().action else {
        panic!("flat down")
    };
    assert_eq!(down.method.value, "DELETE");
    assert_eq!(
        p.stages[0].config.env[0].secret_from.as_deref(),
        Some("API_SECRET")
    );
    assert_eq!(p.inputs.len(), 5);
    // The ignored `store:` key gives a notice, nothing more.
    assert_eq!(loaded.diagnostics.count(Severity::Notice), 1);
    assert_eq!(
        loaded.diagnostics.count(Severity::Warning),
        0,
        "{}",
        loaded.diagnostics
    );
}

#[test]
fn reports_every_problem_at_once() {
    let mut files = good();
    files[0] = (
        "stages.yaml",
        "stages:\n  - name: a\n    config_path: infra/config.yaml\n    dependson: [b]\n    on_failure: explode\n  - name: a\n    config_path: nope/config.yaml\n    depends_on: [zzz]\n",
    );
    let loaded = project(&files);
    assert!(loaded.project.is_none());
    let text = loaded.diagnostics.to_string();
    for want in [
        "stages.yaml:4:5: warning: unknown key `dependson` in a stage",
        "did you mean `depends_on`?",
        "stages.yaml:5:17: error: bad on_failure value `explode`",
        "stages.yaml:6:11: error: duplicate stage name `a` (first defined on line 2)",
        "stages.yaml:8:18: error: stage `a`: depends_on names unknown stage `zzz`",
        "stages.yaml:7:18: error: stage `a`: config file `nope/config.yaml` cannot be read: not found",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn missing_variable_warns_with_position() {
    let mut files = good();
    files[4] = (
        "db/migration/001_create_db.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/{{.nope}}'\n",
    );
    let loaded = project(&files);
    let text = loaded.diagnostics.to_string();
    assert!(
        text.contains("db/migration/001_create_db.yaml:4:22: warning: stage `db`: variable `nope` is used but no source provides it"),
        "{text}"
    );
}

#[test]
fn template_syntax_error_points_into_block_scalar() {
    let mut files = good();
    files[4] = (
        "db/migration/001_create_db.yaml",
        "up:\n  request:\n    method: POST\n    url: x\n    body: |\n      {\n        \"a\": \"{{.vpc_id\"\n      }\n",
    );
    let loaded = project(&files);
    let text = loaded.diagnostics.to_string();
    assert!(
        text.contains("db/migration/001_create_db.yaml:7:24: error: template: unterminated string"),
        "{text}"
    );
}

#[test]
fn duplicate_versions_and_bad_names() {
    let mut files = good();
    files.push(("infra/migration/001_again.yaml", CREATE_VPC));
    files.push(("infra/migration/vpc.yaml", CREATE_VPC));
    let text = project(&files).diagnostics.to_string();
    assert!(
        text.contains("duplicate migration version 1: `001_again.yaml` and `001_create_vpc.yaml`"),
        "{text}"
    );
    // Not numbered: not a migration, passed over with a notice (as apirun does).
    assert!(
        text.contains(
            "notice: `vpc.yaml` is not a migration file (`NNN_name.yaml`); it is ignored"
        ),
        "{text}"
    );
}

/// apirun keeps a stage's config.yaml inside its migration directory (`migrate_dir: .`):
/// the config file there is not a migration and does not make the project invalid.
#[test]
fn a_config_file_inside_the_migration_directory_is_ignored() {
    let loaded = project(&[
        (
            "stages.yaml",
            "stages:\n  - name: s\n    config_path: s/config.yaml\n",
        ),
        ("s/config.yaml", "migrate_dir: .\n"),
        (
            "s/001_a.yaml",
            "up:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    let text = loaded.diagnostics.to_string();
    assert!(loaded.project.is_some(), "{text}");
    assert!(
        text.contains("`config.yaml` is not a migration file"),
        "{text}"
    );
    assert_eq!(loaded.project.unwrap().stages[0].migrations.len(), 1);
}

#[test]
fn env_values_must_be_scalars() {
    let mut files = good();
    files[0] = ("stages.yaml", "stages:\n  - name: infra\n    config_path: infra/config.yaml\n    env:\n      list: [1, 2]\n");
    let text = project(&files[..3]).diagnostics.to_string();
    assert!(
        text.contains("stages.yaml:5:13: error: `env.list` must be a single value, not a list"),
        "{text}"
    );
}

#[test]
fn normalize_paths() {
    assert_eq!(normalize(Path::new("./a/./b/../c")), PathBuf::from("a/c"));
    assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
    assert_eq!(
        beside(Path::new("stages.yaml"), Path::new("./db/config.yaml")),
        PathBuf::from("db/config.yaml")
    );
}

#[test]
fn retry_policy_layers_and_backoff() {
    let p = RetryPolicy::default().overlay(Some(&RetrySpec {
        max_attempts: Some(5),
        ..RetrySpec::default()
    }));
    assert_eq!(p.max_attempts, 5);
    assert_eq!(p.backoff(1), Duration::from_secs(1));
    assert_eq!(p.backoff(3), Duration::from_secs(4));
    assert_eq!(p.backoff(40), Duration::from_secs(30));
    let q = p.overlay(Some(&RetrySpec {
        multiplier: Some(1.0),
        ..RetrySpec::default()
    }));
    assert_eq!((q.max_attempts, q.backoff(9)), (5, Duration::from_secs(1)));
}

#[test]
fn variables_given_on_the_command_line_count_as_provided() {
    let mut files = good();
    files[4] = (
        "db/migration/001_create_db.yaml",
        "up:\n  request:\n    method: GET\n    url: '{{.api}}/{{.nope}}'\n",
    );
    let mut mem = MemoryFiles::default();
    for (p, c) in &files {
        mem.insert(p, c.as_bytes());
    }
    let opts = LoadOptions {
        provided: ["nope".to_owned()].into(),
        ..LoadOptions::default()
    };
    let loaded = load_project(Path::new("stages.yaml"), &mem, opts);
    assert!(
        !loaded.diagnostics.to_string().contains("`nope`"),
        "{}",
        loaded.diagnostics
    );
}

#[test]
fn control_characters_in_names_are_errors() {
    let loaded = project(&[
        (
            "stages.yaml",
            "stages:\n  - name: \"app\\u0000\"\n    config_path: s/config.yaml\n    env:\n      \"re\\ngion\": eu\n",
        ),
        ("s/config.yaml", "migrate_dir: migration\n"),
        ("s/migration/001_a.yaml", "up:\n  request:\n    method: GET\n    url: http://x/a\n"),
    ]);
    assert!(loaded.project.is_none());
    let text = loaded.diagnostics.to_string();
    assert!(
        text.contains("stage name `app\\0` contains the control character U+0000"),
        "{text}"
    );
    assert!(
        text.contains("contains the control character U+000A"),
        "{text}"
    );
    assert!(super::migration::parse_file_name("001_a\u{7}b.yaml").is_err());
}

#[test]
fn a_wait_interval_under_the_minimum_is_an_error() {
    let loaded = project(&[
        (
            "stages.yaml",
            "stages:\n  - name: s\n    config_path: s/config.yaml\n",
        ),
        (
            "s/config.yaml",
            "migrate_dir: migration\nwait:\n  url: http://x/health\n  interval: 0s\n",
        ),
        (
            "s/migration/001_a.yaml",
            "up:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    assert!(loaded.project.is_none());
    let text = loaded.diagnostics.to_string();
    assert!(text.contains("s/config.yaml:4:"), "{text}");
    assert!(
        text.contains("wait.interval must be at least 100 ms"),
        "{text}"
    );
}

#[test]
fn normalize_resolves_parent_directories() {
    for (input, expected) in [
        ("dir/../x", "x"),
        ("a/b/../../c", "c"),
        ("../x", "../x"),
        ("../../x", "../../x"),
        ("a/../../x", "../x"),
        ("./a/./b", "a/b"),
        ("/a/../x", "/x"),
        ("/../x", "/x"),
        ("dir/..", "."),
    ] {
        assert_eq!(normalize(Path::new(input)), Path::new(expected), "{input}");
    }
}

/// apirun's layout with configs in their own directory: `migrate_dir: ../migrations` from
/// `configs/stage.yaml` is `migrations/` beside `configs/`.
#[test]
fn migrate_dir_climbing_out_of_the_config_directory() {
    let loaded = project(&[
        (
            "stages.yaml",
            "stages:\n  - name: s\n    config_path: configs/stage.yaml\n",
        ),
        ("configs/stage.yaml", "migrate_dir: ../migrations\n"),
        (
            "migrations/001_a.yaml",
            "up:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    assert!(loaded.project.is_some(), "{}", loaded.diagnostics);
    assert_eq!(
        loaded.project.unwrap().stages[0].migrate_dir,
        Path::new("migrations")
    );
}

/// apirun accepts an empty `wait:` and `condition: ""`: no health check, no condition.
#[test]
fn empty_wait_and_empty_condition_mean_none() {
    let loaded = project(&[
        (
            "stages.yaml",
            "stages:\n  - name: s\n    config_path: s/config.yaml\n    condition: \"\"\n",
        ),
        ("s/config.yaml", "migrate_dir: migration\nwait:\n"),
        (
            "s/migration/001_a.yaml",
            "up:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    let text = loaded.diagnostics.to_string();
    let project = loaded.project.expect(&text);
    assert!(project.spec.stages[0].condition.is_none());
    assert!(project.stages[0].config.wait.is_none());
    let loaded = super::tests::project(&[
        (
            "stages.yaml",
            "stages:\n  - name: s\n    config_path: s/config.yaml\n",
        ),
        (
            "s/config.yaml",
            "migrate_dir: migration\nwait:\n  timeout: 5s\n",
        ),
        (
            "s/migration/001_a.yaml",
            "up:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    let text = loaded.diagnostics.to_string();
    assert!(loaded.project.is_some(), "{text}");
    assert!(
        text.contains("notice: `wait` has no `url`: no health check runs"),
        "{text}"
    );
}

/// Forms apirun's files use: `apiVersion`/`kind` at a migration's root, `auth_url` in an
/// oauth2 `grant_config`: accepted, with no warning.
#[test]
fn apirun_migration_header_and_auth_url_are_accepted() {
    let loaded = project(&[
        ("stages.yaml", "stages:\n  - name: s\n    config_path: s/config.yaml\n"),
        (
            "s/config.yaml",
            "migrate_dir: migration\nauth:\n  - type: oauth2\n    name: main\n    config:\n      grant_type: client_credentials\n      grant_config:\n        token_url: http://x/token\n        auth_url: http://x/authorize\n        client_id: c\n        client_secret: s3cret-value\n",
        ),
        (
            "s/migration/001_a.yaml",
            "apiVersion: apirun/v1\nkind: Migration\nup:\n  request:\n    method: GET\n    url: http://x/a\n",
        ),
    ]);
    let text = loaded.diagnostics.to_string();
    assert!(loaded.project.is_some(), "{text}");
    assert!(!text.contains("warning"), "{text}");
    assert!(!text.contains("unknown key"), "{text}");
}

#[test]
fn retry_on_lost_at_stage_and_global_level() {
    let mut files = good();
    let stages = STAGES
        .replace(
            "    on_failure: skip_dependents\n",
            "    on_failure: skip_dependents\n    retry_on_lost: safe\n",
        )
        .replace(
            "  max_concurrent_stages: 2\n",
            "  max_concurrent_stages: 2\n  retry_on_lost: never\n",
        );
    files[0] = ("stages.yaml", Box::leak(stages.into_boxed_str()));
    let loaded = project(&files);
    let p = loaded.project.expect("loads");
    assert_eq!(p.spec.stages[1].retry_on_lost, Some(RetryOnLost::Safe));
    assert_eq!(p.spec.stages[0].retry_on_lost, None);
    assert_eq!(p.spec.global.retry_on_lost, Some(RetryOnLost::Never));
    assert!(
        !loaded.diagnostics.to_string().contains("retry_on_lost"),
        "{}",
        loaded.diagnostics
    );

    let bad = STAGES.replace(
        "    on_failure: skip_dependents\n",
        "    on_failure: skip_dependents\n    retry_on_lost: maybe\n",
    );
    files[0] = ("stages.yaml", Box::leak(bad.into_boxed_str()));
    let text = project(&files).diagnostics.to_string();
    assert!(
        text.contains("stages.yaml:17:20: error: bad retry_on_lost value `maybe`"),
        "{text}"
    );
    assert!(text.contains("use `never`"), "{text}");
}

/// A project large enough to be loaded on several threads, with broken stages spread over
/// it: the same stages, diagnostics (in stage order) and digests as loading it one stage
/// at a time.
#[test]
fn a_large_project_loads_in_parallel_exactly_as_one_by_one() {
    let n = PARALLEL_FROM * 3;
    let mut stages = String::from("apiVersion: baton/v1\nkind: StageOrchestration\nstages:\n");
    let mut mem = MemoryFiles::default();
    for i in 0..n {
        stages.push_str(&format!(
            "  - name: s{i}\n    config_path: s{i}/config.yaml\n"
        ));
        // Every 50th stage names a config file that does not exist.
        if i % 50 != 7 {
            mem.insert(format!("s{i}/config.yaml"), "migrate_dir: m\n");
            mem.insert(
                format!("s{i}/m/001_one.yaml"),
                "up:\n  request:\n    method: GET\n    url: http://127.0.0.1:1/x\n",
            );
        }
    }
    mem.insert("stages.yaml", stages.as_bytes());
    let load =
        |files: &MemoryFiles| load_project(Path::new("stages.yaml"), files, LoadOptions::default());
    let broken = load(&mem);
    let errors: Vec<String> = broken
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.message.clone())
        .collect();
    let expected: Vec<String> = (0..n)
        .filter(|i| i % 50 == 7)
        .map(|i| format!("stage `s{i}`: config file `s{i}/config.yaml` cannot be read: not found"))
        .collect();
    assert_eq!(errors, expected);

    // Fixed, it loads every stage in order, with every file's digest.
    for i in (0..n).filter(|i| i % 50 == 7) {
        mem.insert(format!("s{i}/config.yaml"), "migrate_dir: m\n");
        mem.insert(
            format!("s{i}/m/001_one.yaml"),
            "up:\n  request:\n    method: GET\n    url: http://127.0.0.1:1/x\n",
        );
    }
    let p = load(&mem).project.expect("loads");
    let names: Vec<&str> = p
        .spec
        .stages
        .iter()
        .map(|s| s.name.value.as_str())
        .collect();
    let configs: Vec<String> = p
        .stages
        .iter()
        .map(|s| s.config_file.display().to_string())
        .collect();
    assert_eq!(names.len(), n);
    for (i, (name, config)) in names.iter().zip(&configs).enumerate() {
        assert_eq!(*name, format!("s{i}"));
        assert_eq!(*config, format!("s{i}/config.yaml"));
    }
    assert_eq!(p.inputs.len(), 1 + 2 * n);
    // Every file, once, in the byte order of the paths (as memory files keep them).
    let held: Vec<_> = mem.iter().map(|(path, _)| path).collect();
    let inputs: Vec<_> = p.inputs.iter().map(|(path, _)| path.as_path()).collect();
    assert_eq!(inputs, held);
}

/// The cross-file variable checks of a project large enough to be checked in parts: every
/// finding, for the right stage and file, in stage order, as one by one would give them.
#[test]
fn a_large_projects_variable_checks_report_every_stage_in_order() {
    let n = PARALLEL_FROM * 3;
    let mut stages = String::from(
        "apiVersion: baton/v1\nkind: StageOrchestration\nglobal:\n  env:\n    api: http://127.0.0.1:1\nstages:\n",
    );
    let mut mem = MemoryFiles::default();
    for i in 0..n {
        stages.push_str(&format!(
            "  - name: s{i}\n    config_path: s{i}/config.yaml\n"
        ));
        mem.insert(format!("s{i}/config.yaml"), "migrate_dir: m\n");
        // Every 7th stage reads a variable nothing provides; every 11th an unknown auth.
        let var = if i % 7 == 3 { "missing" } else { "api" };
        let auth = if i % 11 == 5 {
            "    auth_name: nobody\n"
        } else {
            ""
        };
        mem.insert(
            format!("s{i}/m/001_one.yaml"),
            format!("up:\n  request:\n    method: GET\n    url: '{{{{.{var}}}}}/x'\n{auth}"),
        );
    }
    mem.insert("stages.yaml", stages.as_bytes());
    let loaded = load_project(Path::new("stages.yaml"), &mem, LoadOptions::default());
    let found: Vec<(Severity, String)> = loaded
        .diagnostics
        .iter()
        .map(|d| (d.severity, d.file.display().to_string()))
        .collect();
    let expected: Vec<(Severity, String)> = (0..n)
        .flat_map(|i| {
            let file = format!("s{i}/m/001_one.yaml");
            let mut each = Vec::new();
            if i % 7 == 3 {
                each.push((Severity::Warning, file.clone()));
            }
            if i % 11 == 5 {
                each.push((Severity::Error, file));
            }
            each
        })
        .collect();
    assert_eq!(found, expected);
    assert!(loaded.project.is_none(), "an unknown auth is an error");
    let missing = loaded
        .diagnostics
        .iter()
        .find(|d| d.severity == Severity::Warning)
        .expect("a warning");
    assert!(
        missing.message.contains("stage `s3`") && missing.message.contains("`missing`"),
        "{}",
        missing.message
    );
}

/// Memory files list a directory's own files, not its subdirectories' nor a sibling's whose
/// name only starts the same (`a/b-c` and `a/b/...` sort apart from `a/b/` by bytes).
#[test]
fn memory_files_list_only_a_directorys_own_files() {
    let mut mem = MemoryFiles::default();
    for p in [
        "top.yaml",
        "./a/b/one.yaml",
        "a/b/two.yaml",
        "a/b/deeper/three.yaml",
        "a/b-c/four.yaml",
        "a/b.yaml",
        "/abs/x.yaml",
    ] {
        mem.insert(p, "x");
    }
    let list = |dir: &str| mem.list(Path::new(dir)).map_err(|e| e.kind());
    assert_eq!(list("a/b"), Ok(vec!["one.yaml".into(), "two.yaml".into()]));
    assert_eq!(
        list("a/./b/"),
        Ok(vec!["one.yaml".into(), "two.yaml".into()])
    );
    assert_eq!(list("a"), Ok(vec!["b.yaml".into()]));
    assert_eq!(list("."), Ok(vec!["top.yaml".into()]));
    assert_eq!(list("/abs"), Ok(vec!["x.yaml".into()]));
    assert_eq!(list("a/b/deeper"), Ok(vec!["three.yaml".into()]));
    assert_eq!(list("nowhere"), Err(io::ErrorKind::NotFound));
    assert_eq!(mem.read(Path::new("a/x/../b/one.yaml")).unwrap(), b"x");
    assert_eq!(
        mem.read(Path::new("a/b")).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

/// A project's inputs: one per path, the last read's digest (a file that changed between two
/// reads counts as read last), in the byte order of the paths.
#[test]
fn inputs_keep_each_paths_last_read_in_byte_order() {
    let read = |p: &str, d: &str| (PathBuf::from(p), d.to_owned());
    let inputs = sorted_inputs(vec![
        read("a/b/x.yaml", "1"),
        read("a-b.yaml", "2"),
        read("a/b/x.yaml", "3"),
        read("stages.yaml", "4"),
        read("a/b/x.yaml", "5"),
    ]);
    assert_eq!(
        inputs,
        vec![
            read("a-b.yaml", "2"),
            read("a/b/x.yaml", "5"),
            read("stages.yaml", "4"),
        ]
    );
}

/// A long stages file is read in parts: its findings come in stage order, at their lines.
#[test]
fn a_long_stages_lists_findings_come_in_stage_order() {
    let n = PARALLEL_FROM * 3;
    let mut stages = String::from("apiVersion: baton/v1\nkind: StageOrchestration\nstages:\n");
    let mut expected = Vec::new();
    for i in 0..n {
        let line = stages.lines().count() + 1;
        stages.push_str(&format!(
            "  - name: s{i}\n    config_path: s{i}/config.yaml\n"
        ));
        // Every 13th stage has a bad on_failure, on the line after its config_path.
        if i % 13 == 4 {
            stages.push_str("    on_failure: sometimes\n");
            expected.push(u32::try_from(line + 2).unwrap());
        }
    }
    let mut mem = MemoryFiles::default();
    mem.insert("stages.yaml", stages.as_bytes());
    let loaded = load_project(Path::new("stages.yaml"), &mem, LoadOptions::default());
    let found: Vec<u32> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.message.contains("bad on_failure value"))
        .map(|d| d.line)
        .collect();
    assert_eq!(found, expected);
    let partial = loaded.partial.expect("the stages file was read");
    let names: Vec<String> = partial
        .stages
        .iter()
        .map(|s| s.name.value.clone())
        .collect();
    assert_eq!(names, (0..n).map(|i| format!("s{i}")).collect::<Vec<_>>());
}

/// `DiskFiles::read_limited` reads a whole file, or one byte past the limit and no more;
/// an empty file reads as empty.
#[test]
fn disk_files_read_whole_files_or_one_byte_past_the_limit() {
    let dir = std::env::temp_dir().join(format!("baton-read-limited-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.join("f.bin");
    std::fs::write(&file, &text).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(DiskFiles.read_limited(&file, 10_000).unwrap(), text);
    assert_eq!(DiskFiles.read_limited(&file, usize::MAX - 1).unwrap(), text);
    assert_eq!(DiskFiles.read(&file).unwrap(), text);
    assert_eq!(DiskFiles.read_limited(&file, 100).unwrap(), text[..101]);
    assert_eq!(DiskFiles.read_limited(&file, 0).unwrap(), text[..1]);
    assert!(DiskFiles.read_limited(&empty, 100).unwrap().is_empty());
    // A directory is refused, not read.
    assert!(DiskFiles.read_limited(&dir, 100).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
