//! Command steps: run a program (terraform, az, kubectl, helm, ...) as a step.
//!
//! The program runs in its own process group, so cancel and timeout kill it and everything
//! it started. stdout and stderr stream as log lines (masked); stdout, when it is JSON, feeds
//! `env_from`. A non-zero exit fails the step with the last lines of stderr.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use baton_common::mask::StreamMasker;
use baton_common::spec::{beside, CommandSpec, EnvMissing, MigrationSpec, ResponseSpec};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::http::json_value;
use super::{scope, template_failure, StageCtx, StageEvent, StepError};

/// stdout kept for `env_from`; a command printing more fails the step.
const MAX_STDOUT: usize = 4 * 1024 * 1024;
/// Lines of stderr quoted when a command fails.
const STDERR_TAIL: usize = 10;

pub(super) async fn run_command(
    ctx: &StageCtx<'_>,
    m: &MigrationSpec,
    cmd: &CommandSpec,
    response: &ResponseSpec,
    vars: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, StepError> {
    let file = m.file.as_path();
    let auth = BTreeMap::new();
    let sc = scope(vars, &auth, ctx.process_env());
    let render = |what: &str, t: &baton_common::spec::Tmpl| {
        t.template
            .render(&sc)
            .map_err(|e| template_failure(file, what, &e))
    };
    let program = render(
        "command.program",
        cmd.program
            .as_ref()
            .ok_or_else(|| StepError::failed("command has no program"))?,
    )?;
    let mut args = Vec::with_capacity(cmd.args.len());
    for a in &cmd.args {
        args.push(render("command.args", a)?);
    }
    let workdir = match &cmd.workdir {
        Some(t) => beside(file, std::path::Path::new(&render("command.workdir", t)?)),
        None => file
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
    };
    let mut command = Command::new(&program);
    command
        .args(&args)
        .current_dir(if workdir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            &workdir
        })
        .env_clear()
        .envs(ctx.process_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, t) in &cmd.env {
        command.env(k, render(&format!("command.env `{k}`"), t)?);
    }
    // Nothing new starts once the stage is cancelled.
    if ctx.cancel.is_cancelled() {
        return Err(StepError::Cancelled);
    }
    let mut child = command
        .spawn()
        .map_err(|e| StepError::failed(format!("cannot start `{program}`: {e}")))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(StepError::failed("cannot read the command's output"));
    };
    let version = m.version;
    let out_task = pump(ctx, version, stdout, true);
    let err_task = pump(ctx, version, stderr, false);
    let limit = cmd.timeout;
    let run = async {
        let (out, err, status) = tokio::join!(out_task, err_task, child.wait());
        (out, err, status)
    };
    let timed = async {
        match limit {
            Some(t) => tokio::time::timeout(t, run).await.map_err(|_| t),
            None => Ok(run.await),
        }
    };
    tokio::pin!(timed);
    let result = tokio::select! {
        // Cancelled: SIGTERM to the whole process group, a short grace to stop on its own,
        // then SIGKILL for whatever is left.
        () = ctx.cancel.cancelled() => {
            signal_group(pgid, Signal::SIGTERM);
            let _ = tokio::time::timeout(super::CANCEL_GRACE, &mut timed).await;
            kill_group(pgid);
            return Err(StepError::Cancelled);
        }
        r = &mut timed => r,
    };
    let (out, err, status) = match result {
        Ok(r) => r,
        Err(t) => {
            kill_group(pgid);
            return Err(StepError::failed(format!(
                "`{program}` did not finish within {}; it was killed",
                fmt_duration(t)
            )));
        }
    };
    let out = out?;
    let err = err?;
    let status =
        status.map_err(|e| StepError::failed(format!("waiting for `{program}` failed: {e}")))?;
    if !status.success() {
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(STDERR_TAIL)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let code = status
            .code()
            .map_or_else(|| "a signal".to_owned(), |c| format!("code {c}"));
        return Err(StepError::failed(format!(
            "`{program}` exited with {code}: {}",
            tail.join(" | ")
        )));
    }
    extract_from_stdout(response, &out)
}

fn kill_group(pgid: Option<Pid>) {
    signal_group(pgid, Signal::SIGKILL);
}

