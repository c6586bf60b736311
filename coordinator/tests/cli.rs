//! Snapshot tests of what people read: the real `baton` binary run on the bundled
//! examples, the valid fixtures and the corpus of broken files, its exit code, stdout and
//! stderr compared with checked-in snapshots (`tests/snapshots/`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `baton` in `dir` and renders the result for a snapshot.
fn baton(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("baton runs");
    let code = out
        .status
        .code()
        .expect("baton exits with a code, not a signal");
    let text = format!(
        "$ baton {}\nexit: {code}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (code, text)
}

fn snapshot(name: &str, dir: &Path, args: &[&str], want_code: i32) {
    let (code, text) = baton(dir, args);
    assert_eq!(code, want_code, "{text}");
    insta::assert_snapshot!(name, text);
}

const VALID: &[(&str, &str, &str)] = &[
    ("seed001", "examples/stages", "stages.yaml"),
    ("seed002", "tests/fixtures/valid/seed002", "stages.yaml"),
    ("prereq_parallel", "examples/multi-stage", "stages.yaml"),
    (
        "prereq_sequential",
        "examples/multi-stage",
        "stages.sequential.yaml",
    ),
    ("prereq_mixed", "examples/multi-stage", "stages.mixed.yaml"),
];

#[test]
fn valid_projects_validate_and_plan() {
    for (name, dir, file) in VALID {
        let dir = repo().join(dir);
        snapshot(
            &format!("validate_{name}"),
            &dir,
            &["stages", "validate", "--config", file],
            0,
        );
        snapshot(
            &format!("dry_run_{name}"),
            &dir,
            &["stages", "up", "--dry-run", "--config", file],
            0,
        );
    }
}

#[test]
fn json_output() {
    let dir = repo().join("examples/stages");
    snapshot(
        "validate_seed001_json",
        &dir,
        &["stages", "validate", "--output", "json"],
        0,
    );
    snapshot(
        "dry_run_seed001_json",
        &dir,
        &["stages", "up", "--dry-run", "-o", "json"],
        0,
    );
    let (_, text) = baton(&dir, &["stages", "up", "--dry-run", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(
        text.split("--- stdout\n")
            .nth(1)
            .unwrap()
            .split("--- stderr")
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["plan"]["order"].as_array().unwrap().len(), 4);
    assert_eq!(json["plan"]["digest"].as_str().unwrap().len(), 64);
}

#[test]
fn graphs() {
    let dir = repo().join("examples/multi-stage");
    snapshot(
        "graph_mermaid",
        &dir,
        &["stages", "graph", "--config", "stages.mixed.yaml"],
        0,
    );
    snapshot(
        "graph_dot",
        &dir,
        &[
            "stages",
            "graph",
            "--format",
            "dot",
            "--config",
            "stages.mixed.yaml",
        ],
        0,
    );
}

#[test]
fn selections() {
    let dir = repo().join("examples/stages");
    snapshot(
        "range_database_to_services_without_history",
        &dir,
        &[
            "stages",
            "up",
            "--dry-run",
            "--from",
            "database",
            "--to",
            "services",
        ],
        2,
    );
    snapshot(
        "range_all",
        &dir,
        &[
            "stages",
            "up",
            "--dry-run",
            "--from",
            "infrastructure",
            "--to",
            "configuration",
        ],
        0,
    );
    snapshot(
        "range_backwards",
        &dir,
        &[
            "stages",
            "up",
            "--dry-run",
            "--from",
            "services",
            "--to",
            "infrastructure",
        ],
        2,
    );
    snapshot(
        "stage_unknown",
        &dir,
        &["stages", "up", "--dry-run", "--stage", "databse"],
        2,
    );
    snapshot(
        "stage_first",
        &dir,
        &["stages", "up", "--dry-run", "--stage", "infrastructure"],
        0,
    );
    // One side of a range: --to alone is the stage and everything before it; --from alone
    // is the stage and everything after it (here refused: its dependency never ran).
    snapshot(
        "range_to_only",
        &dir,
        &["stages", "up", "--dry-run", "--to", "database"],
        0,
    );
    snapshot(
        "range_from_only_without_history",
        &dir,
        &["stages", "up", "--dry-run", "--from", "database"],
        2,
    );
    snapshot(
        "range_from_first",
        &dir,
        &["stages", "up", "--dry-run", "--from", "infrastructure"],
        0,
    );
}

/// One broken project per error class; each reports its problem with file, line, column.
#[test]
fn broken_files() {
    let broken = repo().join("tests/fixtures/broken");
    let mut names: Vec<String> = std::fs::read_dir(&broken)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('_'))
        .collect();
    names.sort();
    assert!(names.len() >= 18, "the corpus lost cases: {names:?}");
    for name in names {
        let dir = broken.join(&name);
        let want = if name == "unknown-key" { 0 } else { 2 };
        snapshot(
            &format!("broken_{}", name.replace('-', "_")),
            &dir,
            &["stages", "validate"],
            want,
        );
        // `stages up` refuses the same files before doing anything.
        if want == 2 {
            let (code, text) = baton(&dir, &["stages", "up", "--dry-run"]);
            assert_eq!(code, 2, "{text}");
            assert!(!text.contains("dry run: no request"), "{text}");
        }
    }
}

#[test]
fn strict_turns_warnings_into_errors() {
    let dir = repo().join("tests/fixtures/broken/unknown-key");
    snapshot(
        "strict_unknown_key",
        &dir,
        &["stages", "validate", "--strict"],
        2,
    );
}

#[test]
fn oversized_document_is_refused() {
    let dir = std::env::temp_dir().join(format!("baton-oversized-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from("stages:\n");
    while text.len() <= 4 * 1024 * 1024 {
        text.push_str("  # padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(dir.join("stages.yaml"), text).unwrap();
    let (code, out) = baton(&dir, &["stages", "validate"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 2, "{out}");
    // Reading stops one byte past the limit, so the message gives the limit, not the size.
    assert!(
        out.contains("stages.yaml: error: file is larger than the limit"),
        "{out}"
    );
    assert!(
        out.contains("more than the limit of 4194304 bytes"),
        "{out}"
    );
}

#[test]
fn missing_stages_file() {
    let dir = repo().join("tests/fixtures");
    snapshot(
        "missing_stages_file",
        &dir,
        &["stages", "validate", "--config", "nope.yaml"],
        2,
    );
}

/// `baton completions SHELL` prints a script the shell loads; bash's completes subcommands
/// and flags when driven the way bash drives it.
#[test]
fn shell_completions() {
    let dir = std::env::temp_dir().join(format!("baton-completions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (shell, marker) in [
        ("bash", "_baton()"),
        ("zsh", "#compdef baton"),
        ("fish", "complete -c baton"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{shell}: {text}");
        std::fs::write(dir.join(shell), text).unwrap();
    }
    let script = dir.join("bash");
    let drive = format!(
        "source {}; COMP_WORDS=(baton stages u); COMP_CWORD=2; _baton baton u stages; echo \"${{COMPREPLY[@]}}\"; COMP_WORDS=(baton stages up --dr); COMP_CWORD=3; _baton baton --dr up; echo \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = Command::new("bash").args(["-c", &drive]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "up\n--dry-run\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, text) = baton(&dir, &["completions", "tcsh"]);
    assert_eq!(code, 2, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every synopsis in docs/cli.md names only flags its command has: each `--flag` of a
/// `baton ...` (or `baton-agent ...`) line in a code block, continuation lines included, is
/// in that command's `--help`.
#[test]
fn documented_synopses_match_help() {
    let doc = std::fs::read_to_string(repo().join("docs/cli.md")).unwrap();
    let agent = baton_e2e::cluster::agent_binary(Path::new(env!("CARGO_BIN_EXE_baton")));
    let mut synopses: Vec<String> = Vec::new();
    let mut in_block = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if line.starts_with("baton ") || line.starts_with("baton-agent ") {
            synopses.push(line.to_owned());
        } else if line.starts_with(' ') && line.trim_start().starts_with('[') {
            if let Some(last) = synopses.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        }
    }
    assert!(synopses.len() > 30, "{synopses:?}");
    let mut missing = Vec::new();
    for s in &synopses {
        let mut words = s.split_whitespace();
        let program = words.next().unwrap();
        let command: Vec<&str> = words
            .take_while(|w| {
                w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
            })
            .collect();
        let bin = if program == "baton-agent" {
            agent.clone()
        } else {
            PathBuf::from(env!("CARGO_BIN_EXE_baton"))
        };
        let help = Command::new(&bin)
            .args(&command)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        for flag in s
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|t| t.starts_with("--") && t.len() > 2)
        {
            if !help.contains(flag) {
                missing.push(format!("{program} {}: {flag}", command.join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags in docs/cli.md that --help does not know: {missing:#?}"
    );
}
