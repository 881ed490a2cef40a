//! Timing-leak harness (dudect method, via `dudect-bencher`).
//!
//! Does the time of a rejected request reveal *where* a presented key differs from the real
//! one? Two classes of inputs, each a full request through `OrgKeyLayer` (header parsing, org
//! lookup, snapshot load, compare, 401 response):
//!
//! - Left: the right key with byte 0 replaced by a random other symbol ("wrong at byte 0");
//! - Right: the right key with byte 11 replaced by a random other symbol ("right except 11").
//!
//! Both classes have the same variety: one random wrong symbol each, at a fixed position.
//!
//! `layer_verify` is orgkey as shipped; `table_verify` the same check without tower and http;
//! `null_same_class` labels inputs of one class at random (the harness's own noise floor). `control_early_exit` is the positive control in the
//! same run: the same requests through the same layer, followed by an early-exit byte loop
//! comparing the presented key with the real one, the leak a naive `==` would add. A run counts
//! only if the control's max |t| exceeds 100; orgkey's should stay below 10.
//!
//! Logins (A1): `login_unknown_vs_wrong_password` times `Sessions::login` for an unknown
//! username (Left) against a known admin with a wrong password (Right), everything else right;
//! `control_login_no_dummy` is the same with a directory that skips the dummy argon2 run for
//! unknown users (the leak A1 forbids). Each sample costs an argon2id verification (~20 ms),
//! so these run `ORGKEY_DUDECT_LOGIN_SAMPLES` (default 3,000) samples, the control a tenth.
//!
//! Run: `cargo bench --bench timing_leak` (env `ORGKEY_DUDECT_SAMPLES`, default 1,000,000
//! per bench; `ORGKEY_DUDECT_FILTER` to run one bench).
#![allow(clippy::unwrap_used, missing_docs)]

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use dudect_bencher::ctbench::{run_benches_console, BenchMetadata, BenchName, BenchOpts};
use dudect_bencher::rand::RngExt;
use dudect_bencher::{BenchRng, Class, CtRunner};
use http::{HeaderValue, Request, Response};
use http_body_util::Empty;
use orgkey::auth::{OrgKeyAuth, ResponseBody};
use orgkey::clock::SystemClock;
use orgkey::directory::{AdminDirectory, AdminStatus, PasswordRejection};
use orgkey::session::obfuscate::obfuscate;
use orgkey::session::{LoginRequest, SessionConfig, Sessions, ThrottlePolicy};
use orgkey::{
    Actor, Admins, ApiKey, KeyAdmin, OrgId, OrgKeyLayer, OrgTable, Password, Scopes, Username,
};
use tower::{Layer, Service};

const KEY: &[u8; 12] = b"Zx9Qw8Er7Ty6";
const SYMBOLS: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Clone)]
struct Inner;
impl Service<Request<Empty<Bytes>>> for Inner {
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

fn table() -> OrgTable {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let admin = KeyAdmin::new(OrgTable::default());
    let actor = Actor::new("bench").unwrap();
    // A realistic table: 1,000 orgs, the target in the middle.
    for i in 0..1_000 {
        let org = OrgId::new(&format!("org-{i:04}")).unwrap();
        rt.block_on(admin.create_org(&org)).unwrap();
        rt.block_on(admin.subscribe(&org, &actor)).unwrap();
    }
    let target = OrgId::new("org-0500").unwrap();
    let key = ApiKey::parse(std::str::from_utf8(KEY).unwrap()).unwrap();
    rt.block_on(admin.edit(&target, key, &actor)).unwrap();
    admin.table().clone()
}

fn service() -> OrgKeyAuth<Inner> {
    OrgKeyLayer::new(table()).layer(Inner)
}

fn call(
    svc: &mut OrgKeyAuth<Inner>,
    request: Request<Empty<Bytes>>,
) -> Response<ResponseBody<Empty<Bytes>>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = std::pin::pin!(svc.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(result) => result.unwrap(),
        Poll::Pending => unreachable!(),
    }
}

/// A presented key of the given class: one random wrong symbol at byte 0 or byte 11.
fn presented(class: Class, rng: &mut BenchRng) -> [u8; 12] {
    let mut key = *KEY;
    let position = match class {
        Class::Left => 0,
        Class::Right => 11,
    };
    loop {
        let symbol = SYMBOLS[rng.random_range(0..SYMBOLS.len())];
        if symbol != KEY[position] {
            key[position] = symbol;
            return key;
        }
    }
}

fn request(key: &[u8; 12]) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    let headers = request.headers_mut();
    headers.insert("x-org-id", HeaderValue::from_static("org-0500"));
    headers.insert("x-api-key", HeaderValue::from_bytes(key).unwrap());
    request
}

