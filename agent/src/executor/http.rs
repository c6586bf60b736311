//! HTTP steps: render the request, send it with retries, check the answer, extract variables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use baton_common::spec::{
    beside, BodySpec, EnvMissing, JsonTemplate, MigrationSpec, RequestSpec, ResponseSpec,
    RetryPolicy, Tmpl,
};
use baton_common::template::{Escape, Reference, Scope, Template};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{
    cancelled_with_grace, scope, sleep_or_cancel, template_failure, Direction, StageCtx,
    StageEvent, StepError,
};

/// The most a `Retry-After` answer may make baton wait before the next attempt.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Methods that change state and so carry an `Idempotency-Key`.
const MUTATING: &[&str] = &["POST", "PUT", "PATCH", "DELETE"];

/// A rendered request, ready to send (and to re-send on retry).
struct Prepared {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

/// Runs one HTTP step and returns the variables it extracted.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_request(
    ctx: &StageCtx<'_>,
    m: &MigrationSpec,
    req: &RequestSpec,
    response: &ResponseSpec,
    vars: &BTreeMap<String, String>,
    retry: RetryPolicy,
    direction: Direction,
    role: &str,
) -> Result<BTreeMap<String, String>, StepError> {
    // Templated entries are rendered first: one that gives no status code fails the step
    // before anything is sent.
    let mut accepted = response.result_code.clone();
    let no_auth = BTreeMap::new();
    for t in &response.result_code_templates {
        let text = t
            .template
            .render(&scope(vars, &no_auth, ctx.process_env()))
            .map_err(|e| template_failure(&m.file, "result_code", &e))?;
        match text.trim().parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => accepted.push(code),
            _ => {
                return Err(StepError::failed(format!(
                "{}: result_code `{}` gives `{text}`, which is not an HTTP status code (100-599)",
                m.file.display(),
                t.source()
            )))
            }
        }
    }
    let prepared = prepare(ctx, m, req, vars, direction, role).await?;
    let (status, body) = send(ctx, m.version, &prepared, retry).await?;
    let ok = if response.any_status {
        true
    } else if accepted.is_empty() {
        (200..300).contains(&status)
    } else {
        accepted.contains(&status)
    };
    if !ok {
        let expected = if accepted.is_empty() {
            "a 2xx status".to_owned()
        } else {
            accepted
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        };
        return Err(StepError::failed(format!(
            "{} {} answered {status}, expected {expected}: {}",
            prepared.method,
            prepared.url,
            excerpt(&String::from_utf8_lossy(&body))
        )));
    }
    extract(response, &body)
}

