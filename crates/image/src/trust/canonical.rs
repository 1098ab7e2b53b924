//! RFC 8785 (JCS) canonical JSON, the bytes a Rekor SignedEntryTimestamp signs.
//!
//! The serialisation is `serde_json_canonicalizer`'s (the implementation sigstore-rs uses
//! for the same check): object members sorted by their UTF-16 code units, no whitespace,
//! strings escaped and numbers printed as ECMAScript's `JSON.stringify` does. This module
//! only names the one call and keeps the tests that pin the bytes Rekor expects.

use serde_json::Value;

/// The value could not be serialised (serde_json_canonicalizer's error, as text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("canonical JSON: {0}")]
pub struct CanonicalError(String);

/// The canonical form of `value`.
pub fn to_canonical(value: &Value) -> Result<String, CanonicalError> {
    serde_json_canonicalizer::to_string(value).map_err(|e| CanonicalError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_members_and_drops_whitespace() {
        let v = json!({"logIndex": 7651500, "body": "eyJh", "logID": "c0d2", "integratedTime": 1669162369});
        assert_eq!(
            to_canonical(&v).unwrap(),
            r#"{"body":"eyJh","integratedTime":1669162369,"logID":"c0d2","logIndex":7651500}"#,
            "logID sorts before logIndex ('D' < 'n')"
        );
        let nested = json!({"b": [1, {"z": null, "a": true}], "a": -5});
        assert_eq!(
            to_canonical(&nested).unwrap(),
            r#"{"a":-5,"b":[1,{"a":true,"z":null}]}"#
        );
    }

    #[test]
    fn escapes_strings_like_ecmascript() {
        let v = json!("a\"b\\c\u{1}\n\t/é\u{2028}");
        assert_eq!(
            to_canonical(&v).unwrap(),
            "\"a\\\"b\\\\c\\u0001\\n\\t/é\u{2028}\""
        );
    }

    #[test]
    fn sorts_by_utf16_code_units() {
        // U+1F600 is D83D DE00 in UTF-16, which sorts before U+FB01 (FB01) although its
        // UTF-8 bytes (F0 …) sort after EF AC 81.
        let v = json!({"\u{fb01}": 1, "\u{1f600}": 2});
        assert_eq!(
            to_canonical(&v).unwrap(),
            "{\"\u{1f600}\":2,\"\u{fb01}\":1}"
        );
    }

    #[test]
    fn prints_numbers_as_ecmascript_does() {
        // RFC 8785, 3.2.2.3: numbers are IEEE doubles printed by ECMAScript's rules.
        assert_eq!(to_canonical(&json!(1.5)).unwrap(), "1.5");
        assert_eq!(to_canonical(&json!(1e21)).unwrap(), "1e+21");
        assert_eq!(to_canonical(&json!(-0.0)).unwrap(), "0");
        assert_eq!(
            to_canonical(&json!(1u64 << 53)).unwrap(),
            "9007199254740992"
        );
        // Rekor's integers (log indexes, times) print as they are.
        assert_eq!(to_canonical(&json!(1669162369)).unwrap(), "1669162369");
    }
}
