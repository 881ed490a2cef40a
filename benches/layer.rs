//! The performance budget of DESIGN.md, measured as ratios within one run.
//!
//! For 1, 1,000 and 1,000,000 orgs:
//! - `floor`: the bare work of a check, without tower or http: org lookup in a `DashMap`,
//!   one `ArcSwap` load, constant-time compare of 12 bytes;
//! - `inner`: the inner service alone (request in, response out);
//! - `layer_valid` / `layer_wrong`: the inner service behind `OrgKeyLayer`, valid / wrong key.
//!
//! Plus `bearer` (tower-http's `ValidateRequestHeaderLayer::bearer`, no lookup, not
//! constant-time) as the peer baseline, and `layer_valid_rotating` at 1,000 orgs with a
//! background thread regenerating one org's key every millisecond.
//!
//! Layer overhead = `layer_valid` - `inner`. Requests cycle through the orgs in a scattered
//! order so that large tables pay their real memory latency. Run:
//! `cargo bench --bench layer`.
//!
//! # `hyper_1k`: the 1.2x budget against a minimal identity-passing layer
//!
//! DESIGN.md's layer budget: at 1,000 orgs, valid key, the layer's overhead (request through
//! the layer minus the inner service alone) is at most 1.2x that of a minimal identity-passing
//! layer measured in the same run (goal 1.0x). Group `hyper_1k` measures, on requests built
//! the way hyper's HTTP/1.1 server hands them to a service:
//!
//! - `inner`: the inner service alone;
//! - `minimal_identity`: [`MinimalIdentity`], a layer as a naive implementation would write
//!   it: two header lookups (with `HeaderName` constants, like orgkey), a plain `==` against
//!   the org's key found in a `DashMap<String, _>` (default hasher, as orgkey's table), one
//!   extension insert of an 8-byte identity, then the inner service;
//! - `minimal_identity_str`: the same with the header names given as `&str` literals
//!   (`headers.get("x-api-key")`), the most common naive spelling: http parses the name on
//!   every lookup;
//! - `bearer`: tower-http's `ValidateRequestHeaderLayer::bearer` (no lookup, no extension);
//! - `orgkey`: `OrgKeyLayer`, valid key.
//!
//! The requests: `Request<HyperLikeBody>`. hyper's `Incoming` has no public constructor, so
//! the body is a stand-in of exactly its size and alignment (asserted at compile time); the
//! rest is built as hyper 1.x's h1 server builds it (`proto/h1/role.rs`, `dispatch.rs`): the
//! head is read into a shared `BytesMut` read buffer and split off as one frozen `Bytes`;
//! `HeaderMap::new()` + `reserve(n)` (hyper reuses the previous response's emptied map, which
//! is unallocated for a response without headers), then one `append` per header in wire
//! order with `HeaderName::from_bytes` and values that are slices of that `Bytes` (hyper uses
//! the unchecked constructor, this bench the checked one: same representation); the URI is
//! a slice too; extensions are empty. At start the group checks this against a request that
//! hyper's own server built from the same bytes over an in-memory pipe (method, URI,
//! version, headers in order, header map capacity, no extensions). Headers: `Host`,
//! `User-Agent`, `Accept`, `X-Org-Id`, `X-API-Key` (for `bearer`, `Authorization: Bearer ...`
//! in place of the key header). Five headers leave the map one slot short of full; with six
//! (or 12, 24) hyper's map is exactly full, which matters to `HeaderMap::entry` (see
//! `orgkey_6h` below).
//!
//! After the group, the bench prints (and writes to `criterion/hyper_1k/summary.txt`):
//! criterion's medians, each overhead (minus `inner`) and the ratio
//! `orgkey overhead / minimal_identity overhead`; then an *interleaved* measurement: batches of
//! 32 requests of each variant in turn (in a random order each round, each variant warmed up by
//! three untimed batches before its timed one), so that the machine's drift hits every variant
//! alike, with the ratio's median and spread over blocks of rounds.
//!
//! ```sh
//! ORGKEY_BENCH_SKIP_1M=1 cargo bench --bench layer -- hyper_1k --measurement-time 5
//! ```
//!
//! `ORGKEY_LAYER_INTERLEAVED=5 <bench binary>` runs only the interleaved measurement (`=6`:
//! with the six-header requests of `orgkey_6h` below, `bearer` keeping its five).
//!
//! # Profiling mode (instruction counts)
//!
//! `ORGKEY_LAYER_PROFILE=<variant> [ORGKEY_LAYER_PROFILE_N=200000] <bench binary>` skips
//! criterion and drives one variant N times (batches of 32, as in the bench). The timed work
//! is inside the non-inlined `profiled_batch`, so under
//! `valgrind --tool=callgrind --toggle-collect='*profiled_batch*'` the collected instruction
//! count divided by N is the instructions per request. Variants: the five above, plus
//! `inner_6h` / `minimal_identity_6h` / `orgkey_6h` (a sixth header, `Accept-Encoding`: the
//! map hyper builds is then exactly full), `orgkey_sessions` (the layer with sessions
//! accepted, direct-key requests), `orgkey_wrong`, `ext_small` (inner after inserting an
//! 8-byte extension), `ext_auth_sized` (the same with a value the size of `Authenticated`),
//! `floor_sip` / `floor_fast` (the floor over a `DashMap` with the default SipHash and with a
//! simple multiply-xor hasher). See docs/hot-path-profile.md.
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, BatchSize, Criterion};
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::Empty;
use orgkey::{Actor, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

/// Requests are built in small batches just before they are timed, so they are hot in cache
/// as in a server that has just parsed them (large batches would make every request's first
/// header read a cache miss, charged to whoever reads first).
const HOT_BATCH: BatchSize = BatchSize::NumIterations(32);

/// The inner service: answers 200 with an empty body, synchronously.
#[derive(Clone)]
struct Inner;
impl<B> Service<Request<B>> for Inner {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: Request<B>) -> Self::Future {
        black_box(&request);
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

/// The inner service, after inserting one small extension (what L2 costs by itself).
#[derive(Clone)]
struct InnerWithExtension;
impl<B> Service<Request<B>> for InnerWithExtension {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert((black_box(0u64), black_box(0u64)));
        black_box(&request);
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

/// Drives a service once, synchronously (every service here is ready at once).
fn drive<S, B>(svc: &mut S, request: Request<B>) -> S::Response
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let _ = svc.poll_ready(&mut cx);
    let mut future = std::pin::pin!(svc.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(result) => result.unwrap(),
        Poll::Pending => unreachable!("synchronous services"),
    }
}
use std::future::Future;

struct Orgs {
    admin: KeyAdmin,
    ids: Vec<String>,
    id_headers: Vec<HeaderValue>,
    key_headers: Vec<HeaderValue>,
    /// The floor's own table: the same orgs and keys in a bare `DashMap<_, ArcSwap<_>>`.
    floor: DashMap<Box<str>, ArcSwap<[u8; 12]>>,
}

fn orgs(n: usize) -> Orgs {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let admin = KeyAdmin::new(OrgTable::with_capacity(Default::default(), n));
    let actor = Actor::new("bench").unwrap();
    let floor = DashMap::with_capacity(n);
    let (mut ids, mut id_headers, mut key_headers) = (vec![], vec![], vec![]);
    for i in 0..n {
        let id = format!("org-{i:07}");
        let org = OrgId::new(&id).unwrap();
        rt.block_on(admin.create_org(&org)).unwrap();
        let info = rt.block_on(admin.subscribe(&org, &actor)).unwrap();
        let key = info.key().unwrap().expose_secret().to_owned();
        let mut bytes = [0u8; 12];
        bytes.copy_from_slice(key.as_bytes());
        floor.insert(Box::from(id.as_str()), ArcSwap::from_pointee(bytes));
        id_headers.push(HeaderValue::from_str(&id).unwrap());
        key_headers.push(HeaderValue::from_str(&key).unwrap());
        ids.push(id);
    }
    Orgs {
        admin,
        ids,
        id_headers,
        key_headers,
        floor,
    }
}

/// A scattered walk over `0..n`: a stride coprime with n.
struct Walk {
    i: usize,
    n: usize,
}
impl Walk {
    fn new(n: usize) -> Self {
        Self { i: 0, n }
    }
    fn next(&mut self) -> usize {
        self.i = (self.i + 7_919_993) % self.n; // a prime larger than every n here
        self.i
    }
}

fn floor_check(floor: &DashMap<Box<str>, ArcSwap<[u8; 12]>>, org: &str, key: &[u8]) -> bool {
    match floor.get(org) {
        Some(entry) => bool::from(entry.value().load().ct_eq(key)),
        None => false,
    }
}

fn request(orgs: &Orgs, i: usize, key: &HeaderValue) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    let headers = request.headers_mut();
    headers.insert("x-org-id", orgs.id_headers[i].clone());
    headers.insert("x-api-key", key.clone());
    request
}

fn bench_size(c: &mut Criterion, n: usize, label: &str) {
    let orgs = orgs(n);
    let wrong = HeaderValue::from_static("WrongKey0000");
    let mut group = c.benchmark_group(format!("orgs_{label}"));
    if n >= 1_000_000 {
        group.sample_size(30);
    }

    let mut walk = Walk::new(n);
    let key_bytes: Vec<Vec<u8>> = orgs
        .key_headers
        .iter()
        .map(|h| h.as_bytes().to_vec())
        .collect();
    group.bench_function("floor", |b| {
        b.iter(|| {
            let i = walk.next();
            assert!(floor_check(
                &orgs.floor,
                black_box(&orgs.ids[i]),
                black_box(&key_bytes[i])
            ));
        })
    });

    let mut inner = Inner;
    let mut walk = Walk::new(n);
    group.bench_function("inner", |b| {
        b.iter_batched(
            || {
                let i = walk.next();
                request(&orgs, i, &orgs.key_headers[i])
            },
            |request| drive(&mut inner, request),
            HOT_BATCH,
        )
    });

    // The inner service plus what L2 requires of any layer: one request extension. http boxes
    // every extension and allocates the map on the first insert, so this is the share of the
    // layer's cost that no implementation of L2 can avoid.
    let mut inner_ext = InnerWithExtension;
    let mut walk = Walk::new(n);
    group.bench_function("inner_with_extension", |b| {
        b.iter_batched(
            || {
                let i = walk.next();
                request(&orgs, i, &orgs.key_headers[i])
            },
            |request| drive(&mut inner_ext, request),
            HOT_BATCH,
        )
    });

    let mut layered = OrgKeyLayer::new(orgs.admin.table().clone()).layer(Inner);
    let mut walk = Walk::new(n);
    group.bench_function("layer_valid", |b| {
        b.iter_batched(
            || {
                let i = walk.next();
                request(&orgs, i, &orgs.key_headers[i])
            },
            |request| {
                let response = drive(&mut layered, request);
                debug_assert_eq!(response.status(), 200);
                response
            },
            HOT_BATCH,
        )
    });

    let mut walk = Walk::new(n);
    group.bench_function("layer_wrong", |b| {
        b.iter_batched(
            || request(&orgs, walk.next(), &wrong),
            |request| {
                let response = drive(&mut layered, request);
                debug_assert_eq!(response.status(), 401);
                response
            },
            HOT_BATCH,
        )
    });

    if n == 1 {
        #[allow(deprecated)]
        let mut bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer(
            orgs.key_headers[0].to_str().unwrap(),
        )
        .layer(Inner);
        let bearer_value =
            HeaderValue::from_str(&format!("Bearer {}", orgs.key_headers[0].to_str().unwrap()))
                .unwrap();
        group.bench_function("bearer", |b| {
            b.iter_batched(
                || {
                    let mut request = request(&orgs, 0, &orgs.key_headers[0]);
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, bearer_value.clone());
                    request
                },
                |request| {
                    let response = drive(&mut bearer, request);
                    debug_assert_eq!(response.status(), 200);
                    response
                },
                HOT_BATCH,
            )
        });
    }

    if n == 1_000 {
        // One org (org-0000000) is regenerated every millisecond; requests go to the others.
        let stop = Arc::new(AtomicBool::new(false));
        let rotator = {
            let admin = orgs.admin.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let org = OrgId::new("org-0000000").unwrap();
                let actor = Actor::new("rotator").unwrap();
                let mut rotations = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rt.block_on(admin.regenerate(&org, &actor)).unwrap();
                    rotations += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                rotations
            })
        };
        let mut walk = Walk::new(n - 1);
        group.bench_function("layer_valid_rotating", |b| {
            b.iter_batched(
                || {
                    let i = 1 + walk.next();
                    request(&orgs, i, &orgs.key_headers[i])
                },
                |request| {
                    let response = drive(&mut layered, request);
                    debug_assert_eq!(response.status(), 200);
                    response
                },
                HOT_BATCH,
            )
        });
        stop.store(true, Ordering::Relaxed);
        let rotations = rotator.join().unwrap();
        eprintln!("rotator: {rotations} regenerations during layer_valid_rotating");

        // The same check as `layer_valid`, right after, for a like-for-like comparison.
        let mut walk = Walk::new(n - 1);
        group.bench_function("layer_valid_not_rotating", |b| {
            b.iter_batched(
                || {
                    let i = 1 + walk.next();
                    request(&orgs, i, &orgs.key_headers[i])
                },
                |request| drive(&mut layered, request),
                HOT_BATCH,
            )
        });
    }
    group.finish();
}

