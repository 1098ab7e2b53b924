//! Parsing image references without a regular expression.
//!
//! oci-spec (behind oci-client) parses references with the distribution project's regular
//! expression, whose tag part `[\w][\w.-]{0,127}` repeats a Unicode class 127 times: the
//! compiled automaton and its search caches held 11 MiB for the life of the process, a
//! third of the agent's idle memory (docs/benchmarks.md). This parser follows the same
//! grammar by hand, accepts and rejects the same strings (a test compares the two over
//! generated inputs), and builds the same [`Reference`] through its plain constructors.
//! Tags are ASCII only (`\w` is Unicode in the expression); the distribution spec allows
//! nothing else, so no registry serves them. And, as Docker's `ParseNormalizedNamed` does,
//! the repository must be lowercase: the grammar reads an uppercase first component of
//! `Foo/bar` as a domain, which the Docker Hub rule then turns into the repository
//! `Foo/bar` of `docker.io`, which no registry serves and whose `docker.io/Foo/bar` form
//! neither parser accepts (the fuzz target `reference` found it; oci-spec accepts it).

use super::Reference;

const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// Why a reference does not parse, in oci-spec's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    Format,
    NameTooLong,
    DigestFormat,
    DigestLength,
    DigestUnsupported,
    Uppercase,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invalid::Empty => "repository name must have at least one component",
            Invalid::Format => "invalid reference format",
            Invalid::NameTooLong => "repository name must not be more than 255 characters",
            Invalid::DigestFormat => "invalid digest format",
            Invalid::DigestLength => "invalid checksum digest length",
            Invalid::DigestUnsupported => "unsupported digest algorithm",
            Invalid::Uppercase => "repository name must be lowercase",
        })
    }
}

