//! A stage's `config.yaml`: where its migrations are, its variables, auth, wait and client.

use std::path::PathBuf;

use crate::yaml::{Node, Value};

use super::read::{style_of, Reader};
use super::stages::{read_env_map, read_retry};
use super::{AuthKind, AuthSpec, ClientSpec, EnvEntry, Located, StageConfigSpec, Tmpl, WaitSpec};

/// The shortest pause between two health checks (`wait.interval`).
pub const MIN_WAIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

const CONFIG_KEYS: &[&str] = &[
    "migrate_dir",
    "env",
    "auth",
    "wait",
    "client",
    "delay_between_migrations",
    "retry",
    "secrets",
    "max_response_bytes",
    "render_body",
];
const CONFIG_IGNORED: &[(&str, &str)] = &[
    ("store", "baton keeps migration history in its own store"),
    (
        "logging",
        "baton's diagnostics are set with the BATON_LOG environment variable",
    ),
];

pub(crate) fn read(r: &mut Reader<'_>, doc: &Node) -> StageConfigSpec {
    let mut spec = StageConfigSpec::default();
    let Some(entries) = r.mapping(doc, "the stage config", CONFIG_KEYS, CONFIG_IGNORED) else {
        return spec;
    };
    for (k, v) in entries {
        match k.key_str() {
            "migrate_dir" => {
                spec.migrate_dir = r.name(v, "migrate_dir").map(|s| Located {
                    value: PathBuf::from(s.value),
                    pos: s.pos,
                })
            }
            "env" => spec.env = read_config_env(r, v),
            "auth" => spec.auth = read_auth_list(r, v),
            "wait" => spec.wait = read_wait(r, v),
            "client" => spec.client = read_client(r, v),
            "delay_between_migrations" => {
                spec.delay_between_migrations =
                    r.duration(v, "delay_between_migrations").map(|d| d.value)
            }
            "retry" => spec.retry = read_retry(r, v),
            "secrets" => spec.secrets = r.string_list(v, "secrets"),
            "max_response_bytes" => spec.max_response_bytes = r.u64(v, "max_response_bytes"),
            "render_body" => spec.render_body = r.bool(v, "render_body"),
            _ => {}
        }
    }
    spec
}

/// `env` in a stage config: the documented list (`- name:` with `value:` or `valueFromEnv:`)
/// or a plain mapping.
fn read_config_env(r: &mut Reader<'_>, node: &Node) -> Vec<EnvEntry> {
    let items = match &node.value {
        Value::Seq(items) => items,
        _ => return read_env_map(r, node, "env"),
    };
    let mut out = Vec::new();
    for item in items {
        let Some(entries) = r.mapping(
            item,
            "an env entry",
            &["name", "value", "valueFromEnv"],
            &[],
        ) else {
            continue;
        };
        let (mut name, mut value, mut from_env) = (None, None, None);
        for (k, v) in entries {
            match k.key_str() {
                "name" => name = r.name(v, "env name"),
                "value" => {
                    value = Some((
                        if v.is_null() {
                            Some(String::new())
                        } else {
                            r.string(v, "env value")
                        },
                        v,
                    ))
                }
                "valueFromEnv" => from_env = r.name(v, "valueFromEnv"),
                _ => {}
            }
        }
        let Some(name) = name else {
            r.error(
                item.pos,
                "env entry has no `name`",
                Some("add `name: <variable>`".into()),
            );
            continue;
        };
        // apirun's forms: `value: ""` beside `valueFromEnv` reads the environment; a
        // non-empty `value` beside it wins; a name alone is the empty string.
        let value = match (value, &from_env) {
            (Some((Some(v), _)), Some(_)) if v.is_empty() => None,
            (v, _) => v,
        };
        match (value, from_env) {
            (Some((Some(value), vnode)), Some(f)) => {
                r.notice(
                    f.pos,
                    format!(
                        "env `{}` has both `value` and `valueFromEnv`: the value is used, as apirun does",
                        name.value
                    ),
                );
                out.push(EnvEntry {
                    name,
                    value,
                    secret_from: None,
                    value_pos: vnode.pos,
                    style: style_of(vnode),
                });
            }
            (Some((None, _)), Some(_)) => {}
            (Some((Some(value), vnode)), None) => out.push(EnvEntry {
                name,
                value,
                secret_from: None,
                value_pos: vnode.pos,
                style: style_of(vnode),
            }),
            (Some((None, _)), None) => {}
            (None, Some(f)) => out.push(EnvEntry {
                name,
                value: String::new(),
                value_pos: f.pos,
                secret_from: Some(f.value),
                style: crate::yaml::ScalarStyle::Plain,
            }),
            (None, None) => out.push(EnvEntry {
                value_pos: name.pos,
                name,
                value: String::new(),
                secret_from: None,
                style: crate::yaml::ScalarStyle::Plain,
            }),
        }
    }
    out
}

