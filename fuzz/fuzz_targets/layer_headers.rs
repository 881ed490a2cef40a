//! Fuzz target: `OrgKeyLayer` on requests with arbitrary headers and URI (L1-L4).
//!
//! Input format (own, simple decoding):
//! - the first line (up to the first `\n`) is the request URI (path and query; if
//!   `http::Uri` rejects it, `/` is used);
//! - every further line is one header, `name:value` split at the first `:`; lines whose name
//!   or value `http` rejects are skipped. Header names are case-insensitive (`X-Org-Id` is
//!   `x-org-id`); values are taken byte for byte (no trimming).
//!
//! The table is built once (see [`fixture`]) with orgs in every state: subscribed with a
//! known key, two orgs sharing one key value, subscribed with a random key, unsubscribed
//! after having a key, subscribed with the key deleted, never subscribed.
//!
//! Oracle, from an independent model of the acceptance rules:
//! - the response is 2xx iff exactly one `x-org-id` header is visible ASCII naming an
//!   existing subscribed org with a key AND exactly one `x-api-key` header equals that org's
//!   current key byte for byte;
//! - accepted: the inner service was called once, saw no `x-api-key` header, saw every other
//!   header unchanged, and saw an `Authenticated` extension for that org, method `ApiKey`,
//!   and the org's current generation;
//! - rejected: status 401, inner service not called, `WWW-Authenticate` is the layer's
//!   challenge, `Content-Type: application/json`, `Cache-Control: no-store`, the body is the
//!   JSON `{"code":"AUTHENTICATION_FAILED","message":...}` for the reason, the `Rejection`
//!   extension carries the reason the model predicts (so the body, being fixed per reason,
//!   never reflects the presented key or org);
//! - nothing panics, and the response future is ready at the first poll.
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use libfuzzer_sys::fuzz_target;
use orgkey::auth::AuthMethod;
use orgkey::{
    Actor, ApiKey, Authenticated, Generation, KeyAdmin, OrgId, OrgKeyLayer, OrgTable, Rejection,
    RejectionReason,
};
use tower::{Service, ServiceBuilder};

const ORG_HEADER: &str = "x-org-id";
const KEY_HEADER: &str = "x-api-key";

/// What the model knows about one org.
#[derive(Debug, Clone)]
struct OrgModel {
    subscribed: bool,
    key: Option<String>,
    generation: Generation,
}

struct Fixture {
    table: OrgTable,
    orgs: HashMap<String, OrgModel>,
}

/// Polls a future that must complete without ever waiting (everything here is in memory).
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..16 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    panic!("future still pending after 16 polls: nothing here should wait");
}

/// The table, built once for the whole fuzzing session.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let admin = KeyAdmin::new(OrgTable::default());
        let ops = Actor::new("fuzz@orgkey.example").expect("actor");
        let org = |id: &str| OrgId::new(id).expect("org id");
        let key = |k: &str| ApiKey::parse(k).expect("fixture key");

        // acme: subscribed, known key.
        ready(admin.create_org(&org("acme"))).expect("create");
        ready(admin.subscribe(&org("acme"), &ops)).expect("subscribe");
        ready(admin.edit(&org("acme"), key("AbCdEf123456"), &ops)).expect("edit");

        // beta-corp: subscribed, known key.
        ready(admin.create_org(&org("beta-corp"))).expect("create");
        ready(admin.subscribe(&org("beta-corp"), &ops)).expect("subscribe");
        ready(admin.edit(&org("beta-corp"), key("ZyXw98765432"), &ops)).expect("edit");

        // shared.co: subscribed, the same key value as acme (K4 allows it).
        ready(admin.create_org(&org("shared.co"))).expect("create");
        ready(admin.subscribe(&org("shared.co"), &ops)).expect("subscribe");
        ready(admin.edit(&org("shared.co"), key("AbCdEf123456"), &ops)).expect("edit");

        // gamma: had key Gamma0000001, then unsubscribed (K8: the key goes with it).
        ready(admin.create_org(&org("gamma"))).expect("create");
        ready(admin.subscribe(&org("gamma"), &ops)).expect("subscribe");
        ready(admin.edit(&org("gamma"), key("Gamma0000001"), &ops)).expect("edit");
        ready(admin.unsubscribe(&org("gamma"), &ops)).expect("unsubscribe");

        // delta_ops: subscribed, had key Delta0000002, key deleted (K5).
        ready(admin.create_org(&org("delta_ops"))).expect("create");
        ready(admin.subscribe(&org("delta_ops"), &ops)).expect("subscribe");
        ready(admin.edit(&org("delta_ops"), key("Delta0000002"), &ops)).expect("edit");
        ready(admin.delete(&org("delta_ops"), &ops)).expect("delete");

        // epsilon: created, never subscribed.
        ready(admin.create_org(&org("epsilon"))).expect("create");

        // zeta: subscribed with a random key, then regenerated (old key dead, K6).
        ready(admin.create_org(&org("zeta"))).expect("create");
        ready(admin.subscribe(&org("zeta"), &ops)).expect("subscribe");
        ready(admin.regenerate(&org("zeta"), &ops)).expect("regenerate");

        let table = admin.table().clone();
        let mut orgs = HashMap::new();
        for id in [
            "acme",
            "beta-corp",
            "shared.co",
            "gamma",
            "delta_ops",
            "epsilon",
            "zeta",
        ] {
            let state = table.state(id).expect("org in table");
            orgs.insert(
                id.to_owned(),
                OrgModel {
                    subscribed: state.is_subscribed(),
                    key: state.key().map(|k| k.expose_secret().to_owned()),
                    generation: state.generation(),
                },
            );
        }
        // The fixture is what the comments above say.
        let m = |id: &str| orgs[id].clone();
        assert_eq!(m("acme").key.as_deref(), Some("AbCdEf123456"));
        assert_eq!(m("beta-corp").key.as_deref(), Some("ZyXw98765432"));
        assert_eq!(m("shared.co").key.as_deref(), Some("AbCdEf123456"));
        assert!(!m("gamma").subscribed && m("gamma").key.is_none());
        assert!(m("delta_ops").subscribed && m("delta_ops").key.is_none());
        assert!(!m("epsilon").subscribed && m("epsilon").key.is_none());
        assert!(m("zeta").subscribed && m("zeta").key.is_some());
        Fixture { table, orgs }
    })
}

