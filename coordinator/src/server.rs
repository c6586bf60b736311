//! `baton coordinator serve`: the coordinator as a server. [`serve`] is what `main` calls and
//! what tests call: it opens the store, builds the agent registry and the run service,
//! rebuilds the runs a previous process left running (their running attempts wait the
//! failover grace for their agents), serves `AgentService` and `ControlService` on the given
//! listener, and on shutdown stops accepting and stops its drivers within the grace period
//! without cancelling anything: runs stay running in the store, agents keep their attempts,
//! and the next start picks both up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_common::proto::{agent_service_server, control_service_server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use baton_common::proto::StoredSubmission;
use prost::Message;

use crate::grpc::{submission_of, AgentApi, BearerCheck, ControlApi};
use crate::runner::remote::{deliver, AgentRegistry, Timing};
use crate::runs::Runs;
use crate::scheduler::driver::RunDirection;
use crate::store::{RunStatus, SledStore, Store, StoreError};

/// Everything the server needs, validated by the caller (flags, files read).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The sled store (the same format as local mode's `.baton/`).
    pub data_dir: PathBuf,
    /// PEM certificate chain and key: TLS on every connection. `None`: plaintext.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Bearer token agents must present; `None`: none required.
    pub agent_token: Option<String>,
    /// Bearer token the CLI must present; `None`: none required.
    pub operator_token: Option<String>,
    /// Named operator tokens (the `operators:` form of the operator token file): each CLI
    /// caller is who its token names, with its roles. Non-empty: `operator_token` is unused.
    pub operators: Vec<crate::grpc::OperatorToken>,
    /// How often agents send heartbeats (H).
    pub heartbeat: Duration,
    /// How long an attempt's lease lasts without renewal (L, told to agents).
    pub lease: Duration,
    /// How much longer the coordinator waits before declaring an attempt lost (G).
    pub grace: Duration,
    /// After a restart, how long attempts that were running wait for their agents (F).
    pub failover_grace: Duration,
    /// HTTP/2 keepalive ping interval; a ping unanswered within half of it ends the
    /// connection.
    pub keepalive: Duration,
    /// How long shutdown waits for drivers and sessions to stop.
    pub shutdown_grace: Duration,
    /// Where the key that encrypts secrets at rest comes from.
    pub state_key: crate::store::StateKey,
}

impl ServeConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServeConfig {
            data_dir,
            tls: None,
            agent_token: None,
            operator_token: None,
            operators: Vec::new(),
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(15),
            grace: Duration::from_secs(10),
            failover_grace: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            state_key: crate::store::StateKey::default(),
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` is cancelled, then shuts down in order within the grace period.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let dir = config.data_dir.clone();
    let state_key = config.state_key.clone();
    let store = tokio::task::spawn_blocking(move || SledStore::open_keyed(&dir, &state_key))
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))??;
    let store: Arc<dyn Store> = Arc::new(store);
    let ledger_store = store.clone();
    let registry = AgentRegistry::new(
        Timing {
            heartbeat: config.heartbeat,
            lease: config.lease,
            grace: config.grace,
        },
        Arc::new(move |a| crate::runs::verdict(ledger_store.as_ref(), a)),
    );
    let runs = Runs::new(store.clone(), Arc::new(registry.clone()));
    recover(&runs, &registry, config.failover_grace).await;
    let sweeper = {
        let registry = registry.clone();
        let stop = shutdown.clone();
        let every = (config.heartbeat / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => deliver(registry.sweep()).await,
                }
            }
        })
    };
    let sessions = TaskTracker::new();
    let agent_api = AgentApi {
        registry: registry.clone(),
        tasks: sessions.clone(),
        shutdown: shutdown.clone(),
    };
    let control_api = ControlApi {
        runs: runs.clone(),
        registry,
    };
    // Projects travel in submissions: allow more than tonic's 4 MiB default.
    const MAX_MESSAGE: usize = 64 * 1024 * 1024;
    let control = control_service_server::ControlServiceServer::new(control_api)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let agents = agent_service_server::AgentServiceServer::new(agent_api)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive / 2))
        .tcp_nodelay(true);
    if let Some((cert, key)) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let router = builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            agents,
            BearerCheck::new(config.agent_token.clone(), "agent"),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            control,
            if config.operators.is_empty() {
                BearerCheck::new(config.operator_token.clone(), "operator")
            } else {
                BearerCheck::operators(config.operators.clone())
            },
        ));
    tracing::info!(addr = ?listener.local_addr().ok(), data_dir = %config.data_dir.display(), "coordinator serving");
    // Our own listener: tonic's TCP options do not reach it, so no-delay is set per stream
    // (else small messages wait for delayed ACKs, ~40 ms each).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            if let Ok(stream) = &s {
                let _ = stream.set_nodelay(true);
            }
            s
        },
    );
    let stopping = shutdown.clone();
    let served = router
        .serve_with_incoming_shutdown(incoming, async move { stopping.cancelled().await })
        .await;
    // Ordered and bounded: dispatch stops (drivers finish the transition they are in; what
    // is recorded is flushed), sessions end. Nothing is cancelled: runs stay running in the
    // store and agents keep their attempts for the next start.
    shutdown.cancel();
    sweeper.abort();
    let grace = config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        runs.suspend().await;
        sessions.close();
        sessions.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?grace, "shutdown grace ran out; stopping anyway (what was recorded is durable)");
    }
    served?;
    Ok(())
}

/// Rebuilds every run a previous process left running, oldest first (so a project's queue
/// keeps its order), from the submission stored with it. Attempts that were running are
/// expected from their agents for `failover` before they count as lost.
async fn recover(runs: &Arc<Runs>, registry: &AgentRegistry, failover: Duration) {
    let store = runs.store().clone();
    let listed = tokio::task::spawn_blocking(move || store.runs()).await;
    let Ok(Ok(all)) = listed else {
        tracing::error!("cannot list runs to recover; none resumed");
        return;
    };
    for run in all.into_iter().filter(|r| r.status == RunStatus::Running) {
        let id = run.id;
        let stored = match runs.store().submission(id) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                tracing::warn!(run = id, "run was running but has no stored submission (recorded by local mode or an older baton); resume it with `baton runs resume` where its files are");
                continue;
            }
            Err(e) => {
                tracing::error!(run = id, error = %e, "cannot read the run's submission; not resumed");
                continue;
            }
        };
        let Ok(StoredSubmission {
            request: Some(request),
            rollback_of,
        }) = StoredSubmission::decode(stored.as_slice())
        else {
            tracing::error!(
                run = id,
                "the run's stored submission is damaged; not resumed"
            );
            continue;
        };
        let rollback =
            (rollback_of != 0).then(|| run.down.clone().map(|d| d.to).unwrap_or_default());
        let direction = match &run.down {
            Some(d) => RunDirection::Down {
                to: d.to.clone(),
                skip_missing_down: d.skip_missing_down,
            },
            None => RunDirection::Up,
        };
        let sub = match submission_of(runs, request, rollback.as_ref(), &run.by) {
            Ok(s) => s,
            Err(status) => {
                tracing::error!(
                    run = id,
                    error = status.message(),
                    "cannot rebuild the run from its submission; not resumed"
                );
                continue;
            }
        };
        let expect = |a| registry.expect(a, failover);
        match runs.recover(sub, run, direction, expect).await {
            Ok(s) => tracing::info!(run = id, notes = ?s.notes, "run resumed after a restart"),
            Err(e) => tracing::error!(run = id, error = %e, "cannot resume the run"),
        }
    }
}