fn budget(c: &mut Criterion) {
    bench_size(c, 1, "1");
    bench_size(c, 1_000, "1k");
    if std::env::var_os("ORGKEY_BENCH_SKIP_1M").is_none() {
        bench_size(c, 1_000_000, "1m");
    }
}

// ---------------------------------------------------------------------------------------------
// hyper_1k: orgkey against a minimal identity-passing layer, on hyper-shaped requests.

const HYPER_ORGS: usize = 1_000;

/// Words of hyper's `Incoming`, for a stand-in body of the same size.
const INCOMING_WORDS: usize =
    std::mem::size_of::<hyper::body::Incoming>() / std::mem::size_of::<usize>();

/// Stand-in for `hyper::body::Incoming`, which only hyper can construct: same size and
/// alignment, so a request moves the same number of bytes through the services.
struct HyperLikeBody(#[allow(dead_code)] [usize; INCOMING_WORDS]);

const _: () = assert!(
    std::mem::size_of::<HyperLikeBody>() == std::mem::size_of::<hyper::body::Incoming>()
        && std::mem::align_of::<HyperLikeBody>() == std::mem::align_of::<hyper::body::Incoming>()
);

type HyperRequest = Request<HyperLikeBody>;

/// hyper's per-connection read buffer: each request head is read into it and split off as
/// one frozen `Bytes`, which the URI and the header values are slices of.
struct HyperLikeReader {
    buf: BytesMut,
}

impl HyperLikeReader {
    fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(8192),
        }
    }

    /// Builds the request for one raw head (`\r\n`-separated, ending in an empty line) as
    /// hyper 1.x's h1 server does (`proto/h1/role.rs` `Server::parse`, `dispatch.rs`
    /// `recv_msg`).
    fn request(&mut self, raw: &[u8]) -> HyperRequest {
        if self.buf.capacity() < raw.len() {
            self.buf = BytesMut::with_capacity(8192);
        }
        self.buf.extend_from_slice(raw);
        let slice = self.buf.split_to(raw.len()).freeze();
        let text = std::str::from_utf8(&slice).unwrap();
        let head = text.strip_suffix("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap().split(' ');
        let method = Method::from_bytes(request_line.next().unwrap().as_bytes()).unwrap();
        let path = request_line.next().unwrap();
        let uri = Uri::from_maybe_shared(slice.slice_ref(path.as_bytes())).unwrap();
        let fields: Vec<(&str, &str)> = lines.map(|l| l.split_once(": ").unwrap()).collect();
        // hyper: the previous response's emptied map (unallocated here), then `reserve`.
        let mut headers = HeaderMap::new();
        headers.reserve(fields.len());
        for (name, value) in fields {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_maybe_shared(slice.slice_ref(value.as_bytes())).unwrap(),
            );
        }
        let mut request = Request::new(HyperLikeBody([0; INCOMING_WORDS]));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        *request.version_mut() = Version::HTTP_11;
        *request.extensions_mut() = http::Extensions::default();
        request
    }
}

