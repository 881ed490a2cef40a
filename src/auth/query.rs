//! Key-like query parameters (L1, G1): never accepted as credentials, and never forwarded.

use http::header::HeaderName;

/// Whether a query parameter named `name` (as it appears in the target, percent-encoded or
/// not) looks like an API key: `apikey`, `api_key`, `api-key`, `key`, or the key header's
/// name, in any case, with `-`, `_` and `.` ignored.
fn is_key_param(name: &str, key_header: &HeaderName) -> bool {
    let normalized = normalize(&percent_decode(name));
    normalized == "apikey" || normalized == "key" || normalized == normalize(key_header.as_str())
}

fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `%XX` sequences decoded (`+` as a space, as forms encode it); anything malformed kept as
/// it is. Names only: the values are never decoded.
fn percent_decode(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pair_name(pair: &str) -> &str {
    pair.split('=').next().unwrap_or_default()
}

/// Whether `query` has a key-like parameter. Only names the rejection reason (`KeyInQuery`).
pub(crate) fn query_has_key(query: Option<&str>, key_header: &HeaderName) -> bool {
    query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| is_key_param(pair_name(pair), key_header))
    })
}

/// `query` without its key-like parameters, and how many were removed. The kept pairs stay
/// byte for byte as they were; `None` when nothing is left.
pub(crate) fn query_without_keys(query: &str, key_header: &HeaderName) -> (Option<String>, usize) {
    let mut removed = 0;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = is_key_param(pair_name(pair), key_header);
            removed += usize::from(key);
            !key
        })
        .collect();
    let kept = kept.join("&");
    (if kept.is_empty() { None } else { Some(kept) }, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_key_detection_matches_common_names_only() {
        let h = HeaderName::from_static("x-api-key");
        assert!(query_has_key(Some("apiKey=abc"), &h));
        assert!(query_has_key(Some("a=1&api_key=abc"), &h));
        assert!(query_has_key(Some("X-API-Key=abc"), &h));
        assert!(query_has_key(Some("key=abc"), &h));
        assert!(query_has_key(Some("api%5Fkey=abc"), &h));
        assert!(query_has_key(Some("api%5fKey=abc"), &h));
        assert!(query_has_key(Some("api.key=abc"), &h));
        assert!(!query_has_key(Some("monkey=1&keys=2"), &h));
        assert!(!query_has_key(Some("%zz=1&%=2&%4=3"), &h));
        assert!(!query_has_key(None, &h));
    }

    #[test]
    fn stripping_keeps_other_pairs_verbatim() {
        let h = HeaderName::from_static("x-api-key");
        assert_eq!(query_without_keys("apikey=1", &h), (None, 1));
        assert_eq!(
            query_without_keys("a=%20&key=1&b&key", &h),
            (Some("a=%20&b".to_owned()), 2)
        );
        assert_eq!(query_without_keys("a=1", &h), (Some("a=1".to_owned()), 0));
    }
}
