//! Fuzz target: `SessionEndpoint` login (`POST /api/v1/authenticatedSession`) on arbitrary
//! bodies (A2, PROTOCOL.md).
//!
//! Input format:
//! - if the first byte is 0x00..=0x08 it selects the request's `Content-Type` (see
//!   [`ContentType::select`]) and is dropped; otherwise the `Content-Type` is
//!   `application/json` and the whole input is the body;
//! - mode 0x08 takes the `Content-Type` value from the input itself: the bytes up to the first
//!   `\n` (omitted if `http` rejects them), the body is what follows.
//!
//! Fixture (built once): org `acme` subscribed with key `AbCdEf123456`; one admin,
//! `admin@acme.example` / `CorrectHorse12`, scopes `api` + `key-admin`, served by a custom
//! `AdminDirectory` (string comparison, no argon2); a fixed clock at 1795671792867 ms; a
//! throttle policy with bursts of `u32::MAX` (with a fixed clock buckets never refill, so a
//! normal policy would turn every later outcome into 429). Requests carry a fixed
//! `ClientAddr`, so both throttle buckets are exercised.
//!
//! Oracle (an independent model of the endpoint's documented behaviour):
//! - the status is exactly the model's: 415 unless the Content-Type's media type is
//!   `application/json` (case-insensitive, parameters allowed), else 413 for a body over 4096
//!   bytes, else 400 for a body that is not the login JSON or a timestamp that is neither a
//!   `u64` nor 1-20 digits fitting a `u64`, else 200 exactly when the username is
//!   `admin@acme.example` (ASCII case-insensitive), the password is `CorrectHorse12`, the
//!   timestamp is within 5 minutes (inclusive) of the clock and `apiKey` is
//!   `obfuscate(b"AbCdEf123456", ts)`, else 401. Never 403 (the admin has `api`), never 429
//!   (permissive throttle), never 5xx;
//! - every response: `Content-Type: application/json`, `Cache-Control: no-store`, no
//!   `Retry-After`, a body that is valid JSON and one of the fixed bodies for its status
//!   (400: code `INVALID_INPUT_ARGUMENT` with one of the fixed messages, the JSON error class
//!   being the one serde reports), so nothing from the input is reflected;
//! - `Set-Cookie` present (exactly once) iff 200, and then exactly
//!   `JSESSIONID=<64 lowercase hex>; Path=/; HttpOnly; SameSite=Strict; Secure`; the id is a
//!   live session of `admin@acme.example` in `acme` (checked with `Sessions::validate`), and
//!   is then logged out; the session table is empty after every run (no session is created
//!   by a failed login);
//! - a 200 is re-checked against the raw input with `serde_json::Value` (not the mirror
//!   struct): the body is a JSON object with those four fields and values. The endpoint
//!   validates the whole body as JSON first: this target found that serde_json's typed parse
//!   skipped invalid UTF-8 and lone `\u` surrogates inside *ignored* fields (inputs kept as
//!   `seed-lenient-*`); such bodies now get 400;
//! - nothing panics.
//!
//! Inputs the model says would reach `Sessions::login` with a username that is not
//! `name@domain` or a password over 1024 bytes are not run (`Corpus::Reject`): orgkey then
//! spends a real argon2id verification (`password::dummy_verify`, A1) to keep the failure's
//! cost equal, about 20 ms (far more under ASan), which would bring the fuzzer to a crawl.
//! Their outcome is a plain 401, covered by the unit and integration tests.
#![no_main]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use bytes::Bytes;
use common::{acme_table, Directory, FixedClock, ADMIN, KEY, NOW_MS, PASSWORD};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::{fuzz_target, Corpus};
use orgkey::identity::{Scopes, Username};
use orgkey::session::obfuscate::obfuscate;
use orgkey::http::{ClientAddr, SessionEndpoint, MAX_LOGIN_BODY};
use orgkey::session::ThrottlePolicy;
use orgkey::{OrgId, SessionConfig, Sessions};
use serde::Deserialize;
use tower::Service;

const WINDOW_MS: u64 = 5 * 60 * 1000;

const SESSION_INFO: &str = r#"{"authType":"ADMIN_LOGIN","obfuscateApiKey":false,"passwordExpiryTime":0,"passwordExpiryDays":0}"#;
const AUTHENTICATION_FAILED: &str =
    r#"{"code":"AUTHENTICATION_FAILED","message":"Authentication failed"}"#;