/// Parses `s` as `[domain/]path[:tag][@digest]`, normalised as Docker does (no domain:
/// `docker.io`; a single Docker Hub path component: `library/…`; no tag or digest: `latest`).
pub fn parse(s: &str) -> Result<Reference, Invalid> {
    if s.is_empty() {
        return Err(Invalid::Empty);
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest
        && !is_digest(d)
    {
        return Err(Invalid::Format);
    }
    // A tag follows the last ':' that comes after the last '/' (an earlier ':' is a port).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if rest[i..].find('/').is_none() => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(t) = tag
        && !is_tag(t)
    {
        return Err(Invalid::Format);
    }
    if !is_name(name) {
        return Err(Invalid::Format);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(Invalid::NameTooLong);
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::Uppercase);
    }
    if let Some(d) = digest {
        let want = match d.split_once(':') {
            Some(("sha256", _)) => 64,
            Some(("sha384", _)) => 96,
            Some(("sha512", _)) => 128,
            Some(_) => return Err(Invalid::DigestUnsupported),
            None => return Err(Invalid::DigestFormat),
        };
        if d.len() - d.find(':').unwrap_or(0) - 1 != want {
            return Err(Invalid::DigestLength);
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}`
fn is_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|part| {
        let mut c = part.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic()) && c.all(|x| x.is_ascii_alphanumeric())
    });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `[\w][\w.-]{0,127}`, ASCII.
fn is_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// A name: `[domain/]component(/component)*`; the first part may be read as a domain only
/// when at least one path component follows it.
fn is_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.iter().all(|p| is_path_component(p))
        || (parts.len() > 1
            && is_domain(parts[0])
            && parts[1..].iter().all(|p| is_path_component(p)))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `label(\.label)*(:[0-9]+)?`, a label being `[A-Za-z0-9]` or
/// `[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]`.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    host.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
    })
}

/// Docker's rule: the first component is a registry when it has a '.' or ':' or is
/// `localhost`; otherwise the name is on Docker Hub, where a single component is an
/// official image under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut rest) = match name.split_once('/') {
        Some((left, right)) if left.contains('.') || left.contains(':') || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    (domain, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// Both parsers give the same answer: the same fields, or both an error, except where
    /// GKM refuses on purpose what oci-spec accepts: a non-ASCII tag, an uppercase Docker
    /// Hub repository.
    fn same(s: &str) {
        let ours = parse(s).ok().map(|r| {
            (
                r.registry().to_string(),
                r.repository().to_string(),
                r.tag().map(str::to_string),
                r.digest().map(str::to_string),
            )
        });
        let theirs = Reference::from_str(s).ok().map(|r| {
            (
                r.registry().to_string(),
                r.repository().to_string(),
                r.tag().map(str::to_string),
                r.digest().map(str::to_string),
            )
        });
        if ours.is_none()
            && let Some((_, repository, tag, _)) = &theirs
            && (tag.as_ref().is_some_and(|t| !t.is_ascii())
                || repository.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return;
        }
        assert_eq!(ours, theirs, "{s:?}");
    }

    const H64: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    #[test]
    fn agrees_with_oci_spec_on_known_cases() {
        let long = format!("r.io/{}", "a".repeat(260));
        let cases = [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "lowercase:Uppercase",
            "Uppercase:tag",
            "Foo/bar",
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "xn--n3h.com/myimage:xn--n3h.com",
            "foo_bar.com:8080",
            "foo/foo_bar.com:8080",
            "opensuse/leap:15.3",
            "localhost/app",
            "localhost:5000/app:v1",
            "index.docker.io/app",
            "index.docker.io/team/app",
            "docker.io/app",
            "127.0.0.1:5000/a/b/c:v1",
            "a__b/c",
            "a___b/c",
            "a--b/c-d",
            "a._b",
            "a..b",
            "-a/b",
            "a-/b",
            "a/b/",
            "/a",
            "a//b",
            "a:",
            "a:b:c",
            "a:-tag",
            "a:.tag",
            "a:_tag",
            "a:tag-with.dots_and-dashes",
            "-host.com/a",
            "host-.com/a",
            "ho_st.com/a",
            "host.com:/a",
            "host.com:50x0/a",
            ":5000/a",
            "a@",
            "a@sha256",
            "a@sha256:",
            "a@sha256:abc",
            "a@md5:ffffffffffffffffffffffffffffffff",
            "a@sha512:ffffffffffffffffffffffffffffffff",
            "a@1sha256:ffffffffffffffffffffffffffffffff",
            "a@sha256+b64:ffffffffffffffffffffffffffffffff",
            "a@@sha256:ffffffffffffffffffffffffffffffff",
            "UPPER.io/app",
            "UPPER.io/App",
            "é.com/app",
            &long,
        ];
        for s in cases {
            same(s);
        }
        let tag128 = format!("r.io/a:{}", "t".repeat(128));
        let tag129 = format!("r.io/a:{}", "t".repeat(129));
        for s in [
            format!("r.io/a@sha256:{H64}"),
            format!("r.io/a:v1@sha256:{H64}"),
            format!("r.io/a@sha256:{}", &H64[1..]),
            format!("r.io/a@sha256:{H64}0"),
            format!("r.io/a@sha256:{}", H64.to_uppercase()),
            format!("r.io/a@sha384:{H64}{}", &H64[..32]),
            format!("r.io:5000/a@sha256:{H64}"),
            tag128,
            tag129,
        ] {
            same(&s);
        }
    }

    #[test]
    fn uppercase_docker_hub_repositories_are_refused() {
        // oci-spec reads `Foo` as a domain, then puts the name on Docker Hub as it is.
        let theirs = Reference::from_str("Foo/bar").unwrap();
        assert_eq!(theirs.repository(), "Foo/bar");
        assert!(Reference::from_str(&theirs.whole()).is_err());
        assert_eq!(parse("Foo/bar").unwrap_err(), Invalid::Uppercase);
        assert_eq!(
            parse("r1B5000/x__y/z-1.2:t5").unwrap_err(),
            Invalid::Uppercase
        );
        // A domain may have capitals; it is not part of the repository.
        assert_eq!(parse("UPPER.io/app").unwrap().repository(), "app");
    }

    #[test]
    fn non_ascii_tags_are_refused() {
        // The one intended difference: oci-spec's `\w` is Unicode.
        assert!(Reference::from_str("app:té").is_ok());
        assert_eq!(parse("app:té").unwrap_err(), Invalid::Format);
    }

    #[test]
    fn agrees_with_oci_spec_on_generated_inputs() {
        // A small deterministic generator over the characters that matter to the grammar.
        let alphabet = [
            "a",
            "b",
            "z",
            "0",
            "9",
            "A",
            "Z",
            ".",
            "_",
            "-",
            ":",
            "/",
            "@",
            "localhost",
            "sha256:",
            H64,
            "5000",
            "__",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut valid = 0;
        for _ in 0..20_000 {
            let len = 1 + (next() % 8) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            same(&s);
            valid += usize::from(parse(&s).is_ok());
        }
        // Both sides of the grammar are exercised.
        assert!((1_000..19_000).contains(&valid), "{valid} valid of 20000");
    }
}
