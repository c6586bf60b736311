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

/// The named operators of an operator token file in the `operators:` form; `None` for a
/// file that holds one token (everyone who has it is the same operator).
///
/// ```yaml
/// operators:
///   - name: alice
///     token_file: /etc/baton/alice.token   # or token: "..."
///     roles: [submit]                       # submit, approve, admin
///     groups: [developers]                  # what `approvers: [group:NAME]` names
/// ```
fn operators(path: &Path) -> Result<Option<Vec<crate::grpc::OperatorToken>>, String> {
    use baton_common::yaml::Value;
    let text = String::from_utf8(read(path, "operator token file")?).map_err(|_| {
        format!(
            "the operator token file `{}` is not UTF-8 text",
            path.display()
        )
    })?;
    let Ok(doc) = baton_common::yaml::parse(&text, baton_common::yaml::Limits::default()) else {
        return Ok(None);
    };
    let Some(list) = doc.get("operators") else {
        return Ok(None);
    };
    let bad = |line: u32, what: &str| format!("{}:{line}: {what}", path.display());
    let Value::Seq(items) = &list.value else {
        return Err(bad(
            list.pos.line,
            "`operators` must be a list of `- name: ...` entries",
        ));
    };
    let strings = |n: Option<&baton_common::yaml::Node>| -> Vec<String> {
        match n.map(|n| &n.value) {
            Some(Value::Seq(v)) => v
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            Some(Value::Scalar(s, _)) => vec![s.clone()],
            _ => Vec::new(),
        }
    };
    let mut out: Vec<crate::grpc::OperatorToken> = Vec::new();
    for item in items {
        let line = item.pos.line;
        let name = item
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| bad(line, "an operator has no `name`"))?
            .to_owned();
        let token = match (
            item.get("token").and_then(|n| n.as_str()),
            item.get("token_file").and_then(|n| n.as_str()),
        ) {
            (Some(t), None) => t.trim().to_owned(),
            (None, Some(f)) => baton_common::client::token_from_file(&baton_common::spec::beside(
                path,
                Path::new(f),
            ))?,
            _ => {
                return Err(bad(
                    line,
                    &format!("operator `{name}` needs exactly one of `token` and `token_file`"),
                ))
            }
        };
        if token.len() < 16 {
            return Err(bad(line, &format!("operator `{name}`'s token is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)")));
        }
        let roles = strings(item.get("roles"));
        if let Some(r) = roles
            .iter()
            .find(|r| !["submit", "approve", "admin"].contains(&r.as_str()))
        {
            return Err(bad(
                line,
                &format!("operator `{name}`: unknown role `{r}` (use submit, approve, admin)"),
            ));
        }
        if out.iter().any(|o| o.name == name || o.token == token) {
            return Err(bad(
                line,
                &format!("operator `{name}`: names and tokens must be unique"),
            ));
        }
        out.push(crate::grpc::OperatorToken {
            name,
            token,
            roles,
            groups: strings(item.get("groups")),
        });
    }
    if out.is_empty() {
        return Err(bad(list.pos.line, "`operators` is empty"));
    }
    Ok(Some(out))
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
    if let Some(path) = &args.operator_token_file {
        match operators(path)? {
            Some(named) => c.operators = named,
            None => c.operator_token = token(&args.operator_token_file)?,
        }
    }
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
        if c.operator_token.is_none() && c.operators.is_empty() {
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