/// What the inner service saw.
#[derive(Debug, Default)]
struct Seen {
    calls: usize,
    headers: Option<HeaderMap>,
    auth: Option<Authenticated>,
}

/// The fuzz input as a request: first line the URI, then `name:value` lines.
fn decode(data: &[u8]) -> (Uri, Vec<(HeaderName, HeaderValue)>) {
    let mut lines = data.split(|&b| b == b'\n');
    let uri = lines
        .next()
        .and_then(|line| Uri::try_from(line).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let headers = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = HeaderName::from_bytes(&line[..colon]).ok()?;
            let value = HeaderValue::from_bytes(&line[colon + 1..]).ok()?;
            Some((name, value))
        })
        .collect();
    (uri, headers)
}

/// Independent re-statement of "the query string seems to carry a key": a parameter whose
/// name, percent-decoded (`+` as a space) and with `-`, `_` and `.` ignored in any case, is
/// `apikey`, `key` or the key header's `xapikey`.
fn model_query_has_key(uri: &Uri) -> bool {
    fn decoded(name: &str) -> Vec<u8> {
        let bytes = name.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
            }
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
        out
    }
    uri.query().is_some_and(|q| {
        q.split('&').any(|pair| {
            let raw = decoded(pair.split('=').next().unwrap_or(""));
            let name: String = String::from_utf8_lossy(&raw)
                .chars()
                .filter(|c| !matches!(c, '-' | '_' | '.'))
                .map(|c| c.to_ascii_lowercase())
                .collect();
            matches!(name.as_str(), "apikey" | "key" | "xapikey")
        })
    })
}

