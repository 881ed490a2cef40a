//! The gateway's server loop (G2, G3): header-read, body-read and idle timeouts, a cap on
//! the connections open at once, and accept errors that back off instead of spinning or
//! flooding the log (G2). A slow or idle client cannot keep a connection (and a file
//! descriptor) for as long as it likes, and a flood of them cannot take the process down.
//!
//! Plain connections speak HTTP/1.1. With [`Transport::tls`] every connection is TLS
//! ([`Tls`]) and speaks HTTP/2 when the client chose `h2` by ALPN, else HTTP/1.1; the limits
//! are the same, and the TLS handshake counts against the header-read timeout.
//!
//! Per connection, a watchdog follows one of three phases:
//!
//! - *head*: waiting for a request head, since the connection opened (TLS handshake
//!   included) or since the first byte of a further request arrived; closed when the head is
//!   not in after the header-read timeout. On HTTP/2 only the first request is timed so: its
//!   frames (pings, window updates) do not start a request head, and a connection between
//!   requests is idle whatever it receives;
//! - *busy*: a request is in flight (its head is in and its response not fully handed to the
//!   socket); its body must arrive within the body-read timeout (else 408 and close);
//! - *idle*: a keep-alive connection between requests; closed after the idle timeout.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a keep-alive connection
//! waits for its next request, so the idle timeout could never be longer than it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tower_service::Service;

use super::forwarded::TrustedProxies;
use super::tls::Tls;
use super::{BoxError, GatewayBody};
use crate::http::ClientAddr;

/// Default `--header-read-timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--body-read-timeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default connection cap never exceeds this: each open connection costs buffers and a
/// task in the process and in the kernel, and a single gateway process needs no more.
pub const MAX_DEFAULT_CONNECTIONS: usize = 4096;
/// Descriptors kept back from the default cap for everything that is not a client connection
/// (stdio, the listener, the runtime's epoll and wakers, the SQLite file and its WAL, the
/// PostgreSQL connections); a quarter of the limit when that is smaller.
const DESCRIPTOR_RESERVE: usize = 64;
/// The open-file limit assumed when `/proc/self/limits` cannot be read (the usual soft limit).
const ASSUMED_OPEN_FILES: usize = 1024;
/// On shutdown, how long requests in flight may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The first pause after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`].
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one warning per this period about failed accepts, and one about the cap.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// What one client may hold, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive in full within this, counted from the connection's start
    /// or from the first byte of a further request on it.
    pub header_read_timeout: Duration,
    /// A request body must arrive in full within this, counted from its head.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once; further clients wait (in the listen backlog).
    pub max_connections: usize,
}

/// How clients reach the service: plain HTTP or TLS, and which peers may vouch for
/// `X-Forwarded-For` and `X-Forwarded-Proto` ([`TrustedProxies`]). The default is plain HTTP
/// that trusts no one.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// Serve every connection over TLS with this certificate (reloadable).
    pub tls: Option<Tls>,
    /// The proxies whose forwarding headers are believed.
    pub trusted_proxies: TrustedProxies,
}

/// The default connection cap: the process's open-file soft limit minus a reserve, halved
/// when proxying (each request forwarded upstream can hold a second socket), at most
/// [`MAX_DEFAULT_CONNECTIONS`], at least 1.
pub fn default_max_connections(proxying: bool) -> usize {
    let limit = open_files_soft_limit().unwrap_or(ASSUMED_OPEN_FILES);
    let reserve = DESCRIPTOR_RESERVE.min(limit / 4);
    let per_connection = if proxying { 2 } else { 1 };
    (limit.saturating_sub(reserve) / per_connection).clamp(1, MAX_DEFAULT_CONNECTIONS)
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux).
fn open_files_soft_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

