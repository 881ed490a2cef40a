//! What several fuzz targets share: the fixed clock, a one-admin directory without argon2,
//! an org `acme` with one live session, marker substitution, the model's reading of the
//! `Cookie` headers, and polling a future that must not wait. Included with `mod common;`;
//! not every target uses every item.
#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, COOKIE};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty};
use orgkey::directory::{AdminDirectory, AdminStatus, PasswordRejection};
use orgkey::identity::{Scopes, Username};
use orgkey::clock::Clock;
use orgkey::session::obfuscate::obfuscate;
use orgkey::session::LoginRequest;
use orgkey::{
    Actor, ApiKey, Generation, KeyAdmin, OrgId, OrgTable, Password, SessionConfig, Sessions,
};
use std::convert::Infallible;
use tower::Service;

pub const ADMIN: &str = "admin@acme.example";
pub const PASSWORD: &str = "CorrectHorse12";
pub const KEY: &[u8; 12] = b"AbCdEf123456";
pub const NOW_MS: u64 = 1_795_671_792_867;

/// A clock stopped at `NOW_MS`.
pub struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(NOW_MS)
    }
}

/// One admin, checked by plain comparison (no argon2: the fuzzer would crawl).
pub struct Directory {
    pub status: AdminStatus,
}

impl Directory {
    /// `ADMIN` in `org`, enabled, with every scope.
    pub fn one_admin(org: OrgId) -> Self {
        Self {
            status: AdminStatus {
                org,
                enabled: true,
                scopes: Scopes::ALL,
                credential_version: 1,
            },
        }
    }
}

impl AdminDirectory for Directory {
    fn status(&self, username: &Username) -> Option<AdminStatus> {
        (username.as_str() == ADMIN).then(|| self.status.clone())
    }

    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        if username.as_str() != ADMIN {
            Err(PasswordRejection::UnknownUser)
        } else if password.expose_secret() != PASSWORD {
            Err(PasswordRejection::WrongPassword)
        } else {
            Ok(self.status.clone())
        }
    }
}

/// Org `acme` subscribed with `KEY`, `ADMIN` in it, `Sessions` on the fixed clock, and one
/// live session of `ADMIN`.
pub struct OneSession {
    pub table: OrgTable,
    pub generation: Generation,
    pub sessions: Sessions,
    /// The live session's id (64 lowercase hex).
    pub token: String,
}

/// A table with org `acme` subscribed and its key set to `KEY`, made on `runtime`.
pub fn acme_table(runtime: &tokio::runtime::Runtime) -> OrgTable {
    let admin = KeyAdmin::new(OrgTable::default());
    let ops = Actor::new("fuzz@orgkey.example").expect("actor");
    let acme = OrgId::new("acme").expect("org id");
    runtime.block_on(admin.create_org(&acme)).expect("create");
    runtime
        .block_on(admin.subscribe(&acme, &ops))
        .expect("subscribe");
    let key = ApiKey::parse(std::str::from_utf8(KEY).expect("ascii")).expect("key");
    runtime
        .block_on(admin.edit(&acme, key, &ops))
        .expect("edit");
    admin.table().clone()
}

pub fn one_session() -> OneSession {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let acme = OrgId::new("acme").expect("org id");
    let table = acme_table(&runtime);
    let generation = table.state("acme").expect("acme").generation();
    let sessions = Sessions::with_config(
        table.clone(),
        Directory::one_admin(acme),
        SessionConfig::default(),
        FixedClock,
    );
    let api_key = obfuscate(KEY, NOW_MS).expect("12-byte key");
    let session = runtime
        .block_on(sessions.login(LoginRequest {
            api_key: Password::new(std::str::from_utf8(&api_key).expect("ascii")),
            username: ADMIN.to_owned(),
            password: Password::new(PASSWORD),
            timestamp_ms: NOW_MS,
            source: None,
        }))
        .expect("fixture login");
    let token = session.token.expose_secret().to_owned();
    assert_eq!(token.len(), 64);
    assert!(token
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    assert_eq!(sessions.len(), 1);
    OneSession {
        table,
        generation,
        sessions,
        token,
    }
}

/// Replaces each marker by its value, left to right (list longer markers first when one is
/// a prefix of another).
pub fn substitute(data: &[u8], markers: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 128);
    let mut i = 0;
    'scan: while i < data.len() {
        for (marker, replacement) in markers {
            if data[i..].starts_with(marker) {
                out.extend_from_slice(replacement);
                i += marker.len();
                continue 'scan;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// Trims spaces and tabs at both ends.
pub fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// The model's reading of `JSESSIONID` in the `Cookie` headers.
#[derive(Debug)]
pub enum Lookup {
    Absent,
    One(Vec<u8>),
    Several,
}

/// RFC 6265 `Cookie` headers as `session/cookie.rs` reads them: every header split at `;`;
/// a piece without `=` is not a cookie; name and value trimmed of spaces and tabs; a
/// `JSESSIONID` pair iff the name is exactly `JSESSIONID`; one pair of surrounding double
/// quotes removed from the value.
pub fn session_cookie(headers: &HeaderMap) -> Lookup {
    let mut found: Vec<Vec<u8>> = Vec::new();
    for value in headers.get_all(COOKIE) {
        for piece in value.as_bytes().split(|&b| b == b';') {
            let Some(eq) = piece.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim_ows(&piece[..eq]) != b"JSESSIONID" {
                continue;
            }
            let mut v = trim_ows(&piece[eq + 1..]);
            if v.len() >= 2 && v.first() == Some(&b'"') && v.last() == Some(&b'"') {
                v = &v[1..v.len() - 1];
            }
            found.push(v.to_vec());
        }
    }
    match found.len() {
        0 => Lookup::Absent,
        1 => Lookup::One(found.pop().expect("one")),
        _ => Lookup::Several,
    }
}

/// `Cookie` headers holding `values`, in order.
pub fn cookie_headers(values: &[HeaderValue]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in values {
        headers.append(COOKIE, value.clone());
    }
    headers
}

/// Polls a future that must complete without waiting.
pub fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("future pending: nothing here should wait"),
    }
}

/// Readies `service`, calls it with `request`, and collects the response; every step must
/// complete without waiting.
pub fn call_now<S, B>(
    service: &mut S,
    request: Request<Empty<Bytes>>,
) -> (http::response::Parts, Bytes)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let response = match ready(service.call(request)) {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let body = ready(body.collect()).expect("infallible body").to_bytes();
    (parts, body)
}