async fn prepare(
    ctx: &StageCtx<'_>,
    m: &MigrationSpec,
    req: &RequestSpec,
    vars: &BTreeMap<String, String>,
    direction: Direction,
    role: &str,
) -> Result<Prepared, StepError> {
    let file = m.file.as_path();
    // Tokens the templates read (`{{.auth.x}}`) and the one `auth_name` injects.
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for t in request_templates(req) {
        for r in t.template.references() {
            if let Reference::Auth { name, .. } = r {
                wanted.insert(name);
            }
        }
    }
    if let Some(a) = &req.auth_name {
        wanted.insert(a.value.clone());
    }
    let mut auth = BTreeMap::new();
    let mut auth_header = None;
    for name in &wanted {
        let token = ctx.tokens.get(ctx, name).await?;
        if req.auth_name.as_ref().is_some_and(|a| &a.value == name) {
            auth_header = Some(token.header.clone());
        }
        auth.insert(name.clone(), token.bare);
    }
    let env = ctx.process_env();
    let sc = scope(vars, &auth, env);
    let render = |what: &str, t: &Tmpl| {
        t.template
            .render(&sc)
            .map_err(|e| template_failure(file, what, &e))
    };

    // Values inserted into the URL are checked (path) or encoded (query): a value never
    // changes which resource the request names.
    let url_text = req
        .url
        .as_ref()
        .ok_or_else(|| StepError::failed("request has no url"))?
        .template
        .render_with(&sc, Escape::Url)
        .map_err(|e| template_failure(file, "url", &e))?;
    let mut url = reqwest::Url::parse(url_text.trim()).map_err(|e| {
        StepError::failed(format!(
            "{}: url `{}` is not a valid URL: {e}",
            file.display(),
            ctx.mask(&url_text)
        ))
    })?;
    if !req.queries.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (name, t) in &req.queries {
            pairs.append_pair(name, &render(&format!("query `{name}`"), t)?);
        }
    }

    let mut headers = HeaderMap::new();
    for (name, t) in &req.headers {
        let value = render(&format!("header `{name}`"), t)?;
        if value.contains(['\r', '\n']) || name.contains(['\r', '\n']) {
            return Err(StepError::failed(format!(
                "{}: header `{name}` contains a line break (CR or LF); nothing was sent",
                file.display()
            )));
        }
        let hn = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            StepError::failed(format!(
                "{}: `{name}` is not a valid header name",
                file.display()
            ))
        })?;
        let hv = HeaderValue::from_str(&value).map_err(|_| {
            StepError::failed(format!(
                "{}: header `{name}` holds characters a header cannot carry",
                file.display()
            ))
        })?;
        headers.append(hn, hv);
    }

    let method = reqwest::Method::from_bytes(req.method.value.as_bytes()).map_err(|_| {
        StepError::failed(format!(
            "{}: bad method `{}`",
            file.display(),
            req.method.value
        ))
    })?;

    let (body, json) = match &req.body {
        None => (None, false),
        Some(BodySpec::Json(j)) => {
            let value = if req.renders_body(&ctx.task.loaded.config) {
                render_json(j, &sc, file)?
            } else {
                literal_json(j)
            };
            (Some(value.to_string().into_bytes()), true)
        }
        Some(BodySpec::Text(t)) => {
            let json = looks_like_json(&headers, t.source());
            let text = if req.renders_body(&ctx.task.loaded.config) {
                let mode = if json {
                    Escape::JsonDocument
                } else {
                    Escape::None
                };
                t.template
                    .render_with(&sc, mode)
                    .map_err(|e| template_failure(file, "body", &e))?
            } else {
                t.source().to_owned()
            };
            (Some(text.into_bytes()), json)
        }
        Some(BodySpec::File(f)) => {
            let path = body_file_path(file, &f.value, &sc)?;
            let mut bytes = ctx.task.files.read(&path).map_err(|e| {
                StepError::failed(format!(
                    "body_file `{}` cannot be read: {e}",
                    path.display()
                ))
            })?;
            // `#{name}#` tokens (parameter files) take the step's variables, rendered or not.
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if baton_common::tokens::has_tokens(text) {
                    let json = looks_like_json(&headers, text);
                    let replaced =
                        baton_common::tokens::replace(
                            text,
                            |n| vars.get(n).or_else(|| env.get(n)).cloned(),
                            json,
                        )
                            .map_err(|e| {
                                StepError::failed(format!(
                                    "body_file `{}`: {e}; define `{}` in the environment's variables or the stage's env",
                                    path.display(),
                                    e.name
                                ))
                            })?;
                    bytes = replaced.into_bytes();
                }
            }
            if req.renders_body(&ctx.task.loaded.config) {
                let text = String::from_utf8(bytes).map_err(|_| {
                    StepError::failed(format!("body_file `{}` is not UTF-8 text", path.display()))
                })?;
                let t =
                    Template::parse(&text).map_err(|e| template_failure(&path, "body_file", &e))?;
                let json = looks_like_json(&headers, &text);
                let mode = if json {
                    Escape::JsonDocument
                } else {
                    Escape::None
                };
                let out = t
                    .render_with(&sc, mode)
                    .map_err(|e| template_failure(&path, "body_file", &e))?;
                (Some(out.into_bytes()), json)
            } else {
                let json = looks_like_json(&headers, &String::from_utf8_lossy(&bytes));
                (Some(bytes), json)
            }
        }
    };
    // A body's type unless the step set one: JSON, or (apirun's behaviour) plain UTF-8 text.
    if body.is_some() && !headers.contains_key(reqwest::header::CONTENT_TYPE) {
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static(if json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            }),
        );
    }
    if let Some(h) = auth_header {
        if !headers.contains_key(reqwest::header::AUTHORIZATION) {
            let hv = HeaderValue::from_str(&h).map_err(|_| {
                StepError::failed("the auth token holds characters a header cannot carry")
            })?;
            headers.insert(reqwest::header::AUTHORIZATION, hv);
        }
    }
    if MUTATING.contains(&method.as_str()) && !headers.contains_key("idempotency-key") {
        let key = idempotency_key(
            &ctx.task.key_scope,
            &ctx.task.stage,
            m.version,
            direction,
            role,
        );
        headers.insert(
            "idempotency-key",
            HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static("baton")),
        );
    }
    Ok(Prepared {
        method,
        url,
        headers,
        body,
    })
}

