//! The reverse proxy (G1): authenticated requests forwarded to one upstream.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use super::{GatewayBody, SiteBody};
use crate::http::proxy::ProxyHeaders;
use crate::Authenticated;

/// Forwards each request to the upstream at a base URI (same path and query), as
/// [`ProxyHeaders`] prescribes: without orgkey's credentials, hop-by-hop headers or client-sent
/// look-alikes of the identity headers, with the identity in the `x-orgkey-*` headers. Bodies
/// stream both ways. Behind the layer only: a request without [`Authenticated`] is refused.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    client: Client<HttpConnector, GatewayBody>,
    headers: ProxyHeaders,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A proxy to `base` (`http://host:port`).
    ///
    /// # Errors
    ///
    /// A message if `base` is not `http://host[:port]` with nothing after it.
    pub fn new(base: &str) -> Result<Self, String> {
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("{base:?} is not a URL ({e})"))?;
        if uri.scheme_str() != Some("http")
            || uri.authority().is_none()
            || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        {
            return Err(format!("{base:?}: use http://host:port"));
        }
        Ok(Self {
            base: uri,
            client: Client::builder(TokioExecutor::new()).build_http(),
            headers: ProxyHeaders::new(),
        })
    }
}

/// A `{"code","message"}` answer for an upstream failure.
fn failure(status: StatusCode, message: &'static str) -> Response<SiteBody> {
    super::site_response(crate::response::error(status, "UPSTREAM_ERROR", message))
}

impl Service<Request<GatewayBody>> for Upstream {
    type Response = Response<SiteBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SiteBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<GatewayBody>) -> Self::Future {
        let Some(auth) = request.extensions().get::<Authenticated>().cloned() else {
            tracing::error!("Upstream called without Authenticated: it must be behind the layer");
            return Box::pin(std::future::ready(Ok(failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the gateway is misconfigured",
            ))));
        };
        let stripped = self.headers.for_upstream(&mut request, &auth);
        if stripped.query_keys > 0 {
            // The names and values stay out of the log: they may be keys.
            tracing::warn!(
                org = %auth.org(),
                parameters = stripped.query_keys,
                "stripped key-like query parameters before forwarding (keys are never accepted in the URL)"
            );
        }
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        let Ok(uri) = Uri::from_parts(parts) else {
            return Box::pin(std::future::ready(Ok(failure(
                StatusCode::BAD_GATEWAY,
                "bad upstream address",
            ))));
        };
        *request.uri_mut() = uri;
        request.headers_mut().remove(http::header::HOST);
        let client = self.client.clone();
        let headers = self.headers.clone();
        Box::pin(async move {
            match client.request(request).await {
                Ok(response) => {
                    let mut response = response.map(|body| body.map_err(Into::into).boxed_unsync());
                    headers.for_client(&mut response);
                    Ok(response)
                }
                Err(error) => {
                    tracing::warn!(%error, "upstream request failed");
                    Ok(failure(
                        StatusCode::BAD_GATEWAY,
                        "the upstream could not be reached",
                    ))
                }
            }
        })
    }
}