const PAYLOAD_TOO_LARGE: &str =
    r#"{"code":"PAYLOAD_TOO_LARGE","message":"login body larger than 4096 bytes"}"#;
const UNSUPPORTED_MEDIA_TYPE: &str =
    r#"{"code":"UNSUPPORTED_MEDIA_TYPE","message":"send Content-Type: application/json"}"#;
const TIMESTAMP_MESSAGE: &str = "timestamp must be milliseconds since the Unix epoch";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    sessions: Sessions,
    endpoint: SessionEndpoint,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        let acme = OrgId::new("acme").expect("org id");
        let table = acme_table(&runtime);
        assert_eq!(
            table
                .state("acme")
                .and_then(|s| s.key().map(|k| k.expose_secret().to_owned())),
            Some("AbCdEf123456".to_owned())
        );

        let directory = Directory::one_admin(acme);
        let config = SessionConfig {
            secure_cookie: true,
            throttle: ThrottlePolicy {
                address_burst: u32::MAX,
                username_burst: u32::MAX,
                // Small, so a full username table (fixed clock: nothing ever refills, so
                // nothing is evicted) costs a short scan per attempt, not 100,000 entries.
                max_entries: 256,
                ..ThrottlePolicy::default()
            },
            ..SessionConfig::default()
        };
        let sessions = Sessions::with_config(table, directory, config, FixedClock);
        let endpoint = SessionEndpoint::new(sessions.clone());
        Fixture {
            runtime,
            sessions,
            endpoint,
        }
    })
}

/// How the request's `Content-Type` is chosen.
#[derive(Debug)]
enum ContentType {
    /// The values to send, in order (`HeaderMap::get` sees the first).
    Fixed(&'static [&'static str]),
    /// Raw bytes from the input.
    Raw(Vec<u8>),
}

impl ContentType {
    /// Splits the input into the content type choice and the body.
    fn select(data: &[u8]) -> (Self, &[u8]) {
        fn fixed<'a>(values: &'static [&'static str], rest: &'a [u8]) -> (ContentType, &'a [u8]) {
            (ContentType::Fixed(values), rest)
        }
        match data.split_first() {
            Some((0x00, rest)) => fixed(&[], rest),
            Some((0x01, rest)) => fixed(&["text/plain"], rest),
            Some((0x02, rest)) => fixed(&["application/json; charset=utf-8"], rest),
            Some((0x03, rest)) => fixed(&["Application/JSON"], rest),
            Some((0x04, rest)) => fixed(&["application/jsonp"], rest),
            Some((0x05, rest)) => fixed(&[" application/json\t;v=1"], rest),
            Some((0x06, rest)) => fixed(&["application/x-www-form-urlencoded"], rest),
            Some((0x07, rest)) => fixed(&["text/plain", "application/json"], rest),
            Some((0x08, rest)) => {
                let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let body = rest.get(end + 1..).unwrap_or(&[]);
                (Self::Raw(rest[..end].to_vec()), body)
            }
            _ => fixed(&["application/json"], data),
        }
    }

    fn values(&self) -> Vec<HeaderValue> {
        match self {
            Self::Fixed(values) => values.iter().map(|v| HeaderValue::from_static(v)).collect(),
            Self::Raw(bytes) => HeaderValue::from_bytes(bytes).into_iter().collect(),
        }
    }
}

/// Model: whether the first `Content-Type` names `application/json` (parameters allowed,
/// case-insensitive, surrounding spaces/tabs ignored; a value with non-visible-ASCII bytes is
/// not a media type).
fn model_is_json(first: Option<&[u8]>) -> bool {
    let Some(value) = first else { return false };
    if !value
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        return false;
    }
    let media = value.split(|&b| b == b';').next().unwrap_or(&[]);
    let start = media.iter().position(|&b| b != b' ' && b != b'\t');
    let media = match start {
        Some(start) => {
            let end = media
                .iter()
                .rposition(|&b| b != b' ' && b != b'\t')
                .unwrap_or(start);
            &media[start..=end]
        }
        None => &[],
    };
    media.eq_ignore_ascii_case(b"application/json")
}

