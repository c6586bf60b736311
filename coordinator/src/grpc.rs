//! The coordinator's gRPC services. They convert and delegate: `AgentService` to the
//! [`AgentRegistry`] (agent sessions), `ControlService` to the [`Runs`] service (the same one
//! local mode uses). Domain errors become a `tonic::Status` in one function per side
//! ([`status_of`] here, `SessionError`'s `From` for sessions).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use baton_common::proto::{self, agent_service_server, control_service_server};
use baton_common::spec::MemoryFiles;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::planner::{self, PlanError, Selection};
use crate::runner::remote::{deliver, AgentRegistry, Outbound};
use crate::runs::{describe_selection, Runs, RunsError, StoreHistory, Submission};
use crate::scheduler::driver::{Resolution, RunDirection};

/// How long an agent may take to send its hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The one mapping from the run service's errors to gRPC statuses.
pub fn status_of(e: RunsError) -> Status {
    match e {
        RunsError::InterruptedFirst { .. } | RunsError::InterruptedOther { .. } => {
            Status::failed_precondition(e.to_string())
        }
        RunsError::UnknownRun(_) => Status::not_found(e.to_string()),
        RunsError::Rollback(_) | RunsError::Resolve(_) => {
            Status::failed_precondition(e.to_string())
        }
        RunsError::NotLive(_) | RunsError::Promotion(_) => {
            Status::failed_precondition(e.to_string())
        }
        RunsError::Store(_) | RunsError::Random(_) => Status::internal(e.to_string()),
    }
}

/// The store key a request names: its `project` (else the stages file's name), scoped to
/// its environment.
fn request_key(
    stages_file: &std::path::Path,
    project: String,
    environment: Option<&str>,
) -> String {
    let project = if project.is_empty() {
        crate::runs::project_key(stages_file)
    } else {
        project
    };
    crate::runs::scoped_key(&project, environment)
}

/// Loads and plans a submission as the CLI sent it: what `SubmitRun` does, and what a
/// restarted coordinator does again from the stored request. `rollback`: plan the rollback
/// of a failed run instead (per stage, the version to roll back to).
pub fn submission_of(
    runs: &Runs,
    r: proto::SubmitRunRequest,
    rollback: Option<&BTreeMap<String, u64>>,
    by: &str,
) -> Result<Submission, Status> {
    let request = Arc::new(r.clone());
    let stages_file = PathBuf::from(&r.stages_file);
    let set: BTreeMap<String, String> = r.set.into_iter().collect();
    let files = files_of(r.files);
    let environment = Some(r.environment.as_str()).filter(|e| !e.is_empty());
    let loaded = crate::project::load(
        &stages_file,
        &files,
        set.keys().cloned().collect(),
        environment,
        false,
    );
    let Some(project) = loaded.project else {
        return Err(Status::invalid_argument(format!(
            "the project is invalid; nothing was run:\n{}",
            loaded.diagnostics
        )));
    };
    if let Some(message) = crate::project::environment_required(&project) {
        return Err(Status::invalid_argument(message));
    }
    let selection = match (r.stages.is_empty(), r.from.is_empty(), r.to.is_empty()) {
        (false, _, _) => Selection::Stages { names: r.stages },
        (true, false, _) | (true, _, false) => Selection::Range {
            from: r.from,
            to: r.to,
        },
        _ => Selection::All,
    };
    let key = request_key(&stages_file, r.project, environment);
    let history =
        StoreHistory::of(runs.store().as_ref(), &key, &project).map_err(|e| status_of(e.into()))?;
    let plan_vars = planner::PlanVars {
        overrides: set.clone(),
        ..Default::default()
    };
    let planned = match rollback {
        Some(to) => planner::plan_down(
            &project,
            &Selection::Stages {
                names: to.keys().cloned().collect(),
            },
            &history,
            planner::Dependents::Leave,
        ),
        None if r.down => {
            let dependents = if r.cascade {
                planner::Dependents::Cascade
            } else {
                planner::Dependents::Refuse
            };
            planner::plan_down(&project, &selection, &history, dependents)
        }
        None => planner::plan_with(&project, &selection, &history, &plan_vars),
    };
    let plan = match planned {
        // Down plans do not forecast; their digest covers --set here (plan_with's already
        // does).
        Ok(mut p) if p.direction == "down" => {
            p.digest = planner::cover_overrides(p.digest, &project, &set);
            p
        }
        Ok(p) => p,
        Err(PlanError::Invalid(d)) => {
            return Err(Status::invalid_argument(format!(
                "the project is invalid; nothing was run:\n{d}"
            )))
        }
        Err(e) => return Err(Status::failed_precondition(e.to_string())),
    };
    if rollback.is_none() && r.down && !r.skip_missing_down {
        let missing = planner::missing_down(&project, &plan);
        if !missing.is_empty() {
            return Err(Status::failed_precondition(planner::missing_down_message(
                &missing,
            )));
        }
    }
    Ok(Submission {
        project: Arc::new(project),
        files: Arc::new(loaded.files),
        plan,
        project_key: key,
        overrides: set,
        // Conditions' `env` is the environment where baton decides; on a coordinator that
        // is nobody's: agents' environments stay on the agents.
        condition_env: BTreeMap::new(),
        by: by.to_owned(),
        skip_promotion: Some(r.skip_promotion_reason).filter(|r| !r.is_empty()),
        request: Some(request),
    })
}

