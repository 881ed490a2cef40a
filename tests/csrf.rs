//! The CSRF guard's acceptance rules (W1; `orgkey::http::csrf`), in front of the login endpoint and
//! the key-management endpoints as the gateway mounts them.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use orgkey::http::csrf::{token_for_session, CsrfLayer, CsrfRejection};
use orgkey::{KeyManagementEndpoint, OrgKeyLayer, SessionEndpoint};
use tower::{Service, ServiceExt};

const HOST: &str = "gw.example:8080";
const ORIGIN: &str = "http://gw.example:8080";

/// `POST /login` goes to the session endpoint, everything else to the key endpoints behind
/// the layer; the guard is in front of both.
fn guarded(
    w: &World,
    layer: CsrfLayer,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl http_body::Body<Error = impl std::fmt::Debug>>,
    Error = Infallible,
> + Clone {
    let login = SessionEndpoint::new(w.sessions.clone());
    let keys = tower::ServiceBuilder::new()
        .layer(OrgKeyLayer::new(w.keys.table().clone()).with_sessions(w.sessions.clone()))
        .service(KeyManagementEndpoint::new(w.keys.clone()).with_sessions(w.sessions.clone()));
    let routes = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let login = login.clone();
        let keys = keys.clone();
        async move {
            let response = if request.uri().path() == "/api/v1/authenticatedSession" {
                login.oneshot(request).await?.map(axum::body::Body::new)
            } else {
                keys.oneshot(request).await?.map(axum::body::Body::new)
            };
            Ok::<_, Infallible>(response)
        }
    });
    tower::ServiceBuilder::new().layer(layer).service(routes)
}

