//! Registry credentials from a docker-config-style file (`{"auths": {host: {...}}}`), the
//! format of a `kubernetes.io/dockerconfigjson` Secret.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading registry credentials {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("registry credentials {path} are not a docker config file: {reason}")]
    Parse { path: String, reason: String },
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// Credentials per registry host. Hosts without an entry are pulled anonymously.
#[derive(Clone, Default)]
pub struct Credentials {
    by_host: BTreeMap<String, RegistryAuth>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Credentials")
            .field("hosts", &self.by_host.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|reason| AuthError::Parse {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        // serde_json's messages quote the offending value, which may be a password: only
        // where and what kind of error.
        let cfg: DockerConfig = serde_json::from_str(text).map_err(|e| {
            format!(
                "not a docker config ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            )
        })?;
        let mut by_host = BTreeMap::new();
        let mut keys: BTreeMap<String, String> = BTreeMap::new();
        for (key, entry) in cfg.auths {
            let host = key_host(&key)?;
            if let Some(other) = keys.insert(host.clone(), key.clone()) {
                return Err(format!(
                    "auths[{other:?}] and auths[{key:?}] both name registry {host}"
                ));
            }
            let auth = if let Some(token) = entry.registrytoken {
                RegistryAuth::Bearer(token)
            } else if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
                RegistryAuth::Basic(u.clone(), p.clone())
            } else if let Some(encoded) = &entry.auth {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    // The decoder's message names the bad byte: say only what is wrong.
                    .map_err(|_| format!("auths[{key:?}].auth is not valid base64"))?;
                let raw = String::from_utf8(raw)
                    .map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("auths[{key:?}].auth is not base64 of user:password"))?;
                RegistryAuth::Basic(u.to_string(), p.to_string())
            } else if let Some(token) = entry.identitytoken {
                // An identity token is a refresh token for the registry's token endpoint.
                RegistryAuth::Basic("<token>".into(), token)
            } else {
                return Err(format!(
                    "auths[{key:?}] has no auth, username/password or token"
                ));
            };
            by_host.insert(host, auth);
        }
        Ok(Self { by_host })
    }

    /// Whether no registry has credentials.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// These credentials with `other`'s entries on top: for a registry both name,
    /// `other`'s (a cache's own pull secret wins over the component's file).
    pub fn overlaid_with(&self, other: &Credentials) -> Credentials {
        let mut by_host = self.by_host.clone();
        by_host.extend(other.by_host.iter().map(|(h, a)| (h.clone(), a.clone())));
        Credentials { by_host }
    }

    /// Only the entry for `registry` (`host[:port]`), if there is one: what a node is
    /// handed to pull one image, and nothing for other registries.
    pub fn only_for(&self, registry: &str) -> Credentials {
        let host = normalise_host(registry);
        Credentials {
            by_host: self
                .by_host
                .get(&host)
                .map(|a| (host, a.clone()))
                .into_iter()
                .collect(),
        }
    }

    /// The docker-config JSON (`{"auths": {host: {...}}}`) of these credentials, which
    /// [`Credentials::from_json`] reads back to the same credentials.
    pub fn to_json(&self) -> String {
        let auths: serde_json::Map<String, serde_json::Value> = self
            .by_host
            .iter()
            .filter_map(|(host, auth)| {
                let entry = match auth {
                    RegistryAuth::Basic(u, p) => {
                        serde_json::json!({"username": u, "password": p})
                    }
                    RegistryAuth::Bearer(t) => serde_json::json!({"registrytoken": t}),
                    RegistryAuth::Anonymous => return None,
                };
                Some((host.clone(), entry))
            })
            .collect();
        serde_json::json!({ "auths": auths }).to_string()
    }