/// Serves `service` on `listener` over plain HTTP/1.1 within `limits` until `shutdown`
/// completes; then stops accepting, lets requests in flight finish (up to 30 s) and returns.
///
/// Each request carries the client's address in its extensions, as a [`ClientAddr`] (which
/// the login throttle reads, A3) and as a `SocketAddr`, with a
/// [`ClientInfo`](super::forwarded::ClientInfo) beside them, and its body as a
/// [`GatewayBody`] under the body-read timeout.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_with(listener, service, limits, Transport::default(), shutdown).await;
}

/// [`serve`] over `transport`: TLS (HTTP/2 or HTTP/1.1 by ALPN) when it has a certificate,
/// and the client's address and scheme as its trusted proxies vouch for them: the
/// [`ClientAddr`] is [`ClientInfo::client`](super::forwarded::ClientInfo::client), while the
/// `SocketAddr` stays the peer's.
pub async fn serve_with<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let transport = Arc::new(transport);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    let mut accept_errors = AcceptErrors::default();
    let mut cap_logged: Option<Instant> = None;
    loop {
        // Wait for a free slot before accepting: a client over the cap waits in the listen
        // backlog instead of taking a descriptor.
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if cap_logged.is_none_or(|at| at.elapsed() >= LOG_PERIOD) {
                    cap_logged = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached; new clients wait until a connection closes"
                    );
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                accept_errors.succeeded();
                let service = service.clone();
                let stopping = stopping.clone();
                let transport = Arc::clone(&transport);
                tokio::spawn(async move {
                    connection(stream, remote, service, limits, &transport, stopping).await;
                    drop(permit);
                });
            }
            Err(error) => {
                drop(permit);
                let pause = accept_errors.failed(&error);
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = sleep(pause) => {}
                }
            }
        }
    }
    drop(listener);
    // Every connection closes once idle; those with a request in flight finish it first.
    let _ = stop.send(());
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = limits.max_connections - slots.available_permits(),
            "connections still open after {DRAIN_TIMEOUT:?}; closing them"
        );
    }
}

/// Failed accepts: a growing pause (EMFILE and ENFILE do not clear by retrying at once) and a
/// rate-limited warning.
#[derive(Default)]
struct AcceptErrors {
    /// Consecutive failures.
    streak: u32,
    /// Failures not yet reported.
    unreported: u64,
    last_report: Option<Instant>,
}

impl AcceptErrors {
    /// Records a failure; returns how long to pause before the next accept.
    fn failed(&mut self, error: &io::Error) -> Duration {
        self.streak = self.streak.saturating_add(1);
        let pause = FIRST_ACCEPT_BACKOFF
            .saturating_mul(1 << self.streak.saturating_sub(1).min(16))
            .min(MAX_ACCEPT_BACKOFF);
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            // One client gave up before we took its connection: nothing to fix here.
            tracing::debug!(%error, "accept error");
            return pause;
        }
        self.unreported += 1;
        if self.last_report.is_none_or(|at| at.elapsed() >= LOG_PERIOD) {
            tracing::warn!(
                %error,
                errors = self.unreported,
                "accept error; retrying in {pause:?} (backing off up to {MAX_ACCEPT_BACKOFF:?}, \
                 reported at most every {LOG_PERIOD:?})"
            );
            self.last_report = Some(Instant::now());
            self.unreported = 0;
        }
        pause
    }

    fn succeeded(&mut self) {
        if self.streak > 0 {
            tracing::debug!(failures = self.streak, "accepting again");
            self.streak = 0;
        }
    }
}

/// Where a connection is in its request cycle; see the module documentation.
#[derive(Clone, Copy)]
enum Phase {
    Head { since: Instant },
    Busy { requests: usize },
    Idle { since: Instant },
}

