//! The deployable gateway (feature `gateway`): the main job, as `cargo run --example gateway`
//! or the `orgkey-gateway` binary.
//!
//! It is the composition root ([`OrgKey`](crate::OrgKey)) on a store, served by a server with
//! limits, in front of either a built-in demo API or an upstream it proxies to:
//!
//! - [`cli`]: the command line (flags, the first start's provisioning, what it prints);
//! - [`ops`]: the operator commands (G6: `org ...`, `admin ...`), direct or through the
//!   running gateway's control socket;
//! - [`serve`](serve::serve): the server with header-read, body-read and idle timeouts, a
//!   connection cap and accept back-off (G2), over plain HTTP/1.1 or TLS
//!   ([`serve_with`](serve::serve_with));
//! - [`tls`]: rustls with a certificate reloaded on `SIGHUP`, HTTP/2 by ALPN, and
//!   [`SecureTransport`](tls::SecureTransport): no login over plain HTTP, `Secure` session
//!   cookies over https (G3);
//! - [`forwarded`]: `--trusted-proxy`, the peers that may vouch for `X-Forwarded-For` and
//!   `X-Forwarded-Proto`, and [`ClientInfo`](forwarded::ClientInfo), who sent a request;
//! - [`Upstream`]: the reverse proxy (G1), with [`ProxyHeaders`](crate::http::proxy::ProxyHeaders):
//!   http and https upstreams, streamed bodies, 502/504 answers;
//! - [`Site`]: what the gateway serves: `/metrics` (O2), `/healthz` and `/readyz` (G5),
//!   forward-auth at `/api/v1/verify` (G4, through [`OrgKey::wrap`](crate::OrgKey::wrap)),
//!   the demo API or the upstream behind
//!   [`OrgKey::wrap`](crate::OrgKey::wrap), and a redirect to the admin page for a browser
//!   that opens `/` (demo) or `/admin/`.

pub mod cli;
pub mod forwarded;
pub mod ops;
pub mod serve;
mod site;
pub mod tls;
mod upstream;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

pub use cli::main;
pub use site::{DemoApi, Site};
pub use upstream::{Upstream, DEFAULT_UPSTREAM_TIMEOUT};

/// A boxed error, as hyper and tower use them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request the gateway's server hands on: the client's bytes, failing with an
/// error once the body-read timeout passes (G2).
pub struct GatewayBody(serve::TimedBody);

impl std::fmt::Debug for GatewayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBody").finish_non_exhaustive()
    }
}

impl http_body::Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// The body of every answer the gateway gives.
pub type SiteBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body the gateway writes itself, as a [`SiteBody`].
fn full(body: impl Into<Bytes>) -> SiteBody {
    boxed(http_body_util::Full::new(body.into()))
}

/// One of orgkey's own JSON answers (`crate::response`), as a gateway answer.
fn site_response(
    response: http::Response<http_body_util::Full<Bytes>>,
) -> http::Response<SiteBody> {
    response.map(boxed)
}

fn boxed(body: http_body_util::Full<Bytes>) -> SiteBody {
    use http_body_util::BodyExt;
    body.map_err(|never| match never {}).boxed_unsync()
}

/// An error and its causes, outermost first: `a (b: c)`. orgkey's messages never carry a
/// secret, so the whole chain may be printed.
pub(crate) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        inner.push(cause.to_string());
        next = cause.source();
    }
    if inner.is_empty() {
        e.to_string()
    } else {
        format!("{e} ({})", inner.join(": "))
    }
}
