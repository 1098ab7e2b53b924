//! The trust policy: the controller's ConfigMap, parsed and checked as a whole.
//!
//! Owns the policy's YAML shape, its defaults and its validation. Every problem is reported
//! at once, each naming the field path and the reason (`authorities[2].key: not a PEM public
//! key`), so an operator fixes a policy in one round. Unknown fields are problems too: a
//! misspelt field in a security policy must not silently fall back to a default.
//!
//! ```yaml
//! authorities:
//!   - name: release-key
//!     key: |
//!       -----BEGIN PUBLIC KEY-----
//!       ...
//!   - name: ci
//!     keyless:
//!       issuer: https://token.actions.githubusercontent.com
//!       subjectRegExp: https://github.com/org/repo/\.github/workflows/.*
//!       trustedRoot: trusted_root.json   # relative to the policy file's folder
//! trustedRegistries: [registry.example.com/kernels]
//! verification: {timeoutSeconds: 10, cacheTTLSeconds: 300}
//! podPolicy: {namespaces: ["ml-*"], requireDigest: true, verifySignatures: false}
//! promotion: {incoming: incoming.example.com/dev, trusted: registry.example.com/kernels,
//!             signKey: promoter.key}
//! requiredAttestations:            # each must be met by an attestation in the `.att` tag
//!   - predicateType: https://gkm.io/attestations/verification/v1
//!     authority: promoter          # a key authority of `authorities`
//!     appliesTo: [caches, pods]    # default: [caches]
//!     conditions:                  # JSON pointers into the predicate
//!       - {field: /caller/groups, contains: release-engineers}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_norway::{Mapping, Value};
use sha2::{Digest, Sha256};

use super::keyless::{KeylessIdentity, SubjectMatch};
use super::keys::PublicKey;
use super::root::TrustedRoot;

/// Default and bounds of `verification.timeoutSeconds`: below Kubernetes' 30 s cap on
/// admission webhooks, so the webhook answers (denies) before the API server gives up.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
pub const MAX_TIMEOUT_SECONDS_EXCLUSIVE: u64 = 30;
pub const DEFAULT_CACHE_TTL_SECONDS: u64 = 300;

/// One problem of a policy: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("reading trust policy {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("trust policy is not valid YAML: {0}")]
    Yaml(String),
    #[error("trust policy has {} problem(s):\n{}", .0.len(), list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl PolicyError {
    /// The problems found (empty for a read or YAML error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Invalid(p) => p,
            _ => &[],
        }
    }
}

/// A parsed, valid trust policy.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    /// Never empty: a signature is accepted if it verifies under any of them.
    pub authorities: Vec<Authority>,
    /// Never empty: cache images must resolve into one of these.
    pub trusted_registries: Vec<RegistryPrefix>,
    pub verification: VerificationSettings,
    pub pod_policy: PodPolicy,
    pub promotion: Option<Promotion>,
    /// Attestations an image must carry besides a valid signature.
    pub required_attestations: Vec<RequiredAttestation>,
    /// `pullSecretNamespace`: where the `imagePullSecrets` of `ClusterGKMCache`s live.
    /// `None`: a cluster cache that names pull secrets is denied.
    pub pull_secret_namespace: Option<String>,
    /// `sha256:<hex>` of the policy's text: which policy a verification was made under.
    pub sha256: String,
}

/// What admission is deciding about: a cache image (`GKMCache`, `ClusterGKMCache`) or a
/// container image of a Pod under `podPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Caches,
    Pods,
}

impl Scope {
    /// The word the policy's `appliesTo` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Caches => "caches",
            Scope::Pods => "pods",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `requiredAttestations`: an in-toto attestation of `predicate_type` about
/// the image's digest, in a DSSE envelope of cosign's `.att` tag, signed by the key of
/// authority `authority`, whose predicate meets every condition.
#[derive(Debug, Clone)]
pub struct RequiredAttestation {
    pub predicate_type: String,
    /// The authority's name (for messages) and its key.
    pub authority: String,
    pub key: PublicKey,
    pub applies_to: Vec<Scope>,
    pub conditions: Vec<Condition>,
}

impl RequiredAttestation {
    /// Whether it applies to images of `scope`.
    pub fn applies(&self, scope: Scope) -> bool {
        self.applies_to.contains(&scope)
    }
}

impl fmt::Display for RequiredAttestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "an attestation of type {} signed by authority {:?}",
            self.predicate_type, self.authority
        )?;
        if !self.conditions.is_empty() {
            let c: Vec<String> = self.conditions.iter().map(|c| c.to_string()).collect();
            write!(f, " with {}", c.join(" and "))?;
        }
        Ok(())
    }
}

/// A condition on a field of an attestation's predicate.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// An RFC 6901 JSON pointer into the predicate (`/caller/groups`).
    pub field: String,
    pub test: ConditionTest,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConditionTest {
    /// The field equals this value (JSON equality).
    Equals(serde_json::Value),
    /// The field is a list holding this value, or a string holding this one.
    Contains(serde_json::Value),
}

