//! Fuzz target: `OrgKeyLayer::with_sessions` (and the session probe `GET` of
//! `SessionEndpoint`) on arbitrary `Cookie` headers (L1, S2).
//!
//! Input format: the bytes are split at `\n`; each piece is one `Cookie` header value (pieces
//! `http` rejects are skipped; an empty piece is an empty header). Before splitting, markers
//! are replaced by values only known at run time:
//! - `@TOKEN@`   -> the live session's id (64 lowercase hex);
//! - `@TOKENUC@` -> the same id in uppercase;
//! - `@NEAR@`    -> the id with its last hex digit changed (well-formed, names no session).
//!
//! No `x-api-key` and no `x-org-id` header is ever sent, so the layer is in session mode
//! whenever a `JSESSIONID` cookie is present.
//!
//! Fixture (built once): org `acme` subscribed with key `AbCdEf123456`; one admin
//! `admin@acme.example` (custom `AdminDirectory`, no argon2); `Sessions` on a fixed clock, so
//! the session never expires; one login through `Sessions::login` whose token is kept.
//!
//! Model of the cookie rules (RFC 6265 `Cookie` header, as `session/cookie.rs` reads it):
//! every `Cookie` header is split at `;`; a piece without `=` is not a cookie; the name (before
//! the first `=`) and the value, each with spaces and tabs trimmed, are a `JSESSIONID` pair
//! iff the name is exactly `JSESSIONID` (case-sensitive); one pair of surrounding double
//! quotes is removed from the value. Then:
//! - more than one `JSESSIONID` pair across all headers (even empty ones) -> 401
//!   `SESSION_NOT_VALID`, reason `SessionAmbiguous`;
//! - exactly one, whose value equals the live id ignoring ASCII case -> accepted;
//! - exactly one, any other value -> 401 `SESSION_NOT_VALID`, reason `SessionNotFound`;
//! - none (and no key, no org) -> 401 `SESSION_NOT_VALID`, reason `SessionMissing`: what a
//!   ZIA client lacks is a session.
//!
//! Oracle:
//! - accepted: 2xx, the inner service called once with an `Authenticated` for `acme`,
//!   method `Session { admin: admin@acme.example, scopes: api+key-admin }`, the current
//!   generation, and the request headers unchanged except that the `JSESSIONID` pair is
//!   removed from the `Cookie` headers (other pieces kept, trimmed, joined with `; `; headers
//!   left empty dropped); no `Rejection` extension;
//! - rejected: 401, inner service not called, the `Rejection` reason above, the layer's
//!   `WWW-Authenticate`, `Content-Type: application/json`, `Cache-Control: no-store`, and the
//!   exact fixed JSON body for the reason;
//! - the response future is ready at the first poll;
//! - `GET` on `SessionEndpoint` with the same headers: 200 with the SessionInfo body iff
//!   accepted, else 401 `SESSION_NOT_VALID`;
//! - after every run the live id still validates and the table holds exactly that session
//!   (a failed lookup never removes a live session of another value);
//! - nothing panics.
#![no_main]

mod common;

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::OnceLock;

use bytes::Bytes;
use common::{
    call_now, cookie_headers, one_session, ready, session_cookie, substitute, Lookup, ADMIN,
};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, COOKIE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use libfuzzer_sys::fuzz_target;
use orgkey::identity::{Scopes, Username};
use orgkey::auth::AuthMethod;
use orgkey::http::SessionEndpoint;
use orgkey::{Authenticated, Generation, OrgKeyLayer, Rejection, RejectionReason, Sessions};
use tower::{Service, ServiceBuilder};

const SESSION_INFO: &str = r#"{"authType":"ADMIN_LOGIN","obfuscateApiKey":false,"passwordExpiryTime":0,"passwordExpiryDays":0}"#;
const SESSION_NOT_VALID: &str = r#"{"code":"SESSION_NOT_VALID","message":"Session is not valid"}"#;
const CHALLENGE: &[u8] = br#"ApiKey realm="orgkey", header="x-api-key""#;

struct Fixture {
    sessions: Sessions,
    layer: OrgKeyLayer,
    endpoint: SessionEndpoint,
    /// The live session's id (lowercase hex).
    token: String,
    generation: Generation,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let live = one_session();
        let layer = OrgKeyLayer::new(live.table).with_sessions(live.sessions.clone());
        let endpoint = SessionEndpoint::new(live.sessions.clone());
        Fixture {
            sessions: live.sessions,
            layer,
            endpoint,
            token: live.token,
            generation: live.generation,
        }
    })
}

/// The markers and their values.
fn markers(token: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut near = token.as_bytes().to_vec();
    let last = near.len() - 1;
    near[last] = if near[last] == b'0' { b'1' } else { b'0' };
    vec![
        (
            b"@TOKENUC@".to_vec(),
            token.to_ascii_uppercase().into_bytes(),
        ),
        (b"@TOKEN@".to_vec(), token.as_bytes().to_vec()),
        (b"@NEAR@".to_vec(), near),
    ]
}

/// `Ok(())` to accept, else the reason and the exact body.
fn model(headers: &HeaderMap, token: &str) -> Result<(), (RejectionReason, &'static str)> {
    match session_cookie(headers) {
        Lookup::One(v) if v.eq_ignore_ascii_case(token.as_bytes()) => Ok(()),
        Lookup::One(_) => Err((RejectionReason::SessionNotFound, SESSION_NOT_VALID)),
        Lookup::Several => Err((RejectionReason::SessionAmbiguous, SESSION_NOT_VALID)),
        Lookup::Absent => Err((RejectionReason::SessionMissing, SESSION_NOT_VALID)),
    }
}

