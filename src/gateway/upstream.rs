//! The reverse proxy (G1): authenticated requests forwarded to one upstream.
//!
//! See [`Upstream`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{BoxError, GatewayBody, SiteBody};
use crate::http::proxy::ProxyHeaders;
use crate::Authenticated;

/// Default [`Upstream::timeout`] (`--upstream-timeout`).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

type Connector = Deadline<HttpsConnector<HttpConnector>>;

/// Forwards each request to the upstream at a base URI (same path and query), as
/// [`ProxyHeaders`] prescribes: without orgkey's credentials, hop-by-hop headers or client-sent
/// look-alikes of the identity headers, with the identity in the `x-orgkey-*` headers and
/// `X-Forwarded-For`/`-Proto`/`-Host` appended; the upstream's `Set-Cookie: JSESSIONID` is
/// dropped (logged once). Behind the layer only: a request without [`Authenticated`] is
/// refused.
///
/// What the upstream sees is [`ProxyHeaders`]' business; moving the bytes is this:
///
/// - `http://` and `https://` upstreams (rustls with the ring provider; the upstream's
///   certificate is checked against the system's trust store, which `SSL_CERT_FILE` and
///   `SSL_CERT_DIR` override);
/// - bodies stream both ways, frame by frame: an upload reaches the upstream while the client
///   is still sending it, a download reaches the client while the upstream is still sending
///   it, and neither is held in memory;
/// - one timeout ([`Upstream::timeout`], `--upstream-timeout`, default 60 s) bounds each wait
///   on the upstream: connecting (TCP and TLS), its answer's head once the request body is
///   sent in full, and each pause within its answer's body. The first two answer
///   `504 {"code":"UPSTREAM_TIMEOUT",...}`; a stalled body is cut (the client's connection is
///   closed: its head was already sent). An upstream that cannot be reached, fails the TLS
///   handshake or closes without an answer gets `502 {"code":"BAD_GATEWAY",...}`. How long
///   the client may take to send its body is the server's body-read timeout (G2), not this.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    tls: Arc<rustls::ClientConfig>,
    client: Client<Connector, SentBody>,
    headers: ProxyHeaders,
    timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A proxy to `base` (`http://host:port` or `https://host:port`), with the default
    /// timeout and [`ProxyHeaders::new`].
    ///
    /// # Errors
    ///
    /// A message if `base` is not `http(s)://host[:port]` with nothing after it, or if it is
    /// `https://` and no trusted root certificate can be loaded (the system's store, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub fn new(base: &str) -> Result<Self, String> {
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("{base:?} is not a URL ({e})"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{base:?}: use http://host:port or https://host:port"
                ))
            }
        };
        if uri.authority().is_none() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!(
                "{base:?}: use http://host:port or https://host:port"
            ));
        }
        let tls = Arc::new(tls_config(https)?);
        Ok(Self {
            client: client(&tls, DEFAULT_UPSTREAM_TIMEOUT),
            base: uri,
            tls,
            headers: ProxyHeaders::new(),
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
        })
    }

    /// How long each wait on the upstream may last (see [`Upstream`]).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.client = client(&self.tls, timeout);
        self
    }

    /// What is stripped and set toward the upstream and the client: another key header, the
    /// scheme clients use (`https` behind TLS, for `X-Forwarded-Proto`), trusted proxies
    /// (for `X-Forwarded-*`). Default: [`ProxyHeaders::new`].
    #[must_use]
    pub fn headers(mut self, headers: ProxyHeaders) -> Self {
        self.headers = headers;
        self
    }
}

/// The TLS settings toward the upstream: the ring provider, TLS 1.2 and 1.3, and the system's
/// trust store (needed only for an `https://` upstream).
fn tls_config(https: bool) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    if https {
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), ToString::to_string);
            return Err(format!(
                "no trusted root certificate for the https upstream ({why}); install the \
                 system's CA certificates or set SSL_CERT_FILE"
            ));
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|config| config.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("TLS settings: {e}"))
}