fn signal_group(pgid: Option<Pid>, signal: Signal) {
    if let Some(p) = pgid {
        // The group may already be gone; nothing else to do then.
        let _ = killpg(p, signal);
    }
}

fn fmt_duration(d: Duration) -> String {
    baton_common::spec::duration::format(d)
}

/// Longest log line emitted as one event; longer output is split into several.
const MAX_LINE: usize = 8 * 1024;

/// Streams one pipe as log lines; returns what it read (stdout, capped, for extraction).
///
/// Output is read in chunks and masked as a stream before it is cut into lines, so a secret
/// that a program writes in two pieces is still masked, and a program that never prints a
/// newline cannot make the agent buffer without bound.
async fn pump<R: AsyncRead + Unpin>(
    ctx: &StageCtx<'_>,
    version: u64,
    mut pipe: R,
    is_stdout: bool,
) -> Result<String, StepError> {
    let masker = ctx.masker_snapshot();
    let mut stream = StreamMasker::new(&masker);
    let mut kept = String::new();
    let mut pending_bytes: Vec<u8> = Vec::new();
    let mut line = String::new();
    let mut buf = vec![0u8; 8 * 1024];
    let prefix = if is_stdout { "" } else { "stderr: " };
    loop {
        let n = pipe
            .read(&mut buf)
            .await
            .map_err(|e| StepError::failed(format!("reading the command's output failed: {e}")))?;
        let text = if n == 0 {
            String::from_utf8_lossy(&std::mem::take(&mut pending_bytes)).into_owned()
        } else {
            pending_bytes.extend_from_slice(&buf[..n]);
            take_utf8(&mut pending_bytes)
        };
        if is_stdout {
            if kept.len() + text.len() > MAX_STDOUT {
                return Err(StepError::failed(format!(
                    "the command printed more than {MAX_STDOUT} bytes on stdout"
                )));
            }
            kept.push_str(&text);
        } else if kept.len() < 64 * 1024 {
            kept.push_str(&text);
        }
        line.push_str(&stream.push(&text));
        if n == 0 {
            line.push_str(&stream.finish());
        }
        while let Some(i) = line.find('\n') {
            let l: String = line.drain(..=i).collect();
            let l = l.trim_end_matches(['\n', '\r']);
            ctx.emit(StageEvent::Log {
                version: Some(version),
                line: format!("{prefix}{l}"),
            })
            .await;
        }
        if line.len() > MAX_LINE || (n == 0 && !line.is_empty()) {
            let l = std::mem::take(&mut line);
            ctx.emit(StageEvent::Log {
                version: Some(version),
                line: format!("{prefix}{l}"),
            })
            .await;
        }
        if n == 0 {
            return Ok(kept);
        }
    }
}

/// Takes the longest valid UTF-8 prefix of `bytes`, leaving an incomplete character at the
/// end for the next read; invalid bytes in the middle become U+FFFD.
fn take_utf8(bytes: &mut Vec<u8>) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let out = s.to_owned();
            bytes.clear();
            out
        }
        Err(e) if e.error_len().is_none() => {
            let valid = e.valid_up_to();
            let rest = bytes.split_off(valid);
            let out = String::from_utf8_lossy(bytes).into_owned();
            *bytes = rest;
            out
        }
        Err(_) => String::from_utf8_lossy(&std::mem::take(bytes)).into_owned(),
    }
}

fn extract_from_stdout(
    response: &ResponseSpec,
    stdout: &str,
) -> Result<BTreeMap<String, String>, StepError> {
    let mut out = BTreeMap::new();
    if response.env_from.is_empty() {
        return Ok(out);
    }
    let valid = gjson::valid(stdout);
    if !valid && response.env_missing == EnvMissing::Fail {
        return Err(StepError::failed(
            "cannot extract variables: the command's stdout is not JSON",
        ));
    }
    for (name, path) in &response.env_from {
        match (
            valid.then(|| json_value(stdout, path)).flatten(),
            response.env_missing,
        ) {
            (Some(v), _) => {
                out.insert(name.value.clone(), v);
            }
            (None, EnvMissing::Skip) => {}
            (None, EnvMissing::Fail) => {
                return Err(StepError::failed(format!(
                    "the command's output has no value at `{path}` for `{}` (env_missing: fail)",
                    name.value
                )))
            }
        }
    }
    Ok(out)
}