/// Every template of a request.
fn request_templates(req: &RequestSpec) -> Vec<&Tmpl> {
    let mut out: Vec<&Tmpl> = req.url.iter().collect();
    out.extend(req.headers.iter().map(|(_, t)| t));
    out.extend(req.queries.iter().map(|(_, t)| t));
    match &req.body {
        Some(BodySpec::Text(t)) => out.push(t),
        Some(BodySpec::Json(j)) => json_leaves(j, &mut out),
        _ => {}
    }
    out
}

fn json_leaves<'a>(j: &'a JsonTemplate, out: &mut Vec<&'a Tmpl>) {
    match j {
        JsonTemplate::Str(t) => out.push(t),
        JsonTemplate::Array(items) => items.iter().for_each(|i| json_leaves(i, out)),
        JsonTemplate::Object(entries) => entries.iter().for_each(|(_, v)| json_leaves(v, out)),
        _ => {}
    }
}

/// A text body is JSON when its Content-Type says so, or, with no Content-Type, when it
/// starts like a JSON object or array.
fn looks_like_json(headers: &HeaderMap, text: &str) -> bool {
    match headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) => ct.to_ascii_lowercase().contains("json"),
        None => matches!(text.trim_start().chars().next(), Some('{' | '[')),
    }
}

/// A structured body: each string leaf is rendered and stays one JSON string.
fn render_json(
    j: &JsonTemplate,
    sc: &baton_common::template::Scope<'_>,
    file: &std::path::Path,
) -> Result<serde_json::Value, StepError> {
    Ok(match j {
        JsonTemplate::Null => serde_json::Value::Null,
        JsonTemplate::Bool(b) => serde_json::Value::Bool(*b),
        JsonTemplate::Number(n) => serde_json::Value::Number(n.clone()),
        JsonTemplate::Str(t) => serde_json::Value::String(
            t.template
                .render(sc)
                .map_err(|e| template_failure(file, "body", &e))?,
        ),
        JsonTemplate::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|i| render_json(i, sc, file))
                .collect::<Result<_, _>>()?,
        ),
        JsonTemplate::Object(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, sc, file)?)))
                .collect::<Result<_, StepError>>()?,
        ),
    })
}

fn literal_json(j: &JsonTemplate) -> serde_json::Value {
    match j {
        JsonTemplate::Null => serde_json::Value::Null,
        JsonTemplate::Bool(b) => serde_json::Value::Bool(*b),
        JsonTemplate::Number(n) => serde_json::Value::Number(n.clone()),
        JsonTemplate::Str(t) => serde_json::Value::String(t.source().to_owned()),
        JsonTemplate::Array(items) => {
            serde_json::Value::Array(items.iter().map(literal_json).collect())
        }
        JsonTemplate::Object(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), literal_json(v)))
                .collect(),
        ),
    }
}

/// Stable for the same run, stage, migration, direction and step: a retry of the step, by
/// this agent or another, carries the same key. `key_scope` holds the store's and the run's
/// random ids, so no other run anywhere shares the key.
pub fn idempotency_key(
    key_scope: &str,
    stage: &str,
    version: u64,
    direction: Direction,
    role: &str,
) -> String {
    let material = format!(
        "{key_scope}\0{stage}\0{version}\0{}\0{role}",
        direction.word()
    );
    let digest = baton_common::spec::sha256_hex(material.as_bytes());
    format!("baton-{}", &digest[..32])
}

