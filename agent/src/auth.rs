//! Auth providers: basic, OAuth2 (password and client_credentials) and PocketBase.
//!
//! A token is acquired on first use and cached for the rest of the stage run; its value is
//! registered as a secret at once, so it is masked in everything the stage emits. A token that
//! cannot be acquired fails the step with the provider's error; it never renders as empty.

use std::collections::BTreeMap;

use baton_common::spec::{AuthKind, AuthSpec, Tmpl};
use baton_common::template::{base64_encode, query_escape};
use tokio::sync::Mutex;

use crate::executor::{scope, template_failure, StageCtx, StepError};

/// A token as a request carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The full `Authorization` header value (`Basic ...`, `Bearer ...`).
    pub header: String,
    /// The bare token, for `{{.auth.name}}`.
    pub bare: String,
}

/// Tokens acquired during one stage run, by auth name.
#[derive(Debug, Default)]
pub struct Tokens {
    cache: Mutex<BTreeMap<String, Token>>,
}

impl Tokens {
    /// The token of auth `name`, acquiring it on first use.
    pub(crate) async fn get(&self, ctx: &StageCtx<'_>, name: &str) -> Result<Token, StepError> {
        let mut cache = self.cache.lock().await;
        if let Some(t) = cache.get(name) {
            return Ok(t.clone());
        }
        let spec = ctx
            .task
            .loaded
            .config
            .auth
            .iter()
            .find(|a| a.name.value == name)
            .ok_or_else(|| {
                StepError::failed(format!("auth `{name}` is not defined in the stage config"))
            })?;
        let token = acquire(ctx, spec).await?;
        ctx.add_secret(&format!("auth.{name}"), &token.bare)?;
        cache.insert(name.to_owned(), token.clone());
        Ok(token)
    }
}

fn render(ctx: &StageCtx<'_>, auth: &AuthSpec, field: &str, t: &Tmpl) -> Result<String, StepError> {
    let empty = BTreeMap::new();
    t.template
        .render(&scope(&ctx.base, &empty, ctx.process_env()))
        .map_err(|e| {
            template_failure(
                &ctx.task.loaded.config_file,
                &format!("auth `{}`: {field}", auth.name.value),
                &e,
            )
        })
}

/// A credential written in the config (a password, a client secret): a secret from the
/// moment it is rendered, like the tokens derived from it. One too short to mask is noted,
/// not fatal: the request it authenticates can still be made.
async fn credential(ctx: &StageCtx<'_>, auth: &AuthSpec, field: &str, value: &str) {
    let name = format!("auth.{}.{field}", auth.name.value);
    if value.is_empty() || ctx.add_secret(&name, value).is_ok() {
        return;
    }
    let line = format!(
        "auth `{}`: {field} is shorter than 4 characters and cannot be masked",
        auth.name.value
    );
    ctx.emit(crate::executor::StageEvent::Log {
        version: None,
        line,
    })
    .await;
}

async fn acquire(ctx: &StageCtx<'_>, auth: &AuthSpec) -> Result<Token, StepError> {
    let name = &auth.name.value;
    match &auth.kind {
        AuthKind::Basic { username, password } => {
            let user = render(ctx, auth, "username", username)?;
            let pass = render(ctx, auth, "password", password)?;
            credential(ctx, auth, "password", &pass).await;
            let bare = base64_encode(format!("{user}:{pass}").as_bytes());
            Ok(Token {
                header: format!("Basic {bare}"),
                bare,
            })
        }
        AuthKind::OAuth2 { grant_type, fields } => {
            let mut values = BTreeMap::new();
            for (k, t) in fields {
                values.insert(k.as_str(), render(ctx, auth, k, t)?);
            }
            for secret in ["client_secret", "password"] {
                if let Some(v) = values.get(secret) {
                    credential(ctx, auth, secret, v).await;
                }
            }
            let token_url = values.get("token_url").cloned().unwrap_or_default();
            let mut form = vec![("grant_type", grant_type.clone())];
            for key in [
                "client_id",
                "client_secret",
                "username",
                "password",
                "audience",
            ] {
                if let Some(v) = values.get(key) {
                    form.push((key, v.clone()));
                }
            }
            if let Some(scope) = values.get("scope").or_else(|| values.get("scopes")) {
                form.push(("scope", scope.clone()));
            }
            let body: String = form
                .iter()
                .map(|(k, v)| format!("{k}={}", query_escape(v)))
                .collect::<Vec<_>>()
                .join("&");
            let request = ctx
                .client
                .post(&token_url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", "application/json")
                .body(body);
            let json = send_for_json(ctx, request, name, &token_url).await?;
            let bare = json
                .get("access_token")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    StepError::failed(format!(
                        "auth `{name}`: the token endpoint's answer has no `access_token`"
                    ))
                })?
                .to_owned();
            Ok(Token {
                header: format!("Bearer {bare}"),
                bare,
            })
        }
        AuthKind::PocketBase {
            base_url,
            email,
            password,
        } => {
            let base = render(ctx, auth, "base_url", base_url)?;
            let pass = render(ctx, auth, "password", password)?;
            credential(ctx, auth, "password", &pass).await;
            let body = serde_json::json!({
                "identity": render(ctx, auth, "email", email)?,
                "password": pass,
            });
            let base = base.trim_end_matches('/');
            // PocketBase 0.23 and later authenticate superusers as a collection; older
            // servers have the admins endpoint. Try the current one first.
            let mut last = None;
            for path in [
                "/api/collections/_superusers/auth-with-password",
                "/api/admins/auth-with-password",
            ] {
                let url = format!("{base}{path}");
                let request = ctx
                    .client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string());
                match send_for_json(ctx, request, name, &url).await {
                    Ok(json) => {
                        let bare = json
                            .get("token")
                            .and_then(|v| v.as_str())
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| {
                                StepError::failed(format!(
                                    "auth `{name}`: PocketBase's answer has no `token`"
                                ))
                            })?
                            .to_owned();
                        return Ok(Token {
                            header: format!("Bearer {bare}"),
                            bare,
                        });
                    }
                    Err(StepError::Failed(msg)) if msg.contains("status 404") => last = Some(msg),
                    Err(e) => return Err(e),
                }
            }
            Err(StepError::Failed(last.unwrap_or_default()))
        }
    }
}

/// Sends a token request and returns its JSON answer; anything else is the provider's error.
async fn send_for_json(
    ctx: &StageCtx<'_>,
    request: reqwest::RequestBuilder,
    name: &str,
    url: &str,
) -> Result<serde_json::Value, StepError> {
    let response = tokio::select! {
        () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
        r = request.send() => r,
    }
    .map_err(|e| {
        StepError::failed(format!(
            "auth `{name}`: token request to {url} failed: {}",
            crate::executor::http::error_chain(&e)
        ))
    })?;
    let status = response.status();
    let text = tokio::select! {
        () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
        t = response.text() => t.unwrap_or_default(),
    };
    if !status.is_success() {
        return Err(StepError::failed(format!(
            "auth `{name}`: token request to {url} failed with status {}: {}",
            status.as_u16(),
            crate::executor::http::excerpt(&text)
        )));
    }
    serde_json::from_str(&text).map_err(|_| {
        StepError::failed(format!(
            "auth `{name}`: token endpoint {url} did not answer with JSON"
        ))
    })
}