impl Condition {
    /// Whether `predicate` meets it; Err says why not, naming the field and what it holds.
    pub fn check(&self, predicate: &serde_json::Value) -> Result<(), String> {
        let Some(got) = predicate.pointer(&self.field) else {
            return Err(format!("the predicate has no field {}", self.field));
        };
        let ok = match &self.test {
            ConditionTest::Equals(want) => got == want,
            ConditionTest::Contains(want) => match (got, want) {
                (serde_json::Value::Array(items), _) => items.contains(want),
                (serde_json::Value::String(s), serde_json::Value::String(w)) => s.contains(w),
                _ => false,
            },
        };
        if ok {
            Ok(())
        } else {
            let mut shown = got.to_string();
            if let Some((cut, _)) = shown.char_indices().nth(200) {
                shown.truncate(cut);
                shown.push('…');
            }
            Err(format!("{} is {shown}, so not {self}", self.field))
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.test {
            ConditionTest::Equals(v) => write!(f, "{} equal to {v}", self.field),
            ConditionTest::Contains(v) => write!(f, "{} containing {v}", self.field),
        }
    }
}

/// A named signer the cluster trusts.
#[derive(Debug, Clone)]
pub struct Authority {
    pub name: String,
    pub kind: AuthorityKind,
}

#[derive(Debug, Clone)]
pub enum AuthorityKind {
    /// A public key (ECDSA P-256, Ed25519, RSA 2048+).
    Key(PublicKey),
    /// A Fulcio-certified OIDC identity, checked offline against a trusted root.
    Keyless(KeylessIdentity),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerificationSettings {
    /// Longest time one verification may take; it fails closed after it.
    pub timeout: Duration,
    /// How long a successful verification is remembered; zero disables the cache.
    pub cache_ttl: Duration,
}

impl Default for VerificationSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECONDS),
            cache_ttl: Duration::from_secs(DEFAULT_CACHE_TTL_SECONDS),
        }
    }
}

/// The Pod admission policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    /// Glob patterns (`*`, `?`) of the namespaces it applies to; empty: none.
    pub namespaces: Vec<String>,
    pub require_digest: bool,
    pub verify_signatures: bool,
}

impl Default for PodPolicy {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            require_digest: true,
            verify_signatures: false,
        }
    }
}

impl PodPolicy {
    /// Whether the policy applies to pods of `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|p| glob_match(p, namespace))
    }
}

/// Promotion from the incoming to the trusted registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub incoming: RegistryPrefix,
    pub trusted: RegistryPrefix,
    /// Groups allowed to promote (besides what RBAC grants); empty: RBAC alone decides.
    pub allowed_groups: Vec<String>,
    /// The promoter's signing key, to sign promoted digests; `None`: no re-signing.
    pub sign_key: Option<PathBuf>,
}

/// A registry or repository prefix (`registry.example.com`, `registry.example.com/team`),
/// matched on path-component boundaries: `reg.io/team` matches `reg.io/team` and
/// `reg.io/team/x`, never `reg.io/teamx`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryPrefix(String);

impl RegistryPrefix {
    /// Parses a prefix: a registry host (with optional port) and optional repository path,
    /// no scheme, tag or digest.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_end_matches('/');
        if t.is_empty() {
            return Err("empty registry prefix".into());
        }
        if t.contains("://") {
            return Err(format!("{s:?} has a scheme; write the registry without it"));
        }
        if t.contains('@') {
            return Err(format!(
                "{s:?} has a digest; a prefix names a registry or repository"
            ));
        }
        let mut parts = t.split('/');
        let host = parts.next().unwrap_or_default();
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!(
                "{s:?} does not start with a registry host (e.g. docker.io/{t})"
            ));
        }
        let host_ok = host.split(':').count() <= 2
            && host.split(':').next().is_some_and(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            })
            && host
                .split(':')
                .nth(1)
                .is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
        if !host_ok {
            return Err(format!("{host:?} is not a registry host[:port]"));
        }
        let mut out = normalise_registry(host);
        for part in parts {
            let ok = !part.is_empty()
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
                && part.starts_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(format!(
                    "{part:?} in {s:?} is not a repository path component (lowercase letters, digits, '.', '_', '-'; no tag)"
                ));
            }
            out.push('/');
            out.push_str(part);
        }
        Ok(Self(out))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `registry/repository` lies within this prefix.
    pub fn matches(&self, registry: &str, repository: &str) -> bool {
        let full = format!("{}/{}", normalise_registry(registry), repository);
        full == self.0
            || (full.starts_with(&self.0) && full.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    /// Whether the repository of `reference` lies within this prefix.
    pub fn matches_reference(&self, reference: &oci_client::Reference) -> bool {
        self.matches(reference.registry(), reference.repository())
    }

    /// The `(registry, repository)` that `reference`'s repository becomes when this prefix
    /// is replaced by `onto` (`in.io/dev` → `reg.io/kernels` takes `in.io/dev/team/app` to
    /// `reg.io` and `kernels/team/app`); `None` when the reference lies outside this prefix
    /// or the result names no repository.
    pub fn rebase(
        &self,
        reference: &oci_client::Reference,
        onto: &RegistryPrefix,
    ) -> Option<(String, String)> {
        if !self.matches_reference(reference) {
            return None;
        }
        let full = format!(
            "{}/{}",
            normalise_registry(reference.registry()),
            reference.repository()
        );
        let moved = format!("{}{}", onto.0, &full[self.0.len()..]);
        let (registry, repository) = moved.split_once('/')?;
        Some((registry.to_string(), repository.to_string()))
    }
}

impl fmt::Display for RegistryPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Host names compare case-insensitively, and Docker Hub has several.
fn normalise_registry(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => h,
    }
}

