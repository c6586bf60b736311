//! The dry run predicts the run (issue 12, section 2): conditions are forecast with `--set`
//! values and the environment the run will use, the plan digest covers `--set`, and
//! `stages down` refuses a migration without `down` before it asks or changes anything.
//! Through the real binary and a recording target.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use baton_e2e::files::write;
use baton_e2e::target::Target;

async fn baton(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    baton_e2e::cli::run_with_env(Path::new(env!("CARGO_BIN_EXE_baton")), dir, args, env).await
}

fn project(dir: &Path) {
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: by_set\n    config_path: s/config.yaml\n    condition: \"{{.env_name}} == 'prod'\"\n  - name: by_env\n    config_path: s/config.yaml\n    condition: '{{ eq (env \"DEPLOY_NOW\") \"yes\" }}'\nglobal:\n  env:\n    api: http://127.0.0.1:9\n    env_name: dev\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_x.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n",
    );
}

/// The 12-digit plan digest a dry run shows (`(digest 30575b7e2de1)`).
fn digest_of(plan: &str) -> String {
    let at = plan
        .find("(digest ")
        .unwrap_or_else(|| panic!("no digest in:\n{plan}"));
    plan[at + 8..at + 20].to_owned()
}

/// The line of the plan that gives `stage`'s forecast.
fn forecast<'a>(plan: &'a str, stage: &str) -> &'a str {
    let start = plan.find(stage).unwrap_or(0);
    plan[start..]
        .lines()
        .find(|l| l.contains("condition"))
        .unwrap_or_else(|| panic!("no condition line for {stage} in:\n{plan}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forecast_uses_set_values_and_the_environment() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("dry-run-forecast");
    project(&dir);
    let set = format!("api={}", target.url());
    let env = [("DEPLOY_NOW", "yes")];
    let args = [
        "stages",
        "up",
        "--dry-run",
        "--set",
        &set,
        "--set",
        "env_name=prod",
    ];
    let (code, plan) = baton(&dir, &args, &env).await;
    assert_eq!(code, 0, "{plan}");
    assert!(forecast(&plan, "by_set").contains("runs"), "{plan}");
    assert!(forecast(&plan, "by_env").contains("runs"), "{plan}");
    let digest = digest_of(&plan);
    // The run does what the plan said, under the same plan digest.
    let (code, out) = baton(
        &dir,
        &args[..2]
            .iter()
            .chain(&args[3..])
            .copied()
            .collect::<Vec<_>>(),
        &env,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        target.requests_to("PUT", "/x").len(),
        2,
        "both stages ran:\n{out}"
    );
    assert!(
        out.contains(&format!("(plan {digest})")),
        "the run's plan differs from the dry run's ({digest}):\n{out}"
    );

    // Without them, the forecast says skipped, and so does the run.
    let dir = baton_e2e::files::temp_dir("dry-run-forecast-off");
    project(&dir);
    let (_, plan) = baton(&dir, &["stages", "up", "--dry-run", "--set", &set], &[]).await;
    assert!(forecast(&plan, "by_set").contains("skipped"), "{plan}");
    assert!(forecast(&plan, "by_env").contains("skipped"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_digest_covers_set_values_but_never_hashes_a_secret() {
    let dir = baton_e2e::files::temp_dir("dry-run-digest");
    project(&dir);
    let digest = |set: &'static str| {
        let dir = dir.clone();
        async move {
            let (code, plan) = baton(&dir, &["stages", "up", "--dry-run", "--set", set], &[]).await;
            assert_eq!(code, 0, "{plan}");
            digest_of(&plan)
        }
    };
    assert_ne!(digest("region=eu").await, digest("region=us").await);
    assert_eq!(
        digest("db_password=one-secret").await,
        digest("db_password=another-secret").await,
        "a secret's value is not part of the digest"
    );
    assert_ne!(
        digest("db_password=x1234").await,
        digest("region=x1234").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_refuses_a_migration_without_down_before_asking() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let dir = baton_e2e::files::temp_dir("dry-run-missing-down");
    write(
        &dir.join("stages.yaml"),
        "stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    write(&dir.join("s/config.yaml"), "migrate_dir: migration\n");
    write(
        &dir.join("s/migration/001_with.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/a'\ndown:\n  method: DELETE\n  url: '{{.api}}/a'\n",
    );
    write(
        &dir.join("s/migration/002_without.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/b'\n",
    );
    let set = format!("api={}", target.url());
    let (code, out) = baton(&dir, &["stages", "up", "--set", &set], &[]).await;
    assert_eq!(code, 0, "{out}");
    // Without --yes and without a terminal: the missing down is what is reported.
    for args in [
        vec!["stages", "down", "--set", &set],
        vec!["stages", "down", "--yes", "--set", &set],
        vec!["stages", "down", "--dry-run", "--set", &set],
    ] {
        let (code, out) = baton(&dir, &args, &[]).await;
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains("stage `s`: 002_without"), "{out}");
        assert!(out.contains("--skip-missing-down"), "{out}");
        assert!(out.contains("nothing was rolled back"), "{out}");
    }
    assert!(
        target.requests_to("DELETE", "/a").is_empty(),
        "nothing was sent"
    );
    let (code, out) = baton(
        &dir,
        &[
            "stages",
            "down",
            "--yes",
            "--skip-missing-down",
            "--set",
            &set,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(target.requests_to("DELETE", "/a").len(), 1);
}
