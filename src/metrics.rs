//! Counters of authentication decisions, logins and key changes (O2), in Prometheus text
//! format.
//!
//! The counters are process-wide (like a Prometheus registry) and sharded per thread, so
//! counting on the hot path is one uncontended atomic add. [`render`] writes them in the
//! Prometheus text exposition format; serve that at `/metrics` (the gateway does).
//!
//! | metric | labels | counts |
//! | --- | --- | --- |
//! | `orgkey_requests_accepted_total` | `method` (`api_key`, `session`) | requests the layer let through |
//! | `orgkey_requests_rejected_total` | `reason` ([`RejectionReason::as_str`]) | requests the layer refused |
//! | `orgkey_logins_total` | `outcome` (`accepted`, or a [`LoginFailure::as_str`]) | login attempts |
//! | `orgkey_key_changes_total` | `action` ([`KeyAction::as_str`]) | key and subscription changes |
//!
//! Labels carry reasons and actions only: never an org, a user or a key.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::audit::KeyAction;
use crate::auth::RejectionReason;
use crate::session::LoginFailure;

const SHARDS: usize = 8;

/// One counter on its own cache line.
#[repr(align(64))]
struct Padded(AtomicU64);

struct Counter([Padded; SHARDS]);

impl Counter {
    const fn new() -> Self {
        Self([const { Padded(AtomicU64::new(0)) }; SHARDS])
    }

    fn add(&self) {
        self.0[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

const LOGIN_OUTCOMES: [&str; 11] = [
    "accepted",
    "unknown_user",
    "wrong_password",
    "admin_disabled",
    "stale_timestamp",
    "no_subscription",
    "no_key",
    "wrong_key",
    "missing_api_scope",
    "throttled",
    "internal",
];

const ACTIONS: [KeyAction; 6] = [
    KeyAction::Subscribe,
    KeyAction::Unsubscribe,
    KeyAction::Add,
    KeyAction::Edit,
    KeyAction::Regenerate,
    KeyAction::Delete,
];

static ACCEPTED_KEY: Counter = Counter::new();
static ACCEPTED_SESSION: Counter = Counter::new();
static REJECTED: [Counter; RejectionReason::ALL.len()] =
    [const { Counter::new() }; RejectionReason::ALL.len()];
static LOGINS: [Counter; LOGIN_OUTCOMES.len()] = [const { Counter::new() }; LOGIN_OUTCOMES.len()];
static CHANGES: [Counter; ACTIONS.len()] = [const { Counter::new() }; ACTIONS.len()];

pub(crate) fn accepted(session: bool) {
    if session {
        ACCEPTED_SESSION.add();
    } else {
        ACCEPTED_KEY.add();
    }
}

pub(crate) fn rejected(reason: RejectionReason) {
    if let Some(i) = RejectionReason::ALL.iter().position(|r| *r == reason) {
        REJECTED[i].add();
    }
}

pub(crate) fn login(outcome: Result<(), &LoginFailure>) {
    let name = match outcome {
        Ok(()) => "accepted",
        Err(failure) => failure.as_str(),
    };
    if let Some(i) = LOGIN_OUTCOMES.iter().position(|o| *o == name) {
        LOGINS[i].add();
    }
}

pub(crate) fn changed(action: KeyAction) {
    if let Some(i) = ACTIONS.iter().position(|a| *a == action) {
        CHANGES[i].add();
    }
}

/// The counters in the Prometheus text exposition format (version 0.0.4); serve it with
/// `Content-Type: text/plain; version=0.0.4`.
pub fn render() -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, help: &str, samples: &mut dyn Iterator<Item = (String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    family(
        "orgkey_requests_accepted_total",
        "Requests the layer let through.",
        &mut [
            ("method=\"api_key\"".to_owned(), ACCEPTED_KEY.get()),
            ("method=\"session\"".to_owned(), ACCEPTED_SESSION.get()),
        ]
        .into_iter(),
    );
    family(
        "orgkey_requests_rejected_total",
        "Requests the layer refused, by reason.",
        &mut RejectionReason::ALL
            .iter()
            .zip(REJECTED.iter())
            .map(|(r, c)| (format!("reason=\"{}\"", r.as_str()), c.get())),
    );
    family(
        "orgkey_logins_total",
        "Login attempts, by outcome.",
        &mut LOGIN_OUTCOMES
            .iter()
            .zip(LOGINS.iter())
            .map(|(o, c)| (format!("outcome=\"{o}\""), c.get())),
    );
    family(
        "orgkey_key_changes_total",
        "Key and subscription changes, by action.",
        &mut ACTIONS
            .iter()
            .zip(CHANGES.iter())
            .map(|(a, c)| (format!("action=\"{}\"", a.as_str()), c.get())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_prefix: &str) -> u64 {
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    #[test]
    fn counts_are_rendered_per_label_and_add_up_across_threads() {
        let before = value(&render(), "orgkey_key_changes_total{action=\"edit\"}");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        changed(KeyAction::Edit);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = render();
        let after = value(&text, "orgkey_key_changes_total{action=\"edit\"}");
        assert!(after >= before + 4000, "{before} -> {after}");
        assert!(text.contains("# TYPE orgkey_requests_rejected_total counter"));
        assert!(text.contains("orgkey_requests_rejected_total{reason=\"wrong_key\"}"));
        assert!(text.contains("orgkey_logins_total{outcome=\"throttled\"}"));
        // Every login failure has its label.
        for failure in [
            LoginFailure::UnknownUser,
            LoginFailure::Internal,
            LoginFailure::Throttled {
                retry_after_secs: 1,
            },
        ] {
            assert!(LOGIN_OUTCOMES.contains(&failure.as_str()));
        }
    }
}