/// One connection's phase, shared by its socket, its service and its watchdog.
struct Activity {
    phase: Mutex<Phase>,
    /// Tells the watchdog that the phase changed.
    changed: Notify,
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, next: impl FnOnce(Phase) -> Phase) {
        {
            let mut phase = self.lock();
            *phase = next(*phase);
        }
        // A stored permit if the watchdog is not waiting: no change goes unseen.
        self.changed.notify_one();
    }

    /// Bytes came in: on an idle connection, that starts the next request head.
    fn bytes_arrived(&self) {
        let mut phase = self.lock();
        if let Phase::Idle { .. } = *phase {
            *phase = Phase::Head {
                since: Instant::now(),
            };
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn busy(&self) -> bool {
        matches!(*self.lock(), Phase::Busy { .. })
    }

    /// When the connection is to be closed, and why; `None` while a request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        match *self.lock() {
            Phase::Head { since } => Some((
                since.checked_add(limits.header_read_timeout)?,
                "request head not received within the header-read timeout",
            )),
            Phase::Idle { since } => {
                Some((since.checked_add(limits.idle_timeout)?, "idle timeout"))
            }
            Phase::Busy { .. } => None,
        }
    }
}

/// A request in flight, from its head until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.set(|phase| match phase {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy { requests: 1 },
        });
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(|phase| match phase {
            Phase::Busy { requests } if requests > 1 => Phase::Busy {
                requests: requests - 1,
            },
            _ => Phase::Idle {
                since: Instant::now(),
            },
        });
    }
}

/// What one connection's requests share: who is at the other end and how.
#[derive(Clone)]
struct Peer {
    remote: SocketAddr,
    tls: bool,
    trusted_proxies: TrustedProxies,
}

/// Which HTTP a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves one connection until it ends, a limit closes it, or shutdown has let it finish:
/// the TLS handshake first (within the header-read timeout), when there is TLS.
async fn connection<S, B>(
    stream: TcpStream,
    remote: SocketAddr,
    service: S,
    limits: Limits,
    transport: &Transport,
    mut stopping: watch::Receiver<()>,
) where
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let activity = Arc::new(Activity {
        phase: Mutex::new(Phase::Head { since: started }),
        changed: Notify::new(),
    });
    let mut peer = Peer {
        remote,
        tls: false,
        trusted_proxies: transport.trusted_proxies.clone(),
    };
    let Some(tls) = &transport.tls else {
        let io = Watched {
            stream,
            activity: Arc::clone(&activity),
        };
        return serve_connection(
            io,
            Protocol::Http1,
            peer,
            service,
            limits,
            activity,
            stopping,
        )
        .await;
    };
    let handshake = tls.acceptor().accept(stream);
    let handshake = async move {
        match started.checked_add(limits.header_read_timeout) {
            Some(deadline) => tokio::time::timeout_at(deadline, handshake).await.ok(),
            None => Some(handshake.await),
        }
    };
    let stream = tokio::select! {
        biased;
        _ = stopping.changed() => return,
        handshake = handshake => match handshake {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%remote, %error, "TLS handshake failed");
                return;
            }
            None => {
                tracing::debug!(
                    %remote,
                    "closing the connection: TLS handshake not finished within the header-read timeout"
                );
                return;
            }
        },
    };
    peer.tls = true;
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_connection(
            stream,
            Protocol::Http2,
            peer,
            service,
            limits,
            activity,
            stopping,
        )
        .await;
    } else {
        let io = Watched {
            stream,
            activity: Arc::clone(&activity),
        };
        serve_connection(
            io,
            Protocol::Http1,
            peer,
            service,
            limits,
            activity,
            stopping,
        )
        .await;
    }
}

