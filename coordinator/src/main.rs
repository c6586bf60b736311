//! The `baton` binary: parse flags, run the command, exit with its code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baton_coordinator::cli::Cli::parse();
    // Not locked for the whole run: the live progress view writes to stdout from its own thread.
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    // The only place the process environment is read.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let code = match baton_coordinator::cli::run(cli, env, &mut out, &mut err) {
        Ok(code) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            1
        }
    };
    let _ = out.flush();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
