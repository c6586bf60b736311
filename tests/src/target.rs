//! A recording target API: an HTTP (or HTTPS) server on 127.0.0.1 that records every request
//! it receives (method, path, query, headers, body) and answers from a script.
//!
//! A script maps `METHOD /path` to a queue of replies; each request takes the next reply and
//! the last one repeats. Unscripted requests get 404. Requests are counted per
//! `Idempotency-Key`, so tests can state how often an effect happened.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the target saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (for timeout and cancel tests).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

#[derive(Debug, Default)]
struct Shared {
    script: HashMap<String, VecDeque<Reply>>,
    log: Vec<Recorded>,
    /// Requests being answered right now, and the most there ever were at once.
    in_flight: usize,
    max_in_flight: usize,
    /// Like a real API that honours `Idempotency-Key`: a key seen before gets the first
    /// answer again and creates nothing (see [`Target::honour_idempotency_keys`]).
    honour_keys: bool,
    answered: HashMap<String, Reply>,
    /// See [`Target::answer_unscripted_like_a_cloud`].
    cloud: bool,
    /// See [`Target::set_cloud_latency`].
    cloud_latency: Duration,
    /// Per request, in arrival order: its path, when it arrived, when it was answered.
    timings: Vec<(String, std::time::Instant, std::time::Instant)>,
}

/// A running target. Stops when dropped.
#[derive(Debug)]
pub struct Target {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Target {
    /// Starts a plain-HTTP target on a free loopback port.
    pub async fn start() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (shared, router) = router();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await });
            let _ = serve.await;
        });
        Target {
            addr,
            scheme: "http",
            shared,
            stop,
        }
    }

    /// Starts an HTTPS target presenting `tls`'s server certificate (TLS 1.2 and 1.3).
    pub async fn start_tls(tls: &crate::tls::TlsMaterial) -> Target {
        Target::start_tls_with(tls, false).await
    }

    /// Starts an HTTPS target; `tls13_only` refuses TLS 1.2 clients.
    pub async fn start_tls_with(tls: &crate::tls::TlsMaterial, tls13_only: bool) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (shared, router) = router();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config(tls13_only));
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake; that is a test outcome.
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                });
            }
        });
        Target {
            addr,
            scheme: "https",
            shared,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://localhost:PORT` for TLS, matching the certificate).
    pub fn url(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    /// Scripts `METHOD /path`: each request takes the next reply; the last one repeats.
    pub fn on(&self, method: &str, path: &str, replies: Vec<Reply>) {
        let mut s = self.shared.lock().expect("target lock");
        s.script.insert(
            format!("{} {path}", method.to_ascii_uppercase()),
            replies.into(),
        );
    }

    /// From now on, a request whose `Idempotency-Key` was answered before gets that same
    /// answer again and takes nothing from the script, as payment and cloud APIs do. Two runs
    /// that wrongly share keys then "succeed" while the second creates nothing.
    pub fn honour_idempotency_keys(&self) {
        self.shared.lock().expect("target lock").honour_keys = true;
    }

    /// From now on, requests with no script are answered like a resource API: `PUT`/`POST`
    /// with 201 and `{"id": PATH, "name": LAST_SEGMENT}`, `DELETE` and `GET` with 200.
    pub fn answer_unscripted_like_a_cloud(&self) {
        self.shared.lock().expect("target lock").cloud = true;
    }

    /// Those cloud answers take `latency` each (the benchmarks' latency knob).
    pub fn set_cloud_latency(&self, latency: Duration) {
        self.shared.lock().expect("target lock").cloud_latency = latency;
    }

    /// Per request, in arrival order: its path, when it arrived and when the handler answered
    /// (for benchmarks: the gap between one stage's last answer and the next one's request).
    pub fn timings(&self) -> Vec<(String, std::time::Instant, std::time::Instant)> {
        self.shared.lock().expect("target lock").timings.clone()
    }

    /// A handle on the request log that can move to another thread.
    pub fn clone_handle(&self) -> TargetLog {
        TargetLog(self.shared.clone())
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().expect("target lock").log.clone()
    }

    /// Requests to `METHOD /path`.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }

    /// The most requests the target was answering at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.lock().expect("target lock").max_in_flight
    }

    /// How many requests carried each `Idempotency-Key`.
    pub fn effect_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in self.requests() {
            if let Some(k) = r.header("idempotency-key") {
                *counts.entry(k.to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// A resource API's answer to a request nobody scripted.
fn cloud_reply(method: &Method, path: &str) -> Reply {
    let name = path.rsplit('/').next().unwrap_or_default();
    match *method {
        Method::PUT | Method::POST => {
            Reply::json(201, serde_json::json!({ "id": path, "name": name }))
        }
        _ => Reply::json(200, serde_json::json!({ "id": path })),
    }
}

/// The request log of a [`Target`], readable from any thread.
#[derive(Debug, Clone)]
pub struct TargetLog(Arc<Mutex<Shared>>);

impl TargetLog {
    /// Requests to `METHOD /path` so far.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.0
            .lock()
            .expect("target lock")
            .log
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .cloned()
            .collect()
    }
}

fn router() -> (Arc<Mutex<Shared>>, Router) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let router = Router::new().fallback(handle).with_state(shared.clone());
    (shared, router)
}

async fn handle(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = std::time::Instant::now();
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let key = format!("{} {}", recorded.method, recorded.path);
    let idem = recorded.header("idempotency-key").map(str::to_owned);
    let reply = {
        let mut s = shared.lock().expect("target lock");
        s.log.push(recorded);
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        let replayed = match &idem {
            Some(k) if s.honour_keys => s.answered.get(k).cloned(),
            _ => None,
        };
        let cloud = s.cloud;
        let path = uri.path().to_owned();
        let reply = replayed
            .or_else(|| {
                s.script.get_mut(&key).and_then(|q| {
                    if q.len() > 1 {
                        q.pop_front()
                    } else {
                        q.front().cloned()
                    }
                })
            })
            .or_else(|| cloud.then(|| cloud_reply(&method, &path).delayed(s.cloud_latency)));
        if let (Some(k), Some(r)) = (idem, &reply) {
            s.answered.entry(k).or_insert_with(|| r.clone());
        }
        reply
    };
    let Some(reply) = reply else {
        shared.lock().expect("target lock").in_flight -= 1;
        return (StatusCode::NOT_FOUND, format!("no script for {key}")).into_response();
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    {
        let mut s = shared.lock().expect("target lock");
        s.in_flight -= 1;
        s.timings
            .push((uri.path().to_owned(), arrived, std::time::Instant::now()));
    }
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    )
        .into_response();
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(&v),
        ) {
            response.headers_mut().insert(k, v);
        }
    }
    response
}