    /// The credentials for `registry` (`host[:port]`).
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        let host = normalise_host(registry);
        self.by_host
            .get(&host)
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

/// The registry host a docker config key names: `https://index.docker.io/v1/` →
/// `index.docker.io`, `Quay.io/` → `quay.io`. Keys kubelet would match by repository path
/// or wildcard (`r.io/team-a`, `*.r.io`) are refused, naming the key: GKM matches whole
/// registries only, and folding such keys into their host would hand one repository's
/// credential to another's pulls.
fn key_host(key: &str) -> Result<String, String> {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let path = path.trim_end_matches('/');
    if !matches!(path, "" | "v1" | "v2") {
        return Err(format!(
            "auths[{key:?}] names a repository path; GKM matches registries only (write the key as {host:?})"
        ));
    }
    if host.is_empty() || host.contains('*') {
        return Err(format!(
            "auths[{key:?}] is not a registry host (wildcards are not supported)"
        ));
    }
    Ok(normalise_host(host))
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `quay.io/` → `quay.io`; lower case.
fn normalise_host(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "registry-1.docker.io" => "index.docker.io".to_string(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_form_of_docker_config_entry() {
        let json = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "quay.io": {"username": "robot", "password": "s3cret"},
            "127.0.0.1:5000": {"registrytoken": "tok"}
        }}"#;
        let c = Credentials::from_json(json).unwrap();
        assert!(
            matches!(c.for_registry("docker.io"), RegistryAuth::Basic(u, p) if u == "user" && p == "pass")
        );
        assert!(matches!(c.for_registry("quay.io"), RegistryAuth::Basic(u, _) if u == "robot"));
        assert!(matches!(c.for_registry("127.0.0.1:5000"), RegistryAuth::Bearer(t) if t == "tok"));
        assert!(matches!(c.for_registry("ghcr.io"), RegistryAuth::Anonymous));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug never shows secrets"
        );
    }

    #[test]
    fn overlay_restrict_and_serialise_round_trip() {
        let base = Credentials::from_json(
            r#"{"auths": {"a.io": {"auth": "dTpw"}, "b.io": {"username": "x", "password": "y"}}}"#,
        )
        .unwrap();
        let own = Credentials::from_json(r#"{"auths": {"b.io": {"registrytoken": "t"}}}"#).unwrap();
        let both = base.overlaid_with(&own);
        assert!(matches!(both.for_registry("a.io"), RegistryAuth::Basic(u, _) if u == "u"));
        assert!(matches!(both.for_registry("b.io"), RegistryAuth::Bearer(t) if t == "t"));
        let one = both.only_for("b.io");
        assert!(matches!(one.for_registry("a.io"), RegistryAuth::Anonymous));
        assert!(both.only_for("c.io").is_empty());
        let back = Credentials::from_json(&both.to_json()).unwrap();
        assert!(
            matches!(back.for_registry("a.io"), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(matches!(back.for_registry("b.io"), RegistryAuth::Bearer(t) if t == "t"));
    }

    #[test]
    fn bad_entries_say_which_host() {
        let err = Credentials::from_json(r#"{"auths": {"quay.io": {"auth": "bm9jb2xvbg=="}}}"#)
            .unwrap_err();
        assert!(err.contains("quay.io"), "{err}");
        let err = Credentials::from_json(r#"{"auths": {"r.io": {}}}"#).unwrap_err();
        assert!(err.contains("r.io"), "{err}");
        // Keys matched by repository path or wildcard elsewhere are refused, not folded.
        for key in ["r.io/team-a", "*.r.io", "https://r.io/v2/team"] {
            let json = format!(r#"{{"auths": {{"{key}": {{"auth": "dTpw"}}}}}}"#);
            let err = Credentials::from_json(&json).unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        let err = Credentials::from_json(
            r#"{"auths": {"R.io": {"auth": "dTpw"}, "https://r.io/v2/": {"auth": "dTpw"}}}"#,
        )
        .unwrap_err();
        assert!(err.contains("both name registry r.io"), "{err}");
    }

    #[test]
    fn errors_never_quote_a_secret() {
        for json in [
            r#"{"auths": "hunter2"}"#,
            r#"{"auths": {"r.io": {"auth": "hunter2!!"}}}"#,
            r#"{"auths": {"r.io": {"password": 7, "username": "hunter2"}}}"#,
            r#"hunter2"#,
        ] {
            let err = Credentials::from_json(json).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
