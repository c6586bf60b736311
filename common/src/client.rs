//! The client side of a connection to a coordinator, shared by the agent and the CLI: the
//! endpoint (HTTP/2 keepalive, timeouts, TLS with the system's roots or a given CA) and the
//! bearer token every call carries.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Why a coordinator URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{url}` is not a coordinator URL: {why} (write e.g. http://127.0.0.1:7600 or https://baton.example:7600)")]
    Url { url: String, why: String },
    #[error("TLS setup for `{url}` failed: {why}")]
    Tls { url: String, why: String },
}

/// An endpoint for `url`: keepalive pings every 10 s (a silent peer is noticed within 15 s),
/// a 10 s connect timeout, and TLS for `https://` (trusting `ca_pem` when given, else the
/// system's roots).
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, ClientError> {
    let bad = |why: String| ClientError::Url {
        url: url.to_owned(),
        why,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("it must start with http:// or https://".to_owned()));
    }
    let mut e = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        e = e.tls_config(tls).map_err(|err| ClientError::Tls {
            url: url.to_owned(),
            why: err.to_string(),
        })?;
    } else if ca_pem.is_some() {
        return Err(bad(
            "a CA file was given but the URL is plaintext (use https://)".to_owned(),
        ));
    }
    Ok(e)
}

/// A bearer token kept in a file (agents, operators and the coordinator all keep theirs so):
/// the file's text without surrounding whitespace; an empty or unreadable file is an error
/// naming it.
pub fn token_from_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file `{}`: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("the token file `{}` is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// Adds `authorization: Bearer TOKEN` to every call (nothing when there is no token), and
/// `x-baton-user` / `x-baton-groups` when a user is named ([`BearerToken::as_user`]: who a
/// coordinator without named operator tokens records as the caller).
#[derive(Clone, Default)]
pub struct BearerToken(
    Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_tuple("BearerToken")
            .field(&self.0.is_some())
            .finish()
    }
}

impl BearerToken {
    /// A token as read from a file or the environment (surrounding whitespace ignored).
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None, None, None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| BearerToken(Some(v), None, None))
                .map_err(|_| "the token holds characters a header cannot carry".to_owned()),
        }
    }
}

impl BearerToken {
    /// Also names the user and its groups (`x-baton-groups`, comma-separated); a value a
    /// header cannot carry is left out.
    pub fn as_user(mut self, user: &str, groups: &[String]) -> Self {
        self.1 = user.parse().ok();
        self.2 = Some(groups.join(","))
            .filter(|g| !g.is_empty())
            .and_then(|g| g.parse().ok());
        self
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(u) = &self.1 {
            req.metadata_mut().insert("x-baton-user", u.clone());
        }
        if let Some(g) = &self.2 {
            req.metadata_mut().insert("x-baton-groups", g.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_checked() {
        assert!(super::endpoint("http://127.0.0.1:7600", None).is_ok());
        assert!(super::endpoint("127.0.0.1:7600", None).is_err());
        assert!(super::endpoint("http://127.0.0.1:7600", Some(b"pem")).is_err());
        assert!(super::BearerToken::new(Some("bad\ntoken")).is_err());
        assert!(super::BearerToken::new(Some("  ")).is_ok());
    }
}
