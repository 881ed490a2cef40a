//! P4 on the embedded store: what a copy of the SQLite state reveals (no key), what a row moved
//! to another org or generation does (fails to open, naming the org), what a wrong master key
//! does (refused, nothing changed), and the migration of a state written by the release before
//! sealing (`tests/fixtures/state-before-sealing.db`).
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::{master_for, TempDb};
use orgkey::store::{OrgRecord, SqliteStore, Store, StoreError};
use orgkey::{
    Actor, ApiKey, AuditEvent, Generation, KeyAction, KeyFormat, MasterKeys, OrgId, SealError,
};

fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

fn record(id: &str, key: Option<&str>, generation: u64) -> OrgRecord {
    OrgRecord {
        org: org(id),
        subscribed: true,
        key: key.map(|k| ApiKey::parse(k).unwrap()),
        generation: Generation::new(generation),
        last_modified_by: Some(Actor::new("op@acme.example").unwrap()),
        last_modified_on: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1)),
    }
}

fn event(id: &str, action: KeyAction, generation: u64) -> AuditEvent {
    AuditEvent {
        org: org(id),
        actor: Actor::new("op@acme.example").unwrap(),
        action,
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        generation: Generation::new(generation),
    }
}

/// Creates `id` in `store` with `key` at generation 1.
async fn keyed(store: &SqliteStore, id: &str, key: &str) {
    store.create_org(&org(id)).await.unwrap();
    store
        .commit(
            Generation::new(0),
            &record(id, Some(key), 1),
            &event(id, KeyAction::Subscribe, 1),
        )
        .await
        .unwrap();
}

/// Every byte of the state's files: the database and its write-ahead log (not the shared
/// memory index beside them, page numbers that any reader rebuilds, nor the master key file).
fn state_bytes(db: &TempDb) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(file) = std::fs::read(format!("{}{suffix}", db.path())) {
            bytes.extend_from_slice(&file);
        }
    }
    bytes
}

/// The keys of `keys` that occur anywhere in `bytes`.
fn found<'a>(bytes: &[u8], keys: &'a [String]) -> Vec<&'a str> {
    let wanted: HashSet<&[u8]> = keys.iter().map(String::as_bytes).collect();
    let len = keys.first().map_or(12, String::len);
    let seen: HashSet<&[u8]> = bytes.windows(len).filter(|w| wanted.contains(w)).collect();
    keys.iter()
        .filter(|k| seen.contains(k.as_bytes()))
        .map(String::as_str)
        .collect()
}

/// A raw connection to the state, for what the store does not offer.
fn raw(db: &TempDb) -> rusqlite::Connection {
    rusqlite::Connection::open(db.path()).unwrap()
}

#[tokio::test]
async fn a_copy_of_the_state_holds_no_key_only_sealed_values() {
    let db = TempDb::new("sealed-raw");
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    let mut keys = Vec::new();
    for i in 0..20u32 {
        let id = format!("org{i}");
        store.create_org(&org(&id)).await.unwrap();
        // Three generations each: every old key was also written once.
        for generation in 1..=3u64 {
            let key = format!("Key{i:03}Gen{generation}xx");
            store
                .commit(
                    Generation::new(generation - 1),
                    &record(&id, Some(&key), generation),
                    &event(&id, KeyAction::Regenerate, generation),
                )
                .await
                .unwrap();
            keys.push(key);
        }
    }
    assert_eq!(found(&state_bytes(&db), &keys), Vec::<&str>::new());
    // The rows hold sealed values: version 1, then the id of the master key.
    let master = master_for(&db.0);
    let sealed: Vec<Vec<u8>> = raw(&db)
        .prepare("SELECT sealed_key FROM orgs")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sealed.len(), 20);
    for value in &sealed {
        assert_eq!(orgkey::seal::sealed_by(value), Some(master.current()));
    }
    // ... and they open, to the last key of each org.
    for record in store.load_orgs().await.unwrap() {
        let i: u32 = record.org.as_str()[3..].parse().unwrap();
        assert_eq!(
            record.key.as_ref().unwrap().expose_secret(),
            format!("Key{i:03}Gen3xx")
        );
    }
    drop(store);
    // The checkpointed file alone, too (a copy taken after the gateway stopped).
    assert_eq!(found(&state_bytes(&db), &keys), Vec::<&str>::new());
}

