//! F1, F2 and S3 with several replicas in one test process: each replica is a whole
//! `OrgKey` stack on its own `PostgresStore` (its own connections, its own lease), all on one
//! schema. No sleeps before the checks: each promise is "in force on every replica when the
//! call returns". The multi-process fleet with faults is `tests/fleet.rs`.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use orgkey::session::obfuscate::obfuscate;
use orgkey::session::LoginRequest;
use orgkey::session::SessionConfig;
use orgkey::store::{FleetConfig, FleetMode, Store};
use orgkey::{Actor, KeyFormat, OrgId, OrgKey, Password, Scopes, Username};

const PASSWORD: &str = "CorrectHorse12!";

fn schema() -> Option<common::pg::TempSchema> {
    common::pg::TempSchema::new(
        "tests/fleet_replicas.rs",
        "the in-process fleet tests (F1, F2, S3) pass without running",
    )
}

fn acme() -> OrgId {
    OrgId::new("acme").unwrap()
}

fn alice() -> Username {
    Username::new("alice@acme.example").unwrap()
}

fn ops() -> Actor {
    Actor::new("ops@acme.example").unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A fast fleet for tests: short lease and wait, so a dead replica costs little time.
fn fleet(mode: FleetMode) -> FleetConfig {
    FleetConfig {
        mode,
        lease: Duration::from_millis(1000),
        renewal: Duration::from_millis(100),
        wait: Duration::from_millis(2500),
        ..FleetConfig::default()
    }
}

async fn replica_with(
    schema: &common::pg::TempSchema,
    name: &str,
    config: FleetConfig,
    sessions: SessionConfig,
) -> OrgKey {
    let store = schema.replica(name, KeyFormat::default(), config).await;
    let orgkey = OrgKey::builder("http://127.0.0.1/api/v1")
        .unwrap()
        .session_config(sessions)
        .open(store)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !orgkey.table().is_trusted() {
        assert!(Instant::now() < deadline, "replica {name} never followed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    orgkey
}

/// Three replicas; the first creates org `acme` with a key and admin alice.
async fn three(schema: &common::pg::TempSchema, mode: FleetMode) -> Vec<OrgKey> {
    three_with(schema, mode, SessionConfig::for_base_url("http://x")).await
}

async fn three_with(
    schema: &common::pg::TempSchema,
    mode: FleetMode,
    sessions: SessionConfig,
) -> Vec<OrgKey> {
    let a = replica_with(schema, "a", fleet(mode), sessions.clone()).await;
    let b = replica_with(schema, "b", fleet(mode), sessions.clone()).await;
    let c = replica_with(schema, "c", fleet(mode), sessions).await;
    a.keys().create_org(&acme()).await.unwrap();
    a.keys().subscribe(&acme(), &ops()).await.unwrap();
    a.admins()
        .create(&alice(), &acme(), &Password::new(PASSWORD), Scopes::ALL)
        .await
        .unwrap();
    vec![a, b, c]
}

fn key_of(orgkey: &OrgKey) -> String {
    orgkey
        .keys()
        .view(&acme())
        .unwrap()
        .key()
        .unwrap()
        .expose_secret()
        .to_owned()
}

async fn login(orgkey: &OrgKey, password: &str) -> Result<String, orgkey::session::LoginFailure> {
    let key = key_of(orgkey);
    let ts = now_ms();
    let obfuscated = String::from_utf8(obfuscate(key.as_bytes(), ts).unwrap().to_vec()).unwrap();
    orgkey
        .sessions()
        .login(LoginRequest {
            api_key: Password::new(obfuscated),
            username: alice().as_str().to_owned(),
            password: Password::new(password.to_owned()),
            timestamp_ms: ts,
            source: None,
        })
        .await
        .map(|session| session.token.expose_secret().to_owned())
}

fn accepts_key(orgkey: &OrgKey, key: &str) -> bool {
    orgkey.table().is_trusted() && orgkey.table().verify("acme", key.as_bytes()).is_ok()
}

fn accepts_session(orgkey: &OrgKey, session: &str) -> bool {
    if !orgkey.sessions().can_vouch() {
        eprintln!("cannot vouch");
        return false;
    }
    match orgkey.sessions().validate(session.as_bytes()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("rejected: {e:?}");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_any_replica_is_in_force_on_every_replica_when_it_returns() {
    let Some(schema) = schema() else { return };
    let fleet = three(&schema, FleetMode::Strict).await;
    for round in 0..60 {
        let writer = &fleet[round % 3];
        let old = key_of(writer);
        let info = writer.keys().regenerate(&acme(), &ops()).await.unwrap();
        assert!(
            info.unconfirmed().is_none(),
            "round {round}: every replica confirmed"
        );
        let new = info.key().unwrap().expose_secret().to_owned();
        for (i, replica) in fleet.iter().enumerate() {
            assert!(
                !accepts_key(replica, &old),
                "round {round}: replica {i} took the old key"
            );
            assert!(
                accepts_key(replica, &new),
                "round {round}: replica {i} refused the new key"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_roam_and_die_everywhere_when_the_call_returns() {
    let Some(schema) = schema() else { return };
    let fleet = three(&schema, FleetMode::Strict).await;
    // S3: a login on any replica is usable on every replica.
    let session = login(&fleet[0], PASSWORD).await.unwrap();
    for replica in &fleet {
        assert!(accepts_session(replica, &session));
    }
    // A logout on B is in force on A and C when it returns.
    assert!(fleet[1]
        .sessions()
        .logout(session.as_bytes())
        .await
        .unwrap());
    for (i, replica) in fleet.iter().enumerate() {
        assert!(
            !accepts_session(replica, &session),
            "replica {i} kept a logged-out session"
        );
    }
    // Revocation: disabling the admin on C ends its sessions on A and B at once.
    let session = login(&fleet[1], PASSWORD).await.unwrap();
    assert!(accepts_session(&fleet[0], &session));
    fleet[2].admins().disable(&alice()).await.unwrap();
    for (i, replica) in fleet.iter().enumerate() {
        assert!(
            !accepts_session(replica, &session),
            "replica {i} kept a disabled admin's session"
        );
        assert!(
            login(replica, PASSWORD).await.is_err(),
            "replica {i} let a disabled admin in"
        );
    }
    // A password change on A is what every replica checks next.
    fleet[0].admins().enable(&alice()).await.unwrap();
    let new_password = "BatteryStaple34?";
    fleet[0]
        .admins()
        .change_password(&alice(), &Password::new(new_password))
        .await
        .unwrap();
    for (i, replica) in fleet.iter().enumerate() {
        assert!(
            login(replica, PASSWORD).await.is_err(),
            "replica {i} took the old password"
        );
    }
    let session = login(&fleet[2], new_password).await.unwrap();
    // K6 across replicas: a key change on B kills the session everywhere.
    fleet[1].keys().regenerate(&acme(), &ops()).await.unwrap();
    for (i, replica) in fleet.iter().enumerate() {
        assert!(
            !accepts_session(replica, &session),
            "replica {i} kept a session of an old key"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_renewing_fences_itself_and_writers_stop_waiting_for_it() {
    let Some(schema) = schema() else { return };
    let mut fleet = three(&schema, FleetMode::Strict).await;
    let old = key_of(&fleet[0]);
    // C stops following (as if frozen or cut off): it neither applies nor renews.
    let c = fleet.pop().unwrap();
    let c_table = c.table().clone();
    drop(c);
    let started = Instant::now();
    let info = fleet[0].keys().regenerate(&acme(), &ops()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        info.unconfirmed().is_none(),
        "a replica whose lease ran out is not waited for"
    );
    // The writer waited for C's lease to run out (600 ms), not for the wait bound (1.5 s).
    assert!(waited < Duration::from_millis(1400), "waited {waited:?}");
    // And C, which never applied the change, fails closed: it judges nothing by its old
    // state once its lease has run out.
    assert!(
        !c_table.is_trusted(),
        "a replica without a lease still vouches for its table"
    );
    assert!(
        c_table.verify("acme", old.as_bytes()).is_ok(),
        "C's table is stale, as expected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_renews_without_applying_is_named_when_the_wait_bound_runs_out() {
    let Some(schema) = schema() else { return };
    let fleet = three(&schema, FleetMode::Strict).await;
    // A replica that holds a lease but never confirms anything (a stuck apply).
    let raw = schema.raw().await;
    raw.execute(
        &format!(
            "INSERT INTO \"{}\".fleet_replicas (id, name, applied_seq, lease_until, started)
             VALUES ('stuck', 'stuck-replica', 0, clock_timestamp() + INTERVAL '1 hour',
                     clock_timestamp())",
            schema.name
        ),
        &[],
    )
    .await
    .unwrap();
    let old = key_of(&fleet[0]);
    let info = fleet[1].keys().regenerate(&acme(), &ops()).await.unwrap();
    let unconfirmed = info.unconfirmed().expect("the stuck replica is named");
    assert_eq!(unconfirmed.replicas, vec!["stuck-replica".to_owned()]);
    assert!(unconfirmed.waited >= Duration::from_millis(2500));
    assert!(unconfirmed.to_string().contains("committed"));
    // Committed and in force on every real replica all the same.
    for replica in &fleet {
        assert!(!accepts_key(replica, &old));
    }
    let stored = fleet[2].keys().view(&acme()).unwrap();
    assert_eq!(stored.generation(), info.generation());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_mode_does_not_wait_for_other_replicas_but_is_in_force_on_the_writer() {
    let Some(schema) = schema() else { return };
    let fleet = three(&schema, FleetMode::Loose).await;
    let raw = schema.raw().await;
    let leases: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".fleet_replicas", schema.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0, "loose replicas hold no lease");
    let old = key_of(&fleet[0]);
    let info = fleet[0].keys().regenerate(&acme(), &ops()).await.unwrap();
    assert!(!accepts_key(&fleet[0], &old));
    // The others follow within milliseconds.
    let new = info.key().unwrap().expose_secret().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fleet.iter().all(|r| accepts_key(r, &new)) {
        assert!(Instant::now() < deadline, "loose replicas never followed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_time_counts_the_last_use_on_any_replica_and_dead_rows_are_collected() {
    let Some(schema) = schema() else { return };
    let store = schema.connect().await;
    // An idle timeout of 1 s: use is shared every 100 ms, a session expires between 1 s and
    // 1.2 s after its last use anywhere.
    let sessions = SessionConfig {
        idle_timeout: Duration::from_secs(1),
        ..SessionConfig::for_base_url("http://x")
    };
    let fleet = three_with(&schema, FleetMode::Strict, sessions).await;
    let session = login(&fleet[0], PASSWORD).await.unwrap();
    // Used on A only, for three idle timeouts: B and C still take it, since the last use
    // anywhere is recent.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(accepts_session(&fleet[0], &session));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepts_session(&fleet[1], &session),
        "B expired a session A kept using"
    );
    assert!(
        accepts_session(&fleet[2], &session),
        "C expired a session A kept using"
    );
    // Unused anywhere for longer than the timeout and its grace: dead on every replica.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for (i, replica) in fleet.iter().enumerate() {
        assert!(
            !accepts_session(replica, &session),
            "replica {i} kept an idle session"
        );
    }
    // Rows of sessions that can never be valid again go: a key change kills every session
    // of the org (K6), and the collection deletes their rows.
    let session = login(&fleet[0], PASSWORD).await.unwrap();
    assert!(accepts_session(&fleet[2], &session));
    fleet[1].keys().regenerate(&acme(), &ops()).await.unwrap();
    let deleted = store
        .collect_sessions(now_ms(), 5 * 60 * 1000, 8 * 3600 * 1000)
        .await
        .unwrap();
    assert!(deleted >= 1, "the dead session's row was not collected");
    assert!(store.load_sessions().await.unwrap().is_empty());
}

/// Replicas starting together race to create the same org and admin: exactly one create of
/// each wins, the others are told it exists (nothing overwritten), and every replica then
/// knows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_org_and_one_admin_have_exactly_one_winner() {
    let Some(schema) = schema() else { return };
    let sessions = SessionConfig::for_base_url("http://x");
    let a = replica_with(&schema, "a", fleet(FleetMode::Strict), sessions.clone()).await;
    let b = replica_with(&schema, "b", fleet(FleetMode::Strict), sessions.clone()).await;
    let c = replica_with(&schema, "c", fleet(FleetMode::Strict), sessions).await;
    let org = OrgId::new("globex").unwrap();
    let (ra, rb, rc) = tokio::join!(
        a.keys().create_org(&org),
        b.keys().create_org(&org),
        c.keys().create_org(&org)
    );
    let created = [&ra, &rb, &rc].iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, 1, "{ra:?} {rb:?} {rc:?}");
    for r in [ra, rb, rc] {
        assert!(
            matches!(r, Ok(()) | Err(orgkey::KeyError::OrgExists)),
            "{r:?}"
        );
    }
    for replica in [&a, &b, &c] {
        assert!(replica.table().state("globex").is_some());
    }
    let bob = Username::new("bob@globex.example").unwrap();
    let passwords = ["FirstPassword1!", "SecondPassword2!", "ThirdPassword3!"];
    let given = passwords.map(Password::new);
    let (pa, pb, pc) = tokio::join!(
        a.admins().create(&bob, &org, &given[0], Scopes::ALL),
        b.admins().create(&bob, &org, &given[1], Scopes::ALL),
        c.admins().create(&bob, &org, &given[2], Scopes::ALL)
    );
    let results = [pa, pb, pc];
    let winners: Vec<usize> = (0..3).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        assert!(
            matches!(r, Ok(()) | Err(orgkey::AccountError::AdminExists)),
            "{r:?}"
        );
    }
    // The winner's password is the one in force, on every replica.
    let store = schema.connect().await;
    let stored = store.load_admins().await.unwrap();
    let bob_record = stored.iter().find(|r| r.username == bob).unwrap();
    let hash = argon2::PasswordHash::new(&bob_record.password_hash).unwrap();
    use argon2::PasswordVerifier;
    assert!(argon2::Argon2::default()
        .verify_password(passwords[winners[0]].as_bytes(), &hash)
        .is_ok());
}

/// W2 across replicas: a regenerate through a session on A (which carries the session over)
/// racing a logout of the same session on B has exactly one winner, decided by the store:
/// either the logout ended the session and no successor lives, or the carry-over won and the
/// logout ended nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_replica_racing_a_carry_over_on_another_has_one_winner() {
    use http_body_util::Full;
    use tower::ServiceExt;
    let Some(schema) = schema() else { return };
    let fleet = three(&schema, FleetMode::Strict).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let (mut logouts, mut carried) = (0, 0);
    for round in 0..30u32 {
        let session = login(a, PASSWORD).await.unwrap();
        let regenerate = http::Request::post("/api/v1/apiKeys/1/regenerate")
            .header("cookie", format!("JSESSIONID={session}"))
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let surface = a.admin_surface();
        // The logout starts later and later, so that rounds land before, inside and after
        // the carry-over (which follows the regenerate's commit and confirmations).
        let delay = Duration::from_micros(600 * u64::from(round));
        let (answer, logged_out) = tokio::join!(surface.oneshot(regenerate), async {
            tokio::time::sleep(delay).await;
            b.sessions().logout(session.as_bytes()).await
        });
        let answer = answer.unwrap();
        let logged_out = logged_out.unwrap();
        let successor = answer
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix("JSESSIONID=")?.split(';').next())
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        let successor_lives = successor
            .as_deref()
            .is_some_and(|id| accepts_session(a, id) || accepts_session(b, id));
        assert!(
            logged_out != successor_lives,
            "round {round}: logout ended it: {logged_out}, a successor lives: {successor_lives} \
             (status {})",
            answer.status()
        );
        logouts += usize::from(logged_out);
        carried += usize::from(successor_lives);
        // The next round starts from the key in force.
        let _ = successor;
    }
    eprintln!("logouts won {logouts}, carry-overs won {carried}");
    assert_eq!(logouts + carried, 30);
}
