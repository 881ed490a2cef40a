//! The ZIA login protocol (PROTOCOL.md), the login rules A1-A2 and session validity S1-S3,
//! through `SessionEndpoint` and `OrgKeyLayer::with_sessions`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use orgkey::{ApiKey, Authenticated, KeyError, Password, Scope, SessionConfig};

const SESSION_INFO: &str = r#"{"authType":"ADMIN_LOGIN","obfuscateApiKey":false,"passwordExpiryTime":0,"passwordExpiryDays":0}"#;

#[tokio::test]
async fn a_right_login_gets_200_session_info_and_a_cookie_clients_can_parse() {
    let w = world().await;
    let a = login(&w, "alice@acme.example").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, SESSION_INFO);
    assert_eq!(a.headers["content-type"], "application/json");
    let cookie = a.headers["set-cookie"].to_str().unwrap();
    // At least one attribute after the value (clients use `JSESSIONID=(.*?);`), no Secure on
    // a plain-http deployment.
    let id = a.session_id();
    assert_eq!(
        cookie,
        format!("JSESSIONID={id}; Path=/; HttpOnly; SameSite=Strict")
    );
    assert_eq!(id.len(), 64, "256 bits of randomness, hex");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // Usernames are case-insensitive.
    let b = login(&w, "Alice@ACME.example").await;
    assert_eq!(b.status, StatusCode::OK);
    assert_ne!(b.session_id(), id, "every login gets a fresh id");
}

#[tokio::test]
async fn the_timestamp_may_be_a_json_number_or_a_string_and_unknown_fields_are_ignored() {
    let w = world().await;
    let ts = w.clock.now_ms();
    let body = serde_json::json!({
        "apiKey": obfuscated(KEY, ts),
        "username": "alice@acme.example",
        "password": PASSWORD,
        "timestamp": ts.to_string(),
        "clientVersion": "9.9",
    })
    .to_string();
    let a = call_endpoint(&w.sessions, post_json(body)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

/// A2: every failure but the missing `api` scope gets the same 401, headers and body.
#[tokio::test]
async fn login_matrix_all_failures_but_the_scope_share_one_401() {
    let w = world().await;
    let ts = w.clock.now_ms();
    let window = 5 * 60 * 1000;
    let every_position_wrong: String = KEY
        .bytes()
        .map(|b| if b == b'z' { 'y' } else { 'z' })
        .collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "unknown user",
            login_body("mallory@acme.example", PASSWORD, KEY, ts),
        ),
        ("not a username", login_body("mallory", PASSWORD, KEY, ts)),
        (
            "wrong password",
            login_body("alice@acme.example", "WrongHorse12!", KEY, ts),
        ),
        (
            "key wrong at every position",
            login_body("alice@acme.example", PASSWORD, &every_position_wrong, ts),
        ),
        (
            "stale timestamp",
            login_body("alice@acme.example", PASSWORD, KEY, ts - window - 1000),
        ),
        (
            "future timestamp",
            login_body("alice@acme.example", PASSWORD, KEY, ts + window + 1000),
        ),
        (
            "org without subscription",
            login_body("carol@nosub.example", PASSWORD, KEY, ts),
        ),
        (
            "org whose key was deleted",
            login_body("dave@nokey.example", PASSWORD, KEY, ts),
        ),
    ];
    let mut answers = Vec::new();
    for (name, body) in cases {
        let a = call_endpoint(&w.sessions, post_json(body)).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{name}: {}", a.body);
        assert!(a.headers.get("set-cookie").is_none(), "{name}");
        answers.push((name, a));
    }
    // A disabled admin, with everything else right.
    w.admins.disable(&user("alice@acme.example")).await.unwrap();
    let disabled = login(&w, "alice@acme.example").await;
    assert_eq!(disabled.status, StatusCode::UNAUTHORIZED);
    answers.push(("disabled admin", disabled));

    let (_, first) = &answers[0];
    assert_eq!(
        first.json()["code"],
        "AUTHENTICATION_FAILED",
        "{}",
        first.body
    );
    for (name, a) in &answers[1..] {
        assert_eq!(a.body, first.body, "{name}");
        assert_eq!(a.headers, first.headers, "{name}");
    }

    // Right credentials but no `api` scope: 403, no cookie.
    let bob = login(&w, "bob@acme.example").await;
    assert_eq!(bob.status, StatusCode::FORBIDDEN);
    assert!(bob.headers.get("set-cookie").is_none());
    assert_eq!(bob.json()["code"], "NOT_AUTHORIZED");
}