/// `AgentService`: one session per `Attach` stream.
#[derive(Debug, Clone)]
pub struct AgentApi {
    pub registry: AgentRegistry,
    /// Owns the session tasks.
    pub tasks: TaskTracker,
    /// Ends every session on shutdown.
    pub shutdown: CancellationToken,
}

type AttachStream = Pin<Box<dyn Stream<Item = Outbound> + Send>>;

#[tonic::async_trait]
impl agent_service_server::AgentService for AgentApi {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {}s of opening the stream",
                    HELLO_TIMEOUT.as_secs()
                ))
            })??;
        let hello = match first.and_then(|m| m.kind) {
            Some(proto::agent_message::Kind::Hello(h)) => h,
            _ => {
                tracing::warn!("agent stream refused: its first message was not a hello");
                return Err(Status::invalid_argument(
                    "the first message of an Attach stream must be a hello",
                ));
            }
        };
        let (session, outbox, effects) = self.registry.attach(hello).map_err(|e| {
            tracing::warn!(error = %e, "agent refused");
            Status::from(e)
        })?;
        deliver(effects).await;
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let span =
            tracing::info_span!("agent_session", agent = %session.agent, session = session.id);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let why = loop {
                    tokio::select! {
                        // Shutdown first: stop reading, let the stream close.
                        () = shutdown.cancelled() => break "the coordinator is shutting down".to_owned(),
                        msg = inbound.message() => match msg {
                            Ok(Some(m)) => match registry.on_message(&session, m) {
                                Ok(effects) => deliver(effects).await,
                                Err(e) => {
                                    tracing::warn!(error = %e, "agent message refused; session ends");
                                    // On the agent's own stream, so it sees why its session ended.
                                    if let Some(tx) = registry.session_outbox(&session) {
                                        let _ = tx.send(Err(Status::from(e))).await;
                                    }
                                    break "protocol error".to_owned();
                                }
                            },
                            Ok(None) => break "the agent closed the stream".to_owned(),
                            Err(status) => break format!("stream error: {}", status.message()),
                        },
                    }
                };
                deliver(registry.detach(&session, &why)).await;
            },
            span,
        ));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(outbox)) as AttachStream
        ))
    }
}

/// `ControlService`: what the CLI calls.
#[derive(Debug, Clone)]
pub struct ControlApi {
    pub runs: Arc<Runs>,
    pub registry: AgentRegistry,
}

/// The files a client sent, as a file system the loader reads.
fn files_of(files: std::collections::HashMap<String, Vec<u8>>) -> MemoryFiles {
    let mut m = MemoryFiles::default();
    for (path, bytes) in files {
        m.insert(PathBuf::from(path), bytes);
    }
    m
}

