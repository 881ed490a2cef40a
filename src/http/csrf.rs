//! [`CsrfLayer`]: protection of browser-originated state changes against cross-site request
//! forgery (W1), for the login and key-management endpoints that the admin page calls.
//!
//! The admin page signs in through `POST /api/v1/authenticatedSession` and manages the key
//! through the `apiKeys` endpoints, exactly like the Zscaler clients do. A browser attaches
//! the session cookie to those requests by itself, so a page from another site could try to
//! make them on a signed-in admin's behalf. The session cookie is `SameSite=Strict`, which
//! already keeps it off cross-site requests in current browsers; this layer adds the two
//! checks of W1 on top, so that the protection does not rest on one browser feature.
//!
//! # Acceptance rules
//!
//! A request passes to the inner service when the first rule that applies says so:
//!
//! 0. Only with [`CsrfLayer::cookie_requests_only`]: a request without a `JSESSIONID`
//!    cookie passes (it carries no ambient credential to forge with).
//! 1. A safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) passes. The endpoints change nothing
//!    on those.
//! 2. A request carrying neither `Origin` nor `Sec-Fetch-Site` passes: it was not sent by a
//!    browser's script or form (browsers send `Origin` on every state-changing request and
//!    `Sec-Fetch-Site` on every request to a secure context), so it is a non-browser API
//!    client, such as the Zscaler libraries, curl or a SOAR integration, which keeps working
//!    unchanged (W1).
//! 3. `Sec-Fetch-Site`, when present, must be `same-origin`; `same-site`, `cross-site` and
//!    `none` are refused.
//! 4. `Origin`, when present, must be the request's own origin (its host and port, the
//!    scheme's default port if none is written, equal those of the `Host` header, or of the
//!    URI's authority for HTTP/2) or one given to [`CsrfLayer::allow_origin`] (scheme, host
//!    and port). `Origin: null` is refused. A request does not say whether it came over TLS,
//!    so for the request's own origin the scheme is not compared: an `http://` page of the
//!    same host and port passes this rule (its requests are `same-site`, not
//!    `same-origin`, so rule 3 refuses them in browsers that send `Sec-Fetch-Site`, and
//!    `Secure` cookies never reach a plain-http page).
//! 5. If the request carries a `JSESSIONID` cookie of a live session, it must carry that
//!    session's CSRF token in the `X-CSRF-Token` header ([`token_for_session`]; compared in
//!    constant time). A cookie of a dead or unknown session needs no token: the session
//!    authenticates nothing (a login may replace it). Two `JSESSIONID` cookies are refused.
//! 6. Anything else passes.
//!
//! A refused request gets `403` with `{"code":"CSRF_CHECK_FAILED","message":...}`; the inner
//! service is not called and nothing changes. Which rule refused it is in a [`CsrfRejection`]
//! in the response's extensions, in the `orgkey::http::csrf` tracing event, and never in the body
//! beyond a fixed sentence.
//!
//! # The token
//!
//! The token is bound to the session: it is the SHA-256 digest of a fixed label and the
//! session id's random bytes, in hex. It needs no storage (every replica derives the same
//! token from the cookie), changes with every session (a carried-over session has a new one,
//! W2), reveals nothing about the id, and differs from the digest the store keeps (S1). The
//! admin page learns it from `GET /admin/session`
//! ([`AdminPage`](crate::http::page::AdminPage)), which only same-origin script can read.
//!
//! # Deployment caveat
//!
//! Rule 2 trusts that browsers send `Origin` with state-changing requests: every current
//! browser does; browsers from before 2020 may not, and are then protected by `SameSite`
//! alone. Behind a reverse proxy that rewrites `Host`, rule 4 needs the public origin
//! through [`CsrfLayer::allow_origin`]. In front of an API that other sites call from
//! browsers with keys (CORS), use [`CsrfLayer::cookie_requests_only`], or rules 3 and 4 would
//! refuse their writes. `SameSite=Strict` does not separate pages of the same site (another
//! port on the host, a sibling subdomain); the origin and token rules do, but anything served
//! from the page's own origin (for example an upstream proxied under it) is the page's equal:
//! serve the admin page on an origin of its own where that matters.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use orgkey::http::csrf::CsrfLayer;
//! use orgkey::{Admins, OrgTable, Sessions};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let table = OrgTable::default();
//! let sessions = Sessions::new(table.clone(), Admins::new(table));
//! let service = ServiceBuilder::new()
//!     .layer(CsrfLayer::new(sessions))
//!     .service_fn(|_: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     });
//!
//! // A Zscaler client (no Origin, no Sec-Fetch-Site) passes.
//! let client = Request::post("/api/v1/authenticatedSession")
//!     .header("host", "gw.example").body(Full::default()).unwrap();
//! assert_eq!(service.clone().oneshot(client).await.unwrap().status(), StatusCode::OK);
//!
//! // A script on another site does not.
//! let forged = Request::post("/api/v1/authenticatedSession")
//!     .header("host", "gw.example").header("origin", "https://evil.example")
//!     .header("sec-fetch-site", "cross-site").body(Full::default()).unwrap();
//! assert_eq!(service.oneshot(forged).await.unwrap().status(), StatusCode::FORBIDDEN);
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{COOKIE, HOST, ORIGIN};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{ResponseBody, ResponseFuture};
use crate::response;
pub use crate::session::{token_for_session, CsrfToken};
use crate::session::{SessionCheck, Sessions};