#[tokio::test]
async fn timestamps_inside_the_window_are_accepted_on_both_sides() {
    let w = world().await;
    let now = w.clock.now_ms();
    for ts in [now - 5 * 60 * 1000 + 1000, now + 5 * 60 * 1000 - 1000] {
        let a = call_endpoint(
            &w.sessions,
            post_json(login_body("alice@acme.example", PASSWORD, KEY, ts)),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn malformed_requests_get_415_413_or_400_and_no_session() {
    let w = world().await;
    let ts = w.clock.now_ms();
    let good = login_body("alice@acme.example", PASSWORD, KEY, ts);

    let text = Request::post("/")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(good.clone())))
        .unwrap();
    assert_eq!(
        call_endpoint(&w.sessions, text).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let none = Request::post("/")
        .body(Full::new(Bytes::from(good.clone())))
        .unwrap();
    assert_eq!(
        call_endpoint(&w.sessions, none).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let charset = Request::post("/")
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(good)))
        .unwrap();
    assert_eq!(
        call_endpoint(&w.sessions, charset).await.status,
        StatusCode::OK
    );

    let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5000));
    assert_eq!(
        call_endpoint(&w.sessions, post_json(huge)).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    for (body, what) in [
        ("{not json", "syntax"),
        (r#"{"username":"alice@acme.example"}"#, "missing fields"),
        (
            r#"{"apiKey":"x","username":"a@b","password":"p","timestamp":-5}"#,
            "negative",
        ),
        (r#"["x","alice@acme.example","p",1]"#, "a top-level array"),
        (
            r#"{"apiKey":"x","username":"a@b","password":"p","timestamp":"12ab"}"#,
            "not digits",
        ),
    ] {
        let a = call_endpoint(&w.sessions, post_json(body)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{what}: {}", a.body);
        assert_eq!(a.json()["code"], "INVALID_INPUT_ARGUMENT");
        assert!(!a.body.contains("alice"), "input is not echoed: {}", a.body);
    }
    assert_eq!(w.sessions.len(), 1, "only the charset login made a session");
}

#[tokio::test]
async fn probe_and_logout_follow_the_protocol() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let probe = |id: Option<String>| {
        let mut request = Request::get("/api/v1/authenticatedSession");
        if let Some(id) = id {
            request = request.header("cookie", format!("other=1; JSESSIONID={id}"));
        }
        request.body(Full::default()).unwrap()
    };
    let live = call_endpoint(&w.sessions, probe(Some(id.clone()))).await;
    assert_eq!(
        (live.status, live.body.as_str()),
        (StatusCode::OK, SESSION_INFO)
    );
    let absent = call_endpoint(&w.sessions, probe(None)).await;
    assert_eq!(absent.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        absent.body,
        r#"{"code":"SESSION_NOT_VALID","message":"Session is not valid"}"#
    );

    // Logout with a JSON body and content type (one client sends `{}`).
    let logout = Request::delete("/api/v1/authenticatedSession")
        .header("cookie", format!("JSESSIONID={id}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let out = call_endpoint(&w.sessions, logout).await;
    assert_eq!(
        (out.status, out.body.as_str()),
        (StatusCode::OK, r#"{"status":"ACTIVE"}"#)
    );
    assert_eq!(out.headers["content-type"], "application/json");
    let dead = call_endpoint(&w.sessions, probe(Some(id.clone()))).await;
    assert_eq!(dead.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Logging out again, or without a session, still answers 200.
    let again = Request::delete("/api/v1/authenticatedSession")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        call_endpoint(&w.sessions, again).await.status,
        StatusCode::OK
    );
    let put = Request::put("/").body(Full::default()).unwrap();
    let put = call_endpoint(&w.sessions, put).await;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(put.headers["allow"], "POST, GET, DELETE");
}

#[tokio::test]
async fn the_layer_accepts_the_session_cookie_and_names_org_and_admin() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let a = get_with_cookie(&w, &id).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "acme alice@acme.example []")
    );
    // The session id never reaches the inner service (like the key header, L2); other
    // cookies do.
    let request = Request::get("/")
        .header("cookie", format!("theme=dark; JSESSIONID={id}; lang=en"))
        .header("cookie", "other=1")
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, request).await;
    assert_eq!(
        a.body,
        "acme alice@acme.example [theme=dark; lang=en | other=1]"
    );
    // Neither a cookie nor a key: a ZIA client is told its session is not valid.
    let nothing = Request::get("/").body(Full::default()).unwrap();
    let a = send_protected(&w, nothing).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["code"], "SESSION_NOT_VALID");
    // Two session cookies are ambiguous.
    let two = Request::get("/")
        .header("cookie", format!("JSESSIONID={id}; JSESSIONID={id}"))
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, two).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Direct keys still work beside sessions.
    let keyed = Request::get("/")
        .header("x-org-id", "acme")
        .header("x-api-key", KEY)
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, keyed).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "acme - []"));
    // Some clients also send Content-Type on GET; it changes nothing.
    let unknown = get_with_cookie(&w, &"0".repeat(64)).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.json()["code"], "SESSION_NOT_VALID");
    assert!(unknown.headers.contains_key("www-authenticate"));
    let garbage = get_with_cookie(&w, "not-an-id").await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_session_names_its_own_org_and_a_request_cannot_switch_it() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let request = Request::get("/")
        .header("cookie", format!("JSESSIONID={id}"))
        .header("x-org-id", "nokey")
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, request).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let same = Request::get("/")
        .header("cookie", format!("JSESSIONID={id}"))
        .header("x-org-id", "acme")
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, same).await;
    assert_eq!(a.status, StatusCode::OK);
}

