//! What the gateway serves: orgkey's stack around the demo API or an upstream, plus the
//! operations routes that are not behind the layer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower_service::Service;

use super::{full, site_response, GatewayBody, SiteBody, Upstream};
use crate::stack::WithOrgKey;
use crate::{Authenticated, OrgKey};

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<SiteBody> {
    site_response(crate::response::value(status, value))
}

/// The demo API the gateway protects when it has no upstream: `GET /api/v1/status`
/// (`{"status":"ACTIVE"}`) and `GET /api/v1/whoami` (the org, and the admin for a session).
/// Behind the layer only.
#[derive(Clone, Copy, Debug, Default)]
pub struct DemoApi;

impl Service<Request<GatewayBody>> for DemoApi {
    type Response = Response<SiteBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<SiteBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET, "/api/v1/status") => {
                json_response(StatusCode::OK, &json!({ "status": "ACTIVE" }))
            }
            (&Method::GET, "/api/v1/whoami") => match request.extensions().get::<Authenticated>() {
                Some(auth) => match auth.admin() {
                    Some(admin) => json_response(
                        StatusCode::OK,
                        &json!({ "orgId": auth.org(), "admin": admin.as_str() }),
                    ),
                    None => json_response(StatusCode::OK, &json!({ "orgId": auth.org() })),
                },
                None => json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "code": "INTERNAL_ERROR", "message": "not behind the layer" }),
                ),
            },
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({ "code": "RESOURCE_NOT_FOUND", "message": "no such resource" }),
            ),
        };
        std::future::ready(Ok(response))
    }
}

/// The protected application: the demo API or the upstream.
#[derive(Clone, Debug)]
enum Backend {
    Demo(DemoApi),
    Upstream(Box<Upstream>),
}

impl Service<Request<GatewayBody>> for Backend {
    type Response = Response<SiteBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SiteBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        match self {
            Self::Demo(demo) => Box::pin(demo.call(request)),
            Self::Upstream(upstream) => upstream.call(request),
        }
    }
}

/// Everything the gateway serves: `GET /metrics` (O2: counters only, no org, user or key;
/// protect it at the network level like any operations endpoint), a redirect to the admin page
/// for `/admin/` and (demo only) `/`, and otherwise [`OrgKey::wrap`] around the demo API or
/// the upstream.
#[derive(Clone, Debug)]
pub struct Site {
    wrapped: WithOrgKey<Backend>,
    proxying: bool,
    table: crate::OrgTable,
}

impl Site {
    /// The site of `orgkey`, protecting the demo API, or `upstream` when given.
    pub fn new(orgkey: &OrgKey, upstream: Option<Upstream>) -> Self {
        let proxying = upstream.is_some();
        let backend = match upstream {
            Some(upstream) => Backend::Upstream(Box::new(upstream)),
            None => Backend::Demo(DemoApi),
        };
        Self {
            wrapped: orgkey.wrap(backend),
            proxying,
            table: orgkey.table().clone(),
        }
    }

    fn operations(&self, request: &Request<GatewayBody>) -> Option<Response<SiteBody>> {
        let path = request.uri().path();
        if path == "/metrics" {
            let mut response = Response::new(full(crate::metrics::render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Some(response);
        }
        // G5: liveness answers while the process runs; readiness only while this replica
        // can vouch for its state (F3: its feed follows and, in strict mode, its lease holds;
        // a lost or unreachable database loses both within the stall bound).
        if path == "/healthz" {
            return Some(status_json(StatusCode::OK, r#"{"status":"ok"}"#));
        }
        if path == "/readyz" {
            if self.table.is_trusted() {
                return Some(status_json(StatusCode::OK, r#"{"status":"ready"}"#));
            }
            let mut response = status_json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"not ready","reason":"this replica cannot vouch for its authentication state (its change feed is reconnecting, stalled or not yet following, or its lease ran out)"}"#,
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(response);
        }
        // A person who opens the page's folder, or the demo gateway's root, lands on the page
        // (with an upstream the root is the upstream's, behind the layer).
        if path == "/admin/" || (path == "/" && !self.proxying) {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::SEE_OTHER;
            response
                .headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/admin"));
            return Some(response);
        }
        None
    }
}

/// A small JSON answer that no cache keeps.
fn status_json(status: StatusCode, body: &'static str) -> Response<SiteBody> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl Service<Request<GatewayBody>> for Site {
    type Response = Response<SiteBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SiteBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.wrapped.poll_ready(cx)
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        if let Some(response) = self.operations(&request) {
            return Box::pin(std::future::ready(Ok(response)));
        }
        let future = self.wrapped.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| body.boxed_unsync()))
        })
    }
}