fn diagnostics(d: &baton_common::diag::Diagnostics) -> Vec<proto::Diagnostic> {
    d.iter()
        .map(|d| proto::Diagnostic {
            severity: d.severity.to_string(),
            file: d.file.display().to_string(),
            line: d.line,
            column: d.column,
            message: d.message.clone(),
            help: d.help.clone().unwrap_or_default(),
        })
        .collect()
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl control_service_server::ControlService for ControlApi {
    type WatchRunStream = WatchStream;

    async fn validate(
        &self,
        request: Request<proto::ValidateRequest>,
    ) -> Result<Response<proto::ValidateResponse>, Status> {
        let r = request.into_inner();
        let files = files_of(r.files);
        let loaded = crate::project::load(
            &PathBuf::from(&r.stages_file),
            &files,
            r.provided.into_iter().collect(),
            Some(r.environment.as_str()).filter(|e| !e.is_empty()),
            r.strict,
        );
        Ok(Response::new(proto::ValidateResponse {
            diagnostics: diagnostics(&loaded.diagnostics),
        }))
    }

    async fn submit_run(
        &self,
        request: Request<proto::SubmitRunRequest>,
    ) -> Result<Response<proto::SubmitRunResponse>, Status> {
        let caller = operator_of(&request);
        caller.require("submit", "submit runs")?;
        let r = request.into_inner();
        if !r.skip_promotion_reason.is_empty() {
            caller.require("admin", "skip the promotion check")?;
        }
        let down = r.down;
        let skip_missing_down = r.skip_missing_down;
        let sub = submission_of(&self.runs, r, None, &caller.identity.name)?;
        let submitted = if down {
            if sub.plan.order.iter().all(|s| s.pending.is_empty()) {
                return Ok(Response::new(proto::SubmitRunResponse {
                    run_id: 0,
                    plan_digest: sub.plan.digest.clone(),
                    notes: vec![
                        "nothing to roll back: no selected stage has applied migrations".to_owned(),
                    ],
                    stages: 0,
                }));
            }
            let direction = RunDirection::Down {
                to: BTreeMap::new(),
                skip_missing_down,
            };
            self.runs.submit_down(sub, direction).await
        } else {
            self.runs.submit_up(sub).await
        }
        .map_err(status_of)?;
        Ok(Response::new(proto::SubmitRunResponse {
            run_id: submitted.run_id,
            plan_digest: submitted.plan_digest,
            notes: submitted.notes,
            stages: u32::try_from(submitted.stages).unwrap_or(u32::MAX),
        }))
    }

    async fn resolve_stage(
        &self,
        request: Request<proto::ResolveStageRequest>,
    ) -> Result<Response<proto::ResolveStageResponse>, Status> {
        operator_of(&request).require("admin", "resolve stages")?;
        let r = request.into_inner();
        let Some(resolution) = Resolution::parse(&r.resolution) else {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a resolution: use succeeded, failed or retry",
                r.resolution
            )));
        };
        let by = if r.decided_by.trim().is_empty() {
            "an unnamed operator".to_owned()
        } else {
            r.decided_by
        };
        self.runs
            .resolve(r.run_id, &r.stage, resolution, &by)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::ResolveStageResponse {}))
    }

    async fn drain_agent(
        &self,
        request: Request<proto::DrainAgentRequest>,
    ) -> Result<Response<proto::DrainAgentResponse>, Status> {
        operator_of(&request).require("admin", "drain agents")?;
        let id = request.into_inner().agent_id;
        match self.registry.drain(&id) {
            Some(running) => Ok(Response::new(proto::DrainAgentResponse { running })),
            None => Err(Status::not_found(format!(
                "no agent `{id}` is attached (see `baton agents list`)"
            ))),
        }
    }

    async fn health(
        &self,
        _request: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        Ok(Response::new(match self.runs.health() {
            None => proto::HealthResponse {
                status: "ok".to_owned(),
                error: String::new(),
            },
            Some(e) => proto::HealthResponse {
                status: "degraded".to_owned(),
                error: e,
            },
        }))
    }

    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        let rx = self
            .runs
            .watch(r.run_id, r.from_seq, r.follow)
            .map_err(status_of)?;
        let stream = ReceiverStream::new(rx).map(|e| {
            Ok(proto::RunEvent {
                seq: e.seq,
                stage: e.stage.clone().unwrap_or_default(),
                message: crate::status::event_text(&e).unwrap_or_default(),
                record_json: serde_json::to_string(&e)
                    .map_err(|err| Status::internal(err.to_string()))?,
            })
        });
        Ok(Response::new(Box::pin(stream) as WatchStream))
    }

    async fn cancel_run(
        &self,
        request: Request<proto::CancelRunRequest>,
    ) -> Result<Response<proto::CancelRunResponse>, Status> {
        let caller = operator_of(&request);
        caller.require("submit", "cancel runs")?;
        let id = request.into_inner().run_id;
        if self
            .runs
            .store()
            .run(id)
            .map_err(|e| status_of(e.into()))?
            .is_none()
        {
            return Err(status_of(RunsError::UnknownRun(id)));
        }
        let cancelled = self
            .runs
            .cancel_by(id, &caller.identity.name)
            .map_err(status_of)?;
        tracing::info!(run = id, cancelled, "cancel requested");
        Ok(Response::new(proto::CancelRunResponse { cancelled }))
    }

    async fn list_runs(
        &self,
        _request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let runs = self.runs.list().map_err(status_of)?;
        Ok(Response::new(proto::ListRunsResponse {
            runs: runs
                .into_iter()
                .map(|(r, queued)| proto::RunSummary {
                    run_id: r.id,
                    status: if queued {
                        "queued".to_owned()
                    } else {
                        r.status.as_str().to_owned()
                    },
                    direction: r.direction,
                    project: r.project,
                    selection: describe_selection(&r.selection),
                    created_at_ms: r.created_at_ms,
                    release: r.release,
                    by: r.by,
                })
                .collect(),
        }))
    }

    async fn stages_status(
        &self,
        request: Request<proto::StagesStatusRequest>,
    ) -> Result<Response<proto::StagesStatusResponse>, Status> {
        let r = request.into_inner();
        let stages_file = PathBuf::from(&r.stages_file);
        let files = files_of(r.files);
        let environment = Some(r.environment.as_str()).filter(|e| !e.is_empty());
        let loaded =
            crate::project::load(&stages_file, &files, Default::default(), environment, false);
        let Some(project) = loaded.project else {
            return Err(Status::invalid_argument(format!(
                "the project is invalid:\n{}",
                loaded.diagnostics
            )));
        };
        if let Some(message) = crate::project::environment_required(&project) {
            return Err(Status::invalid_argument(message));
        }
        let key = request_key(&stages_file, r.project, environment);
        let states = crate::status::stage_states(&project, self.runs.store().as_ref(), &key)
            .map_err(|e| status_of(e.into()))?;
        Ok(Response::new(proto::StagesStatusResponse {
            stages: states
                .into_iter()
                // The text fields for older CLIs; the record for this one.
                .map(|s| proto::StageState {
                    applied: s.applied_lines(),
                    pending: s.pending_lines(),
                    last: s.last_line(),
                    exports: s.export_lines(),
                    record_json: serde_json::to_string(&s).unwrap_or_default(),
                    name: s.name,
                })
                .collect(),
        }))
    }

    async fn decide_run(
        &self,
        request: Request<proto::DecideRunRequest>,
    ) -> Result<Response<proto::DecideRunResponse>, Status> {
        let caller = operator_of(&request);
        let r = request.into_inner();
        caller.require(
            "approve",
            if r.approve {
                "approve runs"
            } else {
                "reject runs"
            },
        )?;
        let gate = self
            .runs
            .decide(r.run_id, r.approve, &caller.identity, &r.comment)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::DecideRunResponse { gate }))
    }

    async fn audit(
        &self,
        _request: Request<proto::AuditRequest>,
    ) -> Result<Response<proto::AuditResponse>, Status> {
        let store = self.runs.store().clone();
        let entries = tokio::task::spawn_blocking(move || store.audit())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| status_of(e.into()))?;
        Ok(Response::new(proto::AuditResponse {
            entries_json: entries
                .iter()
                .map(|e| serde_json::to_string(e).unwrap_or_default())
                .collect(),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        Ok(Response::new(proto::ListAgentsResponse {
            agents: self
                .registry
                .agents()
                .into_iter()
                .map(|a| proto::AgentSummary {
                    agent_id: a.id,
                    labels: a.labels.into_iter().collect(),
                    capacity: a.capacity,
                    running: a.running,
                    last_seen_ms_ago: u64::try_from(a.last_seen.as_millis()).unwrap_or(u64::MAX),
                    version: a.version,
                    draining: a.draining,
                })
                .collect(),
        }))
    }
}

/// A named operator token (`--operator-token-file` in the `operators:` form): who presents
/// it, what it may do, and the groups `approval.approvers` may name (`group:NAME`).
#[derive(Clone)]
pub struct OperatorToken {
    pub name: String,
    pub token: String,
    /// `submit` (runs, cancel), `approve` (approve, reject), `admin` (everything, also
    /// resolve, drain and `--skip-promotion-check`).
    pub roles: Vec<String>,
    pub groups: Vec<String>,
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("OperatorToken")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// Who called the control service, as [`BearerCheck`] established it (a request extension).
#[derive(Debug, Clone)]
pub struct Operator {
    pub identity: crate::runs::Identity,
    pub roles: Vec<String>,
    /// From a named token (enforced), or claimed by the CLI (`x-baton-user`: no named tokens
    /// are configured, so the coordinator trusts what the caller says, as local mode does).
    pub named: bool,
}

impl Operator {
    /// Whether it may act in `role` (`admin` may do everything).
    pub fn may(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role || r == "admin")
    }

    /// `Err(permission denied)` unless it may act in `role`.
    pub fn require(&self, role: &str, what: &str) -> Result<(), Status> {
        if self.may(role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "operator `{}` may not {what}: that needs the `{role}` role (its roles: {}); ask an admin to add it to the operator tokens file",
                self.identity.name,
                if self.roles.is_empty() { "none".to_owned() } else { self.roles.join(", ") }
            )))
        }
    }
}