/// S2 / K6: every key or subscription change of the org ends its sessions.
#[tokio::test]
async fn sessions_die_on_every_key_change_of_their_org() {
    let w = world().await;
    let acme = org("acme");
    type Change = fn(&World) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
    let changes: [(&str, Change); 5] = [
        ("regenerate", |w| {
            Box::pin(async {
                w.keys
                    .regenerate(&org("acme"), &w.ops)
                    .await
                    .map(drop)
                    .unwrap()
            })
        }),
        ("edit to the same value", |w| {
            Box::pin(async {
                let key = ApiKey::parse(KEY).unwrap();
                w.keys
                    .edit(&org("acme"), key, &w.ops)
                    .await
                    .map(drop)
                    .unwrap()
            })
        }),
        ("delete", |w| {
            Box::pin(async { w.keys.delete(&org("acme"), &w.ops).await.map(drop).unwrap() })
        }),
        ("unsubscribe", |w| {
            Box::pin(async {
                w.keys
                    .unsubscribe(&org("acme"), &w.ops)
                    .await
                    .map(drop)
                    .unwrap()
            })
        }),
        ("delete then add", |w| {
            Box::pin(async {
                w.keys.delete(&org("acme"), &w.ops).await.unwrap();
                w.keys.add(&org("acme"), &w.ops).await.map(drop).unwrap()
            })
        }),
    ];
    for (name, change) in changes {
        let id = login(&w, "alice@acme.example").await.session_id();
        assert_eq!(
            get_with_cookie(&w, &id).await.status,
            StatusCode::OK,
            "{name}"
        );
        change(&w).await;
        let after = get_with_cookie(&w, &id).await;
        assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(after.json()["code"], "SESSION_NOT_VALID", "{name}");
        // Restore the org to `KEY` for the next case.
        if w.keys.view(&acme).is_err() {
            w.keys.subscribe(&acme, &w.ops).await.unwrap();
        }
        if w.keys.view(&acme).unwrap().key().is_none() {
            w.keys.add(&acme, &w.ops).await.unwrap();
        }
        let key = ApiKey::parse(KEY).unwrap();
        w.keys.edit(&acme, key, &w.ops).await.unwrap();
    }
}