fn stack(
    w: &World,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl http_body::Body<Error = impl std::fmt::Debug>>,
    Error = Infallible,
> + Clone {
    guarded(w, CsrfLayer::new(w.sessions.clone()))
}

struct Req {
    method: Method,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

impl Req {
    fn new(method: Method, path: &'static str) -> Self {
        Self {
            method,
            path,
            headers: vec![("host", HOST.to_owned())],
            body: None,
        }
    }
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    /// What a same-origin `fetch` from the admin page sends.
    fn sent_by_page(self) -> Self {
        self.header("origin", ORIGIN)
            .header("sec-fetch-site", "same-origin")
    }
    fn cookie(self, id: &str) -> Self {
        self.header("cookie", format!("JSESSIONID={id}"))
    }
    fn token(self, id: &str) -> Self {
        let token = token_for_session(id.as_bytes()).unwrap();
        self.header("x-csrf-token", token.expose_secret())
    }
    fn json(mut self, body: String) -> Self {
        self.body = Some(body);
        self.header("content-type", "application/json")
    }
    fn build(self) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method(self.method).uri(self.path);
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(self.body.map(Full::from).unwrap_or_default())
            .unwrap()
    }
}

async fn send(w: &World, request: Req) -> (Answer, Option<CsrfRejection>) {
    let response = stack(w).oneshot(request.build()).await.unwrap();
    let rejection = response.extensions().get::<CsrfRejection>().copied();
    (answer(response).await, rejection)
}

fn login_req(w: &World) -> Req {
    Req::new(Method::POST, "/api/v1/authenticatedSession").json(login_body(
        "alice@acme.example",
        PASSWORD,
        KEY,
        w.clock.now_ms(),
    ))
}

fn regenerate() -> Req {
    Req::new(Method::POST, "/api/v1/apiKeys/1/regenerate")
}

fn assert_refused(answer: &Answer, rejection: Option<CsrfRejection>, expected: CsrfRejection) {
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert_eq!(answer.json()["code"], "CSRF_CHECK_FAILED");
    assert_eq!(answer.headers["cache-control"], "no-store");
    assert_eq!(rejection, Some(expected));
}

fn key(w: &World) -> Option<String> {
    w.keys
        .view(&org("acme"))
        .unwrap()
        .key()
        .map(|k| k.expose_secret().to_owned())
}

#[tokio::test]
async fn clients_that_are_not_browsers_pass_unchanged() {
    let w = world().await;
    // Rule 2: a Zscaler client logs in and regenerates with neither Origin nor
    // Sec-Fetch-Site, and without any token.
    let (login, rejection) = send(&w, login_req(&w)).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    assert_eq!(rejection, None);
    let id = login.session_id();
    let (changed, _) = send(&w, regenerate().cookie(&id)).await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_ne!(key(&w).as_deref(), Some(KEY));
}

#[tokio::test]
async fn the_page_signs_in_and_changes_the_key_with_its_token() {
    let w = world().await;
    let (login, _) = send(&w, login_req(&w).sent_by_page()).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    let id = login.session_id();
    let (changed, _) = send(&w, regenerate().sent_by_page().cookie(&id).token(&id)).await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    // The carried-over session has its own token; the old one no longer fits.
    let next = changed.session_id();
    let (stale, rejection) = send(&w, regenerate().sent_by_page().cookie(&next).token(&id)).await;
    assert_refused(&stale, rejection, CsrfRejection::TokenMismatch);
    let (again, _) = send(&w, regenerate().sent_by_page().cookie(&next).token(&next)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
}

#[tokio::test]
async fn a_live_session_without_its_token_changes_nothing() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let other = login(&w, "alice@acme.example").await.session_id();
    for request in [
        regenerate().sent_by_page().cookie(&id),
        regenerate().sent_by_page().cookie(&id).token(&other),
        regenerate()
            .sent_by_page()
            .cookie(&id)
            .header("x-csrf-token", "0".repeat(64)),
        // Origin alone (a browser without Sec-Fetch-Site, on plain http) is still a browser.
        regenerate().header("origin", ORIGIN).cookie(&id),
        Req::new(Method::DELETE, "/api/v1/authenticatedSession")
            .sent_by_page()
            .cookie(&id),
    ] {
        let (answer, rejection) = send(&w, request).await;
        assert_refused(&answer, rejection, CsrfRejection::TokenMismatch);
    }
    assert_eq!(key(&w).as_deref(), Some(KEY));
    // The session is still alive: nothing logged it out.
    let (alive, _) = send(
        &w,
        Req::new(Method::GET, "/api/v1/apiKeys")
            .sent_by_page()
            .cookie(&id),
    )
    .await;
    assert_eq!(alive.status, StatusCode::OK, "{}", alive.body);
}

#[tokio::test]
async fn cross_site_requests_are_refused_before_anything_runs() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let cases = [
        (
            regenerate()
                .header("sec-fetch-site", "cross-site")
                .header("origin", "https://evil.example")
                .cookie(&id)
                .token(&id),
            CsrfRejection::CrossSiteFetch,
        ),
        (
            regenerate()
                .header("sec-fetch-site", "same-site")
                .cookie(&id)
                .token(&id),
            CsrfRejection::CrossSiteFetch,
        ),
        (
            regenerate()
                .header("sec-fetch-site", "none")
                .cookie(&id)
                .token(&id),
            CsrfRejection::CrossSiteFetch,
        ),
        (
            regenerate()
                .header("origin", "https://evil.example")
                .cookie(&id)
                .token(&id),
            CsrfRejection::ForeignOrigin,
        ),
        (
            regenerate().header("origin", "null").cookie(&id).token(&id),
            CsrfRejection::ForeignOrigin,
        ),
        (
            // Same host, another port: another origin.
            regenerate()
                .header("origin", "http://gw.example:9999")
                .cookie(&id)
                .token(&id),
            CsrfRejection::ForeignOrigin,
        ),
        (
            regenerate()
                .header("origin", "ftp://gw.example:8080")
                .cookie(&id)
                .token(&id),
            CsrfRejection::ForeignOrigin,
        ),
    ];
    for (request, expected) in cases {
        let (answer, rejection) = send(&w, request).await;
        assert_refused(&answer, rejection, expected);
    }
    // Login CSRF: a foreign page cannot sign a browser in either, and no cookie is set.
    let (forged, rejection) = send(
        &w,
        login_req(&w)
            .header("origin", "https://evil.example")
            .header("sec-fetch-site", "cross-site"),
    )
    .await;
    assert_refused(&forged, rejection, CsrfRejection::CrossSiteFetch);
    assert!(!forged.headers.contains_key("set-cookie"));
    assert_eq!(key(&w).as_deref(), Some(KEY));
}

#[tokio::test]
async fn safe_methods_and_dead_cookies_need_no_token() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    // Rule 1: reads pass even cross-site (SameSite keeps the cookie off them in browsers,
    // and a foreign page cannot read the answer).
    let (read, rejection) = send(
        &w,
        Req::new(Method::GET, "/api/v1/apiKeys")
            .header("sec-fetch-site", "cross-site")
            .cookie(&id),
    )
    .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(rejection, None);
    // A logged-out session's cookie still in the browser does not block the next sign-in.
    let (out, _) = send(
        &w,
        Req::new(Method::DELETE, "/api/v1/authenticatedSession")
            .sent_by_page()
            .cookie(&id)
            .token(&id),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    let (again, rejection) = send(&w, login_req(&w).sent_by_page().cookie(&id)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(rejection, None);
}

#[tokio::test]
async fn two_session_cookies_are_refused() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let (answer, rejection) = send(
        &w,
        regenerate()
            .sent_by_page()
            .header("cookie", format!("JSESSIONID={id}; JSESSIONID={id}"))
            .token(&id),
    )
    .await;
    assert_refused(&answer, rejection, CsrfRejection::AmbiguousSession);
}

