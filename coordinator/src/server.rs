//! `baton coordinator serve`: the coordinator as a server. [`serve`] is what `main` calls and
//! what tests call: it opens the store, builds the agent registry and the run service, serves
//! `AgentService` and `ControlService` on the given listener, and on shutdown stops
//! accepting, cancels runs, and waits a bounded time for them to record their end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_common::proto::{agent_service_server, control_service_server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::grpc::{AgentApi, BearerCheck, ControlApi};
use crate::runner::remote::AgentRegistry;
use crate::runs::Runs;
use crate::store::{SledStore, StoreError};

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
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// How long an attempt's lease lasts without renewal (told to agents).
    pub lease: Duration,
    /// How long shutdown waits for runs to record their end.
    pub shutdown_grace: Duration,
}

impl ServeConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServeConfig {
            data_dir,
            tls: None,
            agent_token: None,
            operator_token: None,
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(10),
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
    let store = tokio::task::spawn_blocking(move || SledStore::open(&dir))
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))??;
    let registry = AgentRegistry::new(config.heartbeat, config.lease);
    let runs = Runs::new(Arc::new(store), Arc::new(registry.clone()));
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
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
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
            BearerCheck::new(config.operator_token.clone(), "operator"),
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
    // Ordered and bounded: sessions end, runs are cancelled and record how they ended.
    shutdown.cancel();
    let grace = config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        runs.shutdown().await;
        sessions.close();
        sessions.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?grace, "shutdown grace ran out; some runs did not record their end");
    }
    served?;
    Ok(())
}