fn samples() -> usize {
    std::env::var("ORGKEY_DUDECT_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

/// The leak a naive comparison has: stops at the first differing byte.
fn early_exit_eq(a: &[u8], b: &[u8]) -> bool {
    for (x, y) in a.iter().zip(b) {
        if black_box(*x) != black_box(*y) {
            return false;
        }
    }
    a.len() == b.len()
}

fn random_class(rng: &mut BenchRng) -> Class {
    if rng.random::<bool>() {
        Class::Left
    } else {
        Class::Right
    }
}

fn run(runner: &mut CtRunner, rng: &mut BenchRng, with_leaky_compare: bool) {
    // `run_one` takes an `Fn`, hence the cells.
    let svc = RefCell::new(service());
    let slot = Cell::new(None);
    for _ in 0..samples() {
        let class = random_class(rng);
        let key = presented(class, rng);
        slot.set(Some(request(&key)));
        // Only the request's journey through the layer is timed; building it is not, and the
        // response is dropped after the clock stops.
        runner.run_one(class, || {
            let request = slot.take().unwrap();
            let response = call(&mut svc.borrow_mut(), request);
            if with_leaky_compare {
                black_box(early_exit_eq(black_box(&key), KEY));
            }
            response
        });
    }
}

/// The hot path without tower and http: `OrgTable::verify` (format check, lookup, snapshot,
/// compare).
fn table_verify(runner: &mut CtRunner, rng: &mut BenchRng) {
    let table = table();
    for _ in 0..samples() {
        let class = random_class(rng);
        let key = presented(class, rng);
        runner.run_one(class, || {
            table.verify(black_box("org-0500"), black_box(&key)).is_ok()
        });
    }
}

/// Null test: both labels get inputs of one class ("wrong at byte 0"), so any |t| here is the
/// harness's own noise floor.
fn null_same_class(runner: &mut CtRunner, rng: &mut BenchRng) {
    let svc = RefCell::new(service());
    let slot = Cell::new(None);
    for _ in 0..samples() {
        let label = random_class(rng);
        slot.set(Some(request(&presented(Class::Left, rng))));
        runner.run_one(label, || call(&mut svc.borrow_mut(), slot.take().unwrap()));
    }
}

/// A directory that leaks: no argon2 run for unknown users.
struct NoDummy(Admins);

impl AdminDirectory for NoDummy {
    fn status(&self, username: &Username) -> Option<AdminStatus> {
        self.0.status(username)
    }
    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        self.0
            .status(username)
            .ok_or(PasswordRejection::UnknownUser)?;
        self.0.verify_password(username, password)
    }
}

fn login_samples() -> usize {
    std::env::var("ORGKEY_DUDECT_LOGIN_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000)
}

fn run_logins(runner: &mut CtRunner, rng: &mut BenchRng, leaky: bool, samples: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let table = table();
    let admins = Admins::new(table.clone());
    let org = OrgId::new("org-0500").unwrap();
    rt.block_on(admins.create(
        &Username::new("alice@acme.example").unwrap(),
        &org,
        &Password::new("CorrectHorse12!"),
        Scopes::ALL,
    ))
    .unwrap();
    let config = SessionConfig {
        throttle: ThrottlePolicy {
            address_burst: u32::MAX,
            username_burst: u32::MAX,
            ..ThrottlePolicy::default()
        },
        ..SessionConfig::default()
    };
    let sessions = if leaky {
        Sessions::with_config(table, NoDummy(admins), config, SystemClock)
    } else {
        Sessions::with_config(table, admins, config, SystemClock)
    };
    for _ in 0..samples {
        let class = random_class(rng);
        let suffix: u64 = rng.random();
        let (username, password) = match class {
            Class::Left => (
                format!("u{suffix:016x}@acme.example"),
                "CorrectHorse12!".to_owned(),
            ),
            Class::Right => (
                "alice@acme.example".to_owned(),
                format!("Wrong{suffix:016x}"),
            ),
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let api_key = String::from_utf8(obfuscate(KEY, ts).unwrap().to_vec()).unwrap();
        let request = RefCell::new(Some(LoginRequest {
            api_key: Password::new(api_key),
            username,
            password: Password::new(password),
            timestamp_ms: ts,
            source: None,
        }));
        runner.run_one(class, || {
            let request = request.borrow_mut().take().unwrap();
            rt.block_on(sessions.login(request)).is_ok()
        });
    }
}

fn login_unknown_vs_wrong_password(runner: &mut CtRunner, rng: &mut BenchRng) {
    run_logins(runner, rng, false, login_samples());
}

fn control_login_no_dummy(runner: &mut CtRunner, rng: &mut BenchRng) {
    run_logins(runner, rng, true, (login_samples() / 10).max(100));
}

fn layer_verify(runner: &mut CtRunner, rng: &mut BenchRng) {
    run(runner, rng, false);
}

fn control_early_exit(runner: &mut CtRunner, rng: &mut BenchRng) {
    run(runner, rng, true);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` compatibility
    }
    let benches = vec![
        BenchMetadata {
            name: BenchName("control_early_exit"),
            seed: None,
            benchfn: control_early_exit,
        },
        BenchMetadata {
            name: BenchName("control_login_no_dummy"),
            seed: None,
            benchfn: control_login_no_dummy,
        },
        BenchMetadata {
            name: BenchName("login_unknown_vs_wrong_password"),
            seed: None,
            benchfn: login_unknown_vs_wrong_password,
        },
        BenchMetadata {
            name: BenchName("layer_verify"),
            seed: None,
            benchfn: layer_verify,
        },
        BenchMetadata {
            name: BenchName("null_same_class"),
            seed: None,
            benchfn: null_same_class,
        },
        BenchMetadata {
            name: BenchName("table_verify"),
            seed: None,
            benchfn: table_verify,
        },
    ];
    let opts = BenchOpts {
        filter: std::env::var("ORGKEY_DUDECT_FILTER").ok(),
        ..BenchOpts::default()
    };
    run_benches_console(opts, benches).unwrap();
}