/// `*` matches any run of characters, `?` any one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with one backtrack point (the last `*`): linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl TrustPolicy {
    /// Reads and checks the policy file at `path`; relative `trustedRoot` paths are resolved
    /// against its folder.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&text, base)
    }

    /// Parses and checks a policy; relative file paths in it are resolved against `base`.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Self, PolicyError> {
        let doc: Value =
            serde_norway::from_str(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
        let mut w = Walk {
            problems: Vec::new(),
            base,
        };
        let policy = w.policy(&doc);
        match policy {
            Some(mut p) if w.problems.is_empty() => {
                p.sha256 = format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())));
                Ok(p)
            }
            _ => Err(PolicyError::Invalid(w.problems)),
        }
    }

    /// Whether `reference` (written `image` by the user) may be admitted at all: inside a
    /// trusted registry. The one registry check of admission, `gkm verify`, the verifier
    /// and the Pod rule; it makes no network call, so it runs before any.
    pub fn check_registry(
        &self,
        image: &str,
        reference: &oci_client::Reference,
    ) -> Result<&RegistryPrefix, UntrustedRegistry> {
        check_registry(&self.trusted_registries, image, reference)
    }

    /// What the Pod rule needs of this policy.
    pub fn pod_rules(&self) -> PodRules {
        PodRules {
            policy: self.pod_policy.clone(),
            trusted_registries: self.trusted_registries.clone(),
        }
    }
}

/// An image outside the registries it had to come from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image {image:?} is not from a trusted registry (trusted: {})", trusted.join(", "))]
pub struct UntrustedRegistry {
    /// As the user wrote it.
    pub image: String,
    /// The prefixes it could have come from.
    pub trusted: Vec<String>,
}

/// The prefix of `trusted` that `reference` falls in, or why none does.
pub fn check_registry<'p>(
    trusted: &'p [RegistryPrefix],
    image: &str,
    reference: &oci_client::Reference,
) -> Result<&'p RegistryPrefix, UntrustedRegistry> {
    trusted
        .iter()
        .find(|p| p.matches_reference(reference))
        .ok_or_else(|| UntrustedRegistry {
            image: image.to_string(),
            trusted: trusted.iter().map(|p| p.as_str().to_string()).collect(),
        })
}

/// What the Pod rule of a policy checks: the namespaces and settings of `podPolicy`, and
/// the trusted registries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRules {
    pub policy: PodPolicy,
    pub trusted_registries: Vec<RegistryPrefix>,
}

impl PodRules {
    /// Why `image` breaks these rules, without any network call; `None` when only the
    /// signature is left to check.
    pub fn static_violation(&self, image: &str) -> Option<String> {
        if image.is_empty() {
            return Some("has no image".into());
        }
        let reference = match crate::oci::parse_reference(image) {
            Ok(r) => r,
            Err(e) => return Some(e.to_string()),
        };
        if let Err(e) = check_registry(&self.trusted_registries, image, &reference) {
            return Some(e.to_string());
        }
        if self.policy.require_digest
            && reference
                .digest()
                .and_then(crate::oci::sha256_hex)
                .is_none()
        {
            return Some(format!(
                "image {image:?} is not pinned by digest (write {}@sha256:<64 hex>)",
                reference.repository()
            ));
        }
        None
    }
}

