//! `baton coordinator serve`: flags to a [`ServeConfig`], the transport-security rules,
//! logging and signals, then [`crate::server::serve`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::{ServeArgs, EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED};
use crate::server::{serve as serve_on, ServeConfig};

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} `{}`: {e}", path.display()))
}

fn token(path: &Option<std::path::PathBuf>) -> Result<Option<String>, String> {
    path.as_deref()
        .map(baton_common::client::token_from_file)
        .transpose()
}

/// The config `args` describe, or why they are refused: off loopback, plaintext and missing
/// tokens need `--insecure` (and then each is warned about).
pub(super) fn config(
    args: &ServeArgs,
    addr: SocketAddr,
    warn: &mut dyn Write,
) -> Result<ServeConfig, String> {
    let mut c = ServeConfig::new(args.data_dir.clone());
    c.agent_token = token(&args.agent_token_file)?;
    c.operator_token = token(&args.operator_token_file)?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        c.tls = Some((read(cert, "TLS certificate")?, read(key, "TLS key")?));
    }
    c.heartbeat = args.heartbeat;
    c.lease = args.lease;
    c.grace = args.grace;
    c.failover_grace = args.failover_grace;
    c.keepalive = args.keepalive;
    c.shutdown_grace = args.shutdown_grace;
    if c.lease < c.heartbeat * 2 {
        return Err(format!(
            "--lease {} ms is shorter than two heartbeats ({} ms each): one late heartbeat would lose every attempt; make --lease at least twice --heartbeat",
            c.lease.as_millis(),
            c.heartbeat.as_millis()
        ));
    }
    if !addr.ip().is_loopback() {
        let mut gaps = Vec::new();
        if c.tls.is_none() {
            gaps.push("plaintext (no --tls-cert/--tls-key)");
        }
        if c.agent_token.is_none() {
            gaps.push("no --agent-token-file");
        }
        if c.operator_token.is_none() {
            gaps.push("no --operator-token-file");
        }
        if !gaps.is_empty() {
            if !args.insecure {
                return Err(format!(
                    "{addr} is not a loopback address, and the coordinator would run with {}; add TLS and tokens, or pass --insecure to accept that",
                    gaps.join(", ")
                ));
            }
            let _ = writeln!(
                warn,
                "warning: --insecure: serving on {addr} with {}; anyone who reaches it can run stages",
                gaps.join(", ")
            );
        }
    }
    Ok(c)
}

/// Runs the coordinator until SIGINT or SIGTERM.
pub(super) fn serve(
    args: &ServeArgs,
    state_key: crate::store::StateKey,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let addr: SocketAddr = match args.listen.parse() {
        Ok(a) => a,
        Err(e) => {
            writeln!(
                err,
                "error: --listen `{}` is not an address: {e} (write e.g. 127.0.0.1:7600)",
                args.listen
            )?;
            return Ok(EXIT_INVALID);
        }
    };
    let mut config = match config(args, addr, err) {
        Ok(c) => c,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(EXIT_INVALID);
        }
    };
    config.state_key = state_key;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let telemetry =
            match baton_common::telemetry::init("baton-coordinator", args.otlp_endpoint.as_deref())
            {
                Ok(t) => t,
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    return Ok(EXIT_INVALID);
                }
            };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                writeln!(err, "error: cannot listen on {addr}: {e}")?;
                return Ok(EXIT_RUN_FAILED);
            }
        };
        // The first line on stdout says where it listens (port 0 picks a free one).
        if let Ok(bound) = listener.local_addr() {
            // A closed stdout only means nobody reads it.
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "baton coordinator listening on {bound}");
            let _ = stdout.flush();
        }
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let signals = tokio::spawn(async move {
            baton_common::telemetry::shutdown_signal().await;
            tracing::info!("signal received; shutting down");
            signal.cancel();
        });
        let served = serve_on(config, listener, shutdown).await;
        signals.abort();
        // The last spans, off the async workers (the exporter blocks while it flushes).
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        match served {
            Ok(()) => Ok(EXIT_OK),
            Err(e) => {
                writeln!(err, "error: {e}")?;
                Ok(EXIT_RUN_FAILED)
            }
        }
    })
}