fn read_auth_list(r: &mut Reader<'_>, node: &Node) -> Vec<AuthSpec> {
    let items = match &node.value {
        Value::Seq(items) => items.iter().collect::<Vec<_>>(),
        Value::Map(_) => vec![node],
        Value::Null => Vec::new(),
        Value::Scalar(..) => {
            r.error(
                node.pos,
                "auth must be a list of `- type: ...` entries",
                None,
            );
            Vec::new()
        }
    };
    let mut out: Vec<AuthSpec> = Vec::new();
    for item in items {
        if let Some(a) = read_auth(r, item) {
            if let Some(first) = out.iter().find(|o| o.name.value == a.name.value) {
                r.error(
                    a.name.pos,
                    format!(
                        "duplicate auth name `{}` (first defined on line {})",
                        a.name.value, first.name.pos.line
                    ),
                    None,
                );
                continue;
            }
            out.push(a);
        }
    }
    out
}

const OAUTH2_FIELDS: &[&str] = &[
    "token_url",
    // apirun's docs show it (the authorization endpoint); the grants baton runs do not use it.
    "auth_url",
    "client_id",
    "client_secret",
    "username",
    "password",
    "scope",
    "scopes",
    "audience",
];

fn read_auth(r: &mut Reader<'_>, node: &Node) -> Option<AuthSpec> {
    let entries = r.mapping(node, "an auth entry", &["type", "name", "config"], &[])?;
    let (mut kind, mut name, mut config) = (None, None, None);
    for (k, v) in entries {
        match k.key_str() {
            "type" => kind = r.located_string(v, "auth type"),
            "name" => name = r.name(v, "auth name"),
            "config" => config = Some(v),
            _ => {}
        }
    }
    let Some(kind) = kind else {
        r.error(
            node.pos,
            "auth entry has no `type`",
            Some("add `type: basic`, `oauth2` or `pocketbase`".into()),
        );
        return None;
    };
    let Some(name) = name else {
        r.error(
            node.pos,
            "auth entry has no `name`",
            Some("add `name: <name used by auth_name>`".into()),
        );
        return None;
    };
    let empty = Node {
        pos: node.pos,
        value: Value::Null,
    };
    let config = config.unwrap_or(&empty);
    let kind = match kind.value.to_ascii_lowercase().as_str() {
        "basic" => {
            let fields = read_fields(
                r,
                config,
                "basic auth config",
                &["username", "password"],
                &["username", "password"],
            )?;
            AuthKind::Basic {
                username: field(&fields, "username")?,
                password: field(&fields, "password")?,
            }
        }
        "pocketbase" => {
            let fields = read_fields(
                r,
                config,
                "pocketbase auth config",
                &["base_url", "email", "password"],
                &["base_url", "email", "password"],
            )?;
            AuthKind::PocketBase {
                base_url: field(&fields, "base_url")?,
                email: field(&fields, "email")?,
                password: field(&fields, "password")?,
            }
        }
        "oauth2" => read_oauth2(r, config)?,
        other => {
            r.error(
                kind.pos,
                format!("unknown auth type `{other}`"),
                Some("use `basic`, `oauth2` or `pocketbase`".into()),
            );
            return None;
        }
    };
    Some(AuthSpec { name, kind })
}

