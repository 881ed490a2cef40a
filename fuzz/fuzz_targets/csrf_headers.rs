//! Fuzz target: `CsrfLayer` (W1) on arbitrary requests: method, `Host`, `Origin`,
//! `Sec-Fetch-Site`, `Cookie` and `X-CSRF-Token` headers, against a model of its six
//! acceptance rules (src/csrf.rs).
//!
//! Input format: the bytes are split at `\n`. The first line is the method (`POST` if
//! `http::Method` rejects it); each further line is `name:value`, split at the first `:`;
//! lines that `HeaderName::from_bytes` or `HeaderValue::from_bytes` reject are skipped. Before
//! splitting, markers are replaced by values only known at run time:
//! - `@TOKEN@` -> the live session's id (64 lowercase hex);
//! - `@CSRF@`  -> that session's CSRF token;
//! - `@DEAD@`  -> a well-formed id that names no session; `@DEADCSRF@` -> its token.
//!
//! Fixture (built once): org `acme` with a key, one admin (custom `AdminDirectory`, no
//! argon2), `Sessions` on a fixed clock, one live session; the layer allows the extra origin
//! `https://admin.example`. Every input goes through it twice: as built, and with
//! `cookie_requests_only` (rule 0: no session cookie, no check).
//!
//! Oracle: the model's decision; accepted -> the inner service called once and its 200
//! returned untouched; refused -> 403, inner not called, the `CsrfRejection` the model names,
//! the fixed JSON body for it, `Content-Type: application/json`, `Cache-Control: no-store`;
//! the response future is ready at the first poll; the live session still validates and is
//! the only one; nothing panics.
#![no_main]

mod common;

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::OnceLock;

use bytes::Bytes;
use common::{call_now, one_session, session_cookie, substitute, Lookup};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use libfuzzer_sys::fuzz_target;
use orgkey::http::csrf::{token_for_session, CsrfLayer, CsrfRejection};
use orgkey::Sessions;
use tower::ServiceBuilder;

const ALLOWED: &str = "https://admin.example";
const DEAD: &str = "00000000000000000000000000000000000000000000000000000000000000ff";

struct Fixture {
    sessions: Sessions,
    layer: CsrfLayer,
    /// The same with `cookie_requests_only` (rule 0).
    cookie_layer: CsrfLayer,
    token: String,
    csrf: String,
    dead_csrf: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let live = one_session();
        let csrf = token_for_session(live.token.as_bytes())
            .expect("token")
            .expose_secret()
            .to_owned();
        let dead_csrf = token_for_session(DEAD.as_bytes())
            .expect("token")
            .expose_secret()
            .to_owned();
        assert_ne!(csrf, dead_csrf);
        let layer = CsrfLayer::new(live.sessions.clone()).allow_origin(ALLOWED);
        let cookie_layer = layer.clone().cookie_requests_only();
        Fixture {
            sessions: live.sessions,
            layer,
            cookie_layer,
            token: live.token,
            csrf,
            dead_csrf,
        }
    })
}

fn markers(f: &Fixture) -> [(&[u8], &[u8]); 4] {
    // Longest markers first: @DEADCSRF@ before @DEAD@.
    [
        (b"@DEADCSRF@", f.dead_csrf.as_bytes()),
        (b"@DEAD@", DEAD.as_bytes()),
        (b"@TOKEN@", f.token.as_bytes()),
        (b"@CSRF@", f.csrf.as_bytes()),
    ]
}

/// `host[:port]` with the scheme's default port written out; lowercase.
fn normalize(scheme: &str, authority: &str) -> String {
    let authority = authority.to_ascii_lowercase();
    let after_host = match authority.rfind(']') {
        Some(i) => &authority[i + 1..],
        None => &authority[..],
    };
    if after_host.contains(':') {
        authority
    } else {
        format!("{authority}:{}", if scheme == "https" { 443 } else { 80 })
    }
}

/// What `HeaderValue::to_str` accepts: visible ASCII, space and tab.
fn text(value: &HeaderValue) -> Option<&str> {
    value
        .as_bytes()
        .iter()
        .all(|&b| b == b'\t' || (32..127).contains(&b))
        .then(|| std::str::from_utf8(value.as_bytes()).expect("ascii"))
}