struct Walk<'a> {
    problems: Vec<Problem>,
    base: &'a Path,
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl Walk<'_> {
    /// The items of an optional list (none when absent or null); a problem when it is
    /// something else.
    fn optional_list<'v>(&mut self, v: Option<&'v Value>, path: &str) -> Option<&'v [Value]> {
        match v {
            None | Some(Value::Null) => Some(&[]),
            Some(Value::Sequence(items)) => Some(items),
            Some(other) => {
                self.err(path, format!("must be a list, not {}", kind(other)));
                None
            }
        }
    }

    fn err(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// `v` as a mapping whose keys are all in `fields`; unknown keys are problems.
    fn mapping<'v>(&mut self, v: &'v Value, path: &str, fields: &[&str]) -> Option<&'v Mapping> {
        let Some(m) = v.as_mapping() else {
            self.err(path, format!("must be a mapping, not {}", kind(v)));
            return None;
        };
        for (k, _) in m.iter() {
            match k.as_str() {
                Some(k) if fields.contains(&k) => {}
                Some(k) => self.err(
                    join(path, k),
                    format!("unknown field (known: {})", fields.join(", ")),
                ),
                None => self.err(path, format!("has a non-string key {k:?}")),
            }
        }
        Some(m)
    }

    fn string(&mut self, m: &Mapping, field: &str, path: &str) -> Option<String> {
        match m.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.err(
                    join(path, field),
                    format!("must be a string, not {}", kind(v)),
                );
                None
            }
        }
    }

    fn required_string(&mut self, m: &Mapping, field: &str, path: &str) -> Option<String> {
        let present = !matches!(m.get(field), None | Some(Value::Null));
        match self.string(m, field, path) {
            Some(s) if s.trim().is_empty() => {
                self.err(join(path, field), "must not be empty");
                None
            }
            Some(s) => Some(s),
            None => {
                if !present {
                    self.err(join(path, field), "is required");
                }
                None
            }
        }
    }

    fn bool(&mut self, m: &Mapping, field: &str, path: &str, default: bool) -> bool {
        match m.get(field) {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.err(
                    join(path, field),
                    format!("must be true or false, not {}", kind(v)),
                );
                default
            }
        }
    }

    fn seconds(&mut self, m: &Mapping, field: &str, path: &str, default: u64) -> Option<u64> {
        match m.get(field) {
            None | Some(Value::Null) => Some(default),
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    self.err(
                        join(path, field),
                        format!("must be a whole number of seconds, not {}", describe(v)),
                    );
                    None
                }
            },
        }
    }

    /// A list of strings; `None` (after a problem) when it is not one.
    fn strings(&mut self, v: Option<&Value>, path: &str) -> Option<Vec<String>> {
        match v {
            None | Some(Value::Null) => Some(Vec::new()),
            Some(Value::Sequence(items)) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            ok = false;
                            self.err(
                                format!("{path}[{i}]"),
                                format!("must be a string, not {}", kind(other)),
                            );
                        }
                    }
                }
                ok.then_some(out)
            }
            Some(other) => {
                self.err(path, format!("must be a list, not {}", kind(other)));
                None
            }
        }
    }

    fn prefix(&mut self, s: &str, path: &str) -> Option<RegistryPrefix> {
        RegistryPrefix::parse(s)
            .map_err(|reason| self.err(path, reason))
            .ok()
    }

    fn policy(&mut self, doc: &Value) -> Option<TrustPolicy> {
        if doc.is_null() {
            self.err("", "the policy is empty");
            return None;
        }
        let top = self.mapping(
            doc,
            "",
            &[
                "authorities",
                "trustedRegistries",
                "verification",
                "podPolicy",
                "promotion",
                "requiredAttestations",
                "pullSecretNamespace",
            ],
        )?;
        let authorities = self.authorities(top.get("authorities"));
        let trusted_registries = self.trusted_registries(top.get("trustedRegistries"));
        let verification = self.verification(top.get("verification"));
        let pod_policy = self.pod_policy(top.get("podPolicy"));
        let promotion = match top.get("promotion") {
            None | Some(Value::Null) => None,
            Some(v) => self.promotion(v),
        };
        let required_attestations =
            self.required_attestations(top.get("requiredAttestations"), authorities.as_deref());
        let pull_secret_namespace = self.string(top, "pullSecretNamespace", "");
        if let Some(ns) = &pull_secret_namespace
            && !crate::api::is_dns1123_label(ns)
        {
            self.err(
                "pullSecretNamespace",
                format!("{ns:?} is not a namespace name (an RFC 1123 label)"),
            );
        }
        Some(TrustPolicy {
            authorities: authorities?,
            trusted_registries: trusted_registries?,
            verification: verification?,
            pod_policy: pod_policy?,
            promotion,
            required_attestations: required_attestations?,
            pull_secret_namespace,
            sha256: String::new(),
        })
    }

    fn required_attestations(
        &mut self,
        v: Option<&Value>,
        authorities: Option<&[Authority]>,
    ) -> Option<Vec<RequiredAttestation>> {
        let path = "requiredAttestations";
        let items = self.optional_list(v, path)?;
        let before = self.problems.len();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(r) = self.required_attestation(item, &format!("{path}[{i}]"), authorities) {
                out.push(r);
            }
        }
        (self.problems.len() == before).then_some(out)
    }

    fn required_attestation(
        &mut self,
        v: &Value,
        path: &str,
        authorities: Option<&[Authority]>,
    ) -> Option<RequiredAttestation> {
        let m = self.mapping(
            v,
            path,
            &["predicateType", "authority", "appliesTo", "conditions"],
        )?;
        let predicate_type = self.required_string(m, "predicateType", path);
        let authority = self.required_string(m, "authority", path);
        // Authorities with problems are reported where they are; only a name that is not
        // there at all is a problem here.
        let key = match (&authority, authorities) {
            (Some(name), Some(all)) => match all.iter().find(|a| &a.name == name) {
                Some(Authority {
                    kind: AuthorityKind::Key(k),
                    ..
                }) => Some(k.clone()),
                Some(_) => {
                    self.err(
                        join(path, "authority"),
                        format!("{name:?} is a keyless authority; attestations are checked against key authorities only"),
                    );
                    None
                }
                None => {
                    let names: Vec<&str> = all.iter().map(|a| a.name.as_str()).collect();
                    self.err(
                        join(path, "authority"),
                        format!(
                            "{name:?} is not the name of an authority (authorities: {})",
                            names.join(", ")
                        ),
                    );
                    None
                }
            },
            _ => None,
        };
        let scopes_path = join(path, "appliesTo");
        let applies_to = match m.get("appliesTo") {
            None | Some(Value::Null) => Some(vec![Scope::Caches]),
            v => self.strings(v, &scopes_path).and_then(|words| {
                let before = self.problems.len();
                let mut out = Vec::new();
                for (i, w) in words.iter().enumerate() {
                    match w.as_str() {
                        "caches" => out.push(Scope::Caches),
                        "pods" => out.push(Scope::Pods),
                        _ => self.err(
                            format!("{scopes_path}[{i}]"),
                            format!("{w:?} is neither caches nor pods"),
                        ),
                    }
                }
                if words.is_empty() {
                    self.err(
                        &scopes_path,
                        "must name caches, pods or both (leave it out for caches)",
                    );
                }
                (self.problems.len() == before).then_some(out)
            }),
        };
        let conditions = self.conditions(m.get("conditions"), &join(path, "conditions"));
        let predicate_type = predicate_type?;
        Some(RequiredAttestation {
            predicate_type,
            authority: authority?,
            key: key?,
            applies_to: applies_to?,
            conditions: conditions?,
        })
    }

    fn conditions(&mut self, v: Option<&Value>, path: &str) -> Option<Vec<Condition>> {
        let items = self.optional_list(v, path)?;
        let before = self.problems.len();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(m) = self.mapping(item, &p, &["field", "equals", "contains"]) else {
                continue;
            };
            let field = self.required_string(m, "field", &p);
            if let Some(f) = &field
                && !f.starts_with('/')
            {
                self.err(
                    join(&p, "field"),
                    format!("{f:?} is not a JSON pointer (RFC 6901: it starts with /, like /caller/groups)"),
                );
            }
            let json = |v: &Value| serde_json::to_value(v).map_err(|e| e.to_string());
            let test = match (m.get("equals"), m.get("contains")) {
                (Some(_), Some(_)) => {
                    self.err(&p, "has both equals and contains; give one");
                    None
                }
                (None, None) => {
                    self.err(&p, "needs equals or contains");
                    None
                }
                (Some(v), None) => match json(v) {
                    Ok(v) => Some(ConditionTest::Equals(v)),
                    Err(e) => {
                        self.err(join(&p, "equals"), e);
                        None
                    }
                },
                (None, Some(v)) => match json(v) {
                    Ok(v) => Some(ConditionTest::Contains(v)),
                    Err(e) => {
                        self.err(join(&p, "contains"), e);
                        None
                    }
                },
            };
            if let (Some(field), Some(test)) = (field, test) {
                out.push(Condition { field, test });
            }
        }
        (self.problems.len() == before).then_some(out)
    }

    fn authorities(&mut self, v: Option<&Value>) -> Option<Vec<Authority>> {
        let path = "authorities";
        let items = match v {
            None | Some(Value::Null) => {
                self.err(
                    path,
                    "is required: list at least one key or keyless identity",
                );
                return None;
            }
            Some(Value::Sequence(items)) => items,
            Some(other) => {
                self.err(path, format!("must be a list, not {}", kind(other)));
                return None;
            }
        };
        if items.is_empty() {
            // Never verify against no authority: that would accept nothing, or, with a
            // library that treats an empty constraint list as satisfied, everything.
            self.err(path, "must list at least one authority");
            return None;
        }
        let before = self.problems.len();
        let mut out = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            // Names are compared even where the rest of the entry is wrong.
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                if let Some(first) = names.get(name) {
                    self.err(
                        format!("{p}.name"),
                        format!("{name:?} is already the name of authorities[{first}]"),
                    );
                } else {
                    names.insert(name.to_string(), i);
                }
            }
            if let Some(a) = self.authority(item, &p) {
                out.push(a);
            }
        }
        (self.problems.len() == before).then_some(out)
    }

    fn authority(&mut self, v: &Value, path: &str) -> Option<Authority> {
        let m = self.mapping(v, path, &["name", "key", "keyless"])?;
        let name = self.required_string(m, "name", path);
        let has_key = !matches!(m.get("key"), None | Some(Value::Null));
        let has_keyless = !matches!(m.get("keyless"), None | Some(Value::Null));
        let kind = match (has_key, has_keyless) {
            (true, true) => {
                self.err(
                    path,
                    "has both key and keyless; an authority is one or the other",
                );
                None
            }
            (false, false) => {
                self.err(path, "needs either key (a PEM public key) or keyless");
                None
            }
            (true, false) => {
                let p = join(path, "key");
                match m.get("key") {
                    Some(Value::String(pem)) => match PublicKey::from_pem(pem) {
                        Ok(k) => Some(AuthorityKind::Key(k)),
                        Err(e) => {
                            self.err(p, e.to_string());
                            None
                        }
                    },
                    Some(other) => {
                        self.err(p, format!("must be a PEM string, not {}", kind(other)));
                        None
                    }
                    None => None,
                }
            }
            (false, true) => m
                .get("keyless")
                .and_then(|v| self.keyless(v, &join(path, "keyless")))
                .map(AuthorityKind::Keyless),
        };
        Some(Authority {
            name: name?,
            kind: kind?,
        })
    }

    fn keyless(&mut self, v: &Value, path: &str) -> Option<KeylessIdentity> {
        let m = self.mapping(
            v,
            path,
            &["issuer", "subject", "subjectRegExp", "trustedRoot"],
        )?;
        let issuer = self.required_string(m, "issuer", path);
        let subject = self.string(m, "subject", path);
        let regexp = self.string(m, "subjectRegExp", path);
        let subject = match (subject, regexp) {
            (Some(_), Some(_)) => {
                self.err(path, "has both subject and subjectRegExp; give one");
                None
            }
            (None, None) => {
                self.err(path, "needs subject or subjectRegExp");
                None
            }
            (Some(s), None) if s.trim().is_empty() => {
                self.err(join(path, "subject"), "must not be empty");
                None
            }
            (Some(s), None) => Some(SubjectMatch::Exact(s)),
            (None, Some(r)) => match SubjectMatch::regexp(&r) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.err(join(path, "subjectRegExp"), e);
                    None
                }
            },
        };
        let root_path = self.required_string(m, "trustedRoot", path);
        let root = root_path.as_ref().and_then(|p| {
            let full = self.base.join(p);
            match TrustedRoot::load(&full) {
                Ok(r) => Some((full, r)),
                Err(e) => {
                    self.err(
                        join(path, "trustedRoot"),
                        format!("{}: {e}", full.display()),
                    );
                    None
                }
            }
        });
        let (trusted_root_path, trusted_root) = root?;
        Some(KeylessIdentity {
            issuer: issuer?,
            subject: subject?,
            trusted_root: Arc::new(trusted_root),
            trusted_root_path,
        })
    }

    fn trusted_registries(&mut self, v: Option<&Value>) -> Option<Vec<RegistryPrefix>> {
        let path = "trustedRegistries";
        if matches!(v, None | Some(Value::Null)) {
            self.err(
                path,
                "is required: list the registry/repository prefixes cache images may come from",
            );
            return None;
        }
        let items = self.strings(v, path)?;
        if items.is_empty() {
            self.err(
                path,
                "must list at least one registry prefix; an empty list denies every image",
            );
            return None;
        }
        let before = self.problems.len();
        let out: Vec<_> = items
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.prefix(s, &format!("{path}[{i}]")))
            .collect();
        (self.problems.len() == before).then_some(out)
    }

    fn verification(&mut self, v: Option<&Value>) -> Option<VerificationSettings> {
        let path = "verification";
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Some(VerificationSettings::default());
        };
        let m = self.mapping(v, path, &["timeoutSeconds", "cacheTTLSeconds"])?;
        let timeout = self.seconds(m, "timeoutSeconds", path, DEFAULT_TIMEOUT_SECONDS);
        let timeout = timeout.and_then(|t| {
            if t == 0 || t >= MAX_TIMEOUT_SECONDS_EXCLUSIVE {
                self.err(
                    join(path, "timeoutSeconds"),
                    format!(
                        "{t} is out of range: at least 1 and below {MAX_TIMEOUT_SECONDS_EXCLUSIVE} (Kubernetes gives an admission webhook at most 30 s)"
                    ),
                );
                None
            } else {
                Some(t)
            }
        });
        let ttl = self.seconds(m, "cacheTTLSeconds", path, DEFAULT_CACHE_TTL_SECONDS);
        Some(VerificationSettings {
            timeout: Duration::from_secs(timeout?),
            cache_ttl: Duration::from_secs(ttl?),
        })
    }

    fn pod_policy(&mut self, v: Option<&Value>) -> Option<PodPolicy> {
        let path = "podPolicy";
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Some(PodPolicy::default());
        };
        let m = self.mapping(
            v,
            path,
            &["namespaces", "requireDigest", "verifySignatures"],
        )?;
        let ns_path = join(path, "namespaces");
        let namespaces = self.strings(m.get("namespaces"), &ns_path);
        let before = self.problems.len();
        for (i, ns) in namespaces.iter().flatten().enumerate() {
            let ok = !ns.is_empty()
                && ns.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '*' | '?')
                });
            if !ok {
                self.err(
                    format!("{ns_path}[{i}]"),
                    format!(
                        "{ns:?} is not a namespace glob (lowercase letters, digits, '-', '*', '?')"
                    ),
                );
            }
        }
        let namespaces = namespaces.filter(|_| self.problems.len() == before);
        let require_digest = self.bool(m, "requireDigest", path, true);
        let verify_signatures = self.bool(m, "verifySignatures", path, false);
        Some(PodPolicy {
            namespaces: namespaces?,
            require_digest,
            verify_signatures,
        })
    }

    fn promotion(&mut self, v: &Value) -> Option<Promotion> {
        let path = "promotion";
        let m = self.mapping(
            v,
            path,
            &["incoming", "trusted", "allowedGroups", "signKey"],
        )?;
        let incoming = self
            .required_string(m, "incoming", path)
            .and_then(|s| self.prefix(&s, &join(path, "incoming")));
        let trusted = self
            .required_string(m, "trusted", path)
            .and_then(|s| self.prefix(&s, &join(path, "trusted")));
        if let (Some(i), Some(t)) = (&incoming, &trusted)
            && i == t
        {
            self.err(join(path, "trusted"), "is the same as promotion.incoming");
        }
        let groups_path = join(path, "allowedGroups");
        let allowed_groups = self.strings(m.get("allowedGroups"), &groups_path);
        for (i, g) in allowed_groups.iter().flatten().enumerate() {
            if g.trim().is_empty() {
                self.err(format!("{groups_path}[{i}]"), "must not be empty");
            }
        }
        let sign_key = match self.string(m, "signKey", path) {
            Some(s) if s.trim().is_empty() => {
                self.err(
                    join(path, "signKey"),
                    "must not be empty (leave it out for no re-signing)",
                );
                None
            }
            Some(s) => Some(Some(self.base.join(s))),
            None => Some(None),
        };
        Some(Promotion {
            incoming: incoming?,
            trusted: trusted?,
            allowed_groups: allowed_groups?,
            sign_key: sign_key?,
        })
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("{n}"),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> RegistryPrefix {
        RegistryPrefix::parse(s).unwrap()
    }

    #[test]
    fn one_registry_check_decides_for_caches_pods_and_the_cli() {
        let trusted = [prefix("r.io/kernels"), prefix("mirror.io")];
        let check = |image: &str| {
            let r = crate::oci::parse_reference(image).unwrap();
            check_registry(&trusted, image, &r).map(|p| p.as_str().to_string())
        };
        assert_eq!(check("r.io/kernels/llama:v1").unwrap(), "r.io/kernels");
        assert_eq!(check("mirror.io/anything/x:v1").unwrap(), "mirror.io");
        // Prefixes end at path components: kernelsx is another repository.
        let e = check("r.io/kernelsx/llama:v1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image \"r.io/kernelsx/llama:v1\" is not from a trusted registry (trusted: r.io/kernels, mirror.io)"
        );
        assert!(check("docker.io/library/busybox").is_err());
        // The Pod rule says the same words, then adds its own: the digest pin.
        let rules = PodRules {
            policy: PodPolicy::default(),
            trusted_registries: trusted.to_vec(),
        };
        assert_eq!(
            rules.static_violation("r.io/kernelsx/llama:v1"),
            Some(e.to_string())
        );
        let tag = rules.static_violation("r.io/kernels/llama:v1").unwrap();
        assert!(tag.contains("is not pinned by digest"), "{tag}");
        let pinned = format!("r.io/kernels/llama@sha256:{}", "a".repeat(64));
        assert_eq!(rules.static_violation(&pinned), None);
        assert_eq!(rules.static_violation("").as_deref(), Some("has no image"));
    }

    #[test]
    fn rebase_moves_a_repository_between_prefixes() {
        let r = |s: &str| oci_client::Reference::try_from(s).unwrap();
        let incoming = RegistryPrefix::parse("in.io:5000/dev").unwrap();
        let trusted = RegistryPrefix::parse("reg.io/kernels").unwrap();
        assert_eq!(
            incoming.rebase(&r("in.io:5000/dev/team/app:v1"), &trusted),
            Some(("reg.io".into(), "kernels/team/app".into()))
        );
        assert_eq!(
            incoming.rebase(&r("in.io:5000/devx/app:v1"), &trusted),
            None
        );
        assert_eq!(incoming.rebase(&r("other.io/dev/app:v1"), &trusted), None);
        let whole = RegistryPrefix::parse("in.io:5000/dev/app").unwrap();
        let host = RegistryPrefix::parse("reg.io").unwrap();
        assert_eq!(whole.rebase(&r("in.io:5000/dev/app:v1"), &host), None);
        assert_eq!(
            whole.rebase(&r("in.io:5000/dev/app:v1"), &trusted),
            Some(("reg.io".into(), "kernels".into()))
        );
    }

    #[test]
    fn prefixes_match_on_path_component_boundaries() {
        let p = prefix("reg.io/team");
        assert!(p.matches("reg.io", "team"));
        assert!(p.matches("reg.io", "team/x"));
        assert!(p.matches("reg.io", "team/x/y"));
        assert!(!p.matches("reg.io", "teamx"));
        assert!(!p.matches("reg.io", "teamx/y"));
        assert!(!p.matches("reg.io", "other/team"));
        assert!(
            !p.matches("reg.io:5000", "team/x"),
            "another port is another registry"
        );
        assert!(!p.matches("evil-reg.io", "team/x"));
        let host = prefix("reg.io/");
        assert_eq!(host.as_str(), "reg.io");
        assert!(host.matches("REG.io", "anything/below"));
        assert!(!host.matches("reg.iox", "a"));
        let port = prefix("127.0.0.1:5000/a");
        assert!(port.matches("127.0.0.1:5000", "a/b"));
        assert!(!port.matches("127.0.0.1:50001", "a/b"));
        let hub = prefix("index.docker.io/library");
        let r = crate::oci::parse_reference("ubuntu:24.04").unwrap();
        assert!(hub.matches_reference(&r));
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_reason() {
        for bad in [
            "",
            "https://reg.io/x",
            "team/x",
            "reg.io/Team",
            "reg.io/x:tag",
            "reg.io/x@sha256:00",
            "reg.io//x",
            "reg.io:port/x",
        ] {
            assert!(RegistryPrefix::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RegistryPrefix::parse("localhost/x").is_ok());
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("ml-*", "ml-train"));
        assert!(glob_match("ml-*", "ml-"));
        assert!(!glob_match("ml-*", "xml-train"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*-prod-*", "team-prod-eu"));
        assert!(!glob_match("*-prod-*", "team-prod"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        let pp = PodPolicy {
            namespaces: vec!["ml-*".into(), "serving".into()],
            ..Default::default()
        };
        assert!(pp.covers("serving") && pp.covers("ml-x") && !pp.covers("default"));
    }

    const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEWwE8rm5B/zE2SBhrmtA0Sxfpoer7
r37uQmr0b7EPjnJZhikUbKoT2mefOEkARyNPBAHAV4oNOOdbqdeObUsVdA==
-----END PUBLIC KEY-----
";

    fn key_yaml() -> String {
        KEY.lines().map(|l| format!("      {l}\n")).collect()
    }

    #[test]
    fn defaults_apply_to_a_minimal_policy() {
        let yaml = format!(
            "authorities:\n  - name: k\n    key: |\n{}trustedRegistries: [reg.io/team]\n",
            key_yaml()
        );
        let p = TrustPolicy::from_yaml(&yaml, Path::new("/")).unwrap();
        assert_eq!(p.verification, VerificationSettings::default());
        assert_eq!(p.verification.timeout, Duration::from_secs(10));
        assert_eq!(p.verification.cache_ttl, Duration::from_secs(300));
        assert_eq!(p.pod_policy, PodPolicy::default());
        assert!(p.pod_policy.require_digest && !p.pod_policy.verify_signatures);
        assert!(p.promotion.is_none());
        assert!(
            matches!(&p.authorities[0].kind, AuthorityKind::Key(k) if k.algorithm() == "ECDSA P-256")
        );
    }

    #[test]
    fn an_empty_authority_list_is_an_error() {
        let e = TrustPolicy::from_yaml(
            "authorities: []\ntrustedRegistries: [reg.io]\n",
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(e.problems().len(), 1, "{e}");
        assert_eq!(e.problems()[0].path, "authorities");
        let e = TrustPolicy::from_yaml("", Path::new("/")).unwrap_err();
        assert!(!e.problems().is_empty());
    }

    #[test]
    fn required_attestations_are_read_with_every_problem_at_once() {
        let base = format!(
            "authorities:\n  - name: k\n    key: |\n{}trustedRegistries: [reg.io/team]\n",
            key_yaml()
        );
        let good = format!(
            "{base}requiredAttestations:\n  - predicateType: https://gkm.io/attestations/verification/v1\n    authority: k\n    appliesTo: [caches, pods]\n    conditions:\n      - {{field: /caller/groups, contains: release}}\n      - {{field: /verification/signatureFormat, equals: tag}}\n"
        );
        let p = TrustPolicy::from_yaml(&good, Path::new("/")).unwrap();
        let r = &p.required_attestations[0];
        assert_eq!(r.authority, "k");
        assert!(r.applies(Scope::Caches) && r.applies(Scope::Pods));
        assert_eq!(
            r.conditions[0].test,
            ConditionTest::Contains(serde_json::json!("release"))
        );
        assert_eq!(
            r.to_string(),
            "an attestation of type https://gkm.io/attestations/verification/v1 signed by authority \"k\" with /caller/groups containing \"release\" and /verification/signatureFormat equal to \"tag\""
        );
        assert!(p.sha256.starts_with("sha256:") && p.sha256.len() == 71);

        let defaults =
            format!("{base}requiredAttestations:\n  - {{predicateType: t, authority: k}}\n");
        let p = TrustPolicy::from_yaml(&defaults, Path::new("/")).unwrap();
        assert_eq!(p.required_attestations[0].applies_to, vec![Scope::Caches]);

        let bad = format!(
            "{base}requiredAttestations:\n  - authority: nobody\n    appliesTo: [nodes]\n    conditions:\n      - {{field: caller, equals: x, contains: y}}\n      - {{field: /a}}\n    extra: 1\n"
        );
        let e = TrustPolicy::from_yaml(&bad, Path::new("/")).unwrap_err();
        let got: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        for want in [
            "requiredAttestations[0].extra: unknown field",
            "requiredAttestations[0].predicateType: is required",
            "requiredAttestations[0].authority: \"nobody\" is not the name of an authority (authorities: k)",
            "requiredAttestations[0].appliesTo[0]: \"nodes\" is neither caches nor pods",
            "requiredAttestations[0].conditions[0].field: \"caller\" is not a JSON pointer",
            "requiredAttestations[0].conditions[0]: has both equals and contains",
            "requiredAttestations[0].conditions[1]: needs equals or contains",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{want} not in {got:#?}"
            );
        }
    }
}