/// The request hyper 1.x's HTTP/1.1 server itself hands to a service for `raw`: served over
/// an in-memory pipe, captured by the service.
fn real_hyper_request(raw: &[u8]) -> Request<hyper::body::Incoming> {
    use tokio::io::AsyncWriteExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(request);
            }
            std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
        });
        let connection = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        client.write_all(raw).await.unwrap();
        let request = rx.await.unwrap();
        drop(client);
        let _ = connection.await;
        request
    })
}

/// Checks that [`HyperLikeReader`] builds what hyper builds: same method, URI, version,
/// headers (names, values, order), header map capacity, and no extensions. Returns the
/// number of headers and the capacity of hyper's map.
fn check_hyper_shape(raw: &[u8]) -> (usize, usize) {
    let real = real_hyper_request(raw);
    let ours = HyperLikeReader::new().request(raw);
    let pairs = |m: &HeaderMap| -> Vec<(String, Vec<u8>)> {
        m.iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    };
    assert_eq!(real.method(), ours.method());
    assert_eq!(real.uri(), ours.uri());
    assert_eq!(real.version(), ours.version());
    assert_eq!(pairs(real.headers()), pairs(ours.headers()));
    assert_eq!(real.headers().capacity(), ours.headers().capacity());
    assert_eq!(real.extensions().len(), 0);
    assert_eq!(ours.extensions().len(), 0);
    (real.headers().len(), real.headers().capacity())
}

