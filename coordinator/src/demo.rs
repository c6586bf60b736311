//! `baton demo`: the bundled examples run for real against a small local cloud API.
//!
//! The demo API listens on a free 127.0.0.1 port and behaves like the APIs the examples were
//! written for: creating a resource answers with its new id (and the fields the examples
//! extract), deleting removes it, and `GET /resources` lists what exists, so `stages down`
//! visibly returns the target to where it started. It is an in-memory toy; nothing leaves
//! this machine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Cloud {
    next: u64,
    /// Resource path -> resource.
    resources: BTreeMap<String, Value>,
}

/// A running demo API; stops when the token is cancelled.
#[derive(Debug)]
pub struct DemoApi {
    pub url: String,
    cloud: Arc<Mutex<Cloud>>,
}

impl DemoApi {
    pub async fn start(stop: CancellationToken) -> std::io::Result<DemoApi> {
        DemoApi::start_on("127.0.0.1:0", stop).await
    }

    /// Starts the API on `addr` (a loopback address; port 0 picks a free one).
    pub async fn start_on(addr: &str, stop: CancellationToken) -> std::io::Result<DemoApi> {
        let listener = TcpListener::bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let cloud = Arc::new(Mutex::new(Cloud::default()));
        let router = Router::new().fallback(handle).with_state(cloud.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(DemoApi { url, cloud })
    }

    /// Paths of the resources that exist now.
    pub fn resources(&self) -> Vec<String> {
        self.cloud
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .resources
            .keys()
            .cloned()
            .collect()
    }
}

/// The singular name and id prefix of a collection, and the extra fields its resources carry.
fn kind(collection: &str, n: u64, body: &Value) -> (String, Value) {
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("app")
        .to_owned();
    match collection {
        "vpc" => (
            "vpc".into(),
            json!({"id": format!("vpc-{n}"), "subnets": [{"id": format!("subnet-{n}a")}, {"id": format!("subnet-{n}b")}]}),
        ),
        "security-groups" => ("security_group".into(), json!({"id": format!("sg-{n}")})),
        "database" | "databases" => (
            "database".into(),
            json!({"id": format!("db-{n}"), "endpoint": format!("db-{n}.internal:5432"), "password": format!("generated-pw-{n:04}")}),
        ),
        // Users are addressed by name.
        "users" => ("user".into(), json!({"id": name, "name": name})),
        "services" => (
            "service".into(),
            json!({"id": format!("svc-{n}"), "url": format!("http://{name}.internal")}),
        ),
        "checks" => ("check".into(), json!({"id": format!("check-{n}")})),
        "alerts" => ("alert".into(), json!({"id": format!("alert-{n}")})),
        other => (
            other.trim_end_matches('s').replace('-', "_"),
            json!({"id": format!("res-{n}")}),
        ),
    }
}

async fn handle(
    State(cloud): State<Arc<Mutex<Cloud>>>,
    method: Method,
    uri: Uri,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut c = cloud
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match method.as_str() {
        "GET" if path == "/health" => (StatusCode::OK, "ok").into_response(),
        "GET" if path == "/resources" => {
            axum::Json(json!(c.resources.keys().collect::<Vec<_>>())).into_response()
        }
        "POST" => {
            c.next += 1;
            let n = c.next;
            let collection = path.rsplit('/').next().unwrap_or("").to_owned();
            let (key, mut resource) = kind(&collection, n, &body);
            let id = resource["id"].as_str().unwrap_or_default().to_owned();
            if let (Value::Object(r), Value::Object(b)) = (&mut resource, &body) {
                for (k, v) in b {
                    r.entry(k.clone()).or_insert(v.clone());
                }
            }
            c.resources.insert(format!("{path}/{id}"), resource.clone());
            (StatusCode::CREATED, axum::Json(json!({ key: resource }))).into_response()
        }
        "PUT" => {
            // Idempotent create-or-replace at the path (cloud templates, settings).
            let mut resource = if body.is_object() {
                body.clone()
            } else {
                json!({})
            };
            resource["id"] = Value::String(path.clone());
            c.resources.insert(path.clone(), resource.clone());
            (StatusCode::OK, axum::Json(resource)).into_response()
        }
        "DELETE" => {
            // Deleting a resource removes everything under it too.
            let before = c.resources.len();
            c.resources
                .retain(|k, _| k != &path && !k.starts_with(&format!("{path}/")));
            if c.resources.len() < before {
                StatusCode::NO_CONTENT.into_response()
            } else {
                (StatusCode::NOT_FOUND, format!("no resource at {path}")).into_response()
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        )
            .into_response(),
    }
}