/// S2: sessions die when their admin is disabled, deleted, loses `api`, or changes password.
#[tokio::test]
async fn sessions_die_when_their_admin_changes() {
    let w = world().await;
    let alice = user("alice@acme.example");
    let check = |id: String| {
        let w = &w;
        async move { get_with_cookie(w, &id).await.status }
    };

    let id = login(&w, "alice@acme.example").await.session_id();
    w.admins.disable(&alice).await.unwrap();
    assert_eq!(check(id).await, StatusCode::UNAUTHORIZED, "disabled");
    w.admins.enable(&alice).await.unwrap();

    let id = login(&w, "alice@acme.example").await.session_id();
    w.admins.revoke(&alice, Scope::Api).await.unwrap();
    assert_eq!(
        check(id).await,
        StatusCode::UNAUTHORIZED,
        "api scope revoked"
    );
    w.admins.grant(&alice, Scope::Api).await.unwrap();

    let id = login(&w, "alice@acme.example").await.session_id();
    w.admins
        .change_password(&alice, &Password::new("AnotherHorse34!"))
        .await
        .unwrap();
    assert_eq!(
        check(id).await,
        StatusCode::UNAUTHORIZED,
        "password changed"
    );
    w.admins
        .change_password(&alice, &Password::new(PASSWORD))
        .await
        .unwrap();

    // Revoking key-admin does not end the session, but takes the scope away at once.
    let id = login(&w, "alice@acme.example").await.session_id();
    w.admins.revoke(&alice, Scope::KeyAdmin).await.unwrap();
    assert_eq!(check(id.clone()).await, StatusCode::OK, "key-admin revoked");

    w.admins.delete(&alice).await.unwrap();
    assert_eq!(check(id).await, StatusCode::UNAUTHORIZED, "deleted");
}

#[tokio::test]
async fn idle_sessions_expire_at_the_timeout_not_before() {
    let w = world().await;
    let idle = Duration::from_secs(5 * 60);
    let second = Duration::from_secs(1);

    let id = login(&w, "alice@acme.example").await.session_id();
    w.clock.advance(idle - second);
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::OK,
        "idle - 1 s"
    );
    // That use restarted the idle timer.
    w.clock.advance(idle - second);
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);

    w.clock.advance(idle + second);
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::UNAUTHORIZED,
        "idle + 1 s"
    );
}

#[tokio::test]
async fn busy_sessions_expire_at_the_absolute_lifetime_not_before() {
    let w = world().await;
    let lifetime = Duration::from_secs(8 * 3600);
    let step = Duration::from_secs(4 * 60);
    let second = Duration::from_secs(1);
    let start = w.clock.now_ms();
    let id = login(&w, "alice@acme.example").await.session_id();
    // Used every 4 minutes (never idle) until 1 s before the lifetime ends.
    let end_ms = start + lifetime.as_millis() as u64 - 1000;
    while w.clock.now_ms() + step.as_millis() as u64 <= end_ms {
        w.clock.advance(step);
        assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
    }
    let remaining = end_ms - w.clock.now_ms();
    w.clock.advance(Duration::from_millis(remaining));
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::OK,
        "lifetime - 1 s"
    );
    w.clock.advance(second + second);
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::UNAUTHORIZED,
        "lifetime + 1 s"
    );
}

#[tokio::test]
async fn expired_sessions_are_purged() {
    let w = world().await;
    for _ in 0..3 {
        login(&w, "alice@acme.example").await;
    }
    assert_eq!(w.sessions.len(), 3);
    w.clock.advance(Duration::from_secs(5 * 60));
    assert_eq!(w.sessions.purge_expired(), 3);
    assert!(w.sessions.is_empty());
}

#[tokio::test]
async fn the_cookie_is_secure_on_https_deployments_and_by_default() {
    for (config, secure) in [
        (
            SessionConfig::for_base_url("https://gw.example/api/v1"),
            true,
        ),
        (
            SessionConfig::for_base_url("HTTPS://gw.example/api/v1"),
            true,
        ),
        (
            SessionConfig::for_base_url("http://gw.example/api/v1"),
            false,
        ),
        (SessionConfig::default(), true),
    ] {
        let w = world_with(config).await;
        let a = login(&w, "alice@acme.example").await;
        let cookie = a.headers["set-cookie"].to_str().unwrap();
        assert_eq!(cookie.ends_with("; Secure"), secure, "{cookie}");
    }
}