/// The request header that carries the token: `X-CSRF-Token`.
pub const TOKEN_HEADER: &str = "x-csrf-token";

const SEC_FETCH_SITE: &str = "sec-fetch-site";
/// Which acceptance rule refused a request; placed in the `403` response's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CsrfRejection {
    /// `Sec-Fetch-Site` is not `same-origin` (rule 3).
    CrossSiteFetch,
    /// `Origin` is `null`, unparsable, or neither the request's own nor an allowed one
    /// (rule 4).
    ForeignOrigin,
    /// The request carries a live session's cookie without its token, or with another
    /// (rule 5).
    TokenMismatch,
    /// More than one `JSESSIONID` cookie (rule 5).
    AmbiguousSession,
}

impl CsrfRejection {
    /// A stable lowercase name, for logs.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::CrossSiteFetch => "cross_site_fetch",
            Self::ForeignOrigin => "foreign_origin",
            Self::TokenMismatch => "token_mismatch",
            Self::AmbiguousSession => "ambiguous_session",
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Self::CrossSiteFetch | Self::ForeignOrigin => {
                r#"{"code":"CSRF_CHECK_FAILED","message":"cross-site request refused"}"#
            }
            Self::TokenMismatch | Self::AmbiguousSession => {
                r#"{"code":"CSRF_CHECK_FAILED","message":"missing or wrong CSRF token"}"#
            }
        }
    }
}

impl fmt::Display for CsrfRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Layer applying the [acceptance rules](self) to every request (W1).
#[derive(Clone, Debug)]
pub struct CsrfLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    sessions: Sessions,
    /// Lowercase ASCII origins (`scheme://host[:port]`), besides the request's own.
    origins: Vec<String>,
    /// Rule 0: requests without a session cookie pass.
    cookie_requests_only: bool,
}

impl CsrfLayer {
    /// Checks against the sessions of `sessions` (rule 5); origins must be the request's own.
    pub fn new(sessions: Sessions) -> Self {
        Self {
            config: Arc::new(Config {
                sessions,
                origins: Vec::new(),
                cookie_requests_only: false,
            }),
        }
    }

    /// Also accepts `origin` (`scheme://host[:port]`, as browsers send it; compared without
    /// regard to ASCII case), for deployments where the `Host` the gateway sees is not the
    /// one the browser used (a reverse proxy that rewrites it). A trailing `/` and any path
    /// are ignored.
    pub fn allow_origin(mut self, origin: &str) -> Self {
        let origin = origin_of(origin);
        Arc::make_mut(&mut self.config).origins.push(origin);
        self
    }
}

impl CsrfLayer {
    /// Applies the rules only to requests that carry a `JSESSIONID` cookie (rule 0): for an
    /// API that browsers on other origins may call with a key (CORS) but that also accepts
    /// admin session cookies. A key-only request, which carries no ambient credential, then
    /// passes whatever its origin; a request that a browser sent with the admin's cookie gets
    /// the full rules, so a page elsewhere on the same site cannot ride on that cookie.
    pub fn cookie_requests_only(mut self) -> Self {
        Arc::make_mut(&mut self.config).cookie_requests_only = true;
        self
    }
}

/// `scheme://authority` of a URL, lowercase (`https://Gw.Example:8443/api/v1` ->
/// `https://gw.example:8443`).
fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split('/').next().unwrap_or_default();
    format!("{scheme}://{authority}").to_ascii_lowercase()
}

