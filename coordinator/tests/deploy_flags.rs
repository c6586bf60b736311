//! Every flag the files in `deploy/` pass to `baton` or `baton-agent` exists in that
//! binary's `--help`: a renamed or removed flag cannot leave the deployment files behind.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn help(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} --help failed",
        bin.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `--flag` tokens in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '[' || c == ',' || c == '=')
        .filter(|t| t.starts_with("--") && t[2..].starts_with(|c: char| c.is_ascii_lowercase()))
        .map(|t| t.trim_end_matches('\\').to_owned())
        .collect()
}

/// Which lines of a file name flags.
type LinePick = Box<dyn Fn(&str) -> bool>;

#[test]
fn every_flag_in_deploy_files_exists() {
    let baton = PathBuf::from(env!("CARGO_BIN_EXE_baton"));
    let agent = baton_e2e::cluster::agent_binary(&baton);
    let serve_help = help(&baton, &["coordinator", "serve"]);
    let agent_help = help(&agent, &[]);
    let deploy = repo().join("deploy");
    // (file, lines that name flags, the help they must be in)
    let cases: Vec<(&str, LinePick, &str)> = vec![
        (
            "systemd/baton-coordinator.service",
            Box::new(|l: &str| !l.trim_start().starts_with('#')),
            &serve_help,
        ),
        (
            "systemd/baton-agent.service",
            Box::new(|l: &str| !l.trim_start().starts_with('#')),
            &agent_help,
        ),
        (
            "kubernetes/coordinator.yaml",
            Box::new(|l: &str| !l.trim_start().starts_with('#')),
            &serve_help,
        ),
        (
            "kubernetes/agent-prod.yaml",
            Box::new(|l: &str| !l.trim_start().starts_with('#')),
            &agent_help,
        ),
        // The image's default command and the comment that shows how to run the coordinator;
        // the build lines hold cargo's and apt's flags, not ours.
        (
            "Containerfile",
            Box::new(|l: &str| l.starts_with("CMD") || l.starts_with("# Run the coordinator")),
            &serve_help,
        ),
        (
            "Containerfile",
            Box::new(|l: &str| l.starts_with("# Run an agent")),
            &agent_help,
        ),
    ];
    // Comments explain installation (`systemctl enable --now`): only code lines, except in
    // the Containerfile, whose usage comments name our flags.
    let mut checked = 0;
    for (file, pick, help) in cases {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        for line in text.lines().filter(|l| pick(l)) {
            for flag in flags(line) {
                assert!(
                    help.contains(&format!("{flag} "))
                        || help.contains(&format!("{flag}\n"))
                        || help.contains(&format!("{flag} <")),
                    "deploy/{file} uses `{flag}`, which `--help` does not list:\n{help}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 25,
        "only {checked} flags found: the scan is broken"
    );
}