/// Whether a status is worth another attempt: 408, 429 and every 5xx.
fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

fn transient_error(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || (e.is_request() && !e.is_builder())
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Sends with retries; returns the final status and body (capped).
async fn send(
    ctx: &StageCtx<'_>,
    version: u64,
    p: &Prepared,
    retry: RetryPolicy,
) -> Result<(u16, Vec<u8>), StepError> {
    let attempts = retry.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut builder = ctx
            .client
            .request(p.method.clone(), p.url.clone())
            .headers(p.headers.clone());
        if let Some(b) = &p.body {
            builder = builder.body(b.clone());
        }
        // Nothing new is sent once the stage is cancelled.
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let started = Instant::now();
        let result = tokio::select! {
            r = builder.send() => r,
            // Cancelled meanwhile: the request in flight gets a short grace to be answered
            // (and recorded); after it, dropping the future aborts it (then it is in doubt).
            () = cancelled_with_grace(&ctx.cancel) => return Err(StepError::Cancelled),
        };
        let sent = |status, error| StageEvent::RequestSent {
            version,
            method: p.method.to_string(),
            url: p.url.to_string(),
            status,
            duration: started.elapsed(),
            attempt,
            error,
        };
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                ctx.emit(sent(Some(status), None)).await;
                if transient_status(status) && attempt < attempts {
                    let wait =
                        retry_after(resp.headers()).unwrap_or_else(|| retry.backoff(attempt));
                    ctx.emit(StageEvent::Log {
                        version: Some(version),
                        line: format!(
                            "{} {} answered {status}; attempt {} of {attempts} in {wait:?}",
                            p.method,
                            p.url,
                            attempt + 1
                        ),
                    })
                    .await;
                    sleep_or_cancel(&ctx.cancel, wait).await?;
                    continue;
                }
                let body = read_capped(ctx, resp).await?;
                return Ok((status, body));
            }
            Err(e) => {
                ctx.emit(sent(None, Some(no_answer_reason(&e)))).await;
                let why = error_chain(&e);
                if transient_error(&e) && attempt < attempts {
                    let wait = retry.backoff(attempt);
                    ctx.emit(StageEvent::Log {
                        version: Some(version),
                        line: format!(
                            "{} {} failed ({why}); attempt {} of {attempts} in {wait:?}",
                            p.method,
                            p.url,
                            attempt + 1
                        ),
                    })
                    .await;
                    sleep_or_cancel(&ctx.cancel, wait).await?;
                    continue;
                }
                return Err(StepError::failed(format!(
                    "{} {} failed after {attempt} attempt(s): {why}",
                    p.method, p.url
                )));
            }
        }
    }
}

/// Why a request got no answer, in a few words people know: `connection refused`, `timed
/// out`, `name not resolved`, `TLS handshake failed`, else the innermost error.
fn no_answer_reason(e: &reqwest::Error) -> String {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    if e.is_timeout() || lower.contains("timed out") {
        "timed out".to_owned()
    } else if lower.contains("connection refused") {
        "connection refused".to_owned()
    } else if lower.contains("dns error") || lower.contains("failed to lookup") {
        "name not resolved".to_owned()
    } else if lower.contains("certificate") || lower.contains("tls") {
        "TLS handshake failed".to_owned()
    } else if lower.contains("connection reset") {
        "connection reset".to_owned()
    } else {
        chain.rsplit(": ").next().unwrap_or(&chain).to_owned()
    }
}

async fn read_capped(
    ctx: &StageCtx<'_>,
    mut resp: reqwest::Response,
) -> Result<Vec<u8>, StepError> {
    let limit = ctx.max_response_bytes;
    let mut body = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c,
            () = cancelled_with_grace(&ctx.cancel) => return Err(StepError::Cancelled),
        };
        match chunk {
            Ok(Some(c)) => {
                if body.len() + c.len() > limit {
                    return Err(StepError::failed(format!(
                        "the response is larger than {limit} bytes (raise `max_response_bytes` in the stage config if it must be read)"
                    )));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(StepError::failed(format!(
                    "reading the response failed: {}",
                    error_chain(&e)
                )))
            }
        }
    }
}

