//! Forward-auth (G4): `<api>/verify`, where a proxy that already fronts the services (nginx
//! `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz` over HTTP) asks orgkey whether a
//! request may pass, and on whose behalf.
//!
//! The proxy sends the client's headers (any method, any path below `<api>/verify`, no body
//! needed); the answer is the layer's own judgement of them:
//!
//! - **200** with the identity headers the reverse proxy sets upstream
//!   ([`insert_identity`]): `x-orgkey-org`, `x-orgkey-auth` (`api_key` or `session`) and, for
//!   a session, `x-orgkey-admin`; the body repeats them as JSON
//!   (`{"orgId":"acme","auth":"api_key"}`), for people reading it with curl;
//! - otherwise the layer's L3 answer, unchanged: 401 (missing, malformed, wrong or expired
//!   credentials, a logged-out session) with `WWW-Authenticate`, 403 (a cross-site browser
//!   write refused by the CSRF guard, W1), 503 + `Retry-After` (this replica cannot vouch for
//!   its state, F3); each with its `{"code","message"}` body.
//!
//! Every answer carries `Cache-Control: no-store`: a proxy that caches auth answers must
//! not keep a 200 past a key change (K6 holds at the proxy as soon as the change returns).
//!
//! [`OrgKey::wrap`](crate::OrgKey::wrap) and
//! [`OrgKey::admin_surface`](crate::OrgKey::admin_surface) route it, and so does the gateway,
//! also when it proxies to an upstream: `<api>/verify` is never forwarded. The pieces, to
//! mount elsewhere: [`VerifyEndpoint`] (the 200) behind [`OrgKey::layer`](crate::OrgKey::layer),
//! inside [`ForwardAuth`] (the `no-store`).
//!
//! # Deployment caveat
//!
//! The 200 says who the *credentials* belong to; the proxy must then make sure the service
//! behind it sees only what orgkey vouched for: strip the key header (`X-API-Key`) and the
//! `JSESSIONID` cookie before the upstream, drop every client-sent `x-orgkey-*` header, and
//! set the identity headers from this answer. The README has the recipes (nginx's is
//! tested).
//!
//! # Example
//!
//! ```
//! use http::{Request, StatusCode};
//! use orgkey::{Actor, OrgId, OrgKey};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orgkey = OrgKey::builder("https://gw.example/api/v1")?
//!     .open(orgkey::store::MemoryStore::new())
//!     .await?;
//! let acme = OrgId::new("acme")?;
//! orgkey.keys().create_org(&acme).await?;
//! let info = orgkey.keys().subscribe(&acme, &Actor::new("ops")?).await?;
//! let key = info.key().unwrap().expose_secret().to_owned();
//!
//! // What nginx's auth_request sends: the client's headers, no body.
//! let ask = |key: &str| {
//!     Request::get("/api/v1/verify")
//!         .header("x-org-id", "acme")
//!         .header("x-api-key", key)
//!         .body(String::new())
//! };
//! let answer = orgkey.admin_surface().oneshot(ask(&key)?).await?;
//! assert_eq!(answer.status(), StatusCode::OK);
//! assert_eq!(answer.headers()["x-orgkey-org"], "acme");
//! assert_eq!(answer.headers()["x-orgkey-auth"], "api_key");
//! assert_eq!(answer.headers()["cache-control"], "no-store");
//!
//! let answer = orgkey.admin_surface().oneshot(ask("WrongKey1234")?).await?;
//! assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
//! assert!(answer.headers().get("x-orgkey-org").is_none());
//! assert_eq!(answer.headers()["cache-control"], "no-store");
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use serde_json::json;
use tower_service::Service;

use crate::http::proxy::insert_identity;
use crate::Authenticated;

/// The path below the API prefix (`/api/v1/verify`); every path below it is served too, for
/// proxies that append the original path (Envoy's `path_prefix`).
pub const VERIFY_PATH: &str = "/verify";

/// Answers a request the layer let through with 200 and its identity ([module docs](self)).
/// Behind the layer only: a request without [`Authenticated`] gets a 500 (and an error in
/// the log), never a 200. Reads no body.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyEndpoint;

