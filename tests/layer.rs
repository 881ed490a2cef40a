//! The layer rules L1-L4, under tower's `ServiceBuilder`, axum's `Router::layer` and a plain
//! hyper server.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use orgkey::auth::{AuthMethod, FnOrgResolver, HostOrgResolver, RequestView};
use orgkey::{
    Actor, ApiKey, Authenticated, KeyAdmin, OrgId, OrgKeyLayer, OrgTable, Rejection,
    RejectionReason,
};
use tower::{Service, ServiceBuilder, ServiceExt};

const KEY: &str = "AbCdEf123456";
/// 65 bytes: one more than any org id may have.
const LONG_ORG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A request (uri, headers) and the reason it must be rejected for.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], RejectionReason);

/// An org table with: `acme` (key `KEY`), `nosub` (no subscription), `nokey` (key deleted).
async fn fixture() -> KeyAdmin {
    let admin = KeyAdmin::new(OrgTable::default());
    let ops = Actor::new("ops@example.com").unwrap();
    for name in ["acme", "nosub", "nokey"] {
        admin.create_org(&OrgId::new(name).unwrap()).await.unwrap();
    }
    let acme = OrgId::new("acme").unwrap();
    admin.subscribe(&acme, &ops).await.unwrap();
    admin
        .edit(&acme, ApiKey::parse(KEY).unwrap(), &ops)
        .await
        .unwrap();
    let nokey = OrgId::new("nokey").unwrap();
    admin.subscribe(&nokey, &ops).await.unwrap();
    admin.delete(&nokey, &ops).await.unwrap();
    admin
}

/// What the inner service saw.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    last: std::sync::Mutex<Option<(Option<Authenticated>, bool)>>,
}

type Svc = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<orgkey::auth::ResponseBody<Full<Bytes>>>,
    Infallible,
>;

fn service(layer: OrgKeyLayer, seen: Arc<Seen>) -> Svc {
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |request: Request<Full<Bytes>>| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.calls.fetch_add(1, Ordering::SeqCst);
                    let auth = request.extensions().get::<Authenticated>().cloned();
                    let has_key_header = request.headers().contains_key("x-api-key");
                    *seen.last.lock().unwrap() = Some((auth, has_key_header));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"inner"))))
                }
            });
    tower::util::BoxCloneService::new(svc)
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::get(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::default()).unwrap()
}

async fn send(svc: &Svc, req: Request<Full<Bytes>>) -> (StatusCode, Response<Bytes>) {
    let response = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, Response::from_parts(parts, body))
}

fn reason(response: &Response<Bytes>) -> RejectionReason {
    response.extensions().get::<Rejection>().unwrap().reason()
}

