//! K6 under concurrency: a validation that starts after a rotation returned never accepts the
//! previous key, and accepts the new one unless a newer rotation has begun.
//!
//! Four validator threads send requests through the layer while one thread regenerates the
//! key as fast as it can, for a bounded time (`ORGKEY_STRESS_SECS`, default 2 seconds).
//! The test prints how many checks it made and fails on any violation.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use orgkey::{Actor, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
use tower::{Layer, Service};

const VALIDATORS: usize = 4;

/// What the rotator has published: rotation `seq` returned, replacing `previous` by `current`.
struct Published {
    seq: u64,
    previous: String,
    current: String,
}

#[derive(Clone)]
struct Ok200;
impl Service<Request<Empty<Bytes>>> for Ok200 {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Empty<Bytes>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

fn status_through_layer<S>(svc: &mut S, key: &str) -> StatusCode
where
    S: Service<
        Request<Empty<Bytes>>,
        Response = Response<orgkey::auth::ResponseBody<Empty<Bytes>>>,
    >,
    S::Error: std::fmt::Debug,
{
    let request = Request::get("/")
        .header("x-org-id", "acme")
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut future = std::pin::pin!(svc.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(result) => result.unwrap().status(),
        Poll::Pending => panic!("the layer and the inner service are synchronous"),
    }
}

use std::future::Future;

#[test]
fn validation_after_rotation_never_accepts_the_previous_key_and_accepts_the_new_one() {
    let seconds: u64 = std::env::var("ORGKEY_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let admin = KeyAdmin::new(OrgTable::default());
    let org = OrgId::new("acme").unwrap();
    let actor = Actor::new("rotator@acme.example").unwrap();
    runtime.block_on(admin.create_org(&org)).unwrap();
    let first = runtime.block_on(admin.subscribe(&org, &actor)).unwrap();
    let first = first.key().unwrap().expose_secret().to_owned();

    let published = Arc::new(ArcSwap::from_pointee(Published {
        seq: 0,
        previous: "NeverAKey000".to_owned(),
        current: first,
    }));
    let started = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(VALIDATORS + 1));
    let layer = OrgKeyLayer::new(admin.table().clone());

    let validators: Vec<_> = (0..VALIDATORS)
        .map(|_| {
            let (published, started, stop, barrier) = (
                Arc::clone(&published),
                Arc::clone(&started),
                Arc::clone(&stop),
                Arc::clone(&barrier),
            );
            let mut svc = layer.layer(Ok200);
            std::thread::spawn(move || {
                let (mut checks, mut violations, mut superseded) = (0u64, Vec::new(), 0u64);
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let snapshot = published.load_full();
                    // Previous key: must never be accepted once its replacement returned.
                    let old = status_through_layer(&mut svc, &snapshot.previous);
                    checks += 1;
                    if old != StatusCode::UNAUTHORIZED {
                        violations.push(format!(
                            "rotation {} had returned but the previous key got {old}",
                            snapshot.seq
                        ));
                    }
                    // Current key: must be accepted unless a newer rotation has begun.
                    let new = status_through_layer(&mut svc, &snapshot.current);
                    checks += 1;
                    if new != StatusCode::OK {
                        if started.load(Ordering::SeqCst) > snapshot.seq {
                            superseded += 1;
                        } else {
                            violations.push(format!(
                                "rotation {} had returned, no newer one had begun, but its key got {new}",
                                snapshot.seq
                            ));
                        }
                    }
                }
                (checks, violations, superseded)
            })
        })
        .collect();

    barrier.wait();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rotations = 0u64;
    while Instant::now() < deadline {
        let seq = rotations + 1;
        let previous = published.load().current.clone();
        started.store(seq, Ordering::SeqCst);
        let info = runtime.block_on(admin.regenerate(&org, &actor)).unwrap();
        published.store(Arc::new(Published {
            seq,
            previous,
            current: info.key().unwrap().expose_secret().to_owned(),
        }));
        rotations = seq;
    }
    stop.store(true, Ordering::Relaxed);

    let mut checks = 0;
    let mut superseded = 0;
    let mut violations = Vec::new();
    for handle in validators {
        let (c, v, s) = handle.join().unwrap();
        checks += c;
        superseded += s;
        violations.extend(v);
    }
    println!(
        "linearizability: {checks} checks by {VALIDATORS} validators against {rotations} rotations in {seconds} s; \
         {superseded} new-key rejections excused by a newer rotation; {} violations",
        violations.len()
    );
    assert!(
        rotations > 10,
        "the rotator made too few rotations to test anything"
    );
    assert!(
        checks > 1000,
        "the validators made too few checks to test anything"
    );
    assert!(
        violations.is_empty(),
        "{} violations, first: {:?}",
        violations.len(),
        violations.first()
    );
}
