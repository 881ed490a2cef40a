//! O1: every decision is made inside a tracing span that carries the org, the auth method and
//! the outcome or reason, the application's own events nest inside it, and nothing secret (a
//! key, a wrong key, a password, a session id, an obfuscated key) appears in any span or
//! event, at any level. One test in this binary: it installs the process-wide subscriber.
#![cfg(all(feature = "gateway", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::fleet::{login, logout, regenerate, request, whoami_key, whoami_session, ADMIN};
use orgkey::store::MemoryStore;
use tracing_subscriber::fmt::format::FmtSpan;

const KEY: &str = "Zx9Qw8Er7Ty6";
const WRONG_KEY: &str = "Wr0ngKey1234";
const PASSWORD: &str = "CorrectHorse12!";

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_spans_with_the_callers_identity_and_nothing_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        // Every span's fields, at its creation and its close.
        .with_span_events(FmtSpan::FULL)
        .init();

    let served = common::served::serve_gateway(MemoryStore::new(), KEY, ADMIN, PASSWORD).await;
    let addr = served.addr;
    let (key_ok, wrong, session, logged_out, regenerated) =
        tokio::task::spawn_blocking(move || {
            let key_ok = whoami_key(addr, KEY).unwrap().status;
            let wrong = whoami_key(addr, WRONG_KEY).unwrap().status;
            let signed_in = login(addr, None, KEY, ADMIN, PASSWORD).unwrap();
            let session = signed_in.session().expect("a session");
            let by_session = whoami_session(addr, &session).unwrap().status;
            let rotated = regenerate(addr, &session).unwrap();
            let successor = rotated.session().expect("a carried-over session");
            let logged_out = logout(addr, &successor).unwrap().status;
            let after = request(
                addr,
                None,
                "GET",
                "/api/v1/whoami",
                &[("cookie", &format!("JSESSIONID={successor}"))],
                "",
            )
            .unwrap()
            .status;
            let new_key = rotated.json()["keyValue"].as_str().unwrap().to_owned();
            (
                key_ok,
                wrong,
                (session, successor, by_session),
                (logged_out, after),
                (rotated.status, new_key),
            )
        })
        .await
        .unwrap();
    assert_eq!((key_ok, wrong), (200, 401));
    assert_eq!(session.2, 200);
    assert_eq!(regenerated.0, 200);
    assert_eq!(logged_out, (200, 401));

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The decisions are spans that carry who called and how it went.
    assert!(
        text.contains("orgkey.authenticate"),
        "no decision span:\n{text}"
    );
    assert!(text.contains("org=acme"), "{text}");
    assert!(
        text.contains("method=\"api_key\"") || text.contains("method=api_key"),
        "{text}"
    );
    assert!(
        text.contains("method=\"session\"") || text.contains("method=session"),
        "{text}"
    );
    assert!(
        text.contains("reason=\"wrong_key\"") || text.contains("reason=wrong_key"),
        "{text}"
    );
    // Nothing secret, anywhere.
    for (what, secret) in [
        ("the key", KEY),
        ("the wrong key", WRONG_KEY),
        ("the new key", regenerated.1.as_str()),
        ("the password", PASSWORD),
        ("the session id", session.0.as_str()),
        ("the successor session id", session.1.as_str()),
    ] {
        assert!(!text.contains(secret), "{what} was traced:\n{text}");
    }
}
