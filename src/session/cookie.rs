//! Reading `JSESSIONID` from `Cookie` headers, and session ids.

use std::fmt;

use http::header::COOKIE;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The session cookie's name, as ZIA clients expect it.
pub const SESSION_COOKIE: &str = "JSESSIONID";

/// Bytes of randomness in a session id (256 bits; S1 asks for at least 128).
pub(crate) const SESSION_ID_BYTES: usize = 32;

/// A session id as given to the client (`JSESSIONID`): 64 lowercase hex characters.
///
/// Secret: redacted `Debug`, no `Display`, no `PartialEq`, zeroized on drop. orgkey keeps only
/// its SHA-256 digest (S1).
pub struct SessionToken(Zeroizing<String>);

impl SessionToken {
    /// Draws a new id from the OS CSPRNG.
    pub(crate) fn generate() -> Result<(Self, [u8; 32]), crate::key::RandomnessError> {
        let mut raw = Zeroizing::new([0u8; SESSION_ID_BYTES]);
        crate::key::fill_random(raw.as_mut())?;
        let digest = digest(raw.as_ref());
        Ok((Self(secret_hex(raw.as_ref())), digest))
    }

    /// The id, for the `Set-Cookie` header. Grep for this when auditing where ids go.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionToken").finish_non_exhaustive()
    }
}

impl ConstantTimeEq for SessionToken {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.as_bytes().ct_eq(other.0.as_bytes())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `bytes` in lowercase hex, in a string wiped on drop (session ids, CSRF tokens).
pub(crate) fn secret_hex(bytes: &[u8]) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for b in bytes {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

fn digest(raw: &[u8]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

/// The digest under which a presented id is stored, or `None` if it is not 64 hex characters
/// (such a value cannot be a session id; nothing is looked up).
pub(crate) fn digest_of_presented(value: &[u8]) -> Option<[u8; 32]> {
    raw_of_presented(value).map(|raw| digest(raw.as_ref()))
}

/// The random bytes of a presented id, or `None` if it is not 64 hex characters.
pub(crate) fn raw_of_presented(value: &[u8]) -> Option<Zeroizing<[u8; SESSION_ID_BYTES]>> {
    if value.len() != SESSION_ID_BYTES * 2 {
        return None;
    }
    let mut raw = Zeroizing::new([0u8; SESSION_ID_BYTES]);
    for (i, pair) in value.chunks_exact(2).enumerate() {
        raw[i] = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(raw)
}

/// The `Set-Cookie` value handing `token` to a client (PROTOCOL.md): `JSESSIONID=<id>;
/// Path=/; HttpOnly; SameSite=Strict`, plus `; Secure` when `secure`. `None` cannot happen
/// for ids made by [`SessionToken::generate`] (hex only).
pub(crate) fn set_cookie_value(token: &SessionToken, secure: bool) -> Option<http::HeaderValue> {
    let cookie = Zeroizing::new(format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
        token.expose_secret(),
        if secure { "; Secure" } else { "" }
    ));
    http::HeaderValue::from_str(&cookie).ok()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// What the `Cookie` headers say about `JSESSIONID`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CookieLookup<'a> {
    /// No `JSESSIONID` cookie.
    Absent,
    /// Exactly one `JSESSIONID` value.
    One(&'a [u8]),
    /// More than one `JSESSIONID` (ambiguous: none is used).
    Several,
}

/// Every `JSESSIONID` value in every `Cookie` header (`name=value` pairs separated by `;`),
/// in order, quotes removed.
pub(crate) fn session_cookies(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(COOKIE).iter().flat_map(|header| {
        header.as_bytes().split(|&b| b == b';').filter_map(|pair| {
            let pair = trim(pair);
            let eq = pair.iter().position(|&b| b == b'=')?;
            if trim(&pair[..eq]) != SESSION_COOKIE.as_bytes() {
                return None;
            }
            let mut value = trim(&pair[eq + 1..]);
            if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
                value = &value[1..value.len() - 1];
            }
            Some(value)
        })
    })
}

/// Finds `JSESSIONID` in every `Cookie` header: one value, none, or several (ambiguous).
pub(crate) fn find_session_cookie(headers: &HeaderMap) -> CookieLookup<'_> {
    let mut values = session_cookies(headers);
    match (values.next(), values.next()) {
        (None, _) => CookieLookup::Absent,
        (Some(value), None) => CookieLookup::One(value),
        (Some(_), Some(_)) => CookieLookup::Several,
    }
}

/// Removes the `JSESSIONID` pair from every `Cookie` header, keeping the other cookies (and
/// dropping headers left empty), so the session id never reaches the inner service or an
/// upstream behind a proxy.
pub(crate) fn strip_session_cookie(headers: &mut HeaderMap) {
    let kept: Vec<http::HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|header| {
            let pairs: Vec<&[u8]> = header
                .as_bytes()
                .split(|&b| b == b';')
                .map(trim)
                .filter(|pair| {
                    let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
                    !pair.is_empty() && trim(name) != SESSION_COOKIE.as_bytes()
                })
                .collect();
            if pairs.is_empty() {
                return None;
            }
            http::HeaderValue::from_bytes(&pairs.join(&b"; "[..])).ok()
        })
        .collect();
    headers.remove(COOKIE);
    for value in kept {
        headers.append(COOKIE, value);
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(COOKIE, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        assert_eq!(
            find_session_cookie(&headers(&["a=1; JSESSIONID=abc; b=2"])),
            CookieLookup::One(b"abc")
        );
        assert_eq!(
            find_session_cookie(&headers(&["a=1", "JSESSIONID = \"abc\" "])),
            CookieLookup::One(b"abc")
        );
        assert_eq!(
            find_session_cookie(&headers(&["XJSESSIONID=abc"])),
            CookieLookup::Absent
        );
        assert_eq!(find_session_cookie(&headers(&[])), CookieLookup::Absent);
        assert_eq!(
            find_session_cookie(&headers(&["JSESSIONID=a", "JSESSIONID=b"])),
            CookieLookup::Several
        );
    }

    #[test]
    fn stripping_removes_only_the_session_cookie() {
        let mut map = headers(&["a=1; JSESSIONID=abc; b=2", "JSESSIONID=x", "c=3"]);
        strip_session_cookie(&mut map);
        let left: Vec<_> = map
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
        assert_eq!(find_session_cookie(&map), CookieLookup::Absent);
    }

    #[test]
    fn ids_are_64_hex_and_digests_match() {
        let (token, digest) = SessionToken::generate().unwrap();
        let text = token.expose_secret();
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(digest_of_presented(text.as_bytes()), Some(digest));
        assert_eq!(
            digest_of_presented(text.to_uppercase().as_bytes()),
            Some(digest)
        );
        assert_eq!(digest_of_presented(&text.as_bytes()[1..]), None);
        assert_eq!(digest_of_presented(&[b'g'; 64]), None);
        assert!(!format!("{token:?}").contains(text));
        let (other, _) = SessionToken::generate().unwrap();
        assert!(!bool::from(token.ct_eq(&other)));
    }
}