impl<S> Layer<S> for CsrfLayer {
    type Service = Csrf<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Csrf {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// Middleware applying the [acceptance rules](self). Built by [`CsrfLayer`].
#[derive(Clone, Debug)]
pub struct Csrf<S> {
    inner: S,
    config: Arc<Config>,
}

impl Config {
    fn check<B>(&self, request: &mut Request<B>) -> Result<(), CsrfRejection> {
        // Rule 0, when configured: a request without a session cookie is not checked (and
        // one without any `Cookie` header is let through without parsing anything: the
        // direct-key hot path).
        if self.cookie_requests_only
            && (!request.headers().contains_key(COOKIE)
                || matches!(self.sessions.check_request(request), SessionCheck::Absent))
        {
            return Ok(());
        }
        // Rule 1.
        if matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ) {
            return Ok(());
        }
        let headers = request.headers();
        let origin = headers.get(ORIGIN);
        let fetch_site = headers.get(HeaderName::from_static(SEC_FETCH_SITE));
        // Rule 2.
        if origin.is_none() && fetch_site.is_none() {
            return Ok(());
        }
        // Rule 3.
        if let Some(site) = fetch_site {
            if site.as_bytes() != b"same-origin" {
                return Err(CsrfRejection::CrossSiteFetch);
            }
        }
        // Rule 4.
        if let Some(origin) = origin {
            if !self.origin_allowed(origin, request) {
                return Err(CsrfRejection::ForeignOrigin);
            }
        }
        // Rule 5: the session is checked once per request, here or by whoever came first;
        // the layer and the endpoints behind reuse the answer.
        match self.sessions.check_request(request) {
            // No session, or a dead one (the layer refuses it): no token to compare.
            SessionCheck::Absent | SessionCheck::Dead(_) => Ok(()),
            SessionCheck::Several => Err(CsrfRejection::AmbiguousSession),
            SessionCheck::Live(live) => {
                let presented = request
                    .headers()
                    .get(HeaderName::from_static(TOKEN_HEADER))
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default();
                if bool::from(live.csrf_token.expose_secret().as_bytes().ct_eq(presented)) {
                    Ok(())
                } else {
                    Err(CsrfRejection::TokenMismatch)
                }
            }
        }
    }

    fn origin_allowed<B>(&self, origin: &HeaderValue, request: &Request<B>) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false; // "null" and garbage
        };
        if !matches!(scheme, "http" | "https") || authority.is_empty() {
            return false;
        }
        let presented = with_port(scheme, authority);
        if self.origins.iter().any(|allowed| {
            allowed
                .split_once("://")
                .is_some_and(|(s, a)| s == scheme && with_port(s, a) == presented)
        }) {
            return true;
        }
        let own = request
            .headers()
            .get(HOST)
            .and_then(|host| host.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        own.is_some_and(|own| with_port(scheme, &own.to_ascii_lowercase()) == presented)
    }
}

/// `authority` with the scheme's default port made explicit (`gw.example` ->
/// `gw.example:443` for https), so that `Origin: https://gw.example` matches
/// `Host: gw.example:443` and the reverse.
fn with_port(scheme: &str, authority: &str) -> String {
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    if authority[host_end..].contains(':') {
        authority.to_owned()
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        format!("{authority}:{port}")
    }
}

fn forbidden(rejection: CsrfRejection) -> Response<Bytes> {
    let mut response = response::fixed(StatusCode::FORBIDDEN, rejection.body());
    response.extensions_mut().insert(rejection);
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Csrf<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The inner service is called synchronously, on the instance `poll_ready` readied.
        match self.config.check(&mut request) {
            Ok(()) => ResponseFuture::inner(self.inner.call(request)),
            Err(rejection) => {
                tracing::warn!(
                    target: "orgkey::http::csrf",
                    method = %request.method(),
                    path = request.uri().path(),
                    reason = rejection.as_str(),
                    "state-changing browser request refused"
                );
                ResponseFuture::rejected(forbidden(rejection).map(ResponseBody::rejection))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_are_made_explicit() {
        assert_eq!(with_port("https", "gw.example"), "gw.example:443");
        assert_eq!(with_port("http", "gw.example"), "gw.example:80");
        assert_eq!(with_port("https", "gw.example:8443"), "gw.example:8443");
        assert_eq!(with_port("http", "[::1]"), "[::1]:80");
        assert_eq!(with_port("http", "[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn origins_are_normalized_to_scheme_and_authority() {
        assert_eq!(
            origin_of("https://Gw.Example:8443/api/v1"),
            "https://gw.example:8443"
        );
        assert_eq!(origin_of("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(origin_of("http://a.example/"), "http://a.example");
    }

    #[test]
    fn tokens_are_per_session_hex_and_not_the_stored_digest() {
        let a = "ab".repeat(32);
        let b = "ac".repeat(32);
        let ta = token_for_session(a.as_bytes()).unwrap();
        let tb = token_for_session(b.as_bytes()).unwrap();
        assert_eq!(ta.expose_secret().len(), 64);
        assert!(ta.expose_secret().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(ta.expose_secret(), tb.expose_secret());
        // Same id, same token (every replica derives it alike); case of the hex id is not
        // significant, as for the session lookup.
        let upper = a.to_ascii_uppercase();
        assert_eq!(
            ta.expose_secret(),
            token_for_session(upper.as_bytes()).unwrap().expose_secret()
        );
        let digest = crate::session::digest_of_presented(a.as_bytes()).unwrap();
        let digest_hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_ne!(ta.expose_secret(), digest_hex);
        assert!(token_for_session(b"not-a-session-id").is_none());
        assert_eq!(format!("{ta:?}"), "CsrfToken { .. }");
    }
}
