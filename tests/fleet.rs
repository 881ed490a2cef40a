//! The fleet test (issue 11 item 5; DESIGN.md F1-F3, S3, A3): several `orgkey-gateway`
//! *processes* on one PostgreSQL schema, spoken to over real HTTP, with the faults a fleet
//! meets in production.
//!
//! - `rotations_*`: a rotation loop (regenerates round-robin over 3 replicas, one admin session
//!   carried over from call to call) while checker threads send every replica the key retired
//!   last and the key in force. After a regenerate returns, no replica may accept the retired
//!   key (a *stale accept*) nor refuse the new one (a *wrong refusal*) (F1, strict mode).
//! - `sessions_*`: a login on one replica works on the others at once; a logout on one is in
//!   force on all when it returns; the W2 carry-over works on every replica (S3, F2).
//! - `throttle_*`: wrong passwords from one address, spread over the replicas, reach the
//!   password check no more often than on one replica; a restart refills nothing; an admin at
//!   a known address is not locked out on any replica (A3, F2).
//! - `faults_*`: the feed's backend stopped (SIGSTOP) and terminated, a replica killed with
//!   kill -9 mid-rotation, PostgreSQL stopped and restarted: each replica fails closed (503 +
//!   `Retry-After`) within the bound and recovers (F1, F3). This one runs on a PostgreSQL
//!   cluster of its own (initdb in a temporary folder), so stopping it disturbs no other test;
//!   where that cannot be made, the PostgreSQL-stop fault is skipped with a `SKIPPED` line and
//!   the others run on the shared server.
//!
//! Two forms. The short one (the default, what `.ci/run` runs with `cargo test
//! --all-features`): 3 replicas, 100 rotations with one checker thread per replica, each fault
//! once; about 30 s. The long one, for the figures in BENCHMARKS.md: 1000 rotations with two
//! checker threads per replica, the feed kill repeated five times (the 503 windows must not
//! grow: the reconnect backoff resets):
//!
//! ```sh
//! ORGKEY_FLEET_LONG=1 cargo test --all-features --release --test fleet
//! ```
//!
//! Either form writes one line of figures to stderr, past libtest's capture (no
//! `--nocapture` needed): `fleet: form=short replicas=3 rotations=100 ... stale_accepts=0
//! wrong_refusals=0 ... rotate_p50_ms=.. rotate_p99_ms=.. stall_detect_ms=..
//! feed_kill_recovery_ms=.. pg_restart_recovery_ms=..`. Timing budgets (rotation p99 <= 50 ms)
//! are never asserted: the figures go to BENCHMARKS.md. Correctness (no
//! stale accept, no wrong refusal, no fencing without a fault) and the fail-closed bounds
//! (stall detected within 2 s, recovery within 10 s) are asserted in both.
//!
//! The four tests are independent (each its own schema and replicas) but take turns
//! (`fleet_turn`): the checkers keep both cores busy, and a fleet next to them would measure
//! their load. The replicas log at `info` without the line per request
//! (`RUST_LOG=info,orgkey::auth=warn`; a set `RUST_LOG` wins); a failing test prints the end
//! of each replica's log and keeps the file. The fault test prints the time of each fault it
//! injects (`(c) SIGSTOP ...`), to read beside those logs.
//!
//! PostgreSQL: `ORGKEY_TEST_POSTGRES_URL`, else `postgres://postgres@127.0.0.1:5432/test` if it
//! answers; if neither, the tests pass without running and say so (`SKIPPED (tests/fleet.rs)`).
#![cfg(all(feature = "postgres", feature = "gateway"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fleet::{
    fleet_turn, login, logout, ms, note, percentile_ms, poll, probe_session, regenerate,
    terminate_backend, whoami_key, whoami_session, Board, Checkers, Checks, Fleet, PrivateCluster,
    Report, Rotator, Stopped, Tally, ADMIN,
};
use common::pg::TempSchema;
use common::{KEY, PASSWORD};

const FILE: &str = "tests/fleet.rs";
const REPLICAS: usize = 3;

/// The fleet flags' values the fault test starts with (the documented defaults, spelled out so
/// that the bounds below follow from them).
const LEASE: Duration = Duration::from_secs(2);
const STALL_BOUND: Duration = Duration::from_secs(2);
/// How long a recovery may take before the test calls it missing.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

