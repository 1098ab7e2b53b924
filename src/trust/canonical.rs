//! RFC 8785 (JCS) canonical JSON, the bytes a Rekor SignedEntryTimestamp signs.
//!
//! Owns only the serialisation: object members sorted by their UTF-16 code units, no
//! whitespace, strings escaped as ECMAScript's `JSON.stringify` does, numbers as ECMAScript
//! prints them. Rekor's documents hold integers only, so numbers are limited to integers
//! that an IEEE double represents exactly (|n| ≤ 2^53); anything else is refused rather
//! than printed differently from the signer.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("number {0} cannot be canonicalised (only integers up to 2^53 are supported)")]
    Number(String),
}

const MAX_EXACT: u64 = 1 << 53;

/// The canonical form of `value`.
pub fn to_canonical(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::new();
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut String) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let ok = n
                .as_u64()
                .map(|u| u <= MAX_EXACT)
                .or_else(|| n.as_i64().map(|i| i.unsigned_abs() <= MAX_EXACT))
                .unwrap_or(false);
            if !ok {
                return Err(CanonicalError::Number(n.to_string()));
            }
            // Integers print the same in ECMAScript as in Rust (no exponent below 1e21).
            out.push_str(&n.to_string());
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            // JCS sorts by UTF-16 code units, which differs from byte order for characters
            // above U+FFFF against those in U+E000..U+FFFF.
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write(&map[k], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
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
    fn refuses_numbers_it_cannot_print_exactly() {
        assert!(to_canonical(&json!(1.5)).is_err());
        assert!(to_canonical(&json!(u64::MAX)).is_err());
        assert_eq!(
            to_canonical(&json!(1u64 << 53)).unwrap(),
            "9007199254740992"
        );
    }
}
