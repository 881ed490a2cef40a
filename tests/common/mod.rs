//! Shared fixtures for the session tests: orgs, admins, a settable clock, and HTTP helpers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

#[cfg(all(feature = "postgres", feature = "gateway"))]
pub mod fleet;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "gateway")]
pub mod served;
pub mod skip;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use orgkey::clock::Clock;
use orgkey::http::SessionEndpoint;
use orgkey::session::obfuscate::obfuscate;
use orgkey::session::{SessionConfig, Sessions};
use orgkey::{
    Actor, Admins, ApiKey, KeyAdmin, OrgId, OrgKeyLayer, OrgTable, Password, Scope, Scopes,
    Username,
};
use tower::{Service, ServiceExt};

pub const KEY: &str = "AbCdEf123456";
pub const PASSWORD: &str = "CorrectHorse12!";
/// 2026-11-26T00:00:00Z, in milliseconds.
pub const T0_MS: u64 = 1_795_651_200_000;

/// A clock tests move by hand.
#[derive(Clone)]
pub struct TestClock(pub Arc<AtomicU64>);

impl TestClock {
    pub fn new() -> Self {
        Self(Arc::new(AtomicU64::new(T0_MS)))
    }
    pub fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.now_ms())
    }
}

pub struct World {
    pub keys: KeyAdmin,
    pub admins: Admins,
    pub sessions: Sessions,
    pub clock: TestClock,
    pub ops: Actor,
}

pub fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

pub fn user(name: &str) -> Username {
    Username::new(name).unwrap()
}

/// Orgs: `acme` (key KEY), `nosub` (never subscribed), `nokey` (key deleted).
/// Admins (password PASSWORD): alice@acme.example (api + key-admin), bob@acme.example
/// (key-admin only), carol@nosub.example, dave@nokey.example (api + key-admin).
pub async fn world_with(config: SessionConfig) -> World {
    let table = OrgTable::default();
    let clock = TestClock::new();
    let keys = KeyAdmin::new(table.clone()).with_clock(clock.clone());
    let ops = Actor::new("ops@example.com").unwrap();
    for id in ["acme", "nosub", "nokey"] {
        keys.create_org(&org(id)).await.unwrap();
    }
    keys.subscribe(&org("acme"), &ops).await.unwrap();
    keys.edit(&org("acme"), ApiKey::parse(KEY).unwrap(), &ops)
        .await
        .unwrap();
    keys.subscribe(&org("nokey"), &ops).await.unwrap();
    keys.edit(&org("nokey"), ApiKey::parse(KEY).unwrap(), &ops)
        .await
        .unwrap();
    keys.delete(&org("nokey"), &ops).await.unwrap();

    let admins = Admins::new(table.clone());
    let password = Password::new(PASSWORD);
    for (name, id, scopes) in [
        ("alice@acme.example", "acme", Scopes::ALL),
        (
            "bob@acme.example",
            "acme",
            Scopes::NONE.with(Scope::KeyAdmin),
        ),
        ("carol@nosub.example", "nosub", Scopes::ALL),
        ("dave@nokey.example", "nokey", Scopes::ALL),
    ] {
        admins
            .create(&user(name), &org(id), &password, scopes)
            .await
            .unwrap();
    }
    let sessions = Sessions::with_config(table, admins.clone(), config, clock.clone());
    World {
        keys,
        admins,
        sessions,
        clock,
        ops,
    }
}

pub async fn world() -> World {
    world_with(SessionConfig::for_base_url("http://gw.example/api/v1")).await
}

/// The obfuscated key a client sends for `key` at `ts`.
pub fn obfuscated(key: &str, ts: u64) -> String {
    String::from_utf8(obfuscate(key.as_bytes(), ts).unwrap().to_vec()).unwrap()
}

pub fn login_body(username: &str, password: &str, key: &str, ts: u64) -> String {
    serde_json::json!({
        "apiKey": obfuscated(key, ts),
        "username": username,
        "password": password,
        "timestamp": ts,
    })
    .to_string()
}

