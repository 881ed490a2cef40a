//! A3: failed logins are throttled per address and per username; throttled attempts never
//! reach the password hash; an attacker cannot lock an admin out of a known address.
//!
//! F2: with a store, the buckets and known addresses are the store's, so replicas sharing it
//! (`fleet_*`, on PostgreSQL: three `Sessions`, each with its own table, directory and
//! connection) allow no more attempts than one, a restart refills nothing (also on SQLite),
//! and a store that cannot be asked fails the login closed.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use orgkey::directory::{AdminDirectory, AdminStatus, PasswordRejection};
use orgkey::http::ClientAddr;
use orgkey::session::{SessionConfig, Sessions};
use orgkey::store::{
    AdminRecord, AuditRecord, BackendError, MemoryStore, OrgRecord, SessionRecord, SqliteStore,
    Store, StoreError, StoreFuture, ThrottleKeys, ThrottlePolicy, ThrottleVerdict,
};
use orgkey::{
    Actor, Admins, ApiKey, AuditEvent, Generation, KeyAdmin, KeyFormat, OrgId, OrgTable, Password,
    Scopes, Username,
};

/// Counts how often the password hash is consulted.
#[derive(Clone)]
struct Counting {
    admins: Admins,
    calls: Arc<AtomicUsize>,
}

impl AdminDirectory for Counting {
    fn status(&self, username: &Username) -> Option<AdminStatus> {
        self.admins.status(username)
    }
    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.admins.verify_password(username, password)
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

struct Setup {
    world: World,
    sessions: Sessions,
    calls: Arc<AtomicUsize>,
}

async fn setup() -> Setup {
    let world = world().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let sessions = Sessions::with_config(
        world.keys.table().clone(),
        Counting {
            admins: world.admins.clone(),
            calls: Arc::clone(&calls),
        },
        SessionConfig::for_base_url("http://gw.example/api/v1"),
        world.clock.clone(),
    );
    Setup {
        world,
        sessions,
        calls,
    }
}

async fn attempt(s: &Setup, from: IpAddr, username: &str, password: &str) -> Answer {
    attempt_on(&s.sessions, &s.world.clock, from, username, password).await
}

async fn attempt_on(
    sessions: &Sessions,
    clock: &TestClock,
    from: IpAddr,
    username: &str,
    password: &str,
) -> Answer {
    let ts = clock.now_ms();
    let mut request = post_json(login_body(username, password, KEY, ts));
    request.extensions_mut().insert(ClientAddr(from));
    call_endpoint(sessions, request).await
}

#[tokio::test]
async fn an_address_gets_10_failures_then_429_with_an_integer_retry_after_and_no_hashing() {
    let s = setup().await;
    // Ten failures for ten different usernames (each under its own username limit)...
    for i in 0..10 {
        let a = attempt(&s, ip(1), &format!("user{i}@acme.example"), "WrongHorse12!").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // ... exhaust the address: any username from it now waits.
    let a = attempt(&s, ip(1), "bob@acme.example", "WrongHorse12!").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 6);
    assert_eq!(
        a.json(),
        serde_json::json!({"message": "Rate Limit (1/SECOND) exceeded", "Retry-After": "6 seconds"})
    );
    // Even the right password is not checked while throttled.
    let right = attempt(&s, ip(1), "alice@acme.example", PASSWORD).await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        s.calls.load(Ordering::SeqCst),
        10,
        "throttled attempts never reach argon2"
    );

    // After Retry-After, one more attempt is allowed.
    s.world.clock.advance(Duration::from_secs(retry));
    let ok = attempt(&s, ip(1), "alice@acme.example", PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK);
    // Another address was never affected.
    let other = attempt(&s, ip(2), "alice@acme.example", PASSWORD).await;
    assert_eq!(other.status, StatusCode::OK);
}