fn client(tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Client<Connector, SentBody> {
    let mut http = HttpConnector::new();
    // The scheme is the https connector's to check.
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(Deadline {
        inner: https,
        timeout,
    })
}

/// A `{"code","message"}` answer for an upstream failure.
fn failure(status: StatusCode, code: &str, message: &str) -> Response<SiteBody> {
    super::site_response(crate::response::error(status, code, message))
}

/// Logs the first `Set-Cookie: JSESSIONID` an upstream sends at warn, later ones at debug.
static SESSION_COOKIE_WARNED: AtomicBool = AtomicBool::new(false);

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
                "INTERNAL_ERROR",
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
                "BAD_GATEWAY",
                "bad upstream address",
            ))));
        };
        *request.uri_mut() = uri;
        // The upstream's own name, set by the client from the URI (the client's is in
        // X-Forwarded-Host).
        request.headers_mut().remove(http::header::HOST);
        let (sent, mut sent_rx) = watch::channel(false);
        let request = request.map(|body| SentBody::new(body, sent));
        let client = self.client.clone();
        let headers = self.headers.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            // The answer's head is due `timeout` after the request body is sent in full (a
            // slow upload is the body-read timeout's business, G2).
            let head_due = async {
                if sent_rx.wait_for(|sent| *sent).await.is_err() {
                    // The body was dropped unfinished: the request fails on its own.
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(timeout).await;
            };
            let result = tokio::select! {
                result = client.request(request) => result,
                () = head_due => {
                    tracing::warn!(?timeout, "the upstream did not answer in time");
                    return Ok(failure(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UPSTREAM_TIMEOUT",
                        &format!("the upstream did not answer within {}", seconds(timeout)),
                    ));
                }
            };
            match result {
                Ok(response) => {
                    let mut response = response.map(|body| {
                        UpstreamBody {
                            inner: body,
                            timeout,
                            timer: None,
                            armed: false,
                        }
                        .boxed_unsync()
                    });
                    let removed = headers.for_client(&mut response);
                    if removed.session_cookies > 0 {
                        warn_session_cookie(removed.session_cookies);
                    }
                    Ok(response)
                }
                Err(error) => Ok(answer_failure(&error, timeout)),
            }
        })
    }
}

fn warn_session_cookie(count: usize) {
    if SESSION_COOKIE_WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!(count, "dropped the upstream's Set-Cookie: JSESSIONID");
    } else {
        tracing::warn!(
            count,
            "dropped the upstream's Set-Cookie: JSESSIONID, which would replace the gateway's \
             session cookie in the browser; give the upstream's session cookie another name \
             (logged once; later ones at debug)"
        );
    }
}

/// `60 s`, `0.5 s`.
fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// The answer to a request the upstream did not answer, by what failed.
fn answer_failure(
    error: &hyper_util::client::legacy::Error,
    timeout: Duration,
) -> Response<SiteBody> {
    let timed_out = caused_by::<ConnectTimeout>(error);
    let tls = caused_by::<rustls::Error>(error);
    tracing::warn!(error = %with_causes(error), "upstream request failed");
    if timed_out {
        failure(
            StatusCode::GATEWAY_TIMEOUT,
            "UPSTREAM_TIMEOUT",
            &format!(
                "the upstream did not accept a connection within {}",
                seconds(timeout)
            ),
        )
    } else if tls {
        failure(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            "the TLS handshake with the upstream failed",
        )
    } else if error.is_connect() {
        failure(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            "the upstream could not be reached",
        )
    } else {
        failure(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            "the upstream closed the connection without an answer",
        )
    }
}

/// Whether `error`, its sources, or the errors `io::Error`s among them wrap (hyper-rustls
/// wraps rustls' errors in two of them, and `io::Error::source` skips what it wraps) is a `T`.
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    if error.is::<T>() {
        return true;
    }
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        if caused_by::<T>(inner) {
            return true;
        }
    }
    error.source().is_some_and(caused_by::<T>)
}

/// `error: cause: cause` (hyper-util's errors keep the reason in their sources).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// Connecting to the upstream (TCP and TLS) took longer than the timeout.
#[derive(Debug)]
struct ConnectTimeout;

impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connecting to the upstream timed out")
    }
}

impl std::error::Error for ConnectTimeout {}

/// A connector whose connections (TCP and TLS handshake) must be up within `timeout`.
#[derive(Clone)]
struct Deadline<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<Uri> for Deadline<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
            }
        })
    }
}

/// The request body on its way upstream, saying when it has been sent in full (which is
/// also never before a connection is up: hyper asks a body nothing before that).
struct SentBody {
    inner: GatewayBody,
    sent: watch::Sender<bool>,
}

impl SentBody {
    fn new(inner: GatewayBody, sent: watch::Sender<bool>) -> Self {
        Self { inner, sent }
    }
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                this.sent.send_replace(true);
            }
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.sent.send_replace(true);
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            // hyper asks this when it writes the request on a connection; an empty body is
            // then never polled.
            self.sent.send_replace(true);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's answer body on its way to the client: fails when the upstream pauses
/// longer than the timeout (counted only while the client is waiting for more).
struct UpstreamBody {
    inner: Incoming,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// The upstream paused its answer's body longer than the timeout.
#[derive(Debug)]
struct UpstreamStalled;

impl std::fmt::Display for UpstreamStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream stopped sending its answer")
    }
}

impl std::error::Error for UpstreamStalled {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if !this.armed {
            // The wait starts now: time the client spent not asking for more is not the
            // upstream's.
            let deadline = Instant::now() + this.timeout;
            match &mut this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.armed = true;
        }
        let Some(timer) = &mut this.timer else {
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_ready() {
            this.armed = false;
            tracing::warn!(
                timeout = ?this.timeout,
                "the upstream stalled in its answer; cutting it"
            );
            return Poll::Ready(Some(Err(Box::new(UpstreamStalled))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