fn long_form() -> bool {
    std::env::var("ORGKEY_FLEET_LONG").is_ok_and(|v| v == "1")
}

fn form() -> &'static str {
    if long_form() {
        "long"
    } else {
        "short"
    }
}

fn schema() -> Option<TempSchema> {
    TempSchema::new(
        FILE,
        "the fleet tests (gateway processes on PostgreSQL) pass without running",
    )
}

fn loopback(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// The status of `GET /whoami` with `key` on `addr` (0 for a transport error).
fn key_status(addr: SocketAddr, key: &str) -> u16 {
    whoami_key(addr, key).map_or(0, |r| r.status)
}

fn session_status(addr: SocketAddr, session: &str) -> u16 {
    whoami_session(addr, session).map_or(0, |r| r.status)
}

/// F1 (strict mode): after a regenerate returns on any replica, no replica accepts the old key
/// and every replica accepts the new one, under concurrent load on every replica.
#[test]
fn rotations_no_replica_accepts_a_retired_key_or_refuses_the_new_one_once_the_call_returns() {
    let Some(schema) = schema() else { return };
    let report = Report::begin();
    let _turn = fleet_turn();
    let long = long_form();
    let rotations = if long { 1000 } else { 100 };
    // A bound on the whole loop, so that a fleet that keeps failing closed fails the test
    // instead of stretching it.
    let budget = Duration::from_secs(if long { 600 } else { 30 });
    let fleet = Fleet::start(
        &schema.url,
        &schema.name,
        REPLICAS,
        &["--fleet-mode", "strict"],
    );
    let addrs = fleet.addrs();
    let board = Arc::new(Board::new(KEY));
    let tally = Arc::new(Tally::default());
    // Paced (a request per millisecond or so per checker): "under load", not saturated.
    // Unpaced checkers keep both cores of a 2-core machine busy and starve PostgreSQL on the
    // same machine; the replicas' lease renewals then run late and they fail closed, as F3
    // wants, which is not what this test measures.
    let checkers = Checkers::start(
        &addrs,
        if long { 2 } else { 1 },
        &board,
        &tally,
        Duration::from_millis(1),
    );
    let mut checks = Checks::default();
    let mut rotator = Rotator::new(KEY);
    let mut latencies = Vec::with_capacity(rotations);
    let started = Instant::now();
    for i in 0..rotations {
        if started.elapsed() > budget {
            checks.expect(false, || {
                format!("only {i} of {rotations} rotations within {budget:?}")
            });
            break;
        }
        board.begin();
        match rotator.rotate(addrs[i % REPLICAS]) {
            Ok(took) => {
                board.end(&rotator.key);
                latencies.push(took);
            }
            Err(e) => {
                board.abandon();
                checks.expect(false, || format!("rotation {i}: {e}"));
                break;
            }
        }
    }
    checkers.finish();

    // And once everything is quiet: every replica (once it serves again, if it had fenced
    // itself) on the newest key, none on an old one.
    let mut stale = Tally::get(&tally.stale_accepts);
    let mut wrong = Tally::get(&tally.wrong_refusals);
    let quiet = Instant::now();
    for &addr in &addrs {
        let left = RECOVERY_BOUND.saturating_sub(quiet.elapsed());
        let serving = poll(quiet, left, Duration::from_millis(10), || {
            let status = key_status(addr, &rotator.key);
            (status != 503).then_some(status)
        });
        let Some((status, _)) = serving else {
            checks.expect(false, || {
                format!("{addr} still fails closed {RECOVERY_BOUND:?} after the load stopped")
            });
            continue;
        };
        checks.expect(status == 200, || {
            format!("{addr}: {status} for the newest key when all was quiet")
        });
        wrong += u64::from(status == 401);
        let refused = rotator
            .retired
            .iter()
            .rev()
            .take(10)
            .map(|old| key_status(addr, old));
        let accepted = refused.filter(|status| *status != 401).collect::<Vec<_>>();
        checks.expect(accepted.is_empty(), || {
            format!("{addr}: {accepted:?} for retired keys when all was quiet")
        });
        stale += accepted.iter().filter(|status| **status == 200).count() as u64;
    }

    let p50 = percentile_ms(&latencies, 50.0);
    let p99 = percentile_ms(&latencies, 99.0);
    report.set("form", form());
    report.set("replicas", REPLICAS);
    report.set("rotations", latencies.len());
    report.set("checked_requests", Tally::get(&tally.requests));
    report.set("stale_accepts", stale);
    report.set("wrong_refusals", wrong);
    report.set("unavailable", Tally::get(&tally.unavailable));
    report.set("rotate_retries", rotator.retries);
    report.set("relogins", rotator.relogins);
    report.set("rotate_p50_ms", format!("{p50:.1}"));
    report.set("rotate_p99_ms", format!("{p99:.1}"));

    checks.expect(stale == 0, || {
        format!("stale accepts: {stale} ({})", tally.summary())
    });
    checks.expect(wrong == 0, || {
        format!("wrong refusals: {wrong} ({})", tally.summary())
    });
    checks.expect(Tally::get(&tally.errors) == 0, || {
        format!("checker errors ({})", tally.summary())
    });
    // A 503 is safe, but no replica has a reason to fence itself in a run without faults.
    checks.expect(Tally::get(&tally.unavailable) == 0, || {
        format!(
            "replicas failed closed without a fault ({})",
            tally.summary()
        )
    });
    checks.expect(rotator.relogins == 0, || {
        format!(
            "{} regenerates were refused the session carried over from the previous call on \
             another replica (sessions are not fleet-wide: S3, W2)",
            rotator.relogins
        )
    });
    // The budget (rotation p99 at most 50 ms on loopback) is a timing claim: it is measured
    // by the long form and recorded in BENCHMARKS.md, never asserted in a test.
    checks.assert("rotations");
}

/// S3 / F2: sessions roam. A login on A works on B and C at once; a logout on B is in force on
/// A and C when it returns; the W2 carry-over (regenerate) gives a successor that works on
/// every replica, and the old session is dead everywhere.
#[test]
fn sessions_a_login_logout_and_carry_over_on_one_replica_hold_on_every_replica() {
    let Some(schema) = schema() else { return };
    let _turn = fleet_turn();
    let fleet = Fleet::start(&schema.url, &schema.name, REPLICAS, &[]);
    let addrs = fleet.addrs();
    let (a, b, c) = (addrs[0], addrs[1], addrs[2]);
    let mut checks = Checks::default();

    let reply = login(a, None, KEY, ADMIN, PASSWORD).unwrap();
    assert_eq!(reply.status, 200, "login on A: {}", reply.brief());
    let first = reply.session().expect("a session cookie");
    for (name, addr) in [("B", b), ("C", c), ("A", a)] {
        checks.status(session_status(addr, &first), 200, || {
            format!("a session from a login on A, used at once on {name} (S3)")
        });
    }

    let reply = logout(b, &first).unwrap();
    checks.expect(reply.status == 200, || {
        format!("logout on B: {}", reply.brief())
    });
    for (name, addr) in [("A", a), ("C", c), ("B", b)] {
        checks.status(session_status(addr, &first), 401, || {
            format!("after a logout on B returned, the session on {name} (S3)")
        });
        let status = probe_session(addr, &first).map_or(0, |r| r.status);
        checks.status(status, 401, || {
            format!("after a logout on B returned, the session probe on {name}")
        });
    }

    // W2: a regenerate on A with a session from a login on C; the successor works everywhere,
    // the old session nowhere; the new key everywhere, the old one nowhere.
    let reply = login(c, None, KEY, ADMIN, PASSWORD).unwrap();
    assert_eq!(reply.status, 200, "login on C: {}", reply.brief());
    let second = reply.session().unwrap();
    let reply = regenerate(a, &second).unwrap();
    checks.expect(reply.status == 200, || {
        format!(
            "regenerate on A with a session from C: {} (S3)",
            reply.brief()
        )
    });
    if reply.status == 200 {
        let new_key = reply.json()["keyValue"].as_str().unwrap().to_owned();
        let successor = reply.session();
        checks.expect(successor.is_some(), || {
            "the regenerate set no successor cookie (W2)".to_owned()
        });
        for (name, addr) in [("B", b), ("C", c), ("A", a)] {
            if let Some(successor) = &successor {
                checks.status(session_status(addr, successor), 200, || {
                    format!("the W2 successor on {name}")
                });
            }
            checks.status(session_status(addr, &second), 401, || {
                format!("the carried-over (old) session on {name}")
            });
            checks.status(key_status(addr, KEY), 401, || {
                format!("the old key on {name}")
            });
            checks.status(key_status(addr, &new_key), 200, || {
                format!("the new key on {name}")
            });
        }
        // The successor roams too: it regenerates again through B.
        if let Some(successor) = successor {
            let reply = regenerate(b, &successor).unwrap();
            checks.expect(reply.status == 200, || {
                format!("regenerate on B with A's W2 successor: {}", reply.brief())
            });
        }
    }
    checks.assert("sessions");
}

/// A3 / F2: failed-login throttles are fleet-wide and survive restarts, and a known admin is
/// never locked out on any replica. Distinct loopback source addresses play distinct clients
/// (the gateway takes the client address from the socket).
#[test]
fn throttle_spread_over_replicas_allows_no_more_attempts_than_one_and_never_locks_out_a_known_admin(
) {
    let Some(schema) = schema() else { return };
    let _turn = fleet_turn();
    let policy = orgkey::session::ThrottlePolicy::default();
    let mut fleet = Fleet::start(&schema.url, &schema.name, REPLICAS, &[]);
    let addrs = fleet.addrs();
    let mut checks = Checks::default();
    let (admin_home, attacker, sprayer) = (loopback(2), loopback(3), loopback(4));
    // A login, sent again while the replica fails closed (a 503 checked nothing; counted).
    let failing_closed = std::cell::Cell::new(0);
    let attempt = |addr: SocketAddr, from: Option<IpAddr>, username: &str, password: &str| {
        let deadline = Instant::now() + RECOVERY_BOUND;
        loop {
            let reply = login(addr, from, KEY, username, password).unwrap();
            if !(reply.is_fail_closed() && Instant::now() < deadline) {
                return reply;
            }
            failing_closed.set(failing_closed.get() + 1);
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // The admin logs in from a known address (on A).
    let reply = attempt(addrs[0], admin_home, ADMIN, PASSWORD);
    assert_eq!(
        reply.status,
        200,
        "the admin's login from 127.0.0.2: {}",
        reply.brief()
    );

    // One attacker address, the admin's username, wrong passwords, round-robin over the
    // replicas. One replica would let `username_burst` through (plus what refills meanwhile);
    // the fleet must not let more.
    let attempts = 3 * policy.address_burst as usize;
    let attack_started = Instant::now();
    let (mut checked, mut throttled) = (0, 0);
    for i in 0..attempts {
        let reply = attempt(addrs[i % REPLICAS], attacker, ADMIN, "WrongPassword99!");
        match reply.status {
            401 => checked += 1,
            429 => {
                throttled += 1;
                let retry = reply
                    .header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok());
                checks.expect(retry.is_some_and(|s| s >= 1), || {
                    format!("a 429 without an integer Retry-After: {}", reply.head)
                });
            }
            _ => checks.expect(false, || format!("attempt {i}: {}", reply.brief())),
        }
    }
    let elapsed = attack_started.elapsed();
    let refills = |refill: Duration| elapsed.as_secs_f64() / refill.as_secs_f64();
    let allowed = (f64::from(policy.username_burst) + refills(policy.username_refill).ceil())
        .min(f64::from(policy.address_burst) + refills(policy.address_refill).ceil())
        as usize;
    eprintln!(
        "throttle: one address, one username, {attempts} wrong passwords over {REPLICAS} \
         replicas in {elapsed:?}: {checked} reached the password check (401), {throttled} \
         throttled (429); one replica allows {allowed}"
    );
    checks.expect(checked <= allowed, || {
        format!(
            "{checked} of {attempts} wrong passwords from one address for one username reached \
             the password check over {REPLICAS} replicas; one replica allows {allowed} (F2)"
        )
    });

    // One address spraying usernames: the address bucket alone binds.
    let started = Instant::now();
    let mut sprayed = 0;
    for i in 0..attempts {
        let username = format!("nobody{i}@acme.example");
        let reply = attempt(addrs[i % REPLICAS], sprayer, &username, "WrongPassword99!");
        match reply.status {
            401 => sprayed += 1,
            429 => {}
            _ => checks.expect(false, || format!("spray attempt {i}: {}", reply.brief())),
        }
    }
    let allowed = policy.address_burst as usize
        + (started.elapsed().as_secs_f64() / policy.address_refill.as_secs_f64()).ceil() as usize;
    eprintln!(
        "throttle: one address, {attempts} usernames: {sprayed} reached the password check; \
         one replica allows {allowed}"
    );
    checks.expect(sprayed <= allowed, || {
        format!(
            "{sprayed} of {attempts} attempts from one address (distinct usernames) reached \
             the password check over {REPLICAS} replicas; one replica allows {allowed} (F2)"
        )
    });

    // A restart refills nothing: B, killed and started again, still throttles the attacker.
    fleet.restart(1);
    let addrs = fleet.addrs();
    if attack_started.elapsed() < policy.username_refill {
        let reply = attempt(addrs[1], attacker, ADMIN, "WrongPassword99!");
        checks.expect(reply.status == 429, || {
            format!(
                "after a restart, B answers the attacker {} (a restart refilled the bucket)",
                reply.brief()
            )
        });
    }

    // The admin, from the known address, logs in on every replica (A3: no lockout from
    // elsewhere, on any replica).
    for (i, &addr) in addrs.iter().enumerate() {
        let reply = attempt(addr, admin_home, ADMIN, PASSWORD);
        checks.expect(reply.status == 200, || {
            format!(
                "the admin at a known address is refused on replica {i} after an attack from \
                 elsewhere: {}",
                reply.brief()
            )
        });
    }
    let failing_closed = failing_closed.get();
    checks.expect(failing_closed == 0, || {
        format!("logins were answered 503 (failing closed) {failing_closed} times without a fault")
    });
    checks.assert("throttle");
}

/// F1 / F3 under faults, each measured: the feed's backend stopped (SIGSTOP), the feed's
/// backend terminated, a replica killed with kill -9 mid-rotation, PostgreSQL stopped and
/// restarted.
#[test]
fn faults_every_replica_fails_closed_when_it_cannot_vouch_for_its_state_and_recovers() {
    let report = Report::begin();
    let _turn = fleet_turn();
    let long = long_form();
    // Declared before the fleet, so that the replicas are killed before the cluster stops.
    let private = match PrivateCluster::start() {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            common::skip::announce(
                FILE,
                "the fault test's PostgreSQL stop and restart passes without running (the \
                 other faults run on the shared server)",
                &format!("no private PostgreSQL cluster could be made: {why}"),
            );
            None
        }
    };
    let shared;
    let (url, schema_name) = match &private {
        Some(cluster) => (cluster.url(), "orgkey_fleet".to_owned()),
        None => {
            let Some(schema) = schema() else { return };
            shared = schema;
            (shared.url.clone(), shared.name.clone())
        }
    };
    let lease = format!("{}", LEASE.as_secs_f64());
    let mut fleet = Fleet::start(
        &url,
        &schema_name,
        REPLICAS,
        &[
            "--fleet-mode",
            "strict",
            "--lease",
            &lease,
            "--lease-renewal",
            "0.25",
            "--fleet-wait",
            "5",
        ],
    );
    let mut checks = Checks::default();
    let mut rotator = Rotator::new(KEY);
    for (i, addr) in fleet.addrs().into_iter().enumerate() {
        assert_eq!(key_status(addr, KEY), 200, "replica {i} before any fault");
    }
    report.set("form", form());
    report.set("replicas", REPLICAS);
    note("faults: the fleet serves");

    // (c) B's feed backend stopped (SIGSTOP: a half-open connection, silent, no error).
    // First alone: B must answer 503 within the stall bound (measured from the SIGSTOP to the
    // first 503), and serve again (on a new connection, the old backend still stopped).
    // Then a regenerate through A right after another SIGSTOP: once it returns, B must not
    // accept the old key nor refuse the new one.
    let b = fleet.addr(1);
    match fleet
        .feed_pid(1, RECOVERY_BOUND)
        .map(|pid| (pid, Stopped::new(pid)))
    {
        Err(e) => checks.expect(false, || format!("B's feed backend: {e}")),
        Ok((_, None)) => common::skip::announce(
            FILE,
            "the fault test's stalled feed (SIGSTOP) passes without running",
            "this process may not signal the PostgreSQL server's processes (run as root or as \
             the server's user)",
        ),
        Ok((pid, Some(stopped))) => {
            note(format_args!("(c) SIGSTOP B's feed backend (pid {pid})"));
            let stopped_at = Instant::now();
            let key = rotator.key.clone();
            let mut early = Vec::new();
            let detected =
                poll(
                    stopped_at,
                    RECOVERY_BOUND,
                    Duration::from_millis(2),
                    || match whoami_key(b, &key) {
                        Ok(reply) if reply.status == 503 => Some(reply),
                        Ok(reply) if reply.status == 200 => None,
                        other => {
                            early.push(format!("{other:?}"));
                            None
                        }
                    },
                );
            checks.expect(early.is_empty(), || {
                format!("B answered the key in force with {early:?} while its feed stalled")
            });
            match detected {
                Some((reply, detect)) => {
                    note("(c) B fails closed");
                    report.set("stall_detect_ms", ms(detect));
                    checks.expect(detect <= STALL_BOUND, || {
                        format!(
                            "B answered 503 {detect:?} after its feed stalled (bound \
                             {STALL_BOUND:?}, F3)"
                        )
                    });
                    checks.expect(reply.is_fail_closed(), || {
                        format!("B's 503 has no Retry-After: {}", reply.head)
                    });
                    let since = Instant::now();
                    let back = poll(since, RECOVERY_BOUND, Duration::from_millis(2), || {
                        (key_status(b, &key) == 200).then_some(())
                    });
                    match back {
                        Some((_, took)) => report.set("stall_recovery_ms", ms(took)),
                        None => checks.expect(false, || {
                            format!(
                                "B did not serve again within {RECOVERY_BOUND:?} of failing \
                                 closed on a stalled feed"
                            )
                        }),
                    }
                }
                None => {
                    report.set("stall_detect_ms", "never");
                    checks.expect(false, || {
                        format!(
                            "B never answered 503 within {RECOVERY_BOUND:?} of its feed \
                             stalling (F3)"
                        )
                    });
                }
            }
            drop(stopped);
        }
    }
    match fleet.feed_pid(1, RECOVERY_BOUND) {
        Err(e) => checks.expect(false, || format!("B's feed backend after the stall: {e}")),
        Ok(pid) => {
            let board = Arc::new(Board::new(&rotator.key));
            let tally = Arc::new(Tally::default());
            let checker = Checkers::start(&[b], 1, &board, &tally, Duration::from_millis(2));
            // A session first: in strict mode a login is a change too, and would wait here.
            board.begin();
            rotator.rotate(fleet.addr(0)).unwrap();
            board.end(&rotator.key);
            if let Some(stopped) = Stopped::new(pid) {
                note(format_args!(
                    "(c) SIGSTOP B's feed backend (pid {pid}), then regenerate through A"
                ));
                board.begin();
                match rotator.rotate(fleet.addr(0)) {
                    Ok(took) => {
                        board.end(&rotator.key);
                        report.set("stall_rotate_ms", ms(took));
                    }
                    Err(e) => {
                        board.abandon();
                        checks.expect(false, || format!("regenerate during B's stall: {e}"));
                    }
                }
                let key = rotator.key.clone();
                let back = poll(
                    Instant::now(),
                    RECOVERY_BOUND,
                    Duration::from_millis(5),
                    || (key_status(b, &key) == 200).then_some(()),
                );
                checks.expect(back.is_some(), || {
                    format!("B did not serve the new key within {RECOVERY_BOUND:?} of a regenerate during its stall")
                });
                drop(stopped);
            }
            checker.finish();
            checks.expect(Tally::get(&tally.stale_accepts) == 0, || {
                format!(
                    "stale accepts on B around its stalled feed: {}",
                    tally.summary()
                )
            });
            checks.expect(Tally::get(&tally.wrong_refusals) == 0, || {
                format!(
                    "wrong refusals on B around its stalled feed: {}",
                    tally.summary()
                )
            });
        }
    }

    // (b) B's feed backend terminated: a short 503 window, then B serves again (the window is
    // measured from the termination to the first 200 after a 503), each time after the feed
    // has followed for longer than its healthy period. The long form repeats it and checks
    // that the windows do not grow: the reconnect backoff resets (F3).
    {
        let b = fleet.addr(1);
        let mut windows: Vec<Duration> = Vec::new();
        let mut shown = Vec::new();
        for _ in 0..if long { 5 } else { 1 } {
            // Past the feed's healthy period (5 s) since it last (re)connected (in (c), or in
            // the round before), so each termination meets a healthy feed.
            std::thread::sleep(Duration::from_secs(6));
            let pid = match fleet.feed_pid(1, RECOVERY_BOUND) {
                Ok(pid) => pid,
                Err(e) => {
                    checks.expect(false, || format!("B's feed backend: {e}"));
                    break;
                }
            };
            note(format_args!("(b) terminate B's feed backend (pid {pid})"));
            let killed_at = Instant::now();
            assert!(terminate_backend(&fleet.url, pid).unwrap());
            let mut saw_503 = false;
            let key = rotator.key.clone();
            let back = poll(killed_at, RECOVERY_BOUND, Duration::from_millis(2), || {
                match whoami_key(b, &key).map(|r| (r.status, r.is_fail_closed())) {
                    Ok((503, closed)) => {
                        checks.expect(closed, || "a 503 without Retry-After".to_owned());
                        saw_503 = true;
                        None
                    }
                    // Before the replica notices, 200 is fine; a window too short to see
                    // (no 503 within a second) counts as none.
                    Ok((200, _)) if saw_503 => Some(true),
                    Ok((200, _)) if killed_at.elapsed() > Duration::from_secs(1) => Some(false),
                    _ => None,
                }
            });
            match back {
                Some((true, took)) => {
                    windows.push(took);
                    shown.push(ms(took));
                }
                Some((false, _)) => shown.push("none-seen".to_owned()),
                None => {
                    shown.push("never".to_owned());
                    checks.expect(false, || {
                        format!(
                            "B did not recover within {RECOVERY_BOUND:?} of its feed backend's \
                             termination"
                        )
                    });
                }
            }
            let renewed = fleet.feed_pid(1, RECOVERY_BOUND);
            checks.expect(renewed.as_ref().is_ok_and(|p| *p != pid), || {
                format!("B's feed did not reconnect on a new backend: {renewed:?}")
            });
        }
        report.set("feed_kill_recovery_ms", shown.join(","));
        if let Some(&first) = windows.first() {
            let limit = first + Duration::from_millis(500);
            checks.expect(windows.iter().all(|w| *w <= limit), || {
                format!(
                    "the 503 windows after identical feed terminations grow ({} ms): the \
                     reconnect backoff does not reset after a healthy period (F3)",
                    shown.join(", ")
                )
            });
        }
    }

    // (d) C killed with kill -9 while A and B rotate: every regenerate still returns, within
    // about the lease (C's lease runs out) and well before the wait bound; C, started again,
    // serves the newest key and refuses the old ones.
    {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pair = [fleet.addr(0), fleet.addr(1)];
        let rotating = std::thread::spawn({
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            let mut rotator = std::mem::replace(&mut rotator, Rotator::new(KEY));
            move || {
                let mut calls = Vec::new();
                while !stop.load(Ordering::SeqCst) && calls.len() < 500 {
                    let started = Instant::now();
                    let outcome = rotator.rotate(pair[calls.len() % 2]);
                    let failed = outcome.is_err();
                    calls.push((started, outcome));
                    done.fetch_add(1, Ordering::SeqCst);
                    if failed {
                        break;
                    }
                }
                (rotator, calls)
            }
        });
        let wait_done = |n: usize| {
            poll(
                Instant::now(),
                Duration::from_secs(30),
                Duration::from_millis(2),
                || (done.load(Ordering::SeqCst) >= n).then_some(()),
            )
        };
        wait_done(3);
        note("(d) kill -9 C");
        let killed_at = Instant::now();
        fleet.kill9(2);
        let at_kill = done.load(Ordering::SeqCst);
        wait_done(at_kill + 4);
        stop.store(true, Ordering::SeqCst);
        let (back, calls) = rotating.join().unwrap();
        rotator = back;
        let mut worst = Duration::ZERO;
        for (i, (started, outcome)) in calls.iter().enumerate() {
            match outcome {
                Ok(took) if *started + *took >= killed_at => worst = worst.max(*took),
                Ok(_) => {}
                Err(e) => {
                    checks.expect(false, || format!("regenerate {i} around C's kill -9: {e}"))
                }
            }
        }
        report.set("kill9_rotate_ms", ms(worst));
        let limit = LEASE + Duration::from_secs(2);
        checks.expect(worst <= limit, || {
            format!(
                "a regenerate took {worst:?} with C killed (expected about the lease, \
                 {LEASE:?}, at most {limit:?})"
            )
        });

        fleet.restart(2);
        let c = fleet.addr(2);
        let key = rotator.key.clone();
        let first = poll(
            Instant::now(),
            RECOVERY_BOUND,
            Duration::from_millis(5),
            || {
                let status = key_status(c, &key);
                (status != 503 && status != 0).then_some(status)
            },
        );
        checks.expect(first.is_some_and(|(s, _)| s == 200), || {
            format!("C, restarted, answers {first:?} for the newest key")
        });
        for old in rotator.retired.iter().rev().take(10) {
            checks.status(key_status(c, old), 401, || {
                "C, restarted, for a retired key".to_owned()
            });
        }
        // C is part of the fleet again: a regenerate through A is in force on C when it returns.
        match rotator.rotate(fleet.addr(0)) {
            Ok(_) => {
                for (i, addr) in fleet.addrs().into_iter().enumerate() {
                    let old = rotator.retired.last().unwrap();
                    let (new_status, old_status) =
                        (key_status(addr, &rotator.key), key_status(addr, old));
                    checks.expect((new_status, old_status) == (200, 401), || {
                        format!(
                            "after C's restart, replica {i} answers {new_status} for the new \
                             key and {old_status} for the old one"
                        )
                    });
                }
            }
            Err(e) => checks.expect(false, || format!("regenerate after C's restart: {e}")),
        }
    }

    // (a) PostgreSQL stopped: every replica fails closed (503 + Retry-After on a valid key, the
    // login and the session probe too), and serves again after the restart. Only on the
    // private cluster.
    if let Some(cluster) = &private {
        let addrs = fleet.addrs();
        let key = rotator.key.clone();
        let reply = login(addrs[0], None, &key, ADMIN, PASSWORD).unwrap();
        let session = reply.session();
        note("(a) stop PostgreSQL");
        let stopping = Instant::now();
        cluster.stop().unwrap();
        let stopped_in = stopping.elapsed();
        let mut worst = Duration::ZERO;
        for (i, &addr) in addrs.iter().enumerate() {
            let closed = poll(stopping, RECOVERY_BOUND, Duration::from_millis(5), || {
                whoami_key(addr, &key).ok().filter(|r| r.status == 503)
            });
            match closed {
                Some((reply, took)) => {
                    worst = worst.max(took);
                    checks.expect(reply.is_fail_closed(), || {
                        format!("replica {i}: a 503 without Retry-After: {}", reply.head)
                    });
                }
                None => checks.expect(false, || {
                    format!(
                        "replica {i} still judges keys {RECOVERY_BOUND:?} after PostgreSQL stopped"
                    )
                }),
            }
            let status = login(addr, None, &key, ADMIN, PASSWORD).map_or(0, |r| r.status);
            checks.status(status, 503, || {
                format!("replica {i}: the login while PostgreSQL is down (F3)")
            });
            if let Some(session) = &session {
                let status = probe_session(addr, session).map_or(0, |r| r.status);
                checks.status(status, 503, || {
                    format!("replica {i}: the session probe while PostgreSQL is down (F3)")
                });
            }
        }
        report.set("pg_stop_fail_closed_ms", ms(worst));
        eprintln!("faults: pg_ctl stop took {stopped_in:?}");
        std::thread::sleep(Duration::from_millis(500));

        cluster.restart().unwrap();
        note("(a) PostgreSQL restarted");
        let restarted = Instant::now();
        let mut worst = Duration::ZERO;
        for (i, &addr) in addrs.iter().enumerate() {
            let back = poll(restarted, RECOVERY_BOUND, Duration::from_millis(5), || {
                (key_status(addr, &key) == 200).then_some(())
            });
            match back {
                Some((_, took)) => worst = worst.max(took),
                None => checks.expect(false, || {
                    format!("replica {i} did not serve within {RECOVERY_BOUND:?} of PostgreSQL's restart")
                }),
            }
        }
        report.set("pg_restart_recovery_ms", ms(worst));
        match rotator.rotate(addrs[0]) {
            Ok(_) => {
                let old = rotator.retired.last().unwrap();
                for (i, &addr) in addrs.iter().enumerate() {
                    let (new_status, old_status) =
                        (key_status(addr, &rotator.key), key_status(addr, old));
                    checks.expect((new_status, old_status) == (200, 401), || {
                        format!(
                            "after PostgreSQL's restart, replica {i} answers {new_status} for \
                             the new key and {old_status} for the old one"
                        )
                    });
                }
            }
            Err(e) => checks.expect(false, || {
                format!("regenerate after PostgreSQL's restart: {e}")
            }),
        }
    }
    // (Failing here, with the fleet alive, keeps and shows each replica's log.)
    checks.assert("faults");
}
