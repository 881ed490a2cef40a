//! [`OrgKeyAuth`]: the middleware service.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::body::ResponseBody;
use super::future::ResponseFuture;
use super::layer::Config;
use super::rejection::Rejection;

/// Middleware that authenticates each request before the inner service sees it (L1-L4).
/// Built by [`OrgKeyLayer`](super::OrgKeyLayer).
#[derive(Clone, Debug)]
pub struct OrgKeyAuth<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> OrgKeyAuth<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for OrgKeyAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The inner service is called here, synchronously, on the instance that `poll_ready`
        // readied, so no clone (and no `mem::replace`) is needed.
        let mut request = request;
        // O1: every decision is made inside a span that carries the org, the method and the
        // outcome or reason (never a key, a session id or a password), on its own target,
        // `orgkey::span`, so that a deployment can keep its logs and drop the spans: disabled
        // (no subscriber, or the target filtered out) it costs a filter check; enabled under a
        // `fmt` subscriber it cost the gateway about 13% of its throughput (BENCHMARKS.md).
        let span = tracing::info_span!(
            target: "orgkey::span",
            "orgkey.authenticate",
            org = tracing::field::Empty,
            method = tracing::field::Empty,
            admin = tracing::field::Empty,
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        let entered = span.enter();
        #[cfg(feature = "metrics")]
        let timer = crate::metrics::AuthTimer::start();
        let decision = self.config.authenticate(&mut request);
        #[cfg(feature = "metrics")]
        timer.stop();
        match decision {
            Ok(authenticated) => {
                #[cfg(feature = "metrics")]
                crate::metrics::accepted(authenticated.admin().is_some());
                if !span.is_disabled() {
                    span.record("org", authenticated.org());
                    span.record("outcome", "accepted");
                    match authenticated.admin() {
                        Some(admin) => {
                            span.record("method", "session");
                            span.record("admin", admin.as_str());
                        }
                        None => {
                            span.record("method", "api_key");
                        }
                    }
                }
                tracing::debug!(
                    target: "orgkey::auth",
                    org = %authenticated.org(),
                    outcome = "accepted",
                    admin = authenticated.admin().map(|a| a.as_str()),
                );
                // The one allocation on success (http boxes every extension, and allocates the
                // map for the first one); see BENCHMARKS.md.
                request.extensions_mut().insert(authenticated);
                let future = self.inner.call(request);
                drop(entered);
                ResponseFuture::inner(future).in_span(span)
            }
            Err((reason, org)) => {
                #[cfg(feature = "metrics")]
                crate::metrics::rejected(reason);
                let org = org.as_ref().map_or("-", |o| o.loggable());
                span.record("org", org);
                span.record("outcome", "rejected");
                span.record("reason", reason.as_str());
                tracing::info!(
                    target: "orgkey::auth",
                    org,
                    outcome = "rejected",
                    reason = reason.as_str(),
                    key_header = %self.config.key_header(),
                    "request rejected"
                );
                let response = Rejection::new(reason).into_response(&self.config.challenge);
                ResponseFuture::rejected(response.map(|b: Bytes| ResponseBody::rejection(b)))
            }
        }
    }
}