/// A request head as curl sends it, plus the org and one credential header.
fn raw_head(org: &str, credential_name: &str, credential: &str) -> Vec<u8> {
    format!(
        "GET /api/v1/things HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\n\
         Accept: application/json\r\nX-Org-Id: {org}\r\n{credential_name}: {credential}\r\n\r\n"
    )
    .into_bytes()
}

/// The identity [`MinimalIdentity`] hands to the inner service: small, `Copy`, no heap.
#[derive(Clone, Copy, Debug)]
struct Identity {
    #[allow(dead_code)]
    tenant: u64,
}

struct Tenant {
    key: String,
    id: u64,
}

/// A minimal identity-passing layer, as a naive implementation would write it: two header
/// lookups, a plain `==` against the key found by org in a `DashMap` (default hasher), one
/// extension insert, then the inner service. No constant time, no credential removal, no
/// metrics, no logging, a bare 401. `STR_NAMES`: header names as `&str` literals (parsed by
/// http on every lookup) instead of `HeaderName` constants.
#[derive(Clone)]
struct MinimalIdentity<S, const STR_NAMES: bool> {
    inner: S,
    tenants: Arc<DashMap<String, Tenant>>,
    org_header: HeaderName,
    key_header: HeaderName,
}

impl<S, const STR_NAMES: bool> MinimalIdentity<S, STR_NAMES> {
    fn new(inner: S, tenants: Arc<DashMap<String, Tenant>>) -> Self {
        Self {
            inner,
            tenants,
            org_header: HeaderName::from_static("x-org-id"),
            key_header: HeaderName::from_static("x-api-key"),
        }
    }
}