#[tokio::test]
async fn a_sealed_value_moved_to_another_org_or_generation_does_not_open() {
    let db = TempDb::new("sealed-moved");
    {
        let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
        for (id, key) in [("acme", "AcmeKey00001"), ("globex", "GlobexKey001")] {
            store.create_org(&org(id)).await.unwrap();
            store
                .commit(
                    Generation::new(0),
                    &record(id, Some(key), 1),
                    &event(id, KeyAction::Subscribe, 1),
                )
                .await
                .unwrap();
        }
    }
    let sealed_of = |id: &str| -> Vec<u8> {
        raw(&db)
            .query_row("SELECT sealed_key FROM orgs WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .unwrap()
    };
    // acme's sealed key written into globex's row: globex does not open, and the error says
    // which org, and why, without any key.
    let acme_gen1 = sealed_of("acme");
    raw(&db)
        .execute(
            "UPDATE orgs SET sealed_key = ?1 WHERE id = 'globex'",
            [&acme_gen1],
        )
        .unwrap();
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    let err = store.load_orgs().await.unwrap_err();
    match &err {
        StoreError::Sealed { org, error, file } => {
            assert_eq!(org.as_str(), "globex");
            assert_eq!(*error, SealError::Forged);
            assert!(file.contains(".master-key"), "{file}");
        }
        other => panic!("expected Sealed, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("org globex"), "{message}");
    assert!(message.contains("copied from another org"), "{message}");
    assert!(!message.contains("AcmeKey00001") && !message.contains("GlobexKey001"));
    drop(store);

    // Put globex right again; then replay acme's generation-1 value after a regenerate to
    // generation 2 (an old key written back): it does not open either.
    let master = master_for(&db.0);
    let globex = master
        .seal(
            &org("globex"),
            Generation::new(1),
            &ApiKey::parse("GlobexKey001").unwrap(),
        )
        .unwrap();
    raw(&db)
        .execute(
            "UPDATE orgs SET sealed_key = ?1 WHERE id = 'globex'",
            [&globex],
        )
        .unwrap();
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    store
        .commit(
            Generation::new(1),
            &record("acme", Some("AcmeKey00002"), 2),
            &event("acme", KeyAction::Regenerate, 2),
        )
        .await
        .unwrap();
    assert_eq!(store.load_orgs().await.unwrap().len(), 2);
    drop(store);
    raw(&db)
        .execute(
            "UPDATE orgs SET sealed_key = ?1 WHERE id = 'acme'",
            [&acme_gen1],
        )
        .unwrap();
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    match store.load_orgs().await.unwrap_err() {
        StoreError::Sealed { org, error, .. } => {
            assert_eq!(org.as_str(), "acme");
            assert_eq!(error, SealError::Forged);
        }
        other => panic!("expected Sealed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_at_open_and_changes_nothing() {
    let db = TempDb::new("sealed-wrong");
    {
        let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
        keyed(&store, "acme", "AcmeKey00001").await;
    }
    let before = state_bytes(&db);
    let other = MasterKeys::generate().unwrap();
    let err = SqliteStore::open(&db.0, KeyFormat::default(), other).unwrap_err();
    match &err {
        StoreError::Sealed { org, error, .. } => {
            assert_eq!(org.as_str(), "acme");
            assert_eq!(
                *error,
                SealError::UnknownMasterKey(master_for(&db.0).current())
            );
        }
        other => panic!("expected Sealed, got {other:?}"),
    }
    assert!(err.to_string().contains("does not hold"), "{err}");
    assert!(state_bytes(&db) == before, "a refused open wrote something");
    // The right one still opens it.
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    let loaded = store.load_orgs().await.unwrap();
    assert_eq!(
        loaded[0].key.as_ref().unwrap().expose_secret(),
        "AcmeKey00001"
    );
}

/// The keys the release before sealing wrote into the fixture (test keys, nothing else).
const FIXTURE_KEYS: [(&str, Option<&str>, u64); 5] = [
    ("acme", Some("FixTure00001"), 2),
    ("globex", Some("mvE5w6jLh6sO"), 1),
    ("hooli", None, 2),
    ("initech", Some("SqAwI8fGlDQy"), 1),
    ("umbrella", Some("X24RmjlIUbX5"), 1),
];
/// hooli's key before it unsubscribed.
const FIXTURE_DELETED_KEY: &str = "TJTtAiNPMgX2";

fn fixture_copy(name: &str) -> TempDb {
    let db = TempDb::new(name);
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state-before-sealing.db"
        ),
        &db.0,
    )
    .unwrap();
    db
}

#[tokio::test]
async fn a_state_written_before_sealing_is_sealed_on_its_first_open() {
    let db = fixture_copy("sealed-migrate");
    let clear: Vec<String> = FIXTURE_KEYS
        .iter()
        .filter_map(|(_, k, _)| k.map(str::to_owned))
        .chain([FIXTURE_DELETED_KEY.to_owned()])
        .collect();
    // The fixture is what it says: the old release's schema, keys in clear.
    let version: i64 = raw(&db)
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 4);
    assert_eq!(found(&state_bytes(&db), &clear).len(), 4);
    assert!(!SqliteStore::holds_sealed_keys(&db.0).unwrap());

    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    let loaded = store.load_orgs().await.unwrap();
    let got: Vec<(String, Option<String>, u64)> = loaded
        .iter()
        .map(|r| {
            (
                r.org.as_str().to_owned(),
                r.key.as_ref().map(|k| k.expose_secret().to_owned()),
                r.generation.get(),
            )
        })
        .collect();
    let want: Vec<(String, Option<String>, u64)> = FIXTURE_KEYS
        .iter()
        .map(|(o, k, g)| ((*o).to_owned(), k.map(str::to_owned), *g))
        .collect();
    assert_eq!(got, want);
    // Admins, sessions and the audit log came through untouched.
    assert_eq!(store.load_admins().await.unwrap().len(), 1);
    assert_eq!(store.load_sessions().await.unwrap().len(), 1);
    assert!(!store
        .audit_page(&org("acme"), None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(SqliteStore::holds_sealed_keys(&db.0).unwrap());
    // No copy of the state holds a key any more: not the table, not free pages, not the log.
    assert_eq!(found(&state_bytes(&db), &clear), Vec::<&str>::new());
    drop(store);
    assert_eq!(found(&state_bytes(&db), &clear), Vec::<&str>::new());
    let plain: i64 = raw(&db)
        .query_row(
            "SELECT count(*) FROM orgs WHERE api_key IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(plain, 0);
    // A second open finds nothing to do and the same keys.
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    assert_eq!(store.load_orgs().await.unwrap().len(), 5);
}

#[tokio::test]
async fn a_clear_key_that_is_not_a_key_stops_the_migration_and_changes_nothing() {
    let db = fixture_copy("sealed-migrate-bad");
    raw(&db)
        .execute(
            "UPDATE orgs SET api_key = 'not a key!' WHERE id = 'umbrella'",
            [],
        )
        .unwrap();
    let err = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap_err();
    assert!(err.to_string().contains("store failed"), "{err}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("key format"), "{source}");
    assert!(!source.contains("not a key"), "{source}");
    // The migration's schema step ran (it adds an empty column); the keys did not move.
    let clear: i64 = raw(&db)
        .query_row(
            "SELECT count(*) FROM orgs WHERE api_key IS NOT NULL AND sealed_key IS NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(clear, 4, "all or nothing");
}

#[tokio::test]
async fn a_backup_is_sealed_like_the_state_and_useless_without_the_master_key() {
    let db = TempDb::new("sealed-backup");
    let store = SqliteStore::open(&db.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    keyed(&store, "acme", "AcmeKey00001").await;
    let copy = TempDb::new("sealed-backup-copy");
    store.backup(&copy.0).await.unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&copy.0).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert_eq!(
        found(&state_bytes(&copy), &["AcmeKey00001".to_owned()]),
        Vec::<&str>::new()
    );
    // Never over an existing file.
    assert!(store.backup(&copy.0).await.is_err());
    // Without the master key: refused.
    let stolen = TempDb::new("sealed-backup-stolen");
    std::fs::copy(&copy.0, &stolen.0).unwrap();
    assert!(matches!(
        SqliteStore::open(
            &stolen.0,
            KeyFormat::default(),
            MasterKeys::generate().unwrap()
        ),
        Err(StoreError::Sealed { .. })
    ));
    // With it: the key.
    let opened = SqliteStore::open(&stolen.0, KeyFormat::default(), master_for(&db.0)).unwrap();
    let loaded = opened.load_orgs().await.unwrap();
    assert_eq!(
        loaded[0].key.as_ref().unwrap().expose_secret(),
        "AcmeKey00001"
    );
}

#[tokio::test]
async fn rotation_reseals_every_key_and_the_old_master_key_can_be_retired() {
    let db = TempDb::new("sealed-rotate");
    let first = master_for(&db.0);
    let store = SqliteStore::open(&db.0, KeyFormat::default(), first.clone()).unwrap();
    for i in 0..1500u32 {
        let id = format!("org{i:04}");
        store.create_org(&org(&id)).await.unwrap();
    }
    // One transaction for the keys would be faster; through the API is what a gateway does.
    for i in 0..1500u32 {
        let id = format!("org{i:04}");
        store
            .commit(
                Generation::new(0),
                &record(&id, Some(&format!("Key{i:04}abcde")), 1),
                &event(&id, KeyAction::Subscribe, 1),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        store.master_keys_in_use().await.unwrap(),
        vec![first.current()]
    );
    let second = first.with_new_key().unwrap();
    // Keys that do not open what is stored are refused, and change nothing.
    assert!(matches!(
        store.set_master_keys(MasterKeys::generate().unwrap()).await,
        Err(StoreError::Sealed { .. })
    ));
    store.set_master_keys(second.clone()).await.unwrap();
    assert_eq!(store.reseal().await.unwrap(), 1500);
    assert_eq!(
        store.master_keys_in_use().await.unwrap(),
        vec![second.current()]
    );
    assert_eq!(store.reseal().await.unwrap(), 0);
    // The old key retired: everything still opens, now and after a reopen.
    let retired = second.without(|id| id == first.current());
    store.set_master_keys(retired.clone()).await.unwrap();
    assert_eq!(store.load_orgs().await.unwrap().len(), 1500);
    drop(store);
    let store = SqliteStore::open(&db.0, KeyFormat::default(), retired).unwrap();
    let loaded = store.load_orgs().await.unwrap();
    assert_eq!(
        loaded[1234].key.as_ref().unwrap().expose_secret(),
        "Key1234abcde"
    );
    // And the first key alone no longer opens the state.
    drop(store);
    assert!(matches!(
        SqliteStore::open(&db.0, KeyFormat::default(), first),
        Err(StoreError::Sealed { .. })
    ));
}