impl<B> Service<Request<B>> for VerifyEndpoint {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(auth) = request.extensions().get::<Authenticated>() else {
            tracing::error!(
                target: "orgkey::http::verify",
                "VerifyEndpoint called without Authenticated: it must be behind the layer"
            );
            return std::future::ready(Ok(crate::response::internal_error()));
        };
        let body = match auth.admin() {
            Some(admin) => {
                json!({ "orgId": auth.org(), "auth": "session", "admin": admin.as_str() })
            }
            None => json!({ "orgId": auth.org(), "auth": "api_key" }),
        };
        let mut response = crate::response::value(StatusCode::OK, &body);
        insert_identity(response.headers_mut(), auth);
        std::future::ready(Ok(response))
    }
}

/// The method the client sent to the proxy that asks, from `X-Original-Method` or
/// `X-Forwarded-Method`, when one of them names one.
fn original_method(headers: &http::HeaderMap) -> Option<http::Method> {
    ["x-original-method", "x-forwarded-method"]
        .into_iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| http::Method::from_bytes(value.as_bytes()).ok())
}

/// The forward-auth service: `inner` (a [`VerifyEndpoint`] behind the layer) with
/// `Cache-Control: no-store` on every answer, the layer's refusals included. The CSRF guard
/// in front of the layer judges the client's own method when the proxy names it in
/// `X-Original-Method` or `X-Forwarded-Method` (W1 behind forward-auth).
#[derive(Clone, Debug)]
pub struct ForwardAuth<S> {
    inner: S,
}

impl<S> ForwardAuth<S> {
    /// Wraps `inner`, normally `protection.layer(VerifyEndpoint)`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B, ResBody> Service<Request<B>> for ForwardAuth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ForwardAuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut request = request;
        // W1 behind a proxy: nginx's auth_request and Traefik's forwardAuth ask with GET
        // whatever the client's method was, and the CSRF guard judges only state-changing
        // methods. The proxy's `X-Original-Method` (the nginx recipe sets it) or
        // `X-Forwarded-Method` (Traefik) says what the client sent; the guard judges that.
        // A client that calls this endpoint itself gains nothing by setting them: the
        // verdict changes nothing, and is only stricter for an unsafe method.
        if let Some(method) = original_method(request.headers()) {
            *request.method_mut() = method;
        }
        ForwardAuthFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The future of [`ForwardAuth`]: the inner answer, marked `no-store`.
    pub struct ForwardAuthFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, ResBody, E> Future for ForwardAuthFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(|result| {
            result.map(|mut response| {
                response
                    .headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::proxy::{ADMIN_HEADER, METHOD_HEADER, ORG_HEADER};
    use crate::{Actor, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
    use tower::ServiceExt;
    use tower_layer::Layer;

    #[tokio::test]
    async fn a_refusal_is_marked_no_store_and_carries_no_identity() {
        let keys = KeyAdmin::new(OrgTable::default());
        let acme = OrgId::new("acme").unwrap();
        keys.create_org(&acme).await.unwrap();
        let info = keys
            .subscribe(&acme, &Actor::new("ops").unwrap())
            .await
            .unwrap();
        let key = info.key().unwrap().expose_secret().to_owned();
        let service =
            ForwardAuth::new(OrgKeyLayer::new(keys.table().clone()).layer(VerifyEndpoint));
        for method in ["GET", "POST", "DELETE", "PATCH"] {
            let request = Request::builder()
                .method(method)
                .uri("/api/v1/verify/some/original/path")
                .header("x-org-id", "acme")
                .header("x-api-key", &key)
                .header("x-orgkey-admin", "forged@acme.example")
                .body(())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{method}");
            assert_eq!(response.headers()[ORG_HEADER], "acme");
            assert_eq!(response.headers()[METHOD_HEADER], "api_key");
            assert!(response.headers().get(ADMIN_HEADER).is_none());
            assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        }
        let request = Request::get("/api/v1/verify")
            .header("x-org-id", "acme")
            .header("x-api-key", "WrongKey1234")
            .body(())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(ORG_HEADER).is_none());
        assert!(response
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .is_some());
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
    }

    #[tokio::test]
    async fn outside_the_layer_it_answers_500_not_200() {
        let response = VerifyEndpoint
            .oneshot(Request::get("/api/v1/verify").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().get(ORG_HEADER).is_none());
    }
}
