//! A3: failed logins are throttled per address and per username; throttled attempts never
//! reach the password hash; an attacker cannot lock an admin out of a known address.
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
use orgkey::{Admins, Password, Username};

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
    let ts = s.world.clock.now_ms();
    let mut request = post_json(login_body(username, password, KEY, ts));
    request.extensions_mut().insert(ClientAddr(from));
    call_endpoint(&s.sessions, request).await
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