/// The headers the inner service must see: the sent ones, with the session cookie removed.
fn model_stripped(headers: &HeaderMap) -> HeaderMap {
    fn trim(mut s: &[u8]) -> &[u8] {
        while let [b' ' | b'\t', rest @ ..] = s {
            s = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = s {
            s = rest;
        }
        s
    }
    let mut out = headers.clone();
    out.remove(COOKIE);
    for value in headers.get_all(COOKIE) {
        let kept: Vec<&[u8]> = value
            .as_bytes()
            .split(|&b| b == b';')
            .map(trim)
            .filter(|piece| {
                let name = piece.split(|&b| b == b'=').next().unwrap_or_default();
                !piece.is_empty() && trim(name) != b"JSESSIONID"
            })
            .collect();
        if !kept.is_empty() {
            out.append(
                COOKIE,
                HeaderValue::from_bytes(&kept.join(&b"; "[..])).expect("valid header bytes"),
            );
        }
    }
    out
}

#[derive(Debug, Default)]
struct Seen {
    calls: usize,
    headers: Option<HeaderMap>,
    auth: Option<Authenticated>,
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let markers = markers(&fixture.token);
    let markers: Vec<(&[u8], &[u8])> = markers
        .iter()
        .map(|(m, v)| (m.as_slice(), v.as_slice()))
        .collect();
    let input = substitute(data, &markers);
    let values: Vec<HeaderValue> = input
        .split(|&b| b == b'\n')
        .filter_map(|piece| HeaderValue::from_bytes(piece).ok())
        .collect();
    let headers = cookie_headers(&values);
    let expected = model(&headers, &fixture.token);

    // The layer.
    let mut request = Request::builder()
        .uri("/api/v1/status")
        .body(Empty::<Bytes>::new())
        .expect("request");
    *request.headers_mut() = headers.clone();
    let seen = Rc::new(RefCell::new(Seen::default()));
    let recorder = Rc::clone(&seen);
    let mut service = ServiceBuilder::new()
        .layer(fixture.layer.clone())
        .service_fn(move |request: Request<Empty<Bytes>>| {
            let mut seen = recorder.borrow_mut();
            seen.calls += 1;
            seen.headers = Some(request.headers().clone());
            seen.auth = request.extensions().get::<Authenticated>().cloned();
            std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
        });
    let (parts, body) = call_now(&mut service, request);
    let status = parts.status;
    let seen = seen.borrow();

    match expected {
        Ok(()) => {
            assert!(
                status.is_success(),
                "model accepts, layer answered {status} ({:?})",
                parts.extensions.get::<Rejection>()
            );
            assert_eq!(seen.calls, 1, "inner service not called exactly once");
            assert_eq!(
                seen.headers.as_ref(),
                Some(&model_stripped(&headers)),
                "inner saw other headers than the sent ones minus the session cookie"
            );
            let auth = seen.auth.as_ref().expect("inner saw no Authenticated");
            assert_eq!(auth.org(), "acme");
            assert_eq!(auth.generation(), fixture.generation);
            let admin = Username::new(ADMIN).expect("username");
            assert_eq!(
                auth.method(),
                &AuthMethod::Session {
                    admin,
                    scopes: Scopes::ALL
                }
            );
            assert!(parts.extensions.get::<Rejection>().is_none());
            assert!(body.is_empty(), "inner body replaced");
        }
        Err((reason, expected_body)) => {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "model rejects ({reason}), layer answered {status}"
            );
            assert_eq!(seen.calls, 0, "inner service called on a rejected request");
            let rejection = parts
                .extensions
                .get::<Rejection>()
                .expect("rejection carries a Rejection");
            assert_eq!(rejection.reason(), reason, "wrong rejection reason");
            assert_eq!(
                parts
                    .headers
                    .get(WWW_AUTHENTICATE)
                    .map(HeaderValue::as_bytes),
                Some(CHALLENGE)
            );
            assert_eq!(
                parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
                Some(&b"application/json"[..])
            );
            assert_eq!(
                parts.headers.get(CACHE_CONTROL).map(HeaderValue::as_bytes),
                Some(&b"no-store"[..])
            );
            assert_eq!(&body[..], expected_body.as_bytes(), "rejection body");
            serde_json::from_slice::<serde_json::Value>(&body).expect("body is JSON");
        }
    }
    drop(seen);

    // The session probe, same cookies.
    let mut probe = Request::builder()
        .method(Method::GET)
        .uri("/api/v1/authenticatedSession")
        .body(Full::new(Bytes::new()))
        .expect("request");
    *probe.headers_mut() = headers;
    let mut endpoint = fixture.endpoint.clone();
    let response = match ready(Service::<Request<Full<Bytes>>>::call(&mut endpoint, probe)) {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let body = ready(body.collect()).expect("infallible body").to_bytes();
    if expected.is_ok() {
        assert_eq!(parts.status, StatusCode::OK, "GET probe of a live session");
        assert_eq!(&body[..], SESSION_INFO.as_bytes());
    } else {
        assert_eq!(
            parts.status,
            StatusCode::UNAUTHORIZED,
            "GET probe: expected 401"
        );
        assert_eq!(&body[..], SESSION_NOT_VALID.as_bytes());
    }

    // The live session survived whatever was presented.
    assert_eq!(fixture.sessions.len(), 1, "session table changed");
    assert!(
        fixture.sessions.validate(fixture.token.as_bytes()).is_ok(),
        "the live session no longer validates"
    );
});