/// The `Authenticated` the layer hands the inner service for `request`, if it passes.
async fn authenticated(w: &World, request: Request<Full<Bytes>>) -> Option<Authenticated> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sink = seen.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(orgkey::OrgKeyLayer::new(w.keys.table().clone()).with_sessions(w.sessions.clone()))
        .service_fn(move |request: Request<Full<Bytes>>| {
            let sink = sink.clone();
            async move {
                *sink.lock().unwrap() = request.extensions().get::<Authenticated>().cloned();
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::<Bytes>::default()))
            }
        });
    tower::ServiceExt::oneshot(svc, request).await.unwrap();
    let auth = seen.lock().unwrap().take();
    auth
}

/// The `Authenticated` of a live session id.
async fn authenticated_for(w: &World, id: &str) -> Authenticated {
    let request = Request::get("/")
        .header("cookie", format!("JSESSIONID={id}"))
        .body(Full::default())
        .unwrap();
    authenticated(w, request)
        .await
        .expect("the session is live")
}

/// Key management authorised by a key-admin session, recorded as made by that admin.
#[tokio::test]
async fn key_admin_sessions_manage_the_key_and_are_recorded_as_the_modifier() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let auth = authenticated_for(&w, &id).await;
    assert!(auth.has_scope(Scope::KeyAdmin));
    assert_eq!(auth.admin().unwrap().as_str(), "alice@acme.example");

    let scoped = w.keys.for_session(&auth).unwrap();
    assert_eq!(scoped.org().as_str(), "acme");
    let info = scoped.regenerate().await.unwrap();
    assert_eq!(
        info.last_modified_by().unwrap().as_str(),
        "alice@acme.example"
    );
    // The regenerate ended the very session that made it (K6): the admin logs in again.
    assert_eq!(
        get_with_cookie(&w, &id).await.status,
        StatusCode::UNAUTHORIZED
    );
    let new_key = info.key().unwrap().expose_secret().to_owned();

    // Without key-admin: forbidden.
    w.admins
        .revoke(&user("alice@acme.example"), Scope::KeyAdmin)
        .await
        .unwrap();
    let ts = w.clock.now_ms();
    let again = call_endpoint(
        &w.sessions,
        post_json(login_body("alice@acme.example", PASSWORD, &new_key, ts)),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let auth = authenticated_for(&w, &again.session_id()).await;
    assert!(!auth.has_scope(Scope::KeyAdmin));
    assert!(matches!(
        w.keys.for_session(&auth),
        Err(KeyError::Forbidden)
    ));
}

#[tokio::test]
async fn direct_key_requests_cannot_manage_keys() {
    let w = world().await;
    let request = Request::get("/")
        .header("x-org-id", "acme")
        .header("x-api-key", KEY)
        .body(Full::default())
        .unwrap();
    let auth = authenticated(&w, request).await.unwrap();
    assert!(auth.admin().is_none());
    assert!(matches!(
        w.keys.for_session(&auth),
        Err(KeyError::Forbidden)
    ));
}