impl<S, B, ResBody, const STR_NAMES: bool> Service<Request<B>> for MinimalIdentity<S, STR_NAMES>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = MinimalFuture<S::Future, Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let identity = {
            let headers = request.headers();
            let (org, key) = if STR_NAMES {
                (headers.get("x-org-id"), headers.get("x-api-key"))
            } else {
                (headers.get(&self.org_header), headers.get(&self.key_header))
            };
            match (org.and_then(|v| v.to_str().ok()), key) {
                (Some(org), Some(key)) => self.tenants.get(org).and_then(|tenant| {
                    (tenant.key.as_bytes() == key.as_bytes())
                        .then_some(Identity { tenant: tenant.id })
                }),
                _ => None,
            }
        };
        match identity {
            Some(identity) => {
                request.extensions_mut().insert(identity);
                MinimalFuture::Inner {
                    future: self.inner.call(request),
                }
            }
            None => {
                let mut response = Response::new(ResBody::default());
                *response.status_mut() = http::StatusCode::UNAUTHORIZED;
                MinimalFuture::Rejected {
                    response: Some(response),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The minimal layer's future: the inner service's, or a ready 401.
    #[project = MinimalFutureProj]
    enum MinimalFuture<F, R> {
        Inner { #[pin] future: F },
        Rejected { response: Option<R> },
    }
}

impl<F, R, E> Future for MinimalFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
{
    type Output = Result<R, E>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            MinimalFutureProj::Inner { future } => future.poll(cx),
            MinimalFutureProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

/// The inner service after inserting a clone of `T` as an extension (profiling only: what
/// the insert costs by itself, by size of the value).
#[derive(Clone)]
struct InnerWithValue<T>(T);
impl<B, T: Clone + Send + Sync + 'static> Service<Request<B>> for InnerWithValue<T> {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(black_box(self.0.clone()));
        black_box(&request);
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

/// A value of the size of `orgkey::Authenticated`.
#[derive(Clone)]
struct AuthSized(#[allow(dead_code)] [u64; AUTH_WORDS]);
const AUTH_WORDS: usize = std::mem::size_of::<orgkey::Authenticated>().div_ceil(8);

/// A simple multiply-xor hasher, for measuring what the default SipHash costs a `DashMap`
/// lookup (not DoS-resistant; profiling only).
#[derive(Default)]
struct MulXor(u64);
const MULXOR_K: u64 = 0x9E37_79B9_7F4A_7C15;
impl Hasher for MulXor {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().unwrap());
            self.0 = (self.0 ^ word).wrapping_mul(MULXOR_K).rotate_left(29);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0 ^ u64::from_le_bytes(word))
                .wrapping_mul(MULXOR_K)
                .rotate_left(29);
        }
    }
    fn write_u8(&mut self, byte: u8) {
        self.0 = (self.0 ^ u64::from(byte))
            .wrapping_mul(MULXOR_K)
            .rotate_left(29);
    }
    fn finish(&self) -> u64 {
        (self.0 ^ (self.0 >> 31)).wrapping_mul(MULXOR_K)
    }
}
type FastFloor = DashMap<Box<str>, ArcSwap<[u8; 12]>, BuildHasherDefault<MulXor>>;

/// Everything the `hyper_1k` variants need: 1,000 orgs in an `OrgTable` and in the minimal
/// layer's `DashMap`, and the raw request heads.
struct HyperSetup {
    orgs: Orgs,
    tenants: Arc<DashMap<String, Tenant>>,
    key_heads: Vec<Vec<u8>>,
    /// The same with a sixth header (`Accept-Encoding`, as Go's client sends): hyper reserves
    /// exactly six slots, and a map of eight slots holds six, so the map is full.
    key_heads_6: Vec<Vec<u8>>,
    wrong_heads: Vec<Vec<u8>>,
    bearer_heads: Vec<Vec<u8>>,
    bearer_token: String,
}

fn hyper_setup() -> HyperSetup {
    let orgs = orgs(HYPER_ORGS);
    let tenants = DashMap::new();
    let (mut key_heads, mut key_heads_6) = (vec![], vec![]);
    let (mut wrong_heads, mut bearer_heads) = (vec![], vec![]);
    let bearer_token = orgs.key_headers[0].to_str().unwrap().to_owned();
    for (i, (id, key)) in orgs.ids.iter().zip(&orgs.key_headers).enumerate() {
        let key = key.to_str().unwrap();
        tenants.insert(
            id.clone(),
            Tenant {
                key: key.to_owned(),
                id: i as u64,
            },
        );
        key_heads.push(raw_head(id, "X-API-Key", key));
        key_heads_6.push(raw_head(id, "Accept-Encoding: gzip\r\nX-API-Key", key));
        wrong_heads.push(raw_head(id, "X-API-Key", "WrongKey0000"));
        bearer_heads.push(raw_head(
            id,
            "Authorization",
            &format!("Bearer {bearer_token}"),
        ));
    }
    HyperSetup {
        orgs,
        tenants: Arc::new(tenants),
        key_heads,
        key_heads_6,
        wrong_heads,
        bearer_heads,
        bearer_token,
    }
}

#[allow(deprecated)]
type Bearer = tower_http::validate_request::ValidateRequestHeader<
    Inner,
    tower_http::auth::require_authorization::Bearer<Empty<Bytes>>,
>;

#[allow(deprecated)]
fn bearer_service(token: &str) -> Bearer {
    tower_http::validate_request::ValidateRequestHeaderLayer::bearer(token).layer(Inner)
}

/// A batch of hyper-shaped requests, cycling through the orgs in a scattered order.
struct Batcher<'a> {
    heads: &'a [Vec<u8>],
    walk: Walk,
    reader: HyperLikeReader,
}

impl<'a> Batcher<'a> {
    fn new(heads: &'a [Vec<u8>]) -> Self {
        Self {
            heads,
            walk: Walk::new(heads.len()),
            reader: HyperLikeReader::new(),
        }
    }
    fn one(&mut self) -> HyperRequest {
        let i = self.walk.next();
        self.reader.request(&self.heads[i])
    }
    fn fill(&mut self, batch: &mut Vec<HyperRequest>, n: usize) {
        batch.clear();
        for _ in 0..n {
            batch.push(self.one());
        }
    }
}

const HYPER_VARIANTS: [&str; 5] = [
    "inner",
    "minimal_identity",
    "minimal_identity_str",
    "bearer",
    "orgkey",
];