/// The model: `Ok(org)` to accept, or the reason to reject.
fn model(
    fixture: &Fixture,
    uri: &Uri,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<String, RejectionReason> {
    let values = |name: &str| -> Vec<&HeaderValue> {
        headers
            .iter()
            .filter(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
            .collect()
    };
    let orgs = values(ORG_HEADER);
    let keys = values(KEY_HEADER);
    let org = match orgs.as_slice() {
        [one]
            if one
                .as_bytes()
                .iter()
                .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t') =>
        {
            // `HeaderValue::to_str` accepts visible ASCII, space and tab.
            std::str::from_utf8(one.as_bytes())
                .expect("ascii")
                .to_owned()
        }
        _ => return Err(RejectionReason::MissingOrg),
    };
    let key = match keys.as_slice() {
        [one] => one.as_bytes(),
        [] if model_query_has_key(uri) => return Err(RejectionReason::KeyInQuery),
        [] => return Err(RejectionReason::MissingKey),
        _ => return Err(RejectionReason::MalformedKey),
    };
    if key.len() != 12 || !key.iter().all(u8::is_ascii_alphanumeric) {
        return Err(RejectionReason::MalformedKey);
    }
    let Some(state) = fixture.orgs.get(&org) else {
        return Err(RejectionReason::UnknownOrg);
    };
    if !state.subscribed {
        return Err(RejectionReason::NoSubscription);
    }
    let Some(current) = &state.key else {
        return Err(RejectionReason::NoKey);
    };
    if current.as_bytes() == key {
        Ok(org)
    } else {
        Err(RejectionReason::WrongKey)
    }
}

fn expected_message(reason: RejectionReason) -> &'static str {
    match reason {
        RejectionReason::MissingOrg => "organization not specified",
        RejectionReason::MissingKey | RejectionReason::KeyInQuery => {
            "API key required in the request header"
        }
        RejectionReason::MalformedKey => "API key malformed",
        _ => "invalid credentials",
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let (uri, headers) = decode(data);
    let expected = model(fixture, &uri, &headers);

    let mut request = Request::builder()
        .uri(uri.clone())
        .body(Empty::<Bytes>::new())
        .expect("request from a valid Uri");
    for (name, value) in &headers {
        request.headers_mut().append(name.clone(), value.clone());
    }
    let sent_headers = request.headers().clone();

    let seen = Rc::new(RefCell::new(Seen::default()));
    let recorder = Rc::clone(&seen);
    let mut service = ServiceBuilder::new()
        .layer(OrgKeyLayer::new(fixture.table.clone()))
        .service_fn(move |request: Request<Empty<Bytes>>| {
            let mut seen = recorder.borrow_mut();
            seen.calls += 1;
            seen.headers = Some(request.headers().clone());
            seen.auth = request.extensions().get::<Authenticated>().cloned();
            std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
        });

    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(
        Service::<Request<Empty<Bytes>>>::poll_ready(&mut service, &mut cx),
        Poll::Ready(Ok(()))
    ));
    let mut future = pin!(service.call(request));
    let response = match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("response future pending with a ready inner service"),
    };
    let status = response.status();
    let (parts, body) = response.into_parts();
    let body = ready(body.collect())
        .expect("body is infallible")
        .to_bytes();
    let seen = seen.borrow();

    match expected {
        Ok(org) => {
            assert!(
                status.is_success(),
                "model accepts org {org:?} but the layer answered {status} ({:?})",
                parts.extensions.get::<Rejection>()
            );
            assert_eq!(seen.calls, 1, "inner service not called exactly once");
            let inner_headers = seen.headers.as_ref().expect("recorded headers");
            assert!(
                !inner_headers.contains_key(KEY_HEADER),
                "inner service saw the API key header (L2)"
            );
            let mut without_key = sent_headers.clone();
            without_key.remove(KEY_HEADER);
            assert_eq!(
                inner_headers, &without_key,
                "inner service saw other headers changed"
            );
            let auth = seen
                .auth
                .as_ref()
                .expect("inner service saw no Authenticated");
            assert_eq!(auth.org(), org, "Authenticated names the wrong org");
            assert_eq!(auth.method(), &AuthMethod::ApiKey);
            assert_eq!(auth.generation(), fixture.orgs[&org].generation);
            assert!(parts.extensions.get::<Rejection>().is_none());
            assert!(body.is_empty(), "inner body was replaced");
        }
        Err(reason) => {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "model rejects ({reason}) but the layer answered {status}"
            );
            assert_eq!(seen.calls, 0, "inner service called on a rejected request");
            let rejection = parts
                .extensions
                .get::<Rejection>()
                .expect("rejection response carries a Rejection");
            assert_eq!(rejection.reason(), reason, "wrong rejection reason");
            assert_eq!(rejection.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                parts
                    .headers
                    .get(WWW_AUTHENTICATE)
                    .map(HeaderValue::as_bytes),
                Some(&br#"ApiKey realm="orgkey", header="x-api-key""#[..]),
                "WWW-Authenticate missing or wrong"
            );
            assert_eq!(
                parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
                Some(&b"application/json"[..])
            );
            assert_eq!(
                parts.headers.get(CACHE_CONTROL).map(HeaderValue::as_bytes),
                Some(&b"no-store"[..])
            );
            let expected_body = format!(
                r#"{{"code":"AUTHENTICATION_FAILED","message":"{}"}}"#,
                expected_message(reason)
            );
            // Exact equality with a fixed body also proves that nothing attacker-controlled
            // (the presented key or org) is reflected to the client.
            assert_eq!(&body[..], expected_body.as_bytes(), "rejection body");
            assert!(
                body.starts_with(br#"{"code":""#),
                "body is not JSON with a code"
            );
        }
    }
});
