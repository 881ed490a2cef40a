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
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dashmap::DashMap;
use http::{HeaderValue, Request, Response};
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = budget
}
criterion_main!(benches);
