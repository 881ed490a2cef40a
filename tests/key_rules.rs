//! The key rules K1-K9 and the write path P1, through the admin handle and the table.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime};

use orgkey::clock::Clock;
use orgkey::table::VerifyError;
use orgkey::{
    Actor, ApiKey, AuditEvent, KeyAction, KeyAdmin, KeyError, KeyFormat, KeyFormatError, OrgId,
    OrgTable,
};

struct FixedClock(SystemTime);
impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

struct Fixture {
    admin: KeyAdmin,
    org: OrgId,
    alice: Actor,
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

fn subscribed_org() -> Fixture {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let admin = KeyAdmin::new(OrgTable::default())
        .with_clock(FixedClock(at(1_764_150_999)))
        .with_base_url("https://gw.example/api/v1")
        .with_audit_sink(move |e: &AuditEvent| sink.lock().unwrap().push(e.clone()));
    let org = OrgId::new("acme").unwrap();
    let alice = Actor::new("alice@acme.example").unwrap();
    rt().block_on(admin.create_org(&org)).unwrap();
    rt().block_on(admin.subscribe(&org, &alice)).unwrap();
    Fixture {
        admin,
        org,
        alice,
        events,
    }
}

fn current_key(f: &Fixture) -> String {
    f.admin
        .view(&f.org)
        .unwrap()
        .key()
        .unwrap()
        .expose_secret()
        .to_owned()
}

fn accepts(f: &Fixture, key: &str) -> bool {
    f.admin.table().verify("acme", key.as_bytes()).is_ok()
}

#[test]
fn k1_malformed_keys_are_rejected_by_admin_calls_and_by_verify() {
    let f = subscribed_org();
    assert!(matches!(
        ApiKey::parse("short"),
        Err(KeyFormatError::WrongLength { .. })
    ));
    let long =
        ApiKey::parse_with("AbCdEf123456AbCdEf1234", KeyFormat::with_len(22).unwrap()).unwrap();
    let err = rt()
        .block_on(f.admin.edit(&f.org, long, &f.alice))
        .unwrap_err();
    assert!(matches!(err, KeyError::InvalidKey(_)), "{err:?}");
    assert_eq!(
        f.admin.table().verify("acme", b"AbCdEf12345-").unwrap_err(),
        VerifyError::MalformedKey
    );
    assert_eq!(
        f.admin
            .table()
            .verify("acme", b"AbCdEf1234567")
            .unwrap_err(),
        VerifyError::MalformedKey
    );
}

#[test]
fn k2_add_fails_while_a_key_exists() {
    let f = subscribed_org();
    let before = current_key(&f);
    let err = rt().block_on(f.admin.add(&f.org, &f.alice)).unwrap_err();
    assert!(matches!(err, KeyError::KeyExists));
    assert!(err.to_string().contains("delete the existing key first"));
    assert_eq!(current_key(&f), before, "a refused add changes nothing");
    assert!(accepts(&f, &before));
}

#[test]
fn k3_regenerate_draws_a_new_valid_key() {
    let f = subscribed_org();
    let before = current_key(&f);
    let info = rt().block_on(f.admin.regenerate(&f.org, &f.alice)).unwrap();
    let after = info.key().unwrap().expose_secret().to_owned();
    assert_ne!(before, after);
    assert!(ApiKey::parse(&after).is_ok());
}

#[test]
fn k4_edit_sets_the_chosen_key_and_the_same_key_may_serve_two_orgs() {
    let f = subscribed_org();
    let beta = OrgId::new("beta").unwrap();
    let rt = rt();
    rt.block_on(f.admin.create_org(&beta)).unwrap();
    rt.block_on(f.admin.subscribe(&beta, &f.alice)).unwrap();
    let shared = ApiKey::parse("SharedKey123").unwrap();
    rt.block_on(f.admin.edit(&f.org, shared.clone(), &f.alice))
        .unwrap();
    rt.block_on(f.admin.edit(&beta, shared, &f.alice)).unwrap();
    let table = f.admin.table();
    let a = table.verify("acme", b"SharedKey123").unwrap();
    let b = table.verify("beta", b"SharedKey123").unwrap();
    assert_eq!(a.org.as_str(), "acme");
    assert_eq!(b.org.as_str(), "beta");
    // The key alone never identifies an org: with an unknown org it is rejected.
    assert_eq!(
        table.verify("gamma", b"SharedKey123").unwrap_err(),
        VerifyError::UnknownOrg
    );
}

#[test]
fn k4_edit_without_a_key_is_refused() {
    let f = subscribed_org();
    let rt = rt();
    rt.block_on(f.admin.delete(&f.org, &f.alice)).unwrap();
    let err = rt
        .block_on(
            f.admin
                .edit(&f.org, ApiKey::parse("SharedKey123").unwrap(), &f.alice),
        )
        .unwrap_err();
    assert!(matches!(err, KeyError::NoKey));
    assert!(f.admin.view(&f.org).unwrap().key().is_none());
}

#[test]
fn k5_delete_leaves_the_org_without_a_key() {
    let f = subscribed_org();
    let old = current_key(&f);
    let rt = rt();
    let info = rt.block_on(f.admin.delete(&f.org, &f.alice)).unwrap();
    assert!(info.key().is_none());
    assert!(!info.enabled());
    assert_eq!(
        f.admin.table().verify("acme", old.as_bytes()).unwrap_err(),
        VerifyError::NoKey
    );
    assert!(matches!(
        rt.block_on(f.admin.delete(&f.org, &f.alice)),
        Err(KeyError::NoKey)
    ));
    assert!(matches!(
        rt.block_on(f.admin.regenerate(&f.org, &f.alice)),
        Err(KeyError::NoKey)
    ));
    // After delete, add works again (K2).
    let added = rt.block_on(f.admin.add(&f.org, &f.alice)).unwrap();
    assert!(accepts(&f, added.key().unwrap().expose_secret()));
}

#[test]
fn k6_every_change_kills_the_old_key_before_it_returns() {
    let f = subscribed_org();
    let rt = rt();
    let mut generation = f.admin.view(&f.org).unwrap().generation();

    let old = current_key(&f);
    let info = rt.block_on(f.admin.regenerate(&f.org, &f.alice)).unwrap();
    assert!(!accepts(&f, &old), "regenerate");
    assert!(accepts(&f, info.key().unwrap().expose_secret()));
    assert!(info.generation() > generation);
    generation = info.generation();

    let old = current_key(&f);
    let info = rt
        .block_on(
            f.admin
                .edit(&f.org, ApiKey::parse("EditedKey123").unwrap(), &f.alice),
        )
        .unwrap();
    assert!(!accepts(&f, &old), "edit");
    assert!(accepts(&f, "EditedKey123"));
    assert!(info.generation() > generation);
    generation = info.generation();

    let info = rt.block_on(f.admin.delete(&f.org, &f.alice)).unwrap();
    assert!(!accepts(&f, "EditedKey123"), "delete");
    assert!(info.generation() > generation);
    generation = info.generation();

    let info = rt.block_on(f.admin.add(&f.org, &f.alice)).unwrap();
    assert!(accepts(&f, info.key().unwrap().expose_secret()));
    assert!(info.generation() > generation);
}

#[test]
fn k6_edit_to_the_same_value_still_bumps_the_generation() {
    let f = subscribed_org();
    let rt = rt();
    let key = ApiKey::parse(&current_key(&f)).unwrap();
    let before = f.admin.view(&f.org).unwrap().generation();
    let after = rt
        .block_on(f.admin.edit(&f.org, key, &f.alice))
        .unwrap()
        .generation();
    assert!(after > before, "sessions of the old generation must die");
}

#[test]
fn k7_changes_record_who_and_when_and_audit_without_key_material() {
    let f = subscribed_org();
    let bob = Actor::new("bob@acme.example").unwrap();
    let rt = rt();
    let info = rt.block_on(f.admin.regenerate(&f.org, &bob)).unwrap();
    assert_eq!(
        info.last_modified_by().unwrap().as_str(),
        "bob@acme.example"
    );
    assert_eq!(info.last_modified_on(), Some(at(1_764_150_999)));
    let key = info.key().unwrap().expose_secret().to_owned();

    let events = f.events.lock().unwrap();
    let actions: Vec<KeyAction> = events.iter().map(|e| e.action).collect();
    assert_eq!(actions, [KeyAction::Subscribe, KeyAction::Regenerate]);
    let last = events.last().unwrap();
    assert_eq!(last.org.as_str(), "acme");
    assert_eq!(last.actor.as_str(), "bob@acme.example");
    assert_eq!(last.generation, info.generation());
    assert_eq!(last.at, at(1_764_150_999));
    assert!(!format!("{last:?}").contains(&key));
}

#[test]
fn k7_refused_changes_leave_no_audit_record() {
    let f = subscribed_org();
    let rt = rt();
    assert!(rt.block_on(f.admin.add(&f.org, &f.alice)).is_err());
    assert_eq!(f.events.lock().unwrap().len(), 1, "only the subscribe");
}

#[test]
fn k8_without_subscription_there_is_no_key_and_no_key_management() {
    let admin = KeyAdmin::new(OrgTable::default());
    let org = OrgId::new("nosub").unwrap();
    let alice = Actor::new("alice@nosub.example").unwrap();
    let rt = rt();
    rt.block_on(admin.create_org(&org)).unwrap();
    assert!(matches!(admin.view(&org), Err(KeyError::NoSubscription)));
    assert!(matches!(
        rt.block_on(admin.add(&org, &alice)),
        Err(KeyError::NoSubscription)
    ));
    assert!(matches!(
        rt.block_on(admin.regenerate(&org, &alice)),
        Err(KeyError::NoSubscription)
    ));
    assert_eq!(
        admin.table().verify("nosub", b"AbCdEf123456").unwrap_err(),
        VerifyError::NoSubscription
    );

    // Applying a subscription provisions a random, enabled key.
    let info = rt.block_on(admin.subscribe(&org, &alice)).unwrap();
    assert!(info.enabled());
    let key = info.key().unwrap().expose_secret().to_owned();
    assert!(admin.table().verify("nosub", key.as_bytes()).is_ok());
    assert!(matches!(
        rt.block_on(admin.subscribe(&org, &alice)),
        Err(KeyError::AlreadySubscribed)
    ));

    // Removing it deletes the key at once (K5, K6).
    rt.block_on(admin.unsubscribe(&org, &alice)).unwrap();
    assert_eq!(
        admin.table().verify("nosub", key.as_bytes()).unwrap_err(),
        VerifyError::NoSubscription
    );
    assert!(matches!(admin.view(&org), Err(KeyError::NoSubscription)));
    // Resubscribing provisions a fresh key, never the old one.
    let again = rt.block_on(admin.subscribe(&org, &alice)).unwrap();
    assert!(admin.table().verify("nosub", key.as_bytes()).is_err());
    assert!(again.key().is_some());
}

#[test]
fn k9_view_shows_key_enabled_who_when_and_base_url() {
    let f = subscribed_org();
    let info = f.admin.view(&f.org).unwrap();
    assert!(info.key().is_some());
    assert!(info.enabled());
    assert_eq!(
        info.last_modified_by().unwrap().as_str(),
        "alice@acme.example"
    );
    assert_eq!(info.last_modified_on(), Some(at(1_764_150_999)));
    assert_eq!(info.base_url(), Some("https://gw.example/api/v1"));
}

#[test]
fn unknown_orgs_are_refused_by_every_admin_call() {
    let admin = KeyAdmin::new(OrgTable::default());
    let ghost = OrgId::new("ghost").unwrap();
    let alice = Actor::new("alice@x.example").unwrap();
    let rt = rt();
    assert!(matches!(admin.view(&ghost), Err(KeyError::UnknownOrg)));
    assert!(matches!(
        rt.block_on(admin.subscribe(&ghost, &alice)),
        Err(KeyError::UnknownOrg)
    ));
    assert!(matches!(
        rt.block_on(admin.regenerate(&ghost, &alice)),
        Err(KeyError::UnknownOrg)
    ));
    rt.block_on(admin.create_org(&ghost)).unwrap();
    assert!(matches!(
        rt.block_on(admin.create_org(&ghost)),
        Err(KeyError::OrgExists)
    ));
}

/// A clock that holds every caller at a barrier: `KeyAdmin` reads the clock after loading the
/// snapshot and before its compare-and-swap, so two changes that both reach the barrier were
/// built from the same snapshot.
struct RendezvousClock(Barrier);
impl Clock for RendezvousClock {
    fn now(&self) -> SystemTime {
        self.0.wait();
        at(1_800_000_000)
    }
}

/// P1: two changes built from the same snapshot: exactly one lands, the other gets `Conflict`
/// and changes nothing; the final key is the winner's; one audit record.
#[test]
fn two_regenerates_from_the_same_snapshot_have_one_winner_and_one_conflict() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let table = OrgTable::default();
    let setup = KeyAdmin::new(table.clone());
    let org = OrgId::new("acme").unwrap();
    let alice = Actor::new("alice@acme.example").unwrap();
    rt().block_on(setup.create_org(&org)).unwrap();
    rt().block_on(setup.subscribe(&org, &alice)).unwrap();
    let admin = KeyAdmin::new(table.clone())
        .with_clock(RendezvousClock(Barrier::new(2)))
        .with_audit_sink(move |e: &AuditEvent| sink.lock().unwrap().push(e.clone()));
    let handles: Vec<_> = ["a@acme.example", "b@acme.example"]
        .into_iter()
        .map(|name| {
            let (admin, org) = (admin.clone(), org.clone());
            std::thread::spawn(move || {
                rt().block_on(admin.regenerate(&org, &Actor::new(name).unwrap()))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Err(KeyError::Conflict)))
            .count(),
        1
    );
    let winner = winners[0];
    let state = table.state("acme").unwrap();
    assert_eq!(state.generation(), winner.generation());
    assert!(table
        .verify("acme", winner.key().unwrap().expose_secret().as_bytes())
        .is_ok());
    assert_eq!(
        state.last_modified_by().unwrap(),
        winner.last_modified_by().unwrap()
    );
    assert_eq!(
        events.lock().unwrap().len(),
        1,
        "no audit record for the loser"
    );
}

/// Concurrency stress: racing changes to one org are never merged or lost. Every call either
/// lands on top of the state before it (distinct generations, the last winner's key is the
/// one in force) or gets `Conflict` and changes nothing.
#[test]
fn racing_regenerates_of_one_org_land_on_top_or_conflict_and_lose_nothing() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 200;
    let f = subscribed_org();
    let admin = f.admin.clone();
    let mut total_conflicts = 0;
    let mut rounds_with_contention = 0;
    for _ in 0..ROUNDS {
        let before = f.events.lock().unwrap().len();
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let admin = admin.clone();
                let barrier = Arc::clone(&barrier);
                let org = f.org.clone();
                std::thread::spawn(move || {
                    let actor = Actor::new(&format!("admin{i}@acme.example")).unwrap();
                    let rt = rt();
                    barrier.wait();
                    rt.block_on(admin.regenerate(&org, &actor))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(KeyError::Conflict)))
            .count();
        assert_eq!(winners.len() + conflicts, THREADS, "only Ok or Conflict");
        assert!(!winners.is_empty(), "at least one change lands");
        // Every winner's change was applied on top of the previous one: generations are
        // distinct, and the table holds the key of the highest generation.
        let mut gens: Vec<_> = winners.iter().map(|w| w.generation()).collect();
        gens.sort();
        gens.dedup();
        assert_eq!(
            gens.len(),
            winners.len(),
            "no two winners share a generation"
        );
        let last = winners
            .iter()
            .max_by_key(|w| w.generation())
            .unwrap()
            .key()
            .unwrap()
            .expose_secret()
            .to_owned();
        assert!(accepts(&f, &last));
        for w in &winners {
            let k = w.key().unwrap().expose_secret();
            if k != last {
                assert!(!accepts(&f, k), "a superseded winner's key is dead");
            }
        }
        // One audit record per winner, none for losers.
        assert_eq!(f.events.lock().unwrap().len() - before, winners.len());
        total_conflicts += conflicts;
        if conflicts > 0 {
            rounds_with_contention += 1;
        }
    }
    println!("{ROUNDS} rounds of {THREADS} racing regenerates: {total_conflicts} conflicts in {rounds_with_contention} rounds");
}
