//! Query-string helpers: repeated keys and Go-style booleans, as the kubelet parses them.

use crate::error::ApiError;

/// All `key=value` pairs of a query string, in order (repeated keys kept).
pub(crate) fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("malformed query string: {e}")))
}

/// The last value of `key`.
pub(crate) fn last<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Every value of `key`.
pub(crate) fn all(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Go's `strconv.ParseBool`; an empty value (`?follow`) counts as true, as in the kubelet.
pub(crate) fn bool_of(pairs: &[(String, String)], key: &str) -> Result<bool, ApiError> {
    match last(pairs, key) {
        None => Ok(false),
        Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(v) => Err(ApiError::BadRequest(format!("invalid boolean {key}={v:?}"))),
    }
}

/// An optional integer parameter.
pub(crate) fn int_of(pairs: &[(String, String)], key: &str) -> Result<Option<i64>, ApiError> {
    last(pairs, key)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid integer {key}={v:?}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_and_booleans() {
        let p = pairs(Some(
            "command=sh&command=-c&command=echo%20hi&tty=1&input=false&x",
        ))
        .expect("parses");
        assert_eq!(all(&p, "command"), vec!["sh", "-c", "echo hi"]);
        assert!(bool_of(&p, "tty").expect("bool"));
        assert!(!bool_of(&p, "input").expect("bool"));
        assert!(bool_of(&p, "x").expect("bool"));
        assert!(!bool_of(&p, "missing").expect("bool"));
        let p = pairs(Some("tty=maybe&n=12&m=x")).expect("parses");
        assert!(bool_of(&p, "tty").is_err());
        assert_eq!(int_of(&p, "n").expect("int"), Some(12));
        assert!(int_of(&p, "m").is_err());
    }
}
