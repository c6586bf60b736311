//! The HTTP client of one stage, built from the stage config's `client:` options. Every
//! request of the stage (health check, auth, migrations) goes through it, so the TLS options
//! apply to all of them.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use baton_common::spec::{beside, ClientSpec, SourceFiles, TlsVersion};

/// Per-request timeout unless `client.timeout` says otherwise (COMPAT.md).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What makes two clients the same: every option that shapes one, the CA bytes included.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    insecure: bool,
    min_tls: Option<u8>,
    max_tls: Option<u8>,
    timeout: Option<Duration>,
    ca: Option<Vec<u8>>,
    user_agent: String,
}

/// Clients built so far by one runner (an agent, or local mode's in-process runner), one per
/// distinct configuration: the system's root certificates are loaded once per client
/// instead of once per stage, and connections to a target are kept alive and reused across
/// stages and migrations. It lives as long as its runner (and so its async runtime, which
/// drives the pooled connections). Bounded: past [`MAX_CLIENTS`] distinct configurations it
/// starts over.
///
/// A configuration's client is built once even when many stages ask for it at the same
/// moment (a run's first wave): the first builds it while the others wait on that
/// configuration's slot, not build their own (each build reads every root certificate).
#[derive(Debug, Default)]
pub struct ClientCache {
    slots: std::sync::Mutex<HashMap<ClientKey, Slot>>,
    /// Clients built through this cache so far (in the debug log with each build).
    built: std::sync::atomic::AtomicUsize,
}

/// One configuration's client, once built.
type Slot = std::sync::Arc<std::sync::Mutex<Option<reqwest::Client>>>;

/// Distinct client configurations kept at once.
const MAX_CLIENTS: usize = 64;

impl ClientCache {
    /// A new cache that starts building the client of a stage without `client:` options
    /// (with `user_agent`) on a thread of its own, while the process still does other work
    /// (recording the run, connecting): the first stage that needs it then finds it built,
    /// or waits for this build instead of starting its own, rather than reading every root
    /// certificate on its critical path. A failed build is not kept; the stage tries again
    /// and reports the error.
    pub fn building_default(user_agent: &str) -> std::sync::Arc<Self> {
        let this = std::sync::Arc::new(ClientCache::default());
        let cache = this.clone();
        let user_agent = user_agent.to_owned();
        let spawned = std::thread::Builder::new()
            .name("baton-client".to_owned())
            .spawn(move || {
                let built = build_client(
                    &ClientSpec::default(),
                    Path::new(""),
                    &baton_common::spec::DiskFiles,
                    &user_agent,
                    Some(&cache),
                );
                if let Err(e) = built {
                    tracing::debug!(error = %e, "building the default HTTP client ahead failed");
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no thread to build the default HTTP client ahead");
        }
        this
    }
}

fn tls_code(v: Option<TlsVersion>) -> Option<u8> {
    v.map(|v| match v {
        TlsVersion::V1_2 => 12,
        TlsVersion::V1_3 => 13,
    })
}

/// The stage's client: from `cache` when a stage with the same options built one, else new
/// (and kept there). `config_file` anchors a relative `ca_file`; an empty `user_agent` means
/// `baton/VERSION`.
pub fn build_client(
    spec: &ClientSpec,
    config_file: &Path,
    files: &dyn SourceFiles,
    user_agent: &str,
    cache: Option<&ClientCache>,
) -> Result<reqwest::Client, String> {
    let user_agent = if user_agent.is_empty() {
        concat!("baton/", env!("CARGO_PKG_VERSION"))
    } else {
        user_agent
    };
    let ca =
        match &spec.ca_file {
            Some(ca) => {
                let path = beside(config_file, &ca.value);
                Some(files.read(&path).map_err(|e| {
                    format!("client.ca_file `{}` cannot be read: {e}", path.display())
                })?)
            }
            None => None,
        };
    let key = ClientKey {
        insecure: spec.insecure,
        min_tls: tls_code(spec.min_tls_version),
        max_tls: tls_code(spec.max_tls_version),
        timeout: spec.timeout,
        ca,
        user_agent: user_agent.to_owned(),
    };
    let Some(cache) = cache else {
        return new_client(spec, config_file, &key);
    };
    // A poisoned lock only means a panic elsewhere; the map and slots stay consistent.
    let slot: Slot = {
        let mut map = cache
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(&key) && map.len() >= MAX_CLIENTS {
            map.clear();
        }
        map.entry(key.clone()).or_default().clone()
    };
    let mut built = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = built.as_ref() {
        return Ok(c.clone());
    }
    // A failed build is not kept: the next stage with these options tries again.
    let client = new_client(spec, config_file, &key)?;
    let n = cache
        .built
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    tracing::debug!(clients_built = n, "built an HTTP client");
    *built = Some(client.clone());
    Ok(client)
}

fn new_client(
    spec: &ClientSpec,
    config_file: &Path,
    key: &ClientKey,
) -> Result<reqwest::Client, String> {
    let user_agent = key.user_agent.as_str();
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
    if let (Some(ca), Some(pem)) = (&spec.ca_file, &key.ca) {
        let path = beside(config_file, &ca.value);
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_per_distinct_configuration() {
        let cache = ClientCache::default();
        let files = baton_common::spec::MemoryFiles::default();
        let spec = ClientSpec::default();
        let config = Path::new("s/config.yaml");
        for _ in 0..3 {
            build_client(&spec, config, &files, "", Some(&cache)).expect("client");
        }
        assert_eq!(cache.slots.lock().expect("lock").len(), 1);
        let insecure = ClientSpec {
            insecure: true,
            ..ClientSpec::default()
        };
        build_client(&insecure, config, &files, "", Some(&cache)).expect("client");
        build_client(&spec, config, &files, "baton-agent/x (a)", Some(&cache)).expect("client");
        assert_eq!(cache.slots.lock().expect("lock").len(), 3);
        assert_eq!(cache.built.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// The client built ahead is the one a stage without `client:` options gets.
    #[test]
    fn a_prewarmed_client_is_the_one_a_plain_stage_uses() {
        let cache = ClientCache::building_default("baton-agent/x");
        // Bounded wait for the background build.
        for _ in 0..1000 {
            if cache.built.load(std::sync::atomic::Ordering::Relaxed) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cache.built.load(std::sync::atomic::Ordering::Relaxed), 1);
        let files = baton_common::spec::MemoryFiles::default();
        build_client(
            &ClientSpec::default(),
            Path::new("s/config.yaml"),
            &files,
            "baton-agent/x",
            Some(&cache),
        )
        .expect("client");
        assert_eq!(
            cache.built.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the stage reused the client built ahead"
        );
    }

    /// A run's first wave asks for the same client at once: it is built once, the others
    /// wait for it.
    #[test]
    fn stages_asking_at_once_share_one_build() {
        let cache = ClientCache::default();
        let files = baton_common::spec::MemoryFiles::default();
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    start.wait();
                    build_client(
                        &ClientSpec::default(),
                        Path::new("s/config.yaml"),
                        &files,
                        "",
                        Some(&cache),
                    )
                    .expect("client");
                });
            }
        });
        assert_eq!(cache.built.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