fn hyper_1k(c: &mut Criterion) {
    let setup = hyper_setup();
    let shapes = [
        check_hyper_shape(&setup.key_heads[0]),
        check_hyper_shape(&setup.key_heads_6[0]),
        check_hyper_shape(&setup.bearer_heads[0]),
    ];
    let started = std::time::SystemTime::now();
    let mut group = c.benchmark_group("hyper_1k");
    let ran = std::cell::Cell::new(false);

    let mut inner = Inner;
    let mut batcher = Batcher::new(&setup.key_heads);
    group.bench_function("inner", |b| {
        b.iter_batched(|| batcher.one(), |r| drive(&mut inner, r), HOT_BATCH)
    });

    let mut minimal = MinimalIdentity::<_, false>::new(Inner, Arc::clone(&setup.tenants));
    let mut batcher = Batcher::new(&setup.key_heads);
    group.bench_function("minimal_identity", |b| {
        b.iter_batched(
            || batcher.one(),
            |r| {
                let response = drive(&mut minimal, r);
                debug_assert_eq!(response.status(), 200);
                response
            },
            HOT_BATCH,
        )
    });

    let mut minimal_str = MinimalIdentity::<_, true>::new(Inner, Arc::clone(&setup.tenants));
    let mut batcher = Batcher::new(&setup.key_heads);
    group.bench_function("minimal_identity_str", |b| {
        b.iter_batched(
            || batcher.one(),
            |r| {
                let response = drive(&mut minimal_str, r);
                debug_assert_eq!(response.status(), 200);
                response
            },
            HOT_BATCH,
        )
    });

    let mut bearer = bearer_service(&setup.bearer_token);
    let mut batcher = Batcher::new(&setup.bearer_heads);
    group.bench_function("bearer", |b| {
        b.iter_batched(
            || batcher.one(),
            |r| {
                let response = drive(&mut bearer, r);
                debug_assert_eq!(response.status(), 200);
                response
            },
            HOT_BATCH,
        )
    });

    let mut orgkey = OrgKeyLayer::new(setup.orgs.admin.table().clone()).layer(Inner);
    let mut batcher = Batcher::new(&setup.key_heads);
    group.bench_function("orgkey", |b| {
        ran.set(true);
        b.iter_batched(
            || batcher.one(),
            |r| {
                let response = drive(&mut orgkey, r);
                debug_assert_eq!(response.status(), 200);
                response
            },
            HOT_BATCH,
        )
    });
    group.finish();

    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) criterion only
    // checks that each routine runs once, and so does this.
    if !ran.get() || !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut report = format!(
        "\nhyper_1k: requests checked against hyper's own; (headers, map capacity): \
         key {:?}, six headers {:?}, bearer {:?}\n",
        shapes[0], shapes[1], shapes[2]
    );
    report.push_str(&criterion_summary(started));
    report.push_str(&interleaved(&setup, &setup.key_heads));
    eprint!("{report}");
    let path = criterion_dir().join("hyper_1k").join("summary.txt");
    if let Err(e) = std::fs::write(&path, &report) {
        eprintln!("could not write {}: {e}", path.display());
    }
}

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        PathBuf::from(home)
    } else if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(target).join("criterion")
    } else {
        PathBuf::from("target/criterion")
    }
}

/// Criterion's median for `hyper_1k/<bench>`, if that bench ran in this process.
fn criterion_median(bench: &str, since: std::time::SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join("hyper_1k")
        .join(bench)
        .join("new")
        .join("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn criterion_summary(since: std::time::SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\nhyper_1k (criterion medians of this run)\n");
    let medians: Vec<Option<f64>> = HYPER_VARIANTS
        .iter()
        .map(|v| criterion_median(v, since))
        .collect();
    let Some(inner) = medians[0] else {
        out.push_str("  `inner` did not run: no overheads\n");
        return out;
    };
    for (name, median) in HYPER_VARIANTS.iter().zip(&medians) {
        if let Some(m) = median {
            let _ = writeln!(
                out,
                "  {name:<22} {m:>8.1} ns   overhead {:>7.1} ns",
                m - inner
            );
        }
    }
    if let (Some(minimal), Some(orgkey)) = (medians[1], medians[4]) {
        let _ = writeln!(
            out,
            "  orgkey overhead / minimal_identity overhead = {:.2}x (budget <= 1.2x, goal 1.0x)",
            (orgkey - inner) / (minimal - inner)
        );
    }
    if let (Some(minimal_str), Some(orgkey)) = (medians[2], medians[4]) {
        let _ = writeln!(
            out,
            "  orgkey overhead / minimal_identity_str overhead = {:.2}x",
            (orgkey - inner) / (minimal_str - inner)
        );
    }
    out
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times one batch through `svc`, in ns per request (responses dropped after the clock).
/// Not inlined, so that a profiler can tell the variants apart in one run.
#[inline(never)]
fn time_batch<S, B>(svc: &mut S, batch: &mut Vec<Request<B>>, out: &mut Vec<S::Response>) -> f64
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    let n = batch.len();
    let start = std::time::Instant::now();
    for request in batch.drain(..) {
        out.push(drive(svc, request));
    }
    let elapsed = start.elapsed();
    out.clear();
    elapsed.as_nanos() as f64 / n as f64
}