/// Extracts `env_from` variables from a JSON body with gjson paths.
fn extract(response: &ResponseSpec, body: &[u8]) -> Result<BTreeMap<String, String>, StepError> {
    let mut out = BTreeMap::new();
    if response.env_from.is_empty() {
        return Ok(out);
    }
    let text = std::str::from_utf8(body).unwrap_or("");
    let valid = gjson::valid(text);
    for (name, path) in &response.env_from {
        let value = if valid { json_value(text, path) } else { None };
        match (value, response.env_missing) {
            (Some(v), _) => {
                out.insert(name.value.clone(), v);
            }
            (None, EnvMissing::Skip) => {}
            (None, EnvMissing::Fail) if !valid => {
                return Err(StepError::failed(format!(
                    "cannot extract `{}`: the response is not JSON",
                    name.value
                )))
            }
            (None, EnvMissing::Fail) => {
                return Err(StepError::failed(format!(
                    "the response has no value at `{path}` for `{}` (env_missing: fail)",
                    name.value
                )))
            }
        }
    }
    Ok(out)
}

/// Where a request's `body_file` is: beside the migration file; a template in its name
/// (`bodies/vpc-{{.env}}.json`) is rendered now, and the result must be a plain file name
/// (no `/`, no `..`), so a value cannot reach outside the files the plan read.
fn body_file_path(file: &Path, written: &Path, sc: &Scope<'_>) -> Result<PathBuf, StepError> {
    let path = beside(file, written);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !baton_common::vars::is_template(&name) {
        return Ok(path);
    }
    let rendered = Template::parse(&name)
        .and_then(|t| t.render(sc))
        .map_err(|e| template_failure(&path, "body_file", &e))?;
    if rendered.is_empty()
        || rendered == "."
        || rendered == ".."
        || rendered.contains(['/', '\\'])
        || rendered.chars().any(char::is_control)
    {
        return Err(StepError::failed(format!(
            "body_file `{}` renders to `{rendered}`, which is not a file name beside it",
            path.display()
        )));
    }
    Ok(path.with_file_name(rendered))
}

/// The value at a gjson path as text: strings raw, numbers exactly as written, booleans as
/// `true`/`false`, objects and arrays as compact JSON, `null` as the empty string (as apirun
/// extracts it); `None` when absent.
pub fn json_value(json: &str, path: &str) -> Option<String> {
    let v = gjson::get(json, path);
    if !v.exists() {
        return None;
    }
    match v.kind() {
        gjson::Kind::Null => Some(String::new()),
        gjson::Kind::String => Some(v.str().to_owned()),
        gjson::Kind::Number => Some(v.json().trim().to_owned()),
        gjson::Kind::True => Some("true".to_owned()),
        gjson::Kind::False => Some("false".to_owned()),
        gjson::Kind::Object | gjson::Kind::Array => {
            let raw = v.json();
            Some(
                serde_json::from_str::<serde_json::Value>(raw)
                    .map_or_else(|_| raw.to_owned(), |p| p.to_string()),
            )
        }
    }
}

