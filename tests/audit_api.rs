//! `GET /api/v1/auditLog`: for the org's admin sessions only; 501 without a store.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use orgkey::http::audit::AuditLogEndpoint;
use orgkey::OrgKeyLayer;
use tower::ServiceExt;

async fn get(w: &World, request: Request<Full<Bytes>>) -> Answer {
    let svc = tower::ServiceBuilder::new()
        .layer(OrgKeyLayer::new(w.keys.table().clone()).with_sessions(w.sessions.clone()))
        .service(AuditLogEndpoint::new(w.keys.clone()));
    answer(svc.oneshot(request).await.unwrap()).await
}

#[tokio::test]
async fn direct_key_requests_are_refused_and_a_handle_without_store_answers_501() {
    let w = world().await;
    let keyed = Request::get("/api/v1/auditLog")
        .header("x-org-id", "acme")
        .header("x-api-key", KEY)
        .body(Full::default())
        .unwrap();
    let a = get(&w, keyed).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(a.json()["code"], "NOT_AUTHORIZED");

    let id = login(&w, "alice@acme.example").await.session_id();
    let request = Request::get("/api/v1/auditLog")
        .header("cookie", format!("JSESSIONID={id}"))
        .body(Full::default())
        .unwrap();
    let a = get(&w, request).await;
    assert_eq!(a.status, StatusCode::NOT_IMPLEMENTED, "{}", a.body);

    let bad = Request::get("/api/v1/auditLog?limit=0")
        .header("cookie", format!("JSESSIONID={id}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(get(&w, bad).await.status, StatusCode::BAD_REQUEST);
    let post = Request::post("/api/v1/auditLog")
        .header("cookie", format!("JSESSIONID={id}"))
        .body(Full::default())
        .unwrap();
    let a = get(&w, post).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "GET");
    let none = Request::get("/").body(Full::default()).unwrap();
    assert_eq!(get(&w, none).await.status, StatusCode::UNAUTHORIZED);
}