/// Batches of 32 requests of each variant in turn, in a random order every round, in blocks
/// of rounds: per block the median batch time of each variant and the ratio of overheads.
/// Each variant runs a few untimed batches before its timed one: what ran just before (the
/// other variants' tables, the heap they left) otherwise weighs on the first batch, by up to
/// 200 ns a request here, depending on which variant preceded.
fn interleaved(setup: &HyperSetup, heads: &[Vec<u8>]) -> String {
    use std::fmt::Write as _;
    const BLOCKS: usize = 40;
    const ROUNDS: usize = 250;
    const BATCH: usize = 32;
    const WARM: usize = 3;
    let mut last = 0.0;
    let mut inner = Inner;
    let mut minimal = MinimalIdentity::<_, false>::new(Inner, Arc::clone(&setup.tenants));
    let mut minimal_str = MinimalIdentity::<_, true>::new(Inner, Arc::clone(&setup.tenants));
    let mut bearer = bearer_service(&setup.bearer_token);
    let mut orgkey = OrgKeyLayer::new(setup.orgs.admin.table().clone()).layer(Inner);
    let mut batchers = [
        Batcher::new(heads),
        Batcher::new(heads),
        Batcher::new(heads),
        Batcher::new(&setup.bearer_heads),
        Batcher::new(heads),
    ];
    let (mut out_plain, mut out_orgkey) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
    let mut batch = Vec::with_capacity(BATCH);
    let v = HYPER_VARIANTS.len();
    let mut block_medians = vec![[0f64; HYPER_VARIANTS.len()]; BLOCKS];
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut all: Vec<Vec<f64>> = vec![Vec::with_capacity(BLOCKS * ROUNDS); v];
    for block in block_medians.iter_mut() {
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); v];
        for _ in 0..ROUNDS {
            // A fresh random order every round, so that no variant always follows the same
            // one (what ran just before changes the heap and the caches).
            let mut order: [usize; HYPER_VARIANTS.len()] = std::array::from_fn(|k| k);
            for k in (1..v).rev() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                order.swap(k, (rng % (k as u64 + 1)) as usize);
            }
            for which in order {
                // WARM batches bring this variant's tables and the heap to its own steady
                // state (as in criterion, which runs one variant at a time); then one is timed.
                for _ in 0..=WARM {
                    batchers[which].fill(&mut batch, BATCH);
                    let ns = match which {
                        0 => time_batch(&mut inner, &mut batch, &mut out_plain),
                        1 => time_batch(&mut minimal, &mut batch, &mut out_plain),
                        2 => time_batch(&mut minimal_str, &mut batch, &mut out_plain),
                        3 => time_batch(&mut bearer, &mut batch, &mut out_plain),
                        _ => time_batch(&mut orgkey, &mut batch, &mut out_orgkey),
                    };
                    last = ns;
                }
                times[which].push(last);
            }
        }
        for (k, t) in times.iter_mut().enumerate() {
            all[k].extend_from_slice(t);
            block[k] = median(t);
        }
    }
    let mut out = format!(
        "\nhyper_1k interleaved ({BLOCKS} blocks x {ROUNDS} rounds, each variant in a random \
         order: {WARM} batches of {BATCH} to warm up, one timed; medians of batch means)\n"
    );
    let overall: Vec<f64> = all.iter_mut().map(|t| median(t)).collect();
    for (name, m) in HYPER_VARIANTS.iter().zip(&overall) {
        let _ = writeln!(
            out,
            "  {name:<22} {m:>8.1} ns   overhead {:>7.1} ns",
            m - overall[0]
        );
    }
    for (label, minimal_index) in [("minimal_identity", 1), ("minimal_identity_str", 2)] {
        let mut ratios: Vec<f64> = block_medians
            .iter()
            .map(|b| (b[4] - b[0]) / (b[minimal_index] - b[0]))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "  orgkey overhead / {label} overhead: overall {:.2}x; per block median {:.2}x, \
             p10-p90 {:.2}x-{:.2}x, min-max {:.2}x-{:.2}x",
            (overall[4] - overall[0]) / (overall[minimal_index] - overall[0]),
            percentile(&ratios, 0.5),
            percentile(&ratios, 0.1),
            percentile(&ratios, 0.9),
            ratios[0],
            ratios[ratios.len() - 1],
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Profiling mode: one variant, N requests, for valgrind/perf (see the module docs).

/// The work that is profiled: `batch` through `svc`. Not inlined, so that
/// `callgrind --toggle-collect='*profiled_batch*'` counts exactly this.
#[inline(never)]
fn profiled_batch<S, B>(svc: &mut S, batch: &mut Vec<Request<B>>, out: &mut Vec<S::Response>)
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    for request in batch.drain(..) {
        out.push(drive(svc, request));
    }
}

/// The floor's work for a batch of org indexes. Not inlined (see `profiled_batch`).
#[inline(never)]
fn profiled_batch_floor<H: std::hash::BuildHasher + Clone>(
    floor: &DashMap<Box<str>, ArcSwap<[u8; 12]>, H>,
    ids: &[String],
    keys: &[Vec<u8>],
    indexes: &[usize],
) {
    for &i in indexes {
        let ok = match floor.get(black_box(ids[i].as_str())) {
            Some(entry) => bool::from(entry.value().load().ct_eq(black_box(&keys[i][..]))),
            None => false,
        };
        assert!(ok);
    }
}

