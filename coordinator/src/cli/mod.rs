//! The `baton` command line: flag parsing and dispatch. One module per subcommand.
//!
//! Every command writes its data to `out` and its diagnostics to `err` and returns the
//! process exit code: 0 success, 1 the run failed, 2 invalid input or usage (COMPAT.md).

mod graph;
mod plan_view;
mod stages;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes.
pub const EXIT_OK: i32 = 0;
pub const EXIT_RUN_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Deployment orchestrator: plans and runs multi-stage deployments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Multi-stage orchestration: validate, plan and run a stages.yaml.
    #[command(subcommand)]
    Stages(StagesCommand),
}

#[derive(Debug, Subcommand)]
pub enum StagesCommand {
    /// Check a stages file and every file it names; report every problem at once.
    Validate(ValidateArgs),
    /// Run stages in dependency order (today: `--dry-run` prints the plan).
    Up(UpArgs),
    /// Draw the stage dependency graph.
    Graph(GraphArgs),
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// The stages file.
    #[arg(long, short = 'c', default_value = "stages.yaml")]
    pub config: PathBuf,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print the plan and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run only this stage (repeatable); its dependencies must have run before.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub stage: Vec<String>,
    /// First stage of a range (with --to).
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// Last stage of a range (with --from).
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    #[default]
    Mermaid,
    Dot,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Graph language.
    #[arg(long, value_enum, default_value_t)]
    pub format: GraphFormat,
}

/// Runs a parsed command line.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    match cli.command {
        Command::Stages(StagesCommand::Validate(a)) => stages::validate(&a, out, err),
        Command::Stages(StagesCommand::Up(a)) => stages::up(&a, out, err),
        Command::Stages(StagesCommand::Graph(a)) => graph::run(&a, out, err),
    }
}