fn read_oauth2(r: &mut Reader<'_>, config: &Node) -> Option<AuthKind> {
    // Existing files nest the grant's settings under `grant_config`; the docs show them flat.
    let mut known: Vec<&str> = vec!["grant_type", "grant_config"];
    known.extend_from_slice(OAUTH2_FIELDS);
    let entries = r.mapping(config, "oauth2 auth config", &known, &[])?;
    let mut grant = None;
    let mut fields: Vec<(String, Tmpl)> = Vec::new();
    for (k, v) in entries {
        match k.key_str() {
            "grant_type" => grant = r.located_string(v, "grant_type"),
            "grant_config" => {
                if let Some(nested) = read_fields(r, v, "oauth2 grant_config", OAUTH2_FIELDS, &[]) {
                    fields.extend(nested);
                }
            }
            key => {
                if let Some(t) = scope_or_template(r, key, v) {
                    fields.push((key.to_owned(), t));
                }
            }
        }
    }
    let Some(grant) = grant else {
        r.error(
            config.pos,
            "oauth2 auth has no `grant_type`",
            Some("add `grant_type: client_credentials` or `password`".into()),
        );
        return None;
    };
    let required: &[&str] = match grant.value.as_str() {
        "client_credentials" => &["token_url", "client_id", "client_secret"],
        "password" => &["token_url", "client_id", "username", "password"],
        other => {
            r.error(
                grant.pos,
                format!("unsupported oauth2 grant_type `{other}`"),
                Some("use `client_credentials` or `password`".into()),
            );
            return None;
        }
    };
    let mut ok = true;
    for req in required {
        if !fields.iter().any(|(k, _)| k == req) {
            r.error(
                config.pos,
                format!("oauth2 `{}` grant needs `{req}`", grant.value),
                None,
            );
            ok = false;
        }
    }
    ok.then_some(AuthKind::OAuth2 {
        grant_type: grant.value,
        fields,
    })
}

/// Reads a mapping of templated fields, requiring `required`.
fn read_fields(
    r: &mut Reader<'_>,
    node: &Node,
    what: &str,
    known: &[&str],
    required: &[&str],
) -> Option<Vec<(String, Tmpl)>> {
    let entries = r.mapping(node, what, known, &[])?;
    let mut out = Vec::new();
    for (k, v) in entries {
        if !known.contains(&k.key_str()) {
            continue;
        }
        if let Some(t) = scope_or_template(r, k.key_str(), v) {
            out.push((k.key_str().to_owned(), t));
        }
    }
    let mut ok = true;
    for req in required {
        if node.get(req).is_none() {
            r.error(node.pos, format!("{what} needs `{req}`"), None);
            ok = false;
        }
    }
    ok.then_some(out)
}

/// A templated field; OAuth2 `scope`/`scopes` may also be a list, sent space-separated.
fn scope_or_template(r: &mut Reader<'_>, key: &str, v: &Node) -> Option<Tmpl> {
    if let (true, Value::Seq(items)) = (matches!(key, "scope" | "scopes"), &v.value) {
        let parts: Vec<String> = items.iter().filter_map(|i| r.string(i, key)).collect();
        return r.template_text(v, parts.join(" "));
    }
    r.template(v, key)
}

fn field(fields: &[(String, Tmpl)], name: &str) -> Option<Tmpl> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, t)| t.clone())
}

