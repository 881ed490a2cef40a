//! The key-management endpoints (PROTOCOL.md, "Key management endpoints"; K2-K9) through the
//! real stack: `OrgKeyLayer::with_sessions` in front of `KeyManagementEndpoint`, with admins
//! logged in through `SessionEndpoint`.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use orgkey::auth::OrgKeyAuth;
use orgkey::clock::Clock;
use orgkey::{
    Authenticated, Generation, KeyAdmin, KeyManagementEndpoint, OrgKeyLayer, Password, Scopes,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower::{Service, ServiceExt};

const BASE: &str = "/api/v1/apiKeys";
/// A valid key other than KEY.
const OTHER_KEY: &str = "Zx9Qw8Er7Ty6";

/// How a request authenticates to the layer.
#[derive(Clone, Copy)]
enum Cred<'a> {
    Session(&'a str),
    Key(&'a str),
    Nothing,
}

fn request(
    method: Method,
    path: &str,
    cred: Cred<'_>,
    json_body: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path);
    builder = match cred {
        Cred::Session(id) => builder.header("cookie", format!("JSESSIONID={id}")),
        Cred::Key(key) => builder.header("x-org-id", "acme").header("x-api-key", key),
        Cred::Nothing => builder,
    };
    match json_body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
        None => builder.body(Full::default()).unwrap(),
    }
}

/// The stack under test: the layer with sessions, then the endpoint over `keys`.
fn stack_over(w: &World, keys: KeyAdmin) -> OrgKeyAuth<KeyManagementEndpoint> {
    tower::ServiceBuilder::new()
        .layer(OrgKeyLayer::new(w.keys.table().clone()).with_sessions(w.sessions.clone()))
        .service(KeyManagementEndpoint::new(keys))
}

async fn send(w: &World, request: Request<Full<Bytes>>) -> Answer {
    answer(
        stack_over(w, w.keys.clone())
            .oneshot(request)
            .await
            .unwrap(),
    )
    .await
}

async fn call(w: &World, method: Method, path: &str, cred: Cred<'_>) -> Answer {
    send(w, request(method, path, cred, None)).await
}

async fn put_key(w: &World, id: &str, body: impl AsRef<[u8]>) -> Answer {
    let request = Request::put(format!("{BASE}/1"))
        .header("cookie", format!("JSESSIONID={id}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_ref())))
        .unwrap();
    send(w, request).await
}

/// The bare endpoint (no layer) for a request that carries `auth`, as the layer would give it.
async fn send_bare(
    w: &World,
    mut request: Request<Full<Bytes>>,
    auth: Option<&Authenticated>,
) -> Answer {
    if let Some(auth) = auth {
        request.extensions_mut().insert(auth.clone());
    }
    answer(
        KeyManagementEndpoint::new(w.keys.clone())
            .oneshot(request)
            .await
            .unwrap(),
    )
    .await
}

/// The `Authenticated` the layer gives the inner service for a live session.
async fn authenticated_for(w: &World, id: &str) -> Authenticated {
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(OrgKeyLayer::new(w.keys.table().clone()).with_sessions(w.sessions.clone()))
        .service_fn(move |request: Request<Full<Bytes>>| {
            let sink = sink.clone();
            async move {
                *sink.lock().unwrap() = request.extensions().get::<Authenticated>().cloned();
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }
        });
    svc.oneshot(request(Method::GET, "/", Cred::Session(id), None))
        .await
        .unwrap();
    let auth = seen.lock().unwrap().take();
    auth.expect("the session is live")
}

/// Logs `username` in with `key` (and PASSWORD) at the clock's time.
async fn login_with_key(w: &World, username: &str, key: &str) -> Answer {
    let ts = w.clock.now_ms();
    call_endpoint(
        &w.sessions,
        post_json(login_body(username, PASSWORD, key, ts)),
    )
    .await
}

async fn alice_session(w: &World) -> String {
    let a = login(w, "alice@acme.example").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    a.session_id()
}

fn generation(w: &World) -> Generation {
    w.keys.view(&org("acme")).unwrap().generation()
}

fn current_key(w: &World) -> Option<String> {
    w.keys
        .view(&org("acme"))
        .unwrap()
        .key()
        .map(|k| k.expose_secret().to_owned())
}

/// The `lastModifiedBy.id` documented for a name.
fn modifier_id(name: &str) -> u64 {
    let d = Sha256::digest(name.as_bytes());
    u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff)
}

fn assert_json_headers(a: &Answer) {
    assert_eq!(a.headers["content-type"], "application/json", "{}", a.body);
    assert_eq!(a.headers["cache-control"], "no-store", "{}", a.body);
}

fn assert_error(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_json_headers(a);
    let body = a.json();
    assert_eq!(body["code"], code, "{}", a.body);
    assert!(body["message"].is_string(), "{}", a.body);
}

/// Checks the resource shape and returns its key value.
fn assert_resource(resource: &Value, modifier: &str, modified_at_secs: u64) -> String {
    let object = resource.as_object().unwrap();
    let mut fields: Vec<_> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "enabled",
            "id",
            "keyValue",
            "lastModifiedBy",
            "lastModifiedTime",
            "permissions"
        ]
    );
    assert_eq!(resource["id"], 1);
    assert_eq!(resource["permissions"], json!([]));
    assert_eq!(resource["enabled"], true);
    assert_eq!(resource["lastModifiedTime"], modified_at_secs);
    assert_eq!(
        resource["lastModifiedBy"],
        json!({"id": modifier_id(modifier), "name": modifier})
    );
    let key = resource["keyValue"].as_str().unwrap().to_owned();
    assert_eq!(key.len(), 12);
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()));
    key
}

