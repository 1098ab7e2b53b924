//! Image references (`gkm::oci::parse_reference`, `PinnedRef::parse`). Input: the reference
//! as UTF-8.
//!
//! Checks:
//! - differential: oci-spec's regular-expression parser (`Reference::from_str`) accepts the
//!   same strings and builds the same registry, repository, tag and digest; the intended
//!   differences are a non-ASCII tag, which oci-spec's Unicode `\w` accepts, and an
//!   uppercase Docker Hub repository (`Foo/bar`), which Docker refuses too;
//! - round trip: a parsed reference's `whole()` parses to the same reference;
//! - `PinnedRef::parse` accepts exactly the parsed references with a sha256 digest of 64
//!   lowercase hex digits, and keeps their registry and repository.

use std::str::FromStr;

use gkm::oci::{PinnedRef, Reference, parse_reference, sha256_hex};

type Fields = (String, String, Option<String>, Option<String>);

fn fields(r: &Reference) -> Fields {
    (
        r.registry().to_string(),
        r.repository().to_string(),
        r.tag().map(str::to_string),
        r.digest().map(str::to_string),
    )
}

pub fn check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let ours = parse_reference(s);
    let theirs = Reference::from_str(s);
    match (&ours, &theirs) {
        (Ok(o), Ok(t)) => assert_eq!(fields(o), fields(t), "{s:?}"),
        (Err(_), Err(_)) => {}
        (Ok(o), Err(e)) => panic!(
            "{s:?}: GKM parses it as {:?}, oci-spec refuses it: {e}",
            fields(o)
        ),
        (Err(e), Ok(t)) => assert!(
            t.tag().is_some_and(|tag| !tag.is_ascii())
                || t.repository().bytes().any(|b| b.is_ascii_uppercase()),
            "{s:?}: oci-spec parses it as {:?}, GKM refuses it: {e}",
            fields(t)
        ),
    }
    let pinned = PinnedRef::parse(s);
    match &ours {
        Ok(r) => {
            let again = parse_reference(&r.whole())
                .unwrap_or_else(|e| panic!("{s:?} parsed, but its whole() does not: {e}"));
            assert_eq!(fields(&again), fields(r), "{s:?} → {:?}", r.whole());
            let sha = r.digest().and_then(sha256_hex).is_some();
            assert_eq!(pinned.is_ok(), sha, "{s:?}: PinnedRef::parse {pinned:?}");
            if let Ok(p) = &pinned {
                assert_eq!(
                    (p.registry(), p.repository()),
                    (r.registry(), r.repository())
                );
                assert_eq!(Some(p.digest()), r.digest());
                assert_eq!(p.hex().len(), 64);
            }
        }
        Err(_) => assert!(pinned.is_err(), "{s:?}: pinned but does not parse"),
    }
}