#[tokio::test]
async fn allowed_origins_cover_a_proxy_that_rewrites_host() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let request = || {
        let mut request = regenerate()
            .header("origin", "https://Admin.Example")
            .header("sec-fetch-site", "same-origin")
            .cookie(&id)
            .token(&id);
        request.headers[0].1 = "10.0.0.7:8080".to_owned(); // the Host the proxy sends
        request.build()
    };
    let refused = stack(&w).oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let allowed = guarded(
        &w,
        CsrfLayer::new(w.sessions.clone()).allow_origin("https://admin.example/api/v1"),
    )
    .oneshot(request())
    .await
    .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
}

#[tokio::test]
async fn http2_requests_compare_the_origin_with_the_authority() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{HOST}/api/v1/apiKeys/1/regenerate"))
        .version(http::Version::HTTP_2)
        .header("origin", ORIGIN)
        .header("sec-fetch-site", "same-origin")
        .header("cookie", format!("JSESSIONID={id}"))
        .header(
            "x-csrf-token",
            token_for_session(id.as_bytes()).unwrap().expose_secret(),
        )
        .body(Full::default())
        .unwrap();
    let response = stack(&w).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// A regenerate by a fresh session of alice, from a page at `origin`, to a gateway that
/// sees `host`, through `layer`.
async fn regenerate_from(w: &World, layer: CsrfLayer, origin: &str, host: &str) -> StatusCode {
    let current = key(w).unwrap();
    let body = login_body("alice@acme.example", PASSWORD, &current, w.clock.now_ms());
    let id = call_endpoint(&w.sessions, post_json(body))
        .await
        .session_id();
    let mut request = regenerate().header("origin", origin).cookie(&id).token(&id);
    request.headers[0].1 = host.to_owned();
    guarded(w, layer)
        .oneshot(request.build())
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn default_ports_match_and_allowed_origins_pin_the_scheme() {
    let w = world().await;
    let plain = || CsrfLayer::new(w.sessions.clone());
    // https://gw.example is gw.example:443, whichever side writes the port.
    for (origin, host) in [
        ("https://gw.example", "gw.example:443"),
        ("https://gw.example:443", "gw.example"),
        ("http://gw.example", "gw.example:80"),
    ] {
        assert_eq!(
            regenerate_from(&w, plain(), origin, host).await,
            StatusCode::OK,
            "{origin} vs {host}"
        );
    }
    assert_eq!(
        regenerate_from(&w, plain(), "https://gw.example", "gw.example:80").await,
        StatusCode::FORBIDDEN
    );
    // An allowed origin is matched with its scheme.
    let allowing = || CsrfLayer::new(w.sessions.clone()).allow_origin("https://admin.example");
    assert_eq!(
        regenerate_from(&w, allowing(), "http://admin.example", "10.0.0.7").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        regenerate_from(&w, allowing(), "https://admin.example:443", "10.0.0.7").await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn cookie_requests_only_lets_key_requests_from_anywhere_through() {
    let w = world().await;
    let id = login(&w, "alice@acme.example").await.session_id();
    let layer = || CsrfLayer::new(w.sessions.clone()).cookie_requests_only();
    let cross_site = || {
        regenerate()
            .header("origin", "https://partner.example")
            .header("sec-fetch-site", "cross-site")
    };
    // A direct-key request from another origin's script (a CORS caller): no cookie, passes
    // (the key endpoints then refuse it for lack of a session: 403, not the guard's 403).
    let keyed = cross_site()
        .header("x-org-id", "acme")
        .header("x-api-key", KEY)
        .build();
    let response = guarded(&w, layer()).oneshot(keyed).await.unwrap();
    assert!(response.extensions().get::<CsrfRejection>().is_none());
    // The same request riding on the admin's cookie gets the full rules.
    let response = guarded(&w, layer())
        .oneshot(cross_site().cookie(&id).token(&id).build())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        response.extensions().get::<CsrfRejection>(),
        Some(&CsrfRejection::CrossSiteFetch)
    );
    assert_eq!(key(&w).as_deref(), Some(KEY));
}
