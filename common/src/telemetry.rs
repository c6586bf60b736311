//! Diagnostics for the two binaries: `tracing` to stderr (filtered by `BATON_LOG`, default
//! `info`) and, with `--otlp-endpoint`, every span exported over OTLP/gRPC with
//! tracing-opentelemetry. A run is one trace: the coordinator's run and stage spans, and the
//! agent's attempt and migration spans, joined by the W3C `traceparent` each assignment
//! carries ([`traceparent`] on the coordinator's side, [`adopt`] on the agent's).
//!
//! Only binaries call [`init`] and [`shutdown_signal`]; libraries just emit spans.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends every buffered span (bounded by the SDK's export timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Sets up logging and, with `otlp_endpoint`, span export as `service`. Call inside the
/// tokio runtime (the exporter's gRPC channel lives there).
///
/// # Errors
/// When the endpoint is not a URL the exporter accepts.
pub fn init(service: &'static str, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `BATON_LOG` filters what is printed only; exported spans have their own level, so
    // quiet logs never thin out a trace.
    let fmt = tracing_subscriber::Layer::with_filter(fmt, filter);
    let Some(endpoint) = otlp_endpoint else {
        // A second init (tests calling twice) keeps the first; not an error.
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry::default());
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("--otlp-endpoint `{endpoint}`: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(service);
    let otel = tracing_subscriber::Layer::with_filter(
        tracing_opentelemetry::layer().with_tracer(tracer),
        tracing_subscriber::filter::LevelFilter::INFO,
    );
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The W3C `traceparent` of `span` (empty when spans are not exported).
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` names (nothing when empty).
pub fn adopt(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Resolves on SIGINT or SIGTERM: when a binary starts its ordered shutdown.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // No SIGTERM handler can be installed: Ctrl-C alone ends the wait.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
