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
//! | `orgkey_auth_duration_seconds` | histogram | the layer's decision time, sampled: one request in [`AUTH_SAMPLE`] per thread is timed (timing every one would cost two clock reads per request) |
//! | `orgkey_fleet_confirm_seconds` | histogram | strict fleet mode (F1): from a change's commit until every live replica confirmed it (the fleet's propagation lag, seen by the writer) |
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

const ACTIONS: [KeyAction; 7] = [
    KeyAction::Subscribe,
    KeyAction::Unsubscribe,
    KeyAction::Add,
    KeyAction::Edit,
    KeyAction::Regenerate,
    KeyAction::Delete,
    KeyAction::Restore,
];

/// One request in this many (per thread) has its decision timed for
/// `orgkey_auth_duration_seconds`.
pub const AUTH_SAMPLE: u32 = 8;

/// A Prometheus histogram with fixed upper bounds (in nanoseconds).
struct Histogram {
    bounds_ns: &'static [u64],
    buckets: [AtomicU64; 16],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    const fn new(bounds_ns: &'static [u64]) -> Self {
        Self {
            bounds_ns,
            buckets: [const { AtomicU64::new(0) }; 16],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, ns: u64) {
        if let Some(i) = self.bounds_ns.iter().position(|bound| ns <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds_ns.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = *bound as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const MICRO: u64 = 1_000;
const MILLI: u64 = 1_000_000;

static AUTH_TIME: Histogram = Histogram::new(&[
    MICRO / 4,
    MICRO / 2,
    MICRO,
    2 * MICRO,
    5 * MICRO,
    10 * MICRO,
    50 * MICRO,
    100 * MICRO,
    MILLI,
    10 * MILLI,
]);

static FLEET_CONFIRM: Histogram = Histogram::new(&[
    MILLI,
    2 * MILLI,
    5 * MILLI,
    10 * MILLI,
    20 * MILLI,
    50 * MILLI,
    100 * MILLI,
    250 * MILLI,
    500 * MILLI,
    1_000 * MILLI,
    2_500 * MILLI,
    5_000 * MILLI,
    10_000 * MILLI,
]);

/// Times one decision of the layer, one request in [`AUTH_SAMPLE`] per thread.
pub(crate) struct AuthTimer(Option<std::time::Instant>);

impl AuthTimer {
    pub(crate) fn start() -> Self {
        thread_local! {
            static NEXT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let sampled = NEXT.with(|next| {
            let n = next.get();
            next.set(if n + 1 >= AUTH_SAMPLE { 0 } else { n + 1 });
            n == 0
        });
        Self(sampled.then(std::time::Instant::now))
    }

    pub(crate) fn stop(self) {
        if let Some(started) = self.0 {
            AUTH_TIME.observe(started.elapsed().as_nanos() as u64);
        }
    }
}

/// A strict-mode change was confirmed by every live replica `after` its commit.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn fleet_confirmed(after: std::time::Duration) {
    FLEET_CONFIRM.observe(after.as_nanos() as u64);
}

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
    AUTH_TIME.render(
        &mut out,
        "orgkey_auth_duration_seconds",
        "The layer's decision time, one request in 8 per thread.",
    );
    FLEET_CONFIRM.render(
        &mut out,
        "orgkey_fleet_confirm_seconds",
        "Strict fleet mode: from a change's commit until every live replica confirmed it.",
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
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[10, 100]);
        for ns in [5, 50, 50, 500] {
            h.observe(ns);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("# TYPE x histogram"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.00000001\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0000001\"} 3"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4"), "{out}");
        assert!(out.contains("x_count 4"), "{out}");
        assert!(out.contains("x_sum 0.000000605"), "{out}");
    }

    #[test]
    fn one_decision_in_eight_per_thread_is_timed() {
        std::thread::spawn(|| {
            let before = AUTH_TIME.count.load(Ordering::Relaxed);
            for _ in 0..(8 * AUTH_SAMPLE) {
                AuthTimer::start().stop();
            }
            let after = AUTH_TIME.count.load(Ordering::Relaxed);
            // Other tests' threads may time decisions too: at least this thread's 8.
            assert!(after - before >= 8, "{before} -> {after}");
        })
        .join()
        .unwrap();
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
