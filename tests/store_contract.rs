//! One contract suite for every store (P1-P3): each test runs against the in-memory store and
//! the SQLite store (a fresh file per test).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use orgkey::store::{MemoryStore, OrgRecord, SqliteStore, Store, StoreError};
use orgkey::{Actor, ApiKey, AuditEvent, Generation, KeyAction, KeyFormat, OrgId};

/// A fresh SQLite file path, removed (with its WAL files) when dropped.
struct TempDb(std::path::PathBuf);

impl TempDb {
    fn new(name: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let path = std::env::temp_dir().join(format!(
            "orgkey-contract-{name}-{}.db",
            u64::from_le_bytes(bytes)
        ));
        Self(path)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn record(id: &str, key: Option<&str>, generation: u64, by: &str, on_ms: u64) -> OrgRecord {
    OrgRecord {
        org: org(id),
        subscribed: true,
        key: key.map(|k| ApiKey::parse(k).unwrap()),
        generation: Generation::new(generation),
        last_modified_by: Some(Actor::new(by).unwrap()),
        last_modified_on: Some(at(on_ms)),
    }
}

fn event(id: &str, action: KeyAction, generation: u64, by: &str, at_ms: u64) -> AuditEvent {
    AuditEvent {
        org: org(id),
        actor: Actor::new(by).unwrap(),
        action,
        at: at(at_ms),
        generation: Generation::new(generation),
    }
}

async fn find(store: &dyn Store, id: &str) -> OrgRecord {
    store
        .load_orgs()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.org.as_str() == id)
        .unwrap()
}

async fn create_then_load_gives_an_empty_org_and_create_twice_is_refused(store: Arc<dyn Store>) {
    store.create_org(&org("acme")).await.unwrap();
    let r = find(&*store, "acme").await;
    assert!(!r.subscribed && r.key.is_none() && r.last_modified_by.is_none());
    assert_eq!(r.generation, Generation::new(0));
    assert!(matches!(
        store.create_org(&org("acme")).await,
        Err(StoreError::Exists)
    ));
    assert_eq!(store.load_orgs().await.unwrap().len(), 1);
}

async fn commit_is_a_compare_and_set_on_the_generation(store: Arc<dyn Store>) {
    store.create_org(&org("acme")).await.unwrap();
    let first = record(
        "acme",
        Some("AbCdEf123456"),
        1,
        "alice@acme.example",
        1_000_123,
    );
    store
        .commit(
            Generation::new(0),
            &first,
            &event(
                "acme",
                KeyAction::Subscribe,
                1,
                "alice@acme.example",
                1_000_123,
            ),
        )
        .await
        .unwrap();
    let r = find(&*store, "acme").await;
    assert_eq!(r.key.unwrap().expose_secret(), "AbCdEf123456");
    assert_eq!(r.generation, Generation::new(1));
    assert_eq!(r.last_modified_by.unwrap().as_str(), "alice@acme.example");
    assert_eq!(r.last_modified_on, Some(at(1_000_123)));

    // A change built from generation 0 again: refused, nothing written, no audit record.
    let stale = record(
        "acme",
        Some("ZzZzZz999999"),
        1,
        "bob@acme.example",
        2_000_000,
    );
    assert!(matches!(
        store
            .commit(
                Generation::new(0),
                &stale,
                &event("acme", KeyAction::Edit, 1, "bob@acme.example", 2_000_000)
            )
            .await,
        Err(StoreError::Conflict)
    ));
    let r = find(&*store, "acme").await;
    assert_eq!(r.key.unwrap().expose_secret(), "AbCdEf123456");
    assert_eq!(
        store
            .audit_page(&org("acme"), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Deleting the key is a commit like any other.
    let deleted = OrgRecord {
        key: None,
        ..record("acme", None, 2, "bob@acme.example", 3_000_000)
    };
    store
        .commit(
            Generation::new(1),
            &deleted,
            &event("acme", KeyAction::Delete, 2, "bob@acme.example", 3_000_000),
        )
        .await
        .unwrap();
    assert!(find(&*store, "acme").await.key.is_none());
}

async fn commit_to_an_unknown_org_is_not_found(store: Arc<dyn Store>) {
    let r = record("ghost", Some("AbCdEf123456"), 1, "a@b.c", 1);
    assert!(matches!(
        store
            .commit(
                Generation::new(0),
                &r,
                &event("ghost", KeyAction::Add, 1, "a@b.c", 1)
            )
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(store
        .audit_page(&org("ghost"), None, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn the_audit_log_pages_newest_first_per_org_without_key_material(store: Arc<dyn Store>) {
    for id in ["acme", "beta"] {
        store.create_org(&org(id)).await.unwrap();
    }
    for g in 1..=5u64 {
        for id in ["acme", "beta"] {
            let key = format!("Key{g:09}");
            store
                .commit(
                    Generation::new(g - 1),
                    &record(id, Some(&key), g, "ops@example.com", g * 1000),
                    &event(id, KeyAction::Regenerate, g, "ops@example.com", g * 1000),
                )
                .await
                .unwrap();
        }
    }
    let page = store.audit_page(&org("acme"), None, 2).await.unwrap();
    let gens: Vec<u64> = page.iter().map(|r| r.event.generation.get()).collect();
    assert_eq!(gens, [5, 4]);
    assert!(page.iter().all(|r| r.event.org.as_str() == "acme"));
    assert!(page[0].seq > page[1].seq);
    let next = store
        .audit_page(&org("acme"), Some(page[1].seq), 10)
        .await
        .unwrap();
    let gens: Vec<u64> = next.iter().map(|r| r.event.generation.get()).collect();
    assert_eq!(gens, [3, 2, 1]);
    assert_eq!(next[0].event.actor.as_str(), "ops@example.com");
    assert_eq!(next[0].event.action, KeyAction::Regenerate);
    assert_eq!(next[0].event.at, at(3000));
    let rendered = format!("{next:?}");
    assert!(
        !rendered.contains("Key00000000"),
        "no key material: {rendered}"
    );
}

async fn racing_commits_from_one_generation_have_exactly_one_winner(store: Arc<dyn Store>) {
    store.create_org(&org("acme")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = format!("Racer{i:07}");
                let by = format!("admin{i}@acme.example");
                store
                    .commit(
                        Generation::new(0),
                        &record("acme", Some(&key), 1, &by, 1000),
                        &event("acme", KeyAction::Regenerate, 1, &by, 1000),
                    )
                    .await
                    .map(|()| key)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(key) => winners.push(key),
            Err(StoreError::Conflict) => conflicts += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(conflicts, 7);
    let stored = find(&*store, "acme").await.key.unwrap();
    assert_eq!(
        stored.expose_secret(),
        winners[0],
        "the final key is the winner's"
    );
    assert_eq!(
        store
            .audit_page(&org("acme"), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(Arc::new(MemoryStore::new())).await;
                }
            )*
        }
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = TempDb::new(stringify!($name));
                    let store = SqliteStore::open(&db.0, KeyFormat::default()).unwrap();
                    super::$name(Arc::new(store)).await;
                }
            )*
        }
    };
}

contract!(
    create_then_load_gives_an_empty_org_and_create_twice_is_refused,
    commit_is_a_compare_and_set_on_the_generation,
    commit_to_an_unknown_org_is_not_found,
    the_audit_log_pages_newest_first_per_org_without_key_material,
    racing_commits_from_one_generation_have_exactly_one_winner,
);

#[tokio::test]
async fn sqlite_state_survives_reopening_and_uses_wal() {
    let db = TempDb::new("reopen");
    {
        let store = SqliteStore::open(&db.0, KeyFormat::default()).unwrap();
        store.create_org(&org("acme")).await.unwrap();
        store
            .commit(
                Generation::new(0),
                &record("acme", Some("AbCdEf123456"), 1, "alice@acme.example", 5),
                &event("acme", KeyAction::Subscribe, 1, "alice@acme.example", 5),
            )
            .await
            .unwrap();
        let wal = format!("{}-wal", db.0.display());
        assert!(std::path::Path::new(&wal).exists(), "WAL journal in use");
        assert!(store.integrity_check().await.unwrap());
    }
    let store = SqliteStore::open(&db.0, KeyFormat::default()).unwrap();
    let r = find(&store, "acme").await;
    assert_eq!(r.key.unwrap().expose_secret(), "AbCdEf123456");
    assert_eq!(r.generation, Generation::new(1));
    assert_eq!(
        store
            .audit_page(&org("acme"), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn sqlite_refuses_a_key_that_does_not_match_the_deployment_format() {
    let db = TempDb::new("format");
    {
        let store = SqliteStore::open(&db.0, KeyFormat::default()).unwrap();
        store.create_org(&org("acme")).await.unwrap();
        store
            .commit(
                Generation::new(0),
                &record("acme", Some("AbCdEf123456"), 1, "a@b.c", 5),
                &event("acme", KeyAction::Subscribe, 1, "a@b.c", 5),
            )
            .await
            .unwrap();
    }
    // Reopened by a deployment configured for 22-character keys: a clear error, not a
    // silently unusable key.
    let store = SqliteStore::open(&db.0, KeyFormat::with_len(22).unwrap()).unwrap();
    let err = store.load_orgs().await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)));
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("key format"), "{source}");
    assert!(!source.contains("AbCdEf123456"));
}
