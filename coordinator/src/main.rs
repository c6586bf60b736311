//! The `baton` binary: parse flags, run the command, exit with its code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the C library's allocator: loading a large project allocates millions
/// of small strings and tree nodes from two threads at once, and glibc's malloc and free were
/// a quarter of the load's CPU (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Standard output that a reader may close (`baton stages up | head -1`): once it is gone,
/// output is dropped instead of failing, so a run never stops half-way because nobody reads
/// its progress; the process still exits with the run's result.
struct ClosableStdout {
    inner: std::io::Stdout,
    closed: bool,
}

impl Write for ClosableStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.inner.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

fn main() -> ExitCode {
    let cli = baton_coordinator::cli::Cli::parse();
    // Not locked for the whole run: the live progress view writes to stdout from its own thread.
    let mut out = ClosableStdout {
        inner: std::io::stdout(),
        closed: false,
    };
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