/// The login body as PROTOCOL.md describes it (unknown fields ignored, duplicates refused).
#[derive(Deserialize)]
struct LoginShape {
    #[serde(rename = "apiKey")]
    api_key: String,
    username: String,
    password: String,
    timestamp: TimestampShape,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TimestampShape {
    Number(u64),
    Text(String),
}

/// Model: a number, or 1-20 ASCII digits whose value fits a `u64`.
fn model_timestamp(ts: &TimestampShape) -> Option<u64> {
    match ts {
        TimestampShape::Number(n) => Some(*n),
        TimestampShape::Text(s) => {
            if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value = s
                .bytes()
                .try_fold(0u128, |acc, b| Some(acc * 10 + u128::from(b - b'0')))?;
            u64::try_from(value).ok()
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Expected {
    /// 415.
    UnsupportedMediaType,
    /// 413.
    TooLarge,
    /// 400 with this message.
    BadRequest(String),
    /// 401.
    Unauthorized,
    /// 200.
    LoggedIn,
    /// Would cost a real argon2 run: not executed.
    Skip,
}

fn json_class(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "could not read",
        Category::Syntax => "not valid JSON",
        Category::Data => "a field is missing or has the wrong type",
        Category::Eof => "the JSON ends early",
    }
}

fn model(content_type: &ContentType, body: &[u8]) -> Expected {
    let values = content_type.values();
    if !model_is_json(values.first().map(HeaderValue::as_bytes)) {
        return Expected::UnsupportedMediaType;
    }
    if body.len() > MAX_LOGIN_BODY {
        return Expected::TooLarge;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.is_object() => {}
        Ok(_) => return Expected::BadRequest("login body must be a JSON object".to_owned()),
        Err(e) => {
            return Expected::BadRequest(format!(
                "login body must be JSON with apiKey, username, password and timestamp ({})",
                json_class(&e)
            ))
        }
    }
    let shape: LoginShape = match serde_json::from_slice(body) {
        Ok(shape) => shape,
        Err(e) => {
            return Expected::BadRequest(format!(
                "login body must be JSON with apiKey, username, password and timestamp ({})",
                json_class(&e)
            ))
        }
    };
    let Some(ts) = model_timestamp(&shape.timestamp) else {
        return Expected::BadRequest(TIMESTAMP_MESSAGE.to_owned());
    };
    if Username::new(&shape.username).is_err() || shape.password.len() > 1024 {
        return Expected::Skip;
    }
    let accepted = shape.username.eq_ignore_ascii_case(ADMIN)
        && shape.password == PASSWORD
        && ts.abs_diff(NOW_MS) <= WINDOW_MS
        && obfuscate(KEY, ts).is_some_and(|o| o[..] == *shape.api_key.as_bytes());
    if accepted {
        Expected::LoggedIn
    } else {
        Expected::Unauthorized
    }
}

/// Independent re-check of an accepted body with `serde_json::Value`.
fn recheck_accepted(body: &[u8]) {
    let value: serde_json::Value =
        serde_json::from_slice(body).expect("200 for a body that is not RFC 8259 JSON");
    let object = value.as_object().expect("a 200 body must be a JSON object");
    let text = |field: &str| {
        object
            .get(field)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("200 without a string {field}"))
    };
    assert!(
        text("username").eq_ignore_ascii_case(ADMIN),
        "200 for another user"
    );
    assert_eq!(text("password"), PASSWORD, "200 with a wrong password");
    let ts = match object.get("timestamp") {
        Some(serde_json::Value::Number(n)) => n.as_u64().expect("200 with a non-u64 timestamp"),
        Some(serde_json::Value::String(s)) => s.parse::<u64>().expect("200 with a bad timestamp"),
        other => panic!("200 with timestamp {other:?}"),
    };
    assert!(
        ts.abs_diff(NOW_MS) <= WINDOW_MS,
        "200 with a stale timestamp {ts}"
    );
    let expected = obfuscate(KEY, ts).expect("12-byte key");
    assert_eq!(
        text("apiKey").as_bytes(),
        &expected[..],
        "200 with a wrong apiKey"
    );
}

fn check_cookie(value: &HeaderValue) -> String {
    let text = value.to_str().expect("Set-Cookie is ASCII");
    let id = text
        .strip_prefix("JSESSIONID=")
        .and_then(|rest| rest.strip_suffix("; Path=/; HttpOnly; SameSite=Strict; Secure"))
        .unwrap_or_else(|| panic!("Set-Cookie has the wrong shape: {text:?}"));
    assert_eq!(id.len(), 64, "session id is not 64 characters: {text:?}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "session id is not lowercase hex: {text:?}"
    );
    id.to_owned()
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let fixture = fixture();
    let (content_type, body) = ContentType::select(data);
    let expected = model(&content_type, body);
    if expected == Expected::Skip {
        return Corpus::Reject;
    }

    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/authenticatedSession")
        .extension(ClientAddr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    for value in content_type.values() {
        request.headers_mut().append(CONTENT_TYPE, value);
    }

    let mut endpoint = fixture.endpoint.clone();
    let response = fixture
        .runtime
        .block_on(async move {
            std::future::poll_fn(|cx| {
                Service::<Request<Full<Bytes>>>::poll_ready(&mut endpoint, cx)
            })
            .await
            .expect("infallible");
            endpoint.call(request).await
        })
        .expect("infallible");
    let (parts, response_body) = response.into_parts();
    let response_body = fixture
        .runtime
        .block_on(response_body.collect())
        .expect("infallible body")
        .to_bytes();
    let status = parts.status;

    // Every response is JSON, not cached, and never throttled here.
    assert_eq!(
        parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
        Some(&b"application/json"[..]),
        "status {status}: Content-Type"
    );
    assert_eq!(
        parts.headers.get(CACHE_CONTROL).map(HeaderValue::as_bytes),
        Some(&b"no-store"[..]),
        "status {status}: Cache-Control"
    );
    assert!(
        parts.headers.get(RETRY_AFTER).is_none(),
        "Retry-After on {status}"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&response_body)
        .unwrap_or_else(|e| panic!("status {status}: response body is not JSON ({e})"));
    assert!(parsed.is_object(), "response body is not a JSON object");
    let cookies: Vec<&HeaderValue> = parts.headers.get_all(SET_COOKIE).iter().collect();
    if status != StatusCode::OK {
        assert!(cookies.is_empty(), "Set-Cookie on a {status}");
    }

    match expected {
        Expected::LoggedIn => {
            assert_eq!(
                status,
                StatusCode::OK,
                "model accepts, endpoint answered {status}"
            );
            assert_eq!(&response_body[..], SESSION_INFO.as_bytes());
            assert_eq!(cookies.len(), 1, "expected exactly one Set-Cookie");
            recheck_accepted(body);
            let id = check_cookie(cookies[0]);
            let identity = fixture
                .sessions
                .validate(id.as_bytes())
                .expect("the cookie of a 200 names a live session");
            assert_eq!(identity.org.as_str(), "acme");
            assert_eq!(identity.admin.as_str(), ADMIN);
            assert_eq!(identity.scopes, Scopes::ALL);
            assert!(
                fixture
                    .runtime
                    .block_on(fixture.sessions.logout(id.as_bytes()))
                    .expect("memory-only sessions cannot fail to log out"),
                "logout of a live session"
            );
            assert!(fixture.sessions.validate(id.as_bytes()).is_err());
        }
        Expected::Unauthorized => {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "model: 401");
            assert_eq!(
                &response_body[..],
                AUTHENTICATION_FAILED.as_bytes(),
                "401 body"
            );
        }
        Expected::BadRequest(message) => {
            assert_eq!(status, StatusCode::BAD_REQUEST, "model: 400 ({message})");
            assert_eq!(parsed["code"], "INVALID_INPUT_ARGUMENT", "400 code");
            assert_eq!(parsed["message"], message.as_str(), "400 message");
            assert_eq!(
                parsed.as_object().map(|o| o.len()),
                Some(2),
                "400 body fields"
            );
        }
        Expected::TooLarge => {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "model: 413");
            assert_eq!(&response_body[..], PAYLOAD_TOO_LARGE.as_bytes(), "413 body");
        }
        Expected::UnsupportedMediaType => {
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "model: 415");
            assert_eq!(
                &response_body[..],
                UNSUPPORTED_MEDIA_TYPE.as_bytes(),
                "415 body"
            );
        }
        Expected::Skip => unreachable!(),
    }
    // No failed login leaves a session behind (and the one of a 200 was logged out).
    assert_eq!(fixture.sessions.len(), 0, "session table not empty");
    Corpus::Keep
});