/// Issue 9, item 9: a wrong password and an unknown user get the same answer (A2) but are
/// told apart in the login's reason, its log line and its metric, so that an operator can tell
/// a typo from user enumeration.
#[tokio::test]
async fn a_wrong_password_is_reported_internally_as_wrong_password_not_unknown_user() {
    use orgkey::session::{LoginFailure, LoginRequest};
    let w = world().await;
    let attempt = |username: &str, password: String| LoginRequest {
        api_key: Password::new(obfuscated(KEY, w.clock.now_ms())),
        username: username.to_owned(),
        password: Password::new(password),
        timestamp_ms: w.clock.now_ms(),
        source: None,
    };
    #[cfg(feature = "metrics")]
    let counted = |outcome: &str| -> u64 {
        let needle = format!("orgkey_logins_total{{outcome=\"{outcome}\"}} ");
        orgkey::metrics::render()
            .lines()
            .find_map(|line| line.strip_prefix(needle.as_str()))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    #[cfg(feature = "metrics")]
    let wrong_before = counted("wrong_password");

    let wrong = w
        .sessions
        .login(attempt("alice@acme.example", "WrongHorse12!".into()))
        .await;
    assert_eq!(wrong.err(), Some(LoginFailure::WrongPassword));
    let unknown = w
        .sessions
        .login(attempt("mallory@acme.example", PASSWORD.into()))
        .await;
    assert_eq!(unknown.err(), Some(LoginFailure::UnknownUser));
    let not_a_name = w.sessions.login(attempt("mallory", PASSWORD.into())).await;
    assert_eq!(not_a_name.err(), Some(LoginFailure::UnknownUser));
    // Too long to hash: still told apart by whether the admin exists.
    let long = "x".repeat(10_000);
    let too_long = w
        .sessions
        .login(attempt("alice@acme.example", long.clone()))
        .await;
    assert_eq!(too_long.err(), Some(LoginFailure::WrongPassword));
    let too_long_unknown = w
        .sessions
        .login(attempt("mallory@acme.example", long))
        .await;
    assert_eq!(too_long_unknown.err(), Some(LoginFailure::UnknownUser));
    #[cfg(feature = "metrics")]
    assert!(counted("wrong_password") >= wrong_before + 2);

    // Over HTTP both are the same 401 (A2), checked in full by the login matrix above.
    let a = call_endpoint(
        &w.sessions,
        post_json(login_body(
            "alice@acme.example",
            "WrongHorse12!",
            KEY,
            w.clock.now_ms(),
        )),
    )
    .await;
    let b = call_endpoint(
        &w.sessions,
        post_json(login_body(
            "mallory@acme.example",
            PASSWORD,
            KEY,
            w.clock.now_ms(),
        )),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!((a.body, a.headers), (b.body, b.headers));
}

/// Issue 9, item 1 (L2, G1): a request that carries a valid key *and* an admin's session
/// cookie is authenticated by the key, and the inner service gets neither credential: the
/// session id would let an upstream act as that admin.
#[tokio::test]
async fn a_session_cookie_beside_a_valid_key_never_reaches_the_inner_service() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let request = Request::get("/both")
        .header("x-org-id", "acme")
        .header("x-api-key", KEY)
        .header("cookie", format!("JSESSIONID={id}; a=1"))
        .header("cookie", "b=2")
        .body(Full::default())
        .unwrap();
    let a = send_protected(&w, request).await;
    assert_eq!(a.status, StatusCode::OK);
    // Authenticated by the key (no admin), the other cookies kept, the session id gone.
    assert_eq!(a.body, "acme - [a=1 | b=2]");
    assert!(!a.body.contains(&id));
    // The session itself is untouched: still usable on its own.
    assert_eq!(get_with_cookie(&w, &id).await.status, StatusCode::OK);
}

/// Issue 9, item 8 (S3): a logout that names two sessions (two `JSESSIONID` cookies, in one
/// header or two) ends both before it answers 200; holding an id is proof enough to end it.
#[tokio::test]
async fn a_logout_naming_two_sessions_ends_both() {
    let w = world().await;
    for split in [false, true] {
        let first = login(&w, "alice@acme.example").await.session_id();
        let second = login(&w, "alice@acme.example").await.session_id();
        let mut logout = Request::delete("/api/v1/authenticatedSession");
        logout = if split {
            logout
                .header("cookie", format!("JSESSIONID={first}"))
                .header("cookie", format!("a=1; JSESSIONID=\"{second}\""))
        } else {
            logout.header("cookie", format!("JSESSIONID={first}; JSESSIONID={second}"))
        };
        let out = call_endpoint(&w.sessions, logout.body(Full::default()).unwrap()).await;
        assert_eq!(out.status, StatusCode::OK, "split: {split}");
        for id in [&first, &second] {
            assert_eq!(
                get_with_cookie(&w, id).await.status,
                StatusCode::UNAUTHORIZED,
                "split: {split}: a named session lives on after the logout answered 200"
            );
        }
    }
    // Too many ids: refused, and none of them ended.
    let live = login(&w, "alice@acme.example").await.session_id();
    let mut cookie = format!("JSESSIONID={live}");
    for _ in 0..16 {
        cookie.push_str(&format!("; JSESSIONID={}", "0".repeat(64)));
    }
    let logout = Request::delete("/api/v1/authenticatedSession")
        .header("cookie", cookie)
        .body(Full::default())
        .unwrap();
    let out = call_endpoint(&w.sessions, logout).await;
    assert_eq!(out.status, StatusCode::BAD_REQUEST);
    assert_eq!(get_with_cookie(&w, &live).await.status, StatusCode::OK);
}
