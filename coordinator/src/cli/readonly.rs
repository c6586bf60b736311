//! Read-only commands while a local run holds the state directory. sled lets one process
//! open a store, so while `stages up` or `stages down` runs, `stages status`, `stages
//! outputs`, `runs list`, `runs show` and `runs logs` ask that process instead: it serves
//! them on a Unix socket in the state directory (`baton.sock`, inside the 0700 directory,
//! itself 0600), rendering the same output from its open store. The socket exists only while
//! the run does; a stale one is ignored.
//!
//! Protocol: the client writes one JSON [`Request`] line and reads one JSON [`Response`]
//! line. Nothing a request asks can change the state, but for `runs approve|reject`, which
//! the running process's driver decides (as a coordinator's would), recording who decided.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_common::spec::Project;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};

use super::OutputFormat;
use crate::store::Store;

/// The socket's name in the state directory.
pub(super) const SOCKET: &str = "baton.sock";

/// A read-only command, as the client was asked it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Request {
    /// `stages status` of the stages file `project` names (its project key).
    Status {
        project: String,
        verbose: bool,
        json: bool,
    },
    /// `stages outputs`: exports, secrets masked (never revealed through the socket).
    Outputs {
        project: String,
        stage: Option<String>,
        json: bool,
    },
    /// `runs approve|reject RUN`: the one request that changes state, decided by the run's
    /// driver under the same rules as on a coordinator.
    Decide {
        run: u64,
        approve: bool,
        by: crate::runs::Identity,
        comment: String,
    },
    /// `baton audit` (and `audit verify`).
    Audit {
        filter: super::environments::AuditFilter,
        json: bool,
        verify: bool,
    },
    RunsList {
        json: bool,
        /// `runs list -e ENV`: only that environment's runs.
        #[serde(default)]
        environment: Option<String>,
    },
    RunsShow {
        run: u64,
        json: bool,
    },
    RunsLogs {
        run: u64,
        stage: Option<String>,
    },
    /// What a dry run plans with: the project's history (`StoreHistory`, as JSON).
    History {
        project: String,
    },
}

/// What the serving process printed for the request, and its exit code.
#[derive(Debug, Serialize, Deserialize)]
struct Response {
    code: i32,
    out: String,
    err: String,
}

fn format(json: bool) -> OutputFormat {
    if json {
        OutputFormat::Json
    } else {
        OutputFormat::Text
    }
}

/// Serves read-only requests for the run of `project` (stored under `key`) until dropped.
pub(super) struct ReadService {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReadService {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving in `dir` (best effort: without a socket, read-only commands are refused
/// as before, naming this process).
pub(super) fn serve(
    dir: &Path,
    runs: Arc<crate::runs::Runs>,
    project: Arc<Project>,
    key: String,
    run: u64,
) -> Option<ReadService> {
    let store = runs.store().clone();
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, path = %path.display(), "no read service for this run");
            return None;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (store, project, key) = (store.clone(), project.clone(), key.clone());
            let runs = runs.clone();
            tokio::spawn(async move {
                let (read, mut write) = conn.into_split();
                let mut line = String::new();
                // One bounded request line, sent promptly.
                let mut reader = BufReader::new(read).take(64 * 1024);
                let limit = std::time::Duration::from_secs(10);
                match tokio::time::timeout(limit, reader.read_line(&mut line)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Decide {
                        run,
                        approve,
                        by,
                        comment,
                    }) => decided(runs.decide(run, approve, &by, &comment).await, run, approve),
                    Ok(request) => tokio::task::spawn_blocking(move || {
                        answer(&request, store.as_ref(), &project, &key, run)
                    })
                    .await
                    .unwrap_or_else(|e| Response {
                        code: super::EXIT_RUN_FAILED,
                        out: String::new(),
                        err: format!("error: the running process could not answer: {e}\n"),
                    }),
                    Err(e) => Response {
                        code: super::EXIT_INVALID,
                        out: String::new(),
                        err: format!("error: a request the running process does not know: {e}\n"),
                    },
                };
                if let Ok(mut text) = serde_json::to_string(&response) {
                    text.push('\n');
                    let _ = write.write_all(text.as_bytes()).await;
                }
            });
        }
    });
    Some(ReadService { path, task })
}

