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
        match self.config.authenticate(&mut request) {
            Ok(authenticated) => {
                #[cfg(feature = "metrics")]
                crate::metrics::accepted(authenticated.admin().is_some());
                tracing::debug!(
                    target: "orgkey::auth",
                    org = %authenticated.org(),
                    outcome = "accepted",
                    admin = authenticated.admin().map(|a| a.as_str()),
                );
                // The one allocation on success (http boxes every extension, and allocates the
                // map for the first one); see BENCHMARKS.md.
                request.extensions_mut().insert(authenticated);
                ResponseFuture::inner(self.inner.call(request))
            }
            Err((reason, org)) => {
                #[cfg(feature = "metrics")]
                crate::metrics::rejected(reason);
                tracing::info!(
                    target: "orgkey::auth",
                    org = org.as_ref().map_or("-", |o| o.loggable()),
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
