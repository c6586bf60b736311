//! The `baton-agent` binary. The agent's connection to a coordinator and its stage executor
//! are built by later issues; until then the binary accepts its documented flags and says
//! plainly that it cannot run stages yet, exiting with the usage code (2).

use std::process::ExitCode;

use clap::Parser;

/// Runs baton stages near their target, dialling out to a coordinator.
#[derive(Debug, Parser)]
#[command(name = "baton-agent", version)]
struct AgentArgs {
    /// The coordinator's URL, e.g. https://baton.example:7443.
    #[arg(long)]
    coordinator: Option<String>,
    /// A label the agent is enrolled with (repeatable), e.g. --label env=prod.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "`{s}` is not a label: write KEY=VALUE, e.g. env=prod"
        )),
    }
}

fn main() -> ExitCode {
    let args = AgentArgs::parse();
    eprintln!(
        "baton-agent {}: connecting to a coordinator is not available in this build yet{}; \
         run stages locally with `baton stages up`",
        env!("CARGO_PKG_VERSION"),
        args.coordinator
            .map(|c| format!(" (asked for {c})"))
            .unwrap_or_default()
    );
    let _ = args.labels;
    ExitCode::from(2)
}