#[tokio::test]
async fn l1_l2_valid_org_and_key_reach_the_inner_service_with_identity_and_without_the_key() {
    let admin = fixture().await;
    let seen = Arc::new(Seen::default());
    let svc = service(OrgKeyLayer::new(admin.table().clone()), Arc::clone(&seen));
    let (status, response) = send(
        &svc,
        request("/", &[("x-org-id", "acme"), ("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body(), "inner");
    let (auth, had_key) = seen.last.lock().unwrap().take().unwrap();
    let auth = auth.unwrap();
    assert_eq!(auth.org(), "acme");
    assert_eq!(auth.method(), &AuthMethod::ApiKey);
    assert_eq!(
        auth.generation(),
        admin.table().state("acme").unwrap().generation()
    );
    assert!(
        !had_key,
        "the key header is removed before the inner service (L2)"
    );
}

#[tokio::test]
async fn l3_failures_never_call_the_inner_service_and_answer_401_json_with_a_challenge() {
    let admin = fixture().await;
    let seen = Arc::new(Seen::default());
    let svc = service(OrgKeyLayer::new(admin.table().clone()), Arc::clone(&seen));
    let cases: &[Case<'_>] = &[
        ("/", &[("x-api-key", KEY)], RejectionReason::MissingOrg),
        ("/", &[("x-org-id", "acme")], RejectionReason::MissingKey),
        (
            "/?apikey=AbCdEf123456",
            &[("x-org-id", "acme")],
            RejectionReason::KeyInQuery,
        ),
        (
            "/?X-API-Key=AbCdEf123456",
            &[("x-org-id", "acme")],
            RejectionReason::KeyInQuery,
        ),
        (
            "/",
            &[("x-org-id", "acme"), ("x-api-key", "AbCdEf12345")],
            RejectionReason::MalformedKey,
        ),
        (
            "/",
            &[("x-org-id", "acme"), ("x-api-key", "AbCdEf12345!")],
            RejectionReason::MalformedKey,
        ),
        (
            "/",
            &[("x-org-id", "acme"), ("x-api-key", KEY), ("x-api-key", KEY)],
            RejectionReason::MalformedKey,
        ),
        (
            "/",
            &[
                ("x-org-id", "acme"),
                ("x-org-id", "acme"),
                ("x-api-key", KEY),
            ],
            RejectionReason::MissingOrg,
        ),
        (
            "/",
            &[("x-org-id", "ghost"), ("x-api-key", KEY)],
            RejectionReason::UnknownOrg,
        ),
        (
            "/",
            &[("x-org-id", "bad org!"), ("x-api-key", KEY)],
            RejectionReason::UnknownOrg,
        ),
        // Found by fuzzing: an org id too long to exist must not hide a malformed key.
        (
            "/",
            &[("x-org-id", LONG_ORG), ("x-api-key", KEY)],
            RejectionReason::UnknownOrg,
        ),
        (
            "/",
            &[("x-org-id", LONG_ORG), ("x-api-key", "short")],
            RejectionReason::MalformedKey,
        ),
        (
            "/",
            &[("x-org-id", "nosub"), ("x-api-key", KEY)],
            RejectionReason::NoSubscription,
        ),
        (
            "/",
            &[("x-org-id", "nokey"), ("x-api-key", KEY)],
            RejectionReason::NoKey,
        ),
        (
            "/",
            &[("x-org-id", "acme"), ("x-api-key", "AbCdEf123457")],
            RejectionReason::WrongKey,
        ),
        (
            "/",
            &[("x-org-id", "acme"), ("x-api-key", "abcdef123456")],
            RejectionReason::WrongKey,
        ),
    ];
    let mut generic_bodies = Vec::new();
    for (uri, headers, expected) in cases {
        let (status, response) = send(&svc, request(uri, headers)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{expected:?}");
        assert_eq!(reason(&response), *expected);
        let challenge = response.headers()[WWW_AUTHENTICATE].to_str().unwrap();
        assert_eq!(challenge, r#"ApiKey realm="orgkey", header="x-api-key""#);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body = std::str::from_utf8(response.body()).unwrap();
        assert!(
            body.starts_with(r#"{"code":"AUTHENTICATION_FAILED","message":"#),
            "{body}"
        );
        assert!(!body.contains(KEY), "a rejection never echoes a key");
        if matches!(
            expected,
            RejectionReason::UnknownOrg
                | RejectionReason::NoSubscription
                | RejectionReason::NoKey
                | RejectionReason::WrongKey
        ) {
            generic_bodies.push(response);
        }
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "inner never called");
    // Unknown org, no subscription, no key and wrong key are indistinguishable (L3): same
    // status, same headers, same body.
    let first = &generic_bodies[0];
    for other in &generic_bodies[1..] {
        assert_eq!(other.body(), first.body());
        assert_eq!(other.headers(), first.headers());
    }
}

#[tokio::test]
async fn k6_a_key_rotated_after_a_response_is_rejected_on_the_next_request() {
    let admin = fixture().await;
    let seen = Arc::new(Seen::default());
    let svc = service(OrgKeyLayer::new(admin.table().clone()), Arc::clone(&seen));
    let ops = Actor::new("ops@example.com").unwrap();
    let acme = OrgId::new("acme").unwrap();
    let ok = send(
        &svc,
        request("/", &[("x-org-id", "acme"), ("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(ok.0, StatusCode::OK);
    let info = admin.regenerate(&acme, &ops).await.unwrap();
    let (status, response) = send(
        &svc,
        request("/", &[("x-org-id", "acme"), ("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(reason(&response), RejectionReason::WrongKey);
    let new_key = info.key().unwrap().expose_secret();
    let ok = send(
        &svc,
        request("/", &[("x-org-id", "acme"), ("x-api-key", new_key)]),
    )
    .await;
    assert_eq!(ok.0, StatusCode::OK);
}

#[tokio::test]
async fn l1_custom_headers_host_resolver_and_closure_resolver() {
    let admin = fixture().await;
    let seen = Arc::new(Seen::default());

    let custom = OrgKeyLayer::new(admin.table().clone())
        .org_header(HeaderName::from_static("x-tenant"))
        .key_header(HeaderName::from_static("x-key"));
    let svc = service(custom, Arc::clone(&seen));
    let (status, _) = send(&svc, request("/", &[("x-tenant", "acme"), ("x-key", KEY)])).await;
    assert_eq!(status, StatusCode::OK);
    let (status, response) = send(
        &svc,
        request("/", &[("x-org-id", "acme"), ("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "defaults no longer apply");
    assert_eq!(
        response.headers()[WWW_AUTHENTICATE],
        r#"ApiKey realm="orgkey", header="x-key""#
    );

    let host = OrgKeyLayer::new(admin.table().clone())
        .org_resolver(HostOrgResolver::subdomain_of("api.example.com"));
    let svc = service(host, Arc::clone(&seen));
    let (status, _) = send(
        &svc,
        request("/", &[("host", "acme.api.example.com"), ("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(
        &svc,
        request(
            "/",
            &[("host", "nosub.api.example.com"), ("x-api-key", KEY)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let by_path = OrgKeyLayer::new(admin.table().clone()).org_resolver(FnOrgResolver::new(
        |req: &RequestView<'_>| {
            req.uri()
                .path()
                .strip_prefix("/orgs/")
                .map(|p| p.split('/').next().unwrap_or_default().to_owned())
        },
    ));
    let svc = service(by_path, Arc::clone(&seen));
    let (status, _) = send(&svc, request("/orgs/acme/items", &[("x-api-key", KEY)])).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, request("/orgs/ghost/items", &[("x-api-key", KEY)])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// An inner service that is ready only after being polled once, to show `poll_ready` is
/// delegated (L4).
#[derive(Clone, Default)]
struct SlowReady {
    polls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for SlowReady {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::default())))
    }
}

#[tokio::test]
async fn l4_poll_ready_is_delegated_to_the_inner_service() {
    let admin = fixture().await;
    let inner = SlowReady::default();
    let polls = Arc::clone(&inner.polls);
    let mut svc = OrgKeyLayer::new(admin.table().clone()).layer_service(inner);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(svc.poll_ready(&mut cx).is_pending());
    assert!(svc.poll_ready(&mut cx).is_ready());
    assert_eq!(polls.load(Ordering::SeqCst), 2);
}

trait LayerExt {
    fn layer_service<S>(&self, inner: S) -> orgkey::auth::OrgKeyAuth<S>;
}
impl LayerExt for OrgKeyLayer {
    fn layer_service<S>(&self, inner: S) -> orgkey::auth::OrgKeyAuth<S> {
        tower::Layer::layer(self, inner)
    }
}

#[tokio::test]
async fn l4_works_under_axum_router_layer() {
    use axum::routing::get;
    use axum::{Extension, Router};

    let admin = fixture().await;
    let app = Router::new()
        .route(
            "/whoami",
            get(|Extension(auth): Extension<Authenticated>| async move { auth.org().to_string() }),
        )
        .layer(OrgKeyLayer::new(admin.table().clone()));
    let ok = app
        .clone()
        .oneshot(
            Request::get("/whoami")
                .header("x-org-id", "acme")
                .header("x-api-key", KEY)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.into_body().collect().await.unwrap().to_bytes(), "acme");
    let bad = app
        .oneshot(
            Request::get("/whoami")
                .header("x-org-id", "acme")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_extractor_yields_authenticated_or_500_without_the_layer() {
    use axum::routing::get;
    use axum::Router;

    let admin = fixture().await;
    let handler = get(|auth: Authenticated| async move { auth.org().to_string() });
    let protected = Router::new()
        .route("/", handler.clone())
        .layer(OrgKeyLayer::new(admin.table().clone()));
    let response = protected
        .oneshot(
            Request::get("/")
                .header("x-org-id", "acme")
                .header("x-api-key", KEY)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "acme"
    );
    let unprotected = Router::new().route("/", handler);
    let response = unprotected
        .oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn l4_works_under_a_plain_hyper_server_over_tcp() {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let admin = fixture().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let table = admin.table().clone();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = ServiceBuilder::new()
                .layer(OrgKeyLayer::new(table.clone()))
                .service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let org = req
                        .extensions()
                        .get::<Authenticated>()
                        .unwrap()
                        .org()
                        .to_owned();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "hello {org}"
                    )))))
                });
            http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await
                .unwrap();
        }
    });
    async fn raw(addr: std::net::SocketAddr, key: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-org-id: acme\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }
    let ok = raw(addr, KEY).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("hello acme"), "{ok}");
    let bad = raw(addr, "AAAAAAAAAAAA").await;
    assert!(bad.starts_with("HTTP/1.1 401"), "{bad}");
    assert!(bad.contains("www-authenticate: ApiKey"), "{bad}");
    server.await.unwrap();
}