fn read_wait(r: &mut Reader<'_>, node: &Node) -> Option<WaitSpec> {
    // `wait:` with nothing under it (apirun's templates leave it so): no health check.
    if matches!(node.value, Value::Null) {
        return None;
    }
    let entries = r.mapping(
        node,
        "`wait`",
        &["url", "method", "status", "timeout", "interval", "headers"],
        &[],
    )?;
    let mut wait = WaitSpec::default();
    let mut url = None;
    for (k, v) in entries {
        match k.key_str() {
            "url" => url = r.template(v, "wait.url"),
            "method" => wait.method = r.string(v, "wait.method").map(|m| m.to_ascii_uppercase()),
            "status" => wait.status = r.u64(v, "wait.status").and_then(|s| u16::try_from(s).ok()),
            "timeout" => wait.timeout = r.duration(v, "wait.timeout").map(|d| d.value),
            "interval" => {
                wait.interval = r.duration(v, "wait.interval").map(|d| d.value);
                if wait.interval.is_some_and(|i| i < MIN_WAIT_INTERVAL) {
                    r.error(
                        v.pos,
                        format!(
                            "wait.interval must be at least {} ms; a shorter one polls the target in a hot loop",
                            MIN_WAIT_INTERVAL.as_millis()
                        ),
                        Some("e.g. `interval: 2s` (the default)".into()),
                    );
                    wait.interval = None;
                }
            }
            "headers" => wait.headers = super::migration::read_pairs(r, v, "wait.headers"),
            _ => {}
        }
    }
    // No url (or an empty one) means no health check, as in apirun.
    let Some(url) = url.filter(|u| !u.template.source().trim().is_empty()) else {
        r.notice(node.pos, "`wait` has no `url`: no health check runs");
        return None;
    };
    wait.url = Some(url);
    Some(wait)
}

fn read_client(r: &mut Reader<'_>, node: &Node) -> ClientSpec {
    let mut client = ClientSpec::default();
    let known = &[
        "insecure",
        "min_tls_version",
        "max_tls_version",
        "mintlsversion",
        "maxtlsversion",
        "ca_file",
        "timeout",
    ];
    let Some(entries) = r.mapping(node, "`client`", known, &[]) else {
        return client;
    };
    for (k, v) in entries {
        match k.key_str() {
            "insecure" => client.insecure = r.bool(v, "client.insecure").unwrap_or(false),
            key @ ("min_tls_version" | "mintlsversion" | "max_tls_version" | "maxtlsversion") => {
                let Some(text) = r.string(v, key) else {
                    continue;
                };
                let version = match text
                    .trim()
                    .trim_start_matches("TLS")
                    .trim_start_matches("tls")
                    .trim()
                {
                    "1.2" | "12" => Some(super::TlsVersion::V1_2),
                    "1.3" | "13" => Some(super::TlsVersion::V1_3),
                    "1.0" | "1.1" | "10" | "11" => {
                        r.error(
                            v.pos,
                            format!("{key}: TLS {text} is not supported"),
                            Some("baton supports TLS 1.2 and 1.3".into()),
                        );
                        None
                    }
                    _ => {
                        r.error(
                            v.pos,
                            format!("{key}: unknown TLS version `{text}`"),
                            Some("use \"1.2\" or \"1.3\"".into()),
                        );
                        None
                    }
                };
                if key.starts_with("min") {
                    client.min_tls_version = version;
                } else {
                    client.max_tls_version = version;
                }
            }
            "ca_file" => {
                client.ca_file = r.name(v, "ca_file").map(|s| Located {
                    value: PathBuf::from(s.value),
                    pos: s.pos,
                })
            }
            "timeout" => client.timeout = r.duration(v, "client.timeout").map(|d| d.value),
            _ => {}
        }
    }
    if let (Some(min), Some(max)) = (client.min_tls_version, client.max_tls_version) {
        if min > max {
            r.error(
                node.pos,
                "client: min_tls_version is above max_tls_version",
                None,
            );
        }
    }
    client
}