pub fn post_json(body: impl Into<String>) -> Request<Full<Bytes>> {
    Request::post("/api/v1/authenticatedSession")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.into())))
        .unwrap()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    /// The JSESSIONID value of the Set-Cookie header.
    pub fn session_id(&self) -> String {
        let cookie = self.headers["set-cookie"].to_str().unwrap();
        cookie
            .strip_prefix("JSESSIONID=")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    }
}

pub async fn answer<B>(response: Response<B>) -> Answer
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

pub async fn call_endpoint(sessions: &Sessions, request: Request<Full<Bytes>>) -> Answer {
    let response = SessionEndpoint::new(sessions.clone())
        .oneshot(request)
        .await
        .unwrap();
    answer(response).await
}

/// Logs `username` in with the right key and PASSWORD at the clock's time.
pub async fn login(world: &World, username: &str) -> Answer {
    let ts = world.clock.now_ms();
    call_endpoint(
        &world.sessions,
        post_json(login_body(username, PASSWORD, KEY, ts)),
    )
    .await
}

/// A protected service: the layer with sessions around an inner service answering 200 with
/// the org and admin it was given.
pub fn protected(
    world: &World,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<orgkey::auth::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(OrgKeyLayer::new(world.keys.table().clone()).with_sessions(world.sessions.clone()))
        .service_fn(|request: Request<Full<Bytes>>| async move {
            let auth = request
                .extensions()
                .get::<orgkey::Authenticated>()
                .unwrap()
                .clone();
            let cookies: Vec<_> = request
                .headers()
                .get_all("cookie")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            let body = format!(
                "{} {} [{}]",
                auth.org(),
                auth.admin().map_or("-", |a| a.as_str()),
                cookies.join(" | ")
            );
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        })
}

/// GET through the protected service with a session cookie.
pub async fn get_with_cookie(world: &World, session_id: &str) -> Answer {
    let request = Request::get("/api/v1/status")
        .header("cookie", format!("JSESSIONID={session_id}"))
        .body(Full::default())
        .unwrap();
    answer(protected(world).oneshot(request).await.unwrap()).await
}

/// Sends `request` through [`protected`].
pub async fn send_protected(world: &World, request: Request<Full<Bytes>>) -> Answer {
    answer(protected(world).oneshot(request).await.unwrap()).await
}

/// A fresh SQLite file path under the temp dir, removed with its WAL files when dropped.
pub struct TempDb(pub std::path::PathBuf);

impl TempDb {
    pub fn new(name: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        Self(std::env::temp_dir().join(format!("orgkey-{name}-{}.db", u64::from_le_bytes(bytes))))
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", ".lock", ".master-key", ".ctl"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// Every writer regenerates `org` at once (after a barrier); returns the keys of the winners
/// and the number of `Conflict`s. Any other error fails the test.
pub async fn race_regenerates(writers: Vec<KeyAdmin>, org: OrgId) -> (Vec<String>, usize) {
    let barrier = Arc::new(tokio::sync::Barrier::new(writers.len()));
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(i, admin)| {
            let (barrier, org) = (Arc::clone(&barrier), org.clone());
            tokio::spawn(async move {
                let actor = Actor::new(&format!("admin{i}@acme.example")).unwrap();
                barrier.wait().await;
                admin
                    .regenerate(&org, &actor)
                    .await
                    .map(|info| info.key().unwrap().expose_secret().to_owned())
            })
        })
        .collect();
    let (mut winners, mut conflicts) = (Vec::new(), 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(key) => winners.push(key),
            Err(orgkey::KeyError::Conflict) => conflicts += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    (winners, conflicts)
}

/// The master key file of the state at `path` (`<path>.master-key`), created on first use, so
/// a test that opens a state again (or from another process) opens it with the same key.
pub fn master_for(path: impl AsRef<std::path::Path>) -> orgkey::MasterKeys {
    let mut file = path.as_ref().as_os_str().to_owned();
    file.push(".master-key");
    orgkey::MasterKeys::load_or_create(std::path::PathBuf::from(file)).unwrap()
}