fn origin_ok(origin: &HeaderValue, headers: &HeaderMap) -> bool {
    let Some(origin) = text(origin) else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !(scheme == "http" || scheme == "https") || authority.is_empty() {
        return false;
    }
    let presented = normalize(scheme, authority);
    if scheme == "https" && presented == "admin.example:443" {
        return true;
    }
    headers
        .get(HOST)
        .and_then(text)
        .is_some_and(|host| normalize(scheme, host) == presented)
}

fn model(method: &Method, headers: &HeaderMap, f: &Fixture) -> Result<(), CsrfRejection> {
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) {
        return Ok(());
    }
    let origin = headers.get(ORIGIN);
    let site = headers.get("sec-fetch-site");
    if origin.is_none() && site.is_none() {
        return Ok(());
    }
    if site.is_some_and(|s| s.as_bytes() != b"same-origin") {
        return Err(CsrfRejection::CrossSiteFetch);
    }
    if origin.is_some_and(|o| !origin_ok(o, headers)) {
        return Err(CsrfRejection::ForeignOrigin);
    }
    match session_cookie(headers) {
        Lookup::Absent => Ok(()),
        Lookup::Several => Err(CsrfRejection::AmbiguousSession),
        Lookup::One(id) if id.eq_ignore_ascii_case(f.token.as_bytes()) => {
            let presented = headers
                .get("x-csrf-token")
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if presented == f.csrf.as_bytes() {
                Ok(())
            } else {
                Err(CsrfRejection::TokenMismatch)
            }
        }
        Lookup::One(_) => Ok(()),
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let input = substitute(data, &markers(f));
    let mut lines = input.split(|&b| b == b'\n');
    let method = lines
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::POST);
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    for cookie_only in [false, true] {
        check(f, cookie_only, &method, &headers);
    }
    assert_eq!(f.sessions.len(), 1, "session table changed");
    assert!(f.sessions.validate(f.token.as_bytes()).is_ok());
});

/// Runs one request through the layer (with or without rule 0) and checks the model.
fn check(f: &Fixture, cookie_only: bool, method: &Method, headers: &HeaderMap) {
    let expected = if cookie_only && matches!(session_cookie(headers), Lookup::Absent) {
        Ok(()) // rule 0
    } else {
        model(method, headers, f)
    };
    let layer = if cookie_only {
        &f.cookie_layer
    } else {
        &f.layer
    };

    let mut request = Request::builder()
        .method(method.clone())
        .uri("/api/v1/apiKeys/1/regenerate")
        .body(Empty::<Bytes>::new())
        .expect("request");
    *request.headers_mut() = headers.clone();
    let calls = Rc::new(Cell::new(0usize));
    let counter = Rc::clone(&calls);
    let mut service =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(move |_: Request<Empty<Bytes>>| {
                counter.set(counter.get() + 1);
                std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
            });
    let (parts, body) = call_now(&mut service, request);
    match expected {
        Ok(()) => {
            assert_eq!(
                parts.status,
                StatusCode::OK,
                "model accepts {method} (cookie_only {cookie_only})"
            );
            assert_eq!(calls.get(), 1, "inner not called exactly once");
            assert!(parts.extensions.get::<CsrfRejection>().is_none());
            assert!(body.is_empty());
        }
        Err(reason) => {
            assert_eq!(
                parts.status,
                StatusCode::FORBIDDEN,
                "model refuses ({reason}, cookie_only {cookie_only})"
            );
            assert_eq!(calls.get(), 0, "inner called on a refused request");
            assert_eq!(parts.extensions.get::<CsrfRejection>(), Some(&reason));
            let message = match reason {
                CsrfRejection::CrossSiteFetch | CsrfRejection::ForeignOrigin => {
                    "cross-site request refused"
                }
                _ => "missing or wrong CSRF token",
            };
            let expected_body = format!(r#"{{"code":"CSRF_CHECK_FAILED","message":"{message}"}}"#);
            assert_eq!(&body[..], expected_body.as_bytes());
            assert_eq!(
                parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
                Some(&b"application/json"[..])
            );
            assert_eq!(
                parts.headers.get(CACHE_CONTROL).map(HeaderValue::as_bytes),
                Some(&b"no-store"[..])
            );
        }
    }
}