#[tokio::test]
async fn a_distributed_attack_on_a_username_does_not_lock_the_admin_out_of_a_known_address() {
    let s = setup().await;
    // Alice logs in from her usual address.
    assert_eq!(
        attempt(&s, ip(7), "alice@acme.example", PASSWORD)
            .await
            .status,
        StatusCode::OK
    );
    // An attacker guesses her password from 5 different addresses...
    for i in 100..105 {
        let a = attempt(&s, ip(i), "alice@acme.example", "Guess0000000!").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    // ... and is then slowed down from any new address.
    let blocked = attempt(&s, ip(200), "alice@acme.example", "Guess0000001!").await;
    assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(blocked.headers["retry-after"], "60");
    let calls = s.calls.load(Ordering::SeqCst);
    // Alice, from her known address, still gets in, at once.
    let alice = attempt(&s, ip(7), "alice@acme.example", PASSWORD).await;
    assert_eq!(alice.status, StatusCode::OK);
    assert_eq!(s.calls.load(Ordering::SeqCst), calls + 1);
}

#[tokio::test]
async fn successful_logins_are_never_throttled() {
    let s = setup().await;
    for _ in 0..30 {
        assert_eq!(
            attempt(&s, ip(9), "alice@acme.example", PASSWORD)
                .await
                .status,
            StatusCode::OK
        );
    }
}

/// An address of 10.0.0.0/8, numbered.
fn addr(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

const WRONG: &str = "WrongHorse12!";
const ALICE: &str = "alice@acme.example";

/// Writes what every replica shares to `store`: the org `acme` with key KEY, and alice
/// (PASSWORD, every scope).
async fn provision(store: impl Store + Clone, clock: &TestClock) {
    let table = OrgTable::default();
    let keys = KeyAdmin::open(table.clone(), store.clone())
        .await
        .unwrap()
        .with_clock(clock.clone());
    let ops = Actor::new("ops@example.com").unwrap();
    keys.create_org(&org("acme")).await.unwrap();
    keys.subscribe(&org("acme"), &ops).await.unwrap();
    keys.edit(&org("acme"), ApiKey::parse(KEY).unwrap(), &ops)
        .await
        .unwrap();
    let admins = Admins::open(table, store).await.unwrap();
    admins
        .create(
            &user(ALICE),
            &org("acme"),
            &Password::new(PASSWORD),
            Scopes::ALL,
        )
        .await
        .unwrap();
}

/// One replica, as a process builds it on `store`: its own org table, directory (counting
/// password checks in `calls`) and sessions.
async fn replica(
    store: impl Store + Clone,
    clock: &TestClock,
    calls: &Arc<AtomicUsize>,
) -> Sessions {
    let table = OrgTable::default();
    KeyAdmin::open(table.clone(), store.clone()).await.unwrap();
    let admins = Admins::open(table.clone(), store.clone()).await.unwrap();
    Sessions::open(
        table,
        Counting {
            admins,
            calls: Arc::clone(calls),
        },
        SessionConfig::for_base_url("http://gw.example/api/v1"),
        clock.clone(),
        store,
    )
    .await
    .unwrap()
}

fn retry_after(answer: &Answer) -> u64 {
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Three replicas of one PostgreSQL schema, sharing a clock and a count of password checks.
#[cfg(feature = "postgres")]
struct Fleet {
    schema: common::pg::TempSchema,
    clock: TestClock,
    calls: Arc<AtomicUsize>,
    replicas: Vec<Sessions>,
}

#[cfg(feature = "postgres")]
impl Fleet {
    async fn new() -> Option<Self> {
        let schema = common::pg::TempSchema::new(
            "tests/throttle.rs",
            "the fleet tests (fleet_*), which need a PostgreSQL server, pass without running",
        )?;
        let clock = TestClock::new();
        provision(schema.connect().await, &clock).await;
        let mut fleet = Self {
            schema,
            clock,
            calls: Arc::new(AtomicUsize::new(0)),
            replicas: Vec::new(),
        };
        fleet.start().await;
        Some(fleet)
    }

    /// Starts three replicas (again), each on a connection of its own.
    async fn start(&mut self) {
        self.replicas.clear();
        for _ in 0..3 {
            let store = self.schema.connect().await;
            self.replicas
                .push(replica(store, &self.clock, &self.calls).await);
        }
    }

    async fn attempt(
        &self,
        replica: usize,
        from: IpAddr,
        username: &str,
        password: &str,
    ) -> Answer {
        attempt_on(
            &self.replicas[replica],
            &self.clock,
            from,
            username,
            password,
        )
        .await
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_wrong_passwords_spread_over_three_replicas_reach_argon2_no_more_often_than_on_one() {
    let Some(f) = Fleet::new().await else { return };
    // Thirty wrong passwords for alice, from thirty addresses, round robin over the replicas:
    // the fleet's one username bucket lets five reach argon2 (in memory: fifteen, five a
    // replica).
    for i in 0..30u32 {
        let a = f.attempt(i as usize % 3, addr(100 + i), ALICE, WRONG).await;
        if i < 5 {
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "attempt {i}");
        } else {
            assert_eq!(retry_after(&a), 60, "attempt {i}");
        }
    }
    assert_eq!(f.calls(), 5, "throttled attempts never reach argon2");
    // Thirty from one address for thirty usernames: its one bucket lets ten through.
    for i in 0..30u32 {
        let a = f
            .attempt(
                i as usize % 3,
                addr(1),
                &format!("user{i}@acme.example"),
                WRONG,
            )
            .await;
        if i < 10 {
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "attempt {i}");
        } else {
            assert_eq!(retry_after(&a), 6, "attempt {i}");
        }
    }
    assert_eq!(f.calls(), 15);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_restart_refills_nothing() {
    let Some(mut f) = Fleet::new().await else {
        return;
    };
    for i in 0..5u32 {
        let a = f.attempt(i as usize % 3, addr(100 + i), ALICE, WRONG).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    for i in 0..10u32 {
        let a = f
            .attempt(
                i as usize % 3,
                addr(1),
                &format!("user{i}@acme.example"),
                WRONG,
            )
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(f.calls(), 15);
    // Every replica restarts: new processes, new connections, the same database.
    f.start().await;
    for replica in 0..3 {
        assert_eq!(
            retry_after(&f.attempt(replica, addr(200), ALICE, WRONG).await),
            60
        );
        let right = f.attempt(replica, addr(1), ALICE, PASSWORD).await;
        assert_eq!(retry_after(&right), 6);
    }
    assert_eq!(f.calls(), 15, "nothing was refilled");
    // The buckets go on refilling at their pace, wherever they are asked.
    f.clock.advance(Duration::from_secs(6));
    let ok = f.attempt(1, addr(1), "bob@acme.example", WRONG).await;
    assert_eq!(ok.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        retry_after(&f.attempt(2, addr(1), "bob@acme.example", WRONG).await),
        6
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_known_admin_is_never_locked_out_on_any_replica() {
    let Some(f) = Fleet::new().await else { return };
    // Alice logs in on replica A from her usual address X.
    let x = addr(7);
    assert_eq!(
        f.attempt(0, x, ALICE, PASSWORD).await.status,
        StatusCode::OK
    );
    // An attacker guesses her password from fifteen other addresses, on every replica: five
    // guesses reach argon2, then every new address waits.
    for i in 0..15u32 {
        let a = f.attempt(i as usize % 3, addr(100 + i), ALICE, WRONG).await;
        if i < 5 {
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "guess {i}");
        } else {
            assert_eq!(retry_after(&a), 60, "guess {i}");
        }
    }
    for replica in 0..3 {
        assert_eq!(
            retry_after(&f.attempt(replica, addr(300), ALICE, WRONG).await),
            60
        );
    }
    // Alice, from X, gets in at once on B and C (and A), which never saw her log in.
    let before = f.calls();
    for replica in [1, 2, 0] {
        let a = f.attempt(replica, x, ALICE, PASSWORD).await;
        assert_eq!(a.status, StatusCode::OK, "replica {replica}");
    }
    assert_eq!(f.calls(), before + 3);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_concurrent_attempts_never_exceed_one_replicas_allowance() {
    let Some(f) = Fleet::new().await else { return };
    let f = Arc::new(f);
    for round in 0..3u32 {
        let barrier = Arc::new(tokio::sync::Barrier::new(60));
        let tasks: Vec<_> = (0..60u32)
            .map(|i| {
                let (f, barrier) = (Arc::clone(&f), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    // Even: alice from thirty addresses; odd: thirty usernames from one.
                    let a = if i % 2 == 0 {
                        f.attempt(i as usize % 3, addr(1_000 + i), ALICE, WRONG)
                            .await
                    } else {
                        let name = format!("user{i}@acme.example");
                        f.attempt(i as usize % 3, addr(1), &name, WRONG).await
                    };
                    a.status
                })
            })
            .collect();
        let mut through = [0, 0];
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                StatusCode::UNAUTHORIZED => through[i % 2] += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("attempt {i}: {other}"),
            }
        }
        assert_eq!(
            through,
            [5, 10],
            "round {round}: [username, address] attempts let through"
        );
        assert_eq!(f.calls(), 15 * (round as usize + 1));
        // An hour later every bucket is full again.
        f.clock.advance(Duration::from_secs(3600));
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_restart_refills_nothing() {
    let db = TempDb::new("throttle-restart");
    let open = || async {
        // A background collection may hold the store a moment after the last replica went.
        for _ in 0..100 {
            match SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)) {
                Ok(store) => return store,
                Err(StoreError::InUse { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the store was never released")
    };
    let clock = TestClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    provision(open().await, &clock).await;
    let sessions = replica(open().await, &clock, &calls).await;
    for i in 0..5u32 {
        let a = attempt_on(&sessions, &clock, addr(100 + i), ALICE, WRONG).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    for i in 0..10u32 {
        let name = format!("user{i}@acme.example");
        let a = attempt_on(&sessions, &clock, addr(1), &name, WRONG).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        retry_after(&attempt_on(&sessions, &clock, addr(200), ALICE, WRONG).await),
        60
    );
    drop(sessions);
    // The process restarts on the same file.
    let sessions = replica(open().await, &clock, &calls).await;
    assert_eq!(
        retry_after(&attempt_on(&sessions, &clock, addr(201), ALICE, WRONG).await),
        60
    );
    let right = attempt_on(&sessions, &clock, addr(1), ALICE, PASSWORD).await;
    assert_eq!(retry_after(&right), 6);
    assert_eq!(calls.load(Ordering::SeqCst), 15, "nothing was refilled");
}

/// A store whose throttle cannot be asked (as a database that is down).
struct ThrottleDown(MemoryStore);

impl Store for ThrottleDown {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        self.0.load_orgs()
    }
    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        self.0.create_org(org)
    }
    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()> {
        self.0.commit(expected, next, audit)
    }
    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        self.0.audit_page(org, before, limit)
    }
    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        self.0.load_admins()
    }
    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        self.0.put_admin(admin)
    }
    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        self.0.delete_admin(username)
    }
    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        self.0.load_sessions()
    }
    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        self.0.put_session(session)
    }
    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        self.0.delete_session(digest)
    }
    fn throttle_take<'a>(
        &'a self,
        _: &'a ThrottleKeys,
        _: &'a ThrottlePolicy,
        _: u64,
    ) -> StoreFuture<'a, ThrottleVerdict> {
        Box::pin(std::future::ready(Err(StoreError::Backend(
            BackendError::new(std::io::Error::other("connection refused")),
        ))))
    }
    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.0
            .throttle_succeeded(keys, username_charged, policy, now_ms)
    }
    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        self.0.throttle_collect(now_ms)
    }
}

#[tokio::test]
async fn a_throttle_store_that_cannot_be_asked_fails_the_login_closed() {
    let store = Arc::new(ThrottleDown(MemoryStore::new()));
    let clock = TestClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    provision(Arc::clone(&store), &clock).await;
    let sessions = replica(Arc::clone(&store), &clock, &calls).await;
    // Even the right password: no answer from the throttle, no password check, no session.
    let a = attempt_on(&sessions, &clock, addr(7), ALICE, PASSWORD).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!a.headers.contains_key("set-cookie"));
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never past the throttle");
    assert!(sessions.is_empty());
}