/// Waits for the stage's `wait` health check to pass.
pub(super) async fn wait_until_healthy(ctx: &StageCtx<'_>) -> Result<(), StepError> {
    let Some(wait) = &ctx.task.loaded.config.wait else {
        return Ok(());
    };
    let Some(url_t) = &wait.url else {
        return Ok(());
    };
    let empty = BTreeMap::new();
    let sc = scope(&ctx.base, &empty, ctx.process_env());
    let file = ctx.task.loaded.config_file.as_path();
    let url = url_t
        .template
        .render_with(&sc, Escape::Url)
        .map_err(|e| template_failure(file, "wait.url", &e))?;
    let method = reqwest::Method::from_bytes(wait.method.as_deref().unwrap_or("GET").as_bytes())
        .map_err(|_| StepError::failed("wait.method is not an HTTP method"))?;
    let mut headers = HeaderMap::new();
    for (name, t) in &wait.headers {
        let value = t
            .template
            .render(&sc)
            .map_err(|e| template_failure(file, "wait.headers", &e))?;
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(n, v);
        } else {
            return Err(StepError::failed(format!(
                "wait header `{name}` cannot be sent (bad name, or CR/LF in its value)"
            )));
        }
    }
    let timeout = wait.timeout.unwrap_or(Duration::from_secs(60));
    // Validation refuses shorter ones; the floor holds whatever the files say.
    let interval = wait
        .interval
        .unwrap_or(Duration::from_secs(2))
        .max(baton_common::spec::MIN_WAIT_INTERVAL);
    let deadline = Instant::now() + timeout;
    ctx.emit(StageEvent::Log {
        version: None,
        line: format!("waiting for {url} (up to {timeout:?})"),
    })
    .await;
    loop {
        let last;
        let request = ctx
            .client
            .request(method.clone(), &url)
            .headers(headers.clone());
        let result = tokio::select! {
            () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
            r = request.send() => r,
        };
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let healthy = match wait.status {
                    Some(s) => status == s,
                    None => (200..300).contains(&status),
                };
                if healthy {
                    ctx.emit(StageEvent::Log {
                        version: None,
                        line: format!("{url} is healthy ({status})"),
                    })
                    .await;
                    return Ok(());
                }
                last = format!("status {status}");
            }
            Err(e) => last = error_chain(&e),
        }
        if Instant::now() + interval > deadline {
            return Err(StepError::failed(format!(
                "health check {url} did not pass within {timeout:?} (last: {last})"
            )));
        }
        sleep_or_cancel(&ctx.cancel, interval).await?;
    }
}

/// A reqwest error with its causes, e.g. `error sending request: connection refused`.
pub fn error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

/// At most 512 characters of a response body, for error messages.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 512;
    let t = text.trim();
    if t.is_empty() {
        return "(empty body)".to_owned();
    }
    match t.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}... ({} bytes in all)", &t[..i], t.len()),
        None => t.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gjson_values() {
        let doc = r#"{"vpc":{"id":"vpc-1","subnets":[{"id":"s-1"},{"id":"s-2"}],"size":12345678901234567890,"f":1.50},
                     "items":[{"name":"a","id":1},{"name":"x","id":2}],"ok":true,"n":null}"#;
        assert_eq!(json_value(doc, "vpc.id").as_deref(), Some("vpc-1"));
        assert_eq!(json_value(doc, "vpc.subnets.0.id").as_deref(), Some("s-1"));
        assert_eq!(json_value(doc, "items.#").as_deref(), Some("2"));
        assert_eq!(json_value(doc, "items.#.id").as_deref(), Some("[1,2]"));
        assert_eq!(
            json_value(doc, r#"items.#(name=="x").id"#).as_deref(),
            Some("2")
        );
        assert_eq!(
            json_value(doc, "vpc.size").as_deref(),
            Some("12345678901234567890")
        );
        assert_eq!(json_value(doc, "vpc.f").as_deref(), Some("1.50"));
        assert_eq!(json_value(doc, "ok").as_deref(), Some("true"));
        assert_eq!(
            json_value(doc, "vpc.subnets.1").as_deref(),
            Some(r#"{"id":"s-2"}"#)
        );
        // apirun extracts a JSON null as the empty string.
        assert_eq!(json_value(doc, "n").as_deref(), Some(""));
        assert_eq!(json_value(doc, "nope"), None);
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = idempotency_key("r1", "infra", 1, Direction::Up, "");
        assert_eq!(a, idempotency_key("r1", "infra", 1, Direction::Up, ""));
        assert_ne!(
            a,
            idempotency_key(
                "r1",
                "infra",
                1,
                Direction::Down {
                    to: 0,
                    skip_missing_down: false
                },
                ""
            )
        );
        assert_ne!(a, idempotency_key("r2", "infra", 1, Direction::Up, ""));
        assert_ne!(a, idempotency_key("r1", "infra", 2, Direction::Up, ""));
        assert!(a.starts_with("baton-") && a.len() == 38);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("99999"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = "x".repeat(2000);
        let e = excerpt(&long);
        assert!(
            e.starts_with(&"x".repeat(512)) && e.ends_with("(2000 bytes in all)"),
            "{e}"
        );
        assert_eq!(excerpt("  "), "(empty body)");
    }
}