fn profile_service<S, R>(heads: &[Vec<u8>], svc: &mut S, n: usize)
where
    S: Service<HyperRequest, Response = Response<R>>,
    S::Error: std::fmt::Debug,
{
    const BATCH: usize = 32;
    let mut batcher = Batcher::new(heads);
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(BATCH);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..n.div_ceil(BATCH) {
        batcher.fill(&mut batch, BATCH);
        profiled_batch(svc, &mut batch, &mut out);
        for response in out.drain(..) {
            *statuses.entry(response.status().as_u16()).or_insert(0u64) += 1;
        }
    }
    eprintln!("statuses: {statuses:?}");
}

fn profile(variant: &str) {
    let n: usize = std::env::var("ORGKEY_LAYER_PROFILE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let setup = hyper_setup();
    let tenants = || Arc::clone(&setup.tenants);
    let table = || setup.orgs.admin.table().clone();
    let heads = &setup.key_heads;
    match variant {
        "inner" => profile_service(heads, &mut Inner, n),
        "minimal_identity" => profile_service(
            heads,
            &mut MinimalIdentity::<_, false>::new(Inner, tenants()),
            n,
        ),
        "minimal_identity_str" => profile_service(
            heads,
            &mut MinimalIdentity::<_, true>::new(Inner, tenants()),
            n,
        ),
        "bearer" => profile_service(
            &setup.bearer_heads,
            &mut bearer_service(&setup.bearer_token),
            n,
        ),
        "orgkey" => profile_service(heads, &mut OrgKeyLayer::new(table()).layer(Inner), n),
        "orgkey_wrong" => profile_service(
            &setup.wrong_heads,
            &mut OrgKeyLayer::new(table()).layer(Inner),
            n,
        ),
        "inner_6h" => profile_service(&setup.key_heads_6, &mut Inner, n),
        "minimal_identity_6h" => profile_service(
            &setup.key_heads_6,
            &mut MinimalIdentity::<_, false>::new(Inner, tenants()),
            n,
        ),
        "orgkey_6h" => profile_service(
            &setup.key_heads_6,
            &mut OrgKeyLayer::new(table()).layer(Inner),
            n,
        ),
        "orgkey_sessions" => {
            let sessions = orgkey::Sessions::new(table(), orgkey::Admins::new(table()));
            let layer = OrgKeyLayer::new(table()).with_sessions(sessions);
            profile_service(heads, &mut layer.layer(Inner), n)
        }
        "ext_small" => profile_service(heads, &mut InnerWithValue(Identity { tenant: 7 }), n),
        "ext_auth_sized" => {
            profile_service(heads, &mut InnerWithValue(AuthSized([7; AUTH_WORDS])), n)
        }
        "floor_sip" | "floor_fast" => {
            let keys: Vec<Vec<u8>> = setup
                .orgs
                .key_headers
                .iter()
                .map(|h| h.as_bytes().to_vec())
                .collect();
            let mut walk = Walk::new(HYPER_ORGS);
            let indexes: Vec<usize> = (0..n).map(|_| walk.next()).collect();
            if variant == "floor_sip" {
                profiled_batch_floor(&setup.orgs.floor, &setup.orgs.ids, &keys, &indexes);
            } else {
                let fast = FastFloor::default();
                for (id, key) in setup.orgs.ids.iter().zip(&keys) {
                    let mut bytes = [0u8; 12];
                    bytes.copy_from_slice(key);
                    fast.insert(Box::from(id.as_str()), ArcSwap::from_pointee(bytes));
                }
                profiled_batch_floor(&fast, &setup.orgs.ids, &keys, &indexes);
            }
        }
        other => panic!("unknown ORGKEY_LAYER_PROFILE variant {other}"),
    }
    type InnerFuture = std::future::Ready<Result<Response<Empty<Bytes>>, Infallible>>;
    eprintln!(
        "profiled {variant}: {n} requests; size_of Authenticated = {} bytes, \
         Request<Incoming> = {} bytes, the inner future {} bytes, orgkey's future {} bytes, \
         the inner response {} bytes, orgkey's response {} bytes",
        std::mem::size_of::<orgkey::Authenticated>(),
        std::mem::size_of::<Request<hyper::body::Incoming>>(),
        std::mem::size_of::<InnerFuture>(),
        std::mem::size_of::<orgkey::auth::ResponseFuture<InnerFuture, Empty<Bytes>>>(),
        std::mem::size_of::<Response<Empty<Bytes>>>(),
        std::mem::size_of::<Response<orgkey::auth::ResponseBody<Empty<Bytes>>>>(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = hyper_1k, budget
}

fn main() {
    if let Ok(variant) = std::env::var("ORGKEY_LAYER_PROFILE") {
        profile(&variant);
        return;
    }
    if let Ok(headers) = std::env::var("ORGKEY_LAYER_INTERLEAVED") {
        let setup = hyper_setup();
        let heads = if headers == "6" {
            &setup.key_heads_6
        } else {
            &setup.key_heads
        };
        eprint!("{}", interleaved(&setup, heads));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
