//! The HTTP client of one stage, built from the stage config's `client:` options. Every
//! request of the stage (health check, auth, migrations) goes through it, so the TLS options
//! apply to all of them.

use std::path::Path;
use std::time::Duration;

use baton_common::spec::{beside, ClientSpec, SourceFiles, TlsVersion};

/// Per-request timeout unless `client.timeout` says otherwise (COMPAT.md).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the stage's client. `config_file` anchors a relative `ca_file`; an empty
/// `user_agent` means `baton/VERSION`.
pub fn build_client(
    spec: &ClientSpec,
    config_file: &Path,
    files: &dyn SourceFiles,
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    let user_agent = if user_agent.is_empty() {
        concat!("baton/", env!("CARGO_PKG_VERSION"))
    } else {
        user_agent
    };
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(spec.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT))
        .connect_timeout(Duration::from_secs(10))
        // Migrations name their targets exactly; a redirect would send a mutating request
        // (and its Authorization header) somewhere the file does not say.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent);
    if spec.insecure {
        b = b.danger_accept_invalid_certs(true);
    }
    if let Some(v) = spec.min_tls_version {
        b = b.min_tls_version(version(v));
    }
    if let Some(v) = spec.max_tls_version {
        b = b.max_tls_version(version(v));
    }
    if let Some(ca) = &spec.ca_file {
        let path = beside(config_file, &ca.value);
        let pem = files
            .read(&path)
            .map_err(|e| format!("client.ca_file `{}` cannot be read: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "client.ca_file `{}` is not a PEM certificate: {e}",
                path.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!(
                "client.ca_file `{}` holds no certificate",
                path.display()
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

fn version(v: TlsVersion) -> reqwest::tls::Version {
    match v {
        TlsVersion::V1_2 => reqwest::tls::Version::TLS_1_2,
        TlsVersion::V1_3 => reqwest::tls::Version::TLS_1_3,
    }
}