/// Serves HTTP on an established connection (plain, or after the TLS handshake) under the
/// watchdog.
async fn serve_connection<I, S, B>(
    io: I,
    protocol: Protocol,
    peer: Peer,
    service: S,
    limits: Limits,
    activity: Arc<Activity>,
    mut stopping: watch::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let remote = peer.remote;
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = InFlight::start(Arc::clone(&activity));
            handle(request, peer.clone(), service.clone(), limits, in_flight)
        })
    };
    let mut http = auto::Builder::new(TokioExecutor::new());
    // Off: the watchdog below times request heads (see the module documentation).
    http.http1().header_read_timeout(None);
    let http = match protocol {
        Protocol::Http1 => http.http1_only(),
        Protocol::Http2 => http.http2_only(),
    };
    let mut conn = pin!(http.serve_connection(TokioIo::new(io), service));
    let mut draining = false;
    loop {
        let changed = activity.changed.notified();
        let deadline = activity.deadline(&limits);
        let expiry = async move {
            match deadline {
                Some((at, _)) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%remote, %error, "connection ended with an error");
                }
                return;
            }
            () = changed => {}
            () = expiry => {
                // The phase may have moved on since the deadline was read.
                if let Some((at, why)) = activity.deadline(&limits) {
                    if at <= Instant::now() {
                        tracing::debug!(%remote, "closing the connection: {why}");
                        return;
                    }
                }
            }
            _ = stopping.changed(), if !draining => {
                // Shutting down: a connection without a request in flight closes now; one
                // with a request finishes its response first.
                if !activity.busy() {
                    return;
                }
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// One request: who sent it in the extensions, the body under the body-read timeout, and a
/// 408 that closes the connection (HTTP/1.1; on HTTP/2 it ends the stream) when the body did
/// not arrive in time.
async fn handle<S, B>(
    request: Request<Incoming>,
    peer: Peer,
    mut service: S,
    limits: Limits,
    in_flight: InFlight,
) -> Result<Response<Tracked>, Infallible>
where
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let remote = peer.remote;
    let (mut parts, body) = request.into_parts();
    let http2 = parts.version == http::Version::HTTP_2;
    let head = parts.method == http::Method::HEAD;
    let client = peer
        .trusted_proxies
        .client_info(remote, peer.tls, &parts.headers);
    parts.extensions.insert(ClientAddr(client.client()));
    parts.extensions.insert(remote);
    parts.extensions.insert(client);
    let expired = Arc::new(AtomicBool::new(false));
    let body = TimedBody {
        inner: body,
        deadline: Instant::now().checked_add(limits.body_read_timeout),
        timer: None,
        expired: Arc::clone(&expired),
    };
    let request = Request::from_parts(parts, GatewayBody(body));
    let response = match std::future::poll_fn(|cx| service.poll_ready(cx)).await {
        Ok(()) => match service.call(request).await {
            Ok(response) => response.map(|body| body.map_err(Into::into).boxed_unsync()),
            Err(never) => match never {},
        },
        Err(never) => match never {},
    };
    let response = if expired.load(Ordering::Relaxed) {
        tracing::debug!(%remote, "request body not received within the body-read timeout");
        let mut timeout = Response::new(super::full(Bytes::from_static(
            b"request body not received in time\n",
        )));
        *timeout.status_mut() = StatusCode::REQUEST_TIMEOUT;
        let headers = timeout.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The rest of the body may still be on its way: do not read it as a next request.
        // (HTTP/2 has no such header: the stream ends, the connection's other streams go on.)
        if !http2 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        timeout
    } else if http2 && head {
        // hyper drops the body of a HEAD answer on HTTP/1.1 but sends it on HTTP/2, where a
        // client takes the DATA frames for a protocol error: the head goes alone.
        response.map(|_| super::full(Bytes::new()))
    } else {
        response
    };
    Ok(response.map(|body| Tracked {
        inner: body,
        _in_flight: in_flight,
    }))
}

/// The error a request body reports when the body-read timeout passes.
#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body not received within the body-read timeout")
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that fails once its deadline passes before it ended; the timer is only set
/// up when the body actually has to wait.
pub(super) struct TimedBody {
    inner: Incoming,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let Some(deadline) = this.deadline else {
            return Poll::Pending;
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
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

/// A response body that keeps its request in flight until it is done or dropped.
struct Tracked {
    inner: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's connection (its socket, or the TLS stream over it), telling [`Activity`]
/// when bytes of a request arrive (HTTP/1.1 only).
struct Watched<I> {
    stream: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_arrived();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