fn now_secs(w: &World) -> u64 {
    w.clock.now_ms() / 1000
}

/// Every change path the endpoint has, for "nothing changed" checks.
fn every_operation() -> Vec<(Method, String, Option<String>)> {
    vec![
        (Method::GET, BASE.to_owned(), None),
        (Method::POST, BASE.to_owned(), None),
        (Method::GET, format!("{BASE}/1"), None),
        (
            Method::PUT,
            format!("{BASE}/1"),
            Some(json!({ "keyValue": OTHER_KEY }).to_string()),
        ),
        (Method::POST, format!("{BASE}/1/regenerate"), None),
        (Method::DELETE, format!("{BASE}/1"), None),
    ]
}

#[tokio::test]
async fn list_and_view_answer_the_one_key_as_a_resource_with_id_1() {
    let w = world().await;
    let id = alice_session(&w).await;

    let list = call(&w, Method::GET, BASE, Cred::Session(&id)).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_json_headers(&list);
    let entries = list.json();
    assert_eq!(entries.as_array().unwrap().len(), 1, "{}", list.body);
    // The fixture's key was set by ops@example.com at T0.
    let key = assert_resource(&entries[0], "ops@example.com", T0_MS / 1000);
    assert_eq!(key, KEY);

    let one = call(&w, Method::GET, &format!("{BASE}/1"), Cred::Session(&id)).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert_json_headers(&one);
    assert_eq!(one.json(), entries[0]);

    // Viewing changes nothing: the session lives on.
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

#[tokio::test]
async fn adding_while_a_key_exists_is_409_duplicate_item_and_changes_nothing() {
    let w = world().await;
    let id = alice_session(&w).await;
    let before = generation(&w);

    let a = call(&w, Method::POST, BASE, Cred::Session(&id)).await;
    assert_error(&a, StatusCode::CONFLICT, "DUPLICATE_ITEM");
    assert_eq!(
        a.json()["message"],
        "an API key already exists: delete the existing key first"
    );
    assert_eq!(generation(&w), before);
    assert_eq!(current_key(&w).as_deref(), Some(KEY));
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

/// K3, K6, K7: the answer carries the new key and names the admin; the old key and the session
/// that asked are dead once the answer is out.
#[tokio::test]
async fn regenerate_answers_the_new_key_names_the_admin_and_kills_the_old_key_and_the_session() {
    let w = world().await;
    let id = alice_session(&w).await;
    w.clock.advance(Duration::from_secs(90));

    let a = call(
        &w,
        Method::POST,
        &format!("{BASE}/1/regenerate"),
        Cred::Session(&id),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_json_headers(&a);
    let new_key = assert_resource(&a.json(), "alice@acme.example", now_secs(&w));
    assert_ne!(new_key, KEY);
    assert_eq!(current_key(&w).as_deref(), Some(new_key.as_str()));

    // The old key is rejected by the layer (direct key mode), the new one accepted.
    let old = call(&w, Method::GET, "/api/v1/status", Cred::Key(KEY)).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED, "{}", old.body);
    let fresh = call(&w, Method::GET, BASE, Cred::Key(&new_key)).await;
    assert_error(&fresh, StatusCode::FORBIDDEN, "NOT_AUTHORIZED");

    // The session that regenerated is dead; a login with the new key works.
    let dead = call(&w, Method::GET, BASE, Cred::Session(&id)).await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");
    let again = login_with_key(&w, "alice@acme.example", &new_key).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let list = call(&w, Method::GET, BASE, Cred::Session(&again.session_id())).await;
    assert_eq!(
        list.json()[0],
        a.json(),
        "GET shows what regenerate answered"
    );
}

/// K4, K6: edit sets the chosen key; the response still reaches the session that made the
/// change, whose next request gets 401.
#[tokio::test]
async fn edit_sets_the_chosen_key_answers_it_and_ends_the_session_that_made_it() {
    let w = world().await;
    let id = alice_session(&w).await;

    let a = put_key(
        &w,
        &id,
        &json!({"keyValue": OTHER_KEY, "note": "ignored"}).to_string(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_json_headers(&a);
    let key = assert_resource(&a.json(), "alice@acme.example", now_secs(&w));
    assert_eq!(key, OTHER_KEY);
    assert_eq!(current_key(&w).as_deref(), Some(OTHER_KEY));

    let next = call(&w, Method::GET, BASE, Cred::Session(&id)).await;
    assert_error(&next, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");
    assert_eq!(
        call(&w, Method::GET, "/", Cred::Key(KEY)).await.status,
        StatusCode::UNAUTHORIZED,
        "the old key is dead"
    );
    assert_eq!(
        login_with_key(&w, "alice@acme.example", OTHER_KEY)
            .await
            .status,
        StatusCode::OK
    );
}

/// K1: a malformed value is refused with the format error's message, which never contains the
/// value; the key, the generation and the session are untouched.
#[tokio::test]
async fn edit_with_an_invalid_value_is_400_changes_nothing_and_never_echoes_the_value() {
    let w = world().await;
    let id = alice_session(&w).await;
    let before = generation(&w);
    for (value, message) in [
        ("Short9", "api key must be exactly 12 characters, got 6"),
        (
            "Secret9Value1X",
            "api key must be exactly 12 characters, got 14",
        ),
        (
            "Secret-Value",
            "api key may contain only ASCII letters and digits (offending character at position 6)",
        ),
        ("", "api key must be exactly 12 characters, got 0"),
        // Issue 9, item 10: characters are counted, not bytes.
        (
            "ABCDEFGHIJKé",
            "api key may contain only ASCII letters and digits (offending character at position 11)",
        ),
        ("ÄbcdefGHIJK", "api key must be exactly 12 characters, got 11"),
    ] {
        let a = put_key(&w, &id, &json!({ "keyValue": value }).to_string()).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "INVALID_INPUT_ARGUMENT");
        assert_eq!(a.json()["message"], message, "{value}");
        if !value.is_empty() {
            assert!(!a.body.contains(value), "the value is echoed: {}", a.body);
        }
        assert_eq!(generation(&w), before, "{value}");
        assert_eq!(current_key(&w).as_deref(), Some(KEY), "{value}");
    }
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

#[tokio::test]
async fn edit_bodies_not_json_too_large_or_malformed_are_refused_and_change_nothing() {
    let w = world().await;
    let id = alice_session(&w).await;
    let before = generation(&w);
    let good = json!({ "keyValue": OTHER_KEY }).to_string();
    let path = format!("{BASE}/1");

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut builder = Request::put(&path).header("cookie", format!("JSESSIONID={id}"));
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        let a = send(
            &w,
            builder.body(Full::new(Bytes::from(good.clone()))).unwrap(),
        )
        .await;
        assert_error(
            &a,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        );
        assert!(!a.body.contains(OTHER_KEY));
    }

    let huge = json!({ "keyValue": OTHER_KEY, "pad": "x".repeat(5000) }).to_string();
    let a = put_key(&w, &id, &huge).await;
    assert_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");

    let malformed: &[(&[u8], &str)] = &[
        (b"{not json", "syntax"),
        (b"", "empty"),
        (br#"{"keyValue":"Zx9Qw8Er7Ty6""#, "truncated"),
        (b"{}", "no keyValue"),
        (br#"{"keyvalue":"Zx9Qw8Er7Ty6"}"#, "wrong case"),
        (br#"{"keyValue":null}"#, "null"),
        (br#"{"keyValue":123456789012}"#, "number"),
        (br#"["Zx9Qw8Er7Ty6"]"#, "array"),
        (br#""Zx9Qw8Er7Ty6""#, "bare string"),
        (br#"{"keyValue":["Zx9Qw8Er7Ty6"]}"#, "keyValue in an array"),
        (
            b"{\"keyValue\":\"Zx9Qw8Er7Ty6\",\"x\":\"\xff\"}",
            "invalid UTF-8 elsewhere",
        ),
        (
            b"{\"keyValue\":\"Zx9Qw8Er7Ty6\",\"x\":\"\\ud800\"}",
            "lone surrogate",
        ),
        (
            b"{\"keyValue\":\"Zx9Qw8Er7Ty6\"} trailing",
            "trailing characters",
        ),
    ];
    for &(body, what) in malformed {
        let a = put_key(&w, &id, body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{what}: {}", a.body);
        assert_error(&a, StatusCode::BAD_REQUEST, "INVALID_INPUT_ARGUMENT");
        assert!(!a.body.contains(OTHER_KEY), "{what}: {}", a.body);
    }
    assert_eq!(generation(&w), before);
    assert_eq!(current_key(&w).as_deref(), Some(KEY));
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);

    // A charset parameter is fine.
    let a = send(
        &w,
        Request::put(&path)
            .header("cookie", format!("JSESSIONID={id}"))
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(good)))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

/// K5: delete answers 204 and ends every session; with no key no one can log in or use a key,
/// so what follows is shown on the endpoint itself, for a request the layer accepted before
/// the delete: the list is empty, the item and its changes are 404, and add works.
#[tokio::test]
async fn delete_answers_204_and_ends_every_session_including_its_own() {
    let w = world().await;
    let id = alice_session(&w).await;
    let auth = authenticated_for(&w, &id).await;

    let a = call(&w, Method::DELETE, &format!("{BASE}/1"), Cred::Session(&id)).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    assert!(a.body.is_empty());
    assert_eq!(a.headers["cache-control"], "no-store");
    assert!(
        !a.headers.contains_key("set-cookie"),
        "no carry-over unless configured"
    );
    assert_eq!(current_key(&w), None);
    assert_error(
        &call(&w, Method::GET, BASE, Cred::Session(&id)).await,
        StatusCode::UNAUTHORIZED,
        "SESSION_NOT_VALID",
    );
    assert_eq!(
        login(&w, "alice@acme.example").await.status,
        StatusCode::UNAUTHORIZED
    );

    // What the session was checked against is gone: a change it asks for, even if it
    // reached the endpoint, is a conflict and changes nothing.
    let before = generation(&w);
    let list = send_bare(
        &w,
        request(Method::GET, BASE, Cred::Nothing, None),
        Some(&auth),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_json_headers(&list);
    assert_eq!(list.json(), json!([]), "{}", list.body);
    let stale = send_bare(
        &w,
        request(Method::POST, BASE, Cred::Nothing, None),
        Some(&auth),
    )
    .await;
    assert_error(&stale, StatusCode::CONFLICT, "EDIT_CONFLICT");
    assert_eq!(generation(&w), before);
    assert_eq!(current_key(&w), None);
}

/// The gateway's composition: carry-over on the endpoint, keyless sessions allowed on the
/// layer in front of it only.
fn carrying_stack(
    w: &World,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<orgkey::auth::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(
            OrgKeyLayer::new(w.keys.table().clone())
                .with_sessions(w.sessions.clone())
                .allow_keyless_sessions(),
        )
        .service(KeyManagementEndpoint::new(w.keys.clone()).with_sessions(w.sessions.clone()))
}

async fn carry_call(w: &World, method: Method, path: &str, id: &str) -> Answer {
    answer(
        carrying_stack(w)
            .oneshot(request(method, path, Cred::Session(id), None))
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_carried_over_session_survives_its_own_changes_and_no_other_does() {
    let w = world().await;
    let alice = alice_session(&w).await;
    // A second session of the same admin: it is not the acting one, so it ends.
    let other = alice_session(&w).await;

    let a = carry_call(&w, Method::POST, &format!("{BASE}/1/regenerate"), &alice).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let cookie = a.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.ends_with("; Path=/; HttpOnly; SameSite=Strict"),
        "{cookie}"
    );
    let successor = a.session_id();
    assert_ne!(successor, alice);
    let new_key = a.json()["keyValue"].as_str().unwrap().to_owned();

    for dead in [&alice, &other] {
        assert_error(
            &carry_call(&w, Method::GET, BASE, dead).await,
            StatusCode::UNAUTHORIZED,
            "SESSION_NOT_VALID",
        );
    }
    let listed = carry_call(&w, Method::GET, BASE, &successor).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    assert_eq!(listed.json()[0]["keyValue"], new_key.as_str());
    assert!(
        !listed.headers.contains_key("set-cookie"),
        "reads carry nothing over"
    );
    // The old key no longer works, the new one does (K6).
    assert_eq!(
        call(&w, Method::GET, BASE, Cred::Key(KEY)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&w, Method::GET, BASE, Cred::Key(&new_key))
            .await
            .status,
        StatusCode::FORBIDDEN,
        "authenticated, but keys are managed by sessions"
    );

    // Edit, then the carried session carries on again.
    let edit = answer(
        carrying_stack(&w)
            .oneshot(request(
                Method::PUT,
                &format!("{BASE}/1"),
                Cred::Session(&successor),
                Some(&json!({ "keyValue": OTHER_KEY }).to_string()),
            ))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(edit.status, StatusCode::OK, "{}", edit.body);
    let third = edit.session_id();
    assert_eq!(current_key(&w).as_deref(), Some(OTHER_KEY));
    assert_eq!(
        carry_call(&w, Method::GET, BASE, &third).await.status,
        StatusCode::OK
    );
    assert_eq!(
        carry_call(&w, Method::GET, BASE, &successor).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn after_a_delete_the_carried_session_can_add_a_key_but_nothing_else_is_let_in() {
    let w = world().await;
    let alice = alice_session(&w).await;
    let a = carry_call(&w, Method::DELETE, &format!("{BASE}/1"), &alice).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    let keyless = a.session_id();
    assert_eq!(current_key(&w), None);

    // K5 everywhere but key management: the default layer refuses the keyless session.
    let elsewhere = send_protected(
        &w,
        Request::get("/api/v1/status")
            .header("cookie", format!("JSESSIONID={keyless}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(
        elsewhere.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        elsewhere.body
    );
    assert_eq!(
        login(&w, "alice@acme.example").await.status,
        StatusCode::UNAUTHORIZED,
        "no login without a key"
    );
    // The session probe of ZIA clients says it is not a live API session either.
    let probe = call_endpoint(
        &w.sessions,
        Request::get("/api/v1/authenticatedSession")
            .header("cookie", format!("JSESSIONID={keyless}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_error(&probe, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");

    // Key management: the list is empty, the item operations find nothing, add works.
    let list = carry_call(&w, Method::GET, BASE, &keyless).await;
    assert_eq!(list.json(), json!([]), "{}", list.body);
    let before = generation(&w);
    for (method, path, body) in every_operation() {
        if path == BASE {
            continue;
        }
        let a = answer(
            carrying_stack(&w)
                .oneshot(request(
                    method.clone(),
                    &path,
                    Cred::Session(&keyless),
                    body.as_deref(),
                ))
                .await
                .unwrap(),
        )
        .await;
        assert_error(&a, StatusCode::NOT_FOUND, "RESOURCE_NOT_FOUND");
        assert_eq!(generation(&w), before, "{method} {path}");
    }
    let added = carry_call(&w, Method::POST, BASE, &keyless).await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    let key = assert_resource(&added.json(), "alice@acme.example", now_secs(&w));
    assert_eq!(current_key(&w).as_deref(), Some(key.as_str()));
    let successor = added.session_id();
    assert_eq!(
        carry_call(&w, Method::GET, BASE, &keyless).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        carry_call(&w, Method::GET, BASE, &successor).await.status,
        StatusCode::OK
    );
    assert_eq!(
        login_with_key(&w, "alice@acme.example", &key).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_carried_over_session_keeps_the_original_absolute_lifetime() {
    let w = world().await;
    let alice = alice_session(&w).await;
    let lifetime = w.sessions.config().absolute_lifetime;
    let idle = w.sessions.config().idle_timeout;
    // Keep the session busy until just before its lifetime ends.
    let mut elapsed = Duration::ZERO;
    while elapsed + idle < lifetime {
        w.clock.advance(idle - Duration::from_secs(1));
        elapsed += idle - Duration::from_secs(1);
        assert_eq!(
            carry_call(&w, Method::GET, BASE, &alice).await.status,
            StatusCode::OK
        );
    }
    let a = carry_call(&w, Method::POST, &format!("{BASE}/1/regenerate"), &alice).await;
    let successor = a.session_id();
    w.clock.advance(lifetime - elapsed);
    let late = carry_call(&w, Method::GET, BASE, &successor).await;
    assert_error(&late, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");
}

#[tokio::test]
async fn requests_without_a_session_get_401_session_not_valid() {
    let w = world().await;
    // Through the layer: no credentials at all, and a cookie that names no session.
    for cred in [Cred::Nothing, Cred::Session("00ff")] {
        let a = call(&w, Method::GET, BASE, cred).await;
        assert_error(&a, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");
    }
    // The endpoint alone (mounted without the layer): refused, never served.
    let before = generation(&w);
    for (method, path, body) in every_operation() {
        let a = send_bare(
            &w,
            request(method.clone(), &path, Cred::Nothing, body.as_deref()),
            None,
        )
        .await;
        assert_error(&a, StatusCode::UNAUTHORIZED, "SESSION_NOT_VALID");
        assert!(!a.body.contains(KEY));
        assert!(
            a.headers.contains_key("www-authenticate"),
            "{method} {path}"
        );
    }
    assert_eq!(generation(&w), before);
}

#[tokio::test]
async fn sessions_without_key_admin_get_403_not_authorized_and_change_nothing() {
    let w = world().await;
    // bob has key-admin but not api, so he cannot log in at all; erin has api only.
    w.admins
        .create(
            &user("erin@acme.example"),
            &org("acme"),
            &Password::new(PASSWORD),
            Scopes::API,
        )
        .await
        .unwrap();
    let erin = login(&w, "erin@acme.example").await;
    assert_eq!(erin.status, StatusCode::OK, "{}", erin.body);
    let id = erin.session_id();
    let before = generation(&w);
    for (method, path, body) in every_operation() {
        let a = send(
            &w,
            request(method.clone(), &path, Cred::Session(&id), body.as_deref()),
        )
        .await;
        assert_error(&a, StatusCode::FORBIDDEN, "NOT_AUTHORIZED");
        assert!(!a.body.contains(KEY), "{method} {path}: {}", a.body);
        assert_eq!(generation(&w), before, "{method} {path}");
    }
    assert_eq!(current_key(&w).as_deref(), Some(KEY));
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

#[tokio::test]
async fn direct_key_requests_get_403_not_authorized_and_change_nothing() {
    let w = world().await;
    let before = generation(&w);
    for (method, path, body) in every_operation() {
        let a = send(
            &w,
            request(method.clone(), &path, Cred::Key(KEY), body.as_deref()),
        )
        .await;
        assert_error(&a, StatusCode::FORBIDDEN, "NOT_AUTHORIZED");
        assert!(!a.body.contains(KEY), "{method} {path}: {}", a.body);
        assert_eq!(generation(&w), before, "{method} {path}");
    }
    assert_eq!(current_key(&w).as_deref(), Some(KEY));
}

#[tokio::test]
async fn ids_other_than_1_and_unknown_paths_are_404_resource_not_found() {
    let w = world().await;
    let id = alice_session(&w).await;
    let before = generation(&w);
    for (method, path) in [
        (Method::GET, format!("{BASE}/2")),
        (Method::PUT, format!("{BASE}/2")),
        (Method::DELETE, format!("{BASE}/2")),
        (Method::POST, format!("{BASE}/2/regenerate")),
        (Method::GET, format!("{BASE}/0")),
        (Method::GET, format!("{BASE}/01")),
        (Method::GET, format!("{BASE}/abc")),
        (Method::GET, format!("{BASE}/1/")),
        (Method::GET, format!("{BASE}/1/other")),
        (Method::POST, format!("{BASE}/1/regenerate/again")),
        (Method::GET, "/api/v1/apiKeysX".to_owned()),
        (Method::GET, "/api/v1/status".to_owned()),
    ] {
        let a = send(
            &w,
            request(
                method.clone(),
                &path,
                Cred::Session(&id),
                Some(&json!({"keyValue": OTHER_KEY}).to_string()),
            ),
        )
        .await;
        assert_error(&a, StatusCode::NOT_FOUND, "RESOURCE_NOT_FOUND");
        assert_eq!(generation(&w), before, "{method} {path}");
    }
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_methods_on_known_paths_are_405_with_allow() {
    let w = world().await;
    let id = alice_session(&w).await;
    let before = generation(&w);
    for (method, path, allow) in [
        (Method::PUT, BASE.to_owned(), "GET, POST"),
        (Method::DELETE, BASE.to_owned(), "GET, POST"),
        (Method::PATCH, BASE.to_owned(), "GET, POST"),
        (Method::POST, format!("{BASE}/1"), "GET, PUT, DELETE"),
        (Method::PATCH, format!("{BASE}/1"), "GET, PUT, DELETE"),
        (Method::HEAD, format!("{BASE}/1"), "GET, PUT, DELETE"),
        (Method::GET, format!("{BASE}/1/regenerate"), "POST"),
        (Method::PUT, format!("{BASE}/1/regenerate"), "POST"),
    ] {
        let a = call(&w, method.clone(), &path, Cred::Session(&id)).await;
        assert_error(&a, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
        assert_eq!(a.headers["allow"], allow, "{method} {path}");
    }
    assert_eq!(generation(&w), before);
}

/// K8: an org whose subscription was removed has no key and no sessions; a request the layer
/// accepted before the removal gets 403 NOT_SUBSCRIBED for every operation.
#[tokio::test]
async fn an_org_without_subscription_gets_403_not_subscribed() {
    let w = world().await;
    let id = alice_session(&w).await;
    let auth = authenticated_for(&w, &id).await;
    w.keys.unsubscribe(&org("acme"), &w.ops).await.unwrap();
    let before = w.keys.table().state("acme").unwrap().generation();
    for (method, path, body) in every_operation() {
        let a = send_bare(
            &w,
            request(method.clone(), &path, Cred::Nothing, body.as_deref()),
            Some(&auth),
        )
        .await;
        assert_error(&a, StatusCode::FORBIDDEN, "NOT_SUBSCRIBED");
        assert_eq!(a.json()["message"], "no API subscription");
        assert_eq!(w.keys.table().state("acme").unwrap().generation(), before);
    }
    assert_error(
        &call(&w, Method::GET, BASE, Cred::Session(&id)).await,
        StatusCode::UNAUTHORIZED,
        "SESSION_NOT_VALID",
    );
}

/// A clock that holds every caller at a barrier: `KeyAdmin` reads it after loading the
/// snapshot and before its compare-and-swap, so two changes meeting there were built from the
/// same snapshot.
struct RendezvousClock(Barrier);

impl Clock for RendezvousClock {
    fn now(&self) -> SystemTime {
        self.0.wait();
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }
}

/// P1: two regenerates through the same session race; one answers 200, the other 409
/// EDIT_CONFLICT, and the key in force is the winner's.
#[tokio::test]
async fn a_change_that_loses_a_race_is_409_edit_conflict_and_changes_nothing() {
    let w = world().await;
    let id = alice_session(&w).await;
    let racing = KeyAdmin::new(w.keys.table().clone()).with_clock(RendezvousClock(Barrier::new(2)));
    let stack = stack_over(&w, racing);
    let before = generation(&w);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let stack = stack.clone();
            let request = request(
                Method::POST,
                &format!("{BASE}/1/regenerate"),
                Cred::Session(&id),
                None,
            );
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(async move { answer(stack.oneshot(request).await.unwrap()).await })
            })
        })
        .collect();
    let mut answers: Vec<Answer> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    answers.sort_by_key(|a| a.status);
    assert_eq!(answers[0].status, StatusCode::OK, "{}", answers[0].body);
    assert_error(&answers[1], StatusCode::CONFLICT, "EDIT_CONFLICT");
    let winner = answers[0].json()["keyValue"].as_str().unwrap().to_owned();
    assert_eq!(current_key(&w).as_deref(), Some(winner.as_str()));
    assert!(!answers[1].body.contains(&winner));
    assert_eq!(
        generation(&w).get(),
        before.get() + 1,
        "one change, not two"
    );
}

/// Mounted with axum's `nest_service` (the prefix is stripped), or below a router nested at
/// `/api/v1` (the endpoint sees `/apiKeys...`), the endpoint answers the same.
#[tokio::test]
async fn the_endpoint_works_nested_under_axum_and_below_the_base_url() {
    let w = world().await;
    let id = alice_session(&w).await;
    let svc = stack_over(&w, w.keys.clone());
    let nested = axum::Router::new().nest_service(BASE, svc.clone());
    let below_base = axum::Router::new().nest(
        "/api/v1",
        axum::Router::new()
            .route_service("/apiKeys", svc.clone())
            .route_service("/apiKeys/{*rest}", svc),
    );
    let direct = call(&w, Method::GET, BASE, Cred::Session(&id)).await;
    assert_eq!(direct.status, StatusCode::OK);
    for (name, app) in [
        ("nest_service", nested),
        ("nest + route_service", below_base),
    ] {
        for (method, path, status) in [
            (Method::GET, BASE.to_owned(), StatusCode::OK),
            (Method::GET, format!("{BASE}/1"), StatusCode::OK),
            (Method::GET, format!("{BASE}/2"), StatusCode::NOT_FOUND),
            (
                Method::GET,
                format!("{BASE}/1/regenerate"),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (Method::POST, BASE.to_owned(), StatusCode::CONFLICT),
        ] {
            let request = Request::builder()
                .method(method.clone())
                .uri(&path)
                .header("cookie", format!("JSESSIONID={id}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let a = answer(app.clone().oneshot(request).await.unwrap()).await;
            assert_eq!(a.status, status, "{name}: {method} {path}: {}", a.body);
            if path == BASE && method == Method::GET {
                assert_eq!(a.body, direct.body, "{name}");
            }
        }
        // Changes work there too (and end the session, so this is the last request).
    }
    let nested = axum::Router::new().nest_service(BASE, stack_over(&w, w.keys.clone()));
    let request = Request::post(format!("{BASE}/1/regenerate"))
        .header("cookie", format!("JSESSIONID={id}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let a = answer(nested.oneshot(request).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_resource(&a.json(), "alice@acme.example", now_secs(&w));
}