/// What `runs approve|reject` prints for the driver's answer.
fn decided(answer: Result<String, crate::runs::RunsError>, run: u64, approve: bool) -> Response {
    match answer {
        Ok(gate) => Response {
            code: super::EXIT_OK,
            out: format!(
                "run {run}: {gate} {}\n",
                if approve { "approved" } else { "rejected" }
            ),
            err: String::new(),
        },
        Err(e) => Response {
            code: super::EXIT_INVALID,
            out: String::new(),
            err: format!("error: {e}\n"),
        },
    }
}

/// Renders `request` from the open store, as the command would; `run` is the run this
/// process drives (its stages show as running, not interrupted).
fn answer(
    request: &Request,
    store: &dyn Store,
    project: &Project,
    key: &str,
    run: u64,
) -> Response {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let other_project = |p: &str| p != key;
    let code = match request {
        Request::Status { project: p, .. }
        | Request::Outputs { project: p, .. }
        | Request::History { project: p }
            if other_project(p) =>
        {
            let _ = writeln!(
                err,
                "error: the state directory is in use by a run of another stages file; try again when it ends"
            );
            Ok(super::EXIT_INVALID)
        }
        Request::Status { verbose, json, .. } => {
            match crate::status::stage_states(project, store, key) {
                Ok(mut states) => {
                    for s in &mut states {
                        if let Some(last) = s.last.as_mut().filter(|l| l.run == run) {
                            if last.outcome.starts_with("interrupted") {
                                last.outcome = last.outcome.replacen("interrupted", "running", 1);
                            }
                        }
                    }
                    super::run::write_status(&states, *verbose, format(*json), &mut out)
                        .map(|()| super::EXIT_OK)
                }
                Err(e) => writeln!(err, "error: {e}").map(|()| super::EXIT_RUN_FAILED),
            }
        }
        Request::Outputs { stage, json, .. } => super::stages::write_stage_outputs(
            project,
            store,
            key,
            stage.as_deref(),
            false,
            format(*json),
            &mut out,
            &mut err,
        ),
        // Answered by the driver before this is reached.
        Request::Decide { .. } => Ok(super::EXIT_INVALID),
        Request::Audit {
            filter,
            json,
            verify,
        } => super::environments::write_audit(
            store,
            filter,
            *verify,
            format(*json),
            &mut out,
            &mut err,
        ),
        Request::RunsList { json, environment } => super::run::runs_list(
            store,
            environment.as_deref(),
            format(*json),
            &mut out,
            &mut err,
        ),
        Request::RunsShow { run, json } => {
            super::run::runs_show(store, *run, format(*json), &mut out, &mut err)
        }
        Request::RunsLogs { run, stage } => {
            super::run::runs_logs(store, *run, stage.as_deref(), &mut out, &mut err)
        }
        Request::History { .. } => match crate::runs::StoreHistory::of(store, key, project) {
            Ok(h) => serde_json::to_writer(&mut out, &h)
                .map(|()| super::EXIT_OK)
                .map_err(std::io::Error::from),
            Err(e) => writeln!(err, "error: {e}").map(|()| super::EXIT_RUN_FAILED),
        },
    };
    Response {
        code: code.unwrap_or(super::EXIT_RUN_FAILED),
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// The history of `project` from the process running in `dir`, for a dry run; `None` when
/// no run serves there or it cannot answer (the dry run then opens the state itself).
pub(super) fn history(dir: &Path, project: &str) -> Option<crate::runs::StoreHistory> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let request = Request::History {
        project: project.to_owned(),
    };
    match ask(dir, &request, &mut out, &mut err) {
        Ok(Some(code)) if code == super::EXIT_OK => serde_json::from_slice(&out).ok(),
        _ => None,
    }
}

/// Asks the process running in `dir` (if any) to answer `request`; `None` when no run
/// serves there (then the command opens the state itself).
pub(super) fn ask(
    dir: &Path,
    request: &Request,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Option<i32>> {
    use std::io::{BufRead, BufReader};
    let path = dir.join(SOCKET);
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(&path) else {
        return Ok(None);
    };
    let limit = Some(std::time::Duration::from_secs(30));
    conn.set_read_timeout(limit)?;
    conn.set_write_timeout(limit)?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    if conn.write_all(line.as_bytes()).is_err() {
        return Ok(None);
    }
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply)?;
    let Ok(response) = serde_json::from_str::<Response>(&reply) else {
        return Ok(None);
    };
    out.write_all(response.out.as_bytes())?;
    err.write_all(response.err.as_bytes())?;
    Ok(Some(response.code))
}
