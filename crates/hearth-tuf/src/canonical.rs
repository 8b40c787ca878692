//! OLPC canonical JSON, the serialisation TUF signs (spec 4.2, "canonical
//! JSON"; as securesystemslib's `encode_canonical` does it).
//!
//! Rules: object keys sorted by code point, no insignificant whitespace,
//! strings escape only `"` and `\` (every other byte is written raw),
//! integers only (floats are not representable and are refused).

use serde_json::Value;

use crate::Error;

/// Encodes `value` as canonical JSON.
///
/// # Errors
/// [`Error::Malformed`] when the value holds a non-integer number.
pub fn encode(value: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(1024);
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut Vec<u8>) -> Result<(), Error> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(Error::malformed("canonical json", format!("non-integer number {n}")));
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sort explicitly: serde_json's map keeps insertion order when some
            // other crate in the build turns on `preserve_order`. UTF-8 byte
            // order equals code point order, which is what Python sorts by.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write(&map[key], out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in s.as_bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let v: Value = serde_json::from_str(input).unwrap();
        assert_eq!(String::from_utf8(encode(&v).unwrap()).unwrap(), expected);
    }

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        check(r#"{ "b": 1, "a": [true, null, -3], "c": {"z": "x", "y": ""} }"#, r#"{"a":[true,null,-3],"b":1,"c":{"y":"","z":"x"}}"#);
    }

    #[test]
    fn escapes_only_quote_and_backslash() {
        check(r#"{"k": "a\"b\\c\n\u00e9"}"#, "{\"k\":\"a\\\"b\\\\c\n\u{e9}\"}");
    }

    #[test]
    fn refuses_floats() {
        let v: Value = serde_json::from_str(r#"{"a": 1.5}"#).unwrap();
        assert!(encode(&v).is_err());
    }
}