/// The caller of a control request (anyone with every role when no check ran: tests that
/// call the service directly).
pub fn operator_of<T>(req: &Request<T>) -> Operator {
    req.extensions()
        .get::<Operator>()
        .cloned()
        .unwrap_or_else(|| Operator {
            identity: claimed(req.metadata()),
            roles: vec!["admin".to_owned()],
            named: false,
        })
}

/// Who a CLI says it is (`x-baton-user`: its BATON_USER or OS user, else `operator`; and
/// `x-baton-groups`: its BATON_GROUPS): what a coordinator without named tokens records.
fn claimed(m: &tonic::metadata::MetadataMap) -> crate::runs::Identity {
    let header = |name: &str| {
        m.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    crate::runs::Identity {
        name: header("x-baton-user").map_or_else(|| "operator".to_owned(), str::to_owned),
        groups: header("x-baton-groups")
            .map(|g| {
                g.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Checks `authorization: Bearer TOKEN` against a token read from a file, or against named
/// operator tokens, in constant time; records who called as an [`Operator`].
#[derive(Clone)]
pub struct BearerCheck {
    expected: Option<Arc<Vec<u8>>>,
    operators: Arc<Vec<OperatorToken>>,
    /// `agent` or `operator`, for the message.
    who: &'static str,
}

impl std::fmt::Debug for BearerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerCheck")
            .field("who", &self.who)
            .field("required", &self.expected.is_some())
            .field("operators", &self.operators.len())
            .finish()
    }
}

impl BearerCheck {
    /// `expected: None` accepts every caller (loopback without tokens).
    pub fn new(expected: Option<String>, who: &'static str) -> Self {
        BearerCheck {
            expected: expected.map(|t| Arc::new(t.into_bytes())),
            operators: Arc::default(),
            who,
        }
    }

    /// Named operator tokens: each caller is the operator whose token it presents.
    pub fn operators(operators: Vec<OperatorToken>) -> Self {
        BearerCheck {
            expected: None,
            operators: Arc::new(operators),
            who: "operator",
        }
    }
}

/// Equal lengths and bytes, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerCheck {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        if !self.operators.is_empty() {
            // Every token is compared, so the time taken does not say which one matched.
            let mut found = None;
            for o in self.operators.iter() {
                let same = given
                    .as_deref()
                    .is_some_and(|t| constant_time_eq(t.as_bytes(), o.token.as_bytes()));
                if same && found.is_none() {
                    found = Some(o);
                }
            }
            return match found {
                Some(o) => {
                    req.extensions_mut().insert(Operator {
                        identity: crate::runs::Identity {
                            name: o.name.clone(),
                            groups: o.groups.clone(),
                        },
                        roles: o.roles.clone(),
                        named: true,
                    });
                    Ok(req)
                }
                None => {
                    tracing::warn!(who = self.who, "request refused: unknown operator token");
                    Err(Status::unauthenticated(if given.is_some() {
                        "the operator token is not one of the coordinator's operators (check --token-file or BATON_TOKEN)"
                    } else {
                        "this coordinator requires an operator token: pass --token-file FILE or set BATON_TOKEN"
                    }))
                }
            };
        }
        // One shared token (or none): everyone is the same principal, named as they claim.
        let claimed = Operator {
            identity: claimed(req.metadata()),
            roles: vec!["admin".to_owned()],
            named: false,
        };
        let Some(expected) = &self.expected else {
            req.extensions_mut().insert(claimed);
            return Ok(req);
        };
        match given.as_deref() {
            Some(t) if constant_time_eq(t.as_bytes(), expected) => {
                req.extensions_mut().insert(claimed);
                Ok(req)
            }
            Some(_) => {
                tracing::warn!(who = self.who, "request refused: wrong token");
                Err(Status::unauthenticated(format!(
                    "the {} token is wrong (check --token-file or BATON_TOKEN against the coordinator's --{}-token-file)",
                    self.who, self.who
                )))
            }
            None => {
                tracing::warn!(who = self.who, "request refused: no token");
                Err(Status::unauthenticated(format!(
                    "this coordinator requires an {} token: pass --token-file FILE or set BATON_TOKEN",
                    self.who
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
