//! P1 and P2 through `KeyAdmin` with a store: commit, then swap, then return; a failed commit
//! changes nothing; state survives a restart; racing writers on one database get one winner.
#![allow(clippy::unwrap_used)]

mod common;

use common::{race_regenerates, TempDb};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use orgkey::store::{
    AdminRecord, AuditRecord, BackendError, MemoryStore, OrgRecord, SqliteStore, Store, StoreError,
    StoreFuture, ThrottleKeys, ThrottlePolicy, ThrottleVerdict,
};
use orgkey::{
    Actor, AuditEvent, Generation, KeyAction, KeyAdmin, KeyError, KeyFormat, OrgId, OrgTable,
    Username,
};

/// A store whose commits fail while `failing` is set.
struct Flaky {
    inner: MemoryStore,
    failing: Arc<AtomicBool>,
}

#[derive(Debug)]
struct DiskFull;
impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk full")
    }
}
impl std::error::Error for DiskFull {}

impl Store for Flaky {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        self.inner.load_orgs()
    }
    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        self.inner.create_org(org)
    }
    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(StoreError::Backend(
                BackendError::new(DiskFull),
            ))));
        }
        self.inner.commit(expected, next, audit)
    }
    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        self.inner.audit_page(org, before, limit)
    }
    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        self.inner.load_admins()
    }
    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        self.inner.put_admin(admin)
    }
    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        self.inner.delete_admin(username)
    }
    fn load_sessions(&self) -> StoreFuture<'_, Vec<orgkey::store::SessionRecord>> {
        self.inner.load_sessions()
    }
    fn put_session<'a>(&'a self, session: &'a orgkey::store::SessionRecord) -> StoreFuture<'a, ()> {
        self.inner.put_session(session)
    }
    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        self.inner.delete_session(digest)
    }
    fn throttle_take<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ThrottleVerdict> {
        self.inner.throttle_take(keys, policy, now_ms)
    }
    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.inner
            .throttle_succeeded(keys, username_charged, policy, now_ms)
    }
    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        self.inner.throttle_collect(now_ms)
    }
}

fn org() -> OrgId {
    OrgId::new("acme").unwrap()
}

fn alice() -> Actor {
    Actor::new("alice@acme.example").unwrap()
}

#[tokio::test]
async fn a_failed_commit_changes_nothing_in_memory_and_records_no_audit_event() {
    let failing = Arc::new(AtomicBool::new(false));
    let audited = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&audited);
    let admin = KeyAdmin::open(
        OrgTable::default(),
        Flaky {
            inner: MemoryStore::new(),
            failing: Arc::clone(&failing),
        },
    )
    .await
    .unwrap()
    .with_audit_sink(move |_: &AuditEvent| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    admin.create_org(&org()).await.unwrap();
    let info = admin.subscribe(&org(), &alice()).await.unwrap();
    let key = info.key().unwrap().expose_secret().to_owned();
    assert_eq!(audited.load(Ordering::SeqCst), 1);

    failing.store(true, Ordering::SeqCst);
    for result in [
        admin.regenerate(&org(), &alice()).await,
        admin.delete(&org(), &alice()).await,
        admin.unsubscribe(&org(), &alice()).await,
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, KeyError::Store(_)), "{err:?}");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "the store failed"
        );
    }
    // The old key still works, the generation did not move, nothing was audited.
    assert!(admin.table().verify("acme", key.as_bytes()).is_ok());
    assert_eq!(admin.view(&org()).unwrap().generation(), info.generation());
    assert_eq!(audited.load(Ordering::SeqCst), 1);

    failing.store(false, Ordering::SeqCst);
    admin.regenerate(&org(), &alice()).await.unwrap();
    assert!(admin.table().verify("acme", key.as_bytes()).is_err());
}

#[tokio::test]
async fn changes_survive_a_restart_on_sqlite_and_old_keys_stay_dead() {
    let db = TempDb::new("restart");
    let (old, new) = {
        let admin = KeyAdmin::open(
            OrgTable::default(),
            SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
        )
        .await
        .unwrap();
        admin.create_org(&org()).await.unwrap();
        let first = admin.subscribe(&org(), &alice()).await.unwrap();
        let second = admin.regenerate(&org(), &alice()).await.unwrap();
        (
            first.key().unwrap().expose_secret().to_owned(),
            second.key().unwrap().expose_secret().to_owned(),
        )
    };
    // A new process: a fresh table, loaded from the file.
    let store = SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap();
    let audit = store.audit_page(&org(), None, 10).await.unwrap();
    let admin = KeyAdmin::open(OrgTable::default(), store).await.unwrap();
    assert!(admin.table().verify("acme", new.as_bytes()).is_ok());
    assert!(admin.table().verify("acme", old.as_bytes()).is_err());
    let info = admin.view(&org()).unwrap();
    assert_eq!(
        info.last_modified_by().unwrap().as_str(),
        "alice@acme.example"
    );
    assert_eq!(info.generation(), Generation::new(2));
    let actions: Vec<_> = audit.iter().map(|r| r.event.action).collect();
    assert_eq!(actions, [KeyAction::Regenerate, KeyAction::Subscribe]);
    assert!(matches!(
        admin.create_org(&org()).await,
        Err(KeyError::OrgExists)
    ));
}

/// Eight writers, each with its own in-memory table, regenerate one org at the same
/// generation through one SQLite store (a file serves one process, P5, so they share its
/// connection): exactly one wins, the others get `Conflict`, and the stored key is the
/// winner's. The store's compare-and-set decides, not the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_regenerates_on_one_sqlite_file_have_exactly_one_winner() {
    let db = TempDb::new("race");
    {
        let admin = KeyAdmin::open(
            OrgTable::default(),
            SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
        )
        .await
        .unwrap();
        admin.create_org(&org()).await.unwrap();
        admin.subscribe(&org(), &alice()).await.unwrap();
    }
    let store = SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap();
    let mut writers = Vec::new();
    for _ in 0..8 {
        writers.push(
            KeyAdmin::open(OrgTable::default(), store.clone())
                .await
                .unwrap(),
        );
    }
    drop(store);
    let (winners, conflicts) = race_regenerates(writers, org()).await;
    assert_eq!((winners.len(), conflicts), (1, 7));
    let reopened = KeyAdmin::open(
        OrgTable::default(),
        SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
    )
    .await
    .unwrap();
    assert!(reopened
        .table()
        .verify("acme", winners[0].as_bytes())
        .is_ok());
}

#[tokio::test]
async fn admin_accounts_survive_a_restart_on_sqlite() {
    use orgkey::{AdminDirectory, Admins, Password, PasswordRejection, Scope, Scopes, Username};
    let db = TempDb::new("admins");
    let alice = Username::new("alice@acme.example").unwrap();
    let version = {
        let store = Arc::new(
            SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
        );
        let keys = KeyAdmin::open(OrgTable::default(), Arc::clone(&store))
            .await
            .unwrap();
        keys.create_org(&org()).await.unwrap();
        let admins = Admins::open(keys.table().clone(), store).await.unwrap();
        admins
            .create(&alice, &org(), &Password::new("FirstHorse123"), Scopes::ALL)
            .await
            .unwrap();
        admins.revoke(&alice, Scope::KeyAdmin).await.unwrap();
        admins
            .change_password(&alice, &Password::new("SecondHorse45"))
            .await
            .unwrap();
        admins.get(&alice).unwrap().credential_version
    };
    let store = Arc::new(
        SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
    );
    let keys = KeyAdmin::open(OrgTable::default(), Arc::clone(&store))
        .await
        .unwrap();
    let admins = Admins::open(keys.table().clone(), store).await.unwrap();
    let status = admins.get(&alice).unwrap();
    assert_eq!(status.scopes, Scopes::API);
    assert_eq!(status.credential_version, version);
    assert!(admins
        .verify_password(&alice, &Password::new("SecondHorse45"))
        .is_ok());
    assert_eq!(
        admins
            .verify_password(&alice, &Password::new("FirstHorse123"))
            .err(),
        Some(PasswordRejection::WrongPassword)
    );
    admins.delete(&alice).await.unwrap();
    drop((keys, admins));
    let store = SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap();
    assert!(store.load_admins().await.unwrap().is_empty());
}

/// P2 for sessions: after a restart on the same SQLite file a live session is still live and
/// a logged-out one stays dead.
#[tokio::test]
async fn logged_out_sessions_stay_dead_across_a_restart_and_live_ones_survive() {
    use orgkey::session::obfuscate::obfuscate;
    use orgkey::session::{LoginRequest, SessionConfig, Sessions};
    use orgkey::{Admins, ApiKey, Password, Scopes, Username};
    let db = TempDb::new("sessions");
    let alice_name = Username::new("alice@acme.example").unwrap();
    let open = || async {
        let store = Arc::new(
            SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
        );
        let keys = KeyAdmin::open(OrgTable::default(), Arc::clone(&store))
            .await
            .unwrap();
        let admins = Admins::open(keys.table().clone(), Arc::clone(&store))
            .await
            .unwrap();
        let sessions = Sessions::open(
            keys.table().clone(),
            admins.clone(),
            SessionConfig::default(),
            orgkey::clock::SystemClock,
            store,
        )
        .await
        .unwrap();
        (keys, admins, sessions)
    };
    let login = |sessions: Sessions| async move {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let api_key = obfuscate(b"AbCdEf123456", ts).unwrap();
        let session = sessions
            .login(LoginRequest {
                api_key: Password::new(String::from_utf8(api_key.to_vec()).unwrap()),
                username: "alice@acme.example".into(),
                password: Password::new("CorrectHorse12!"),
                timestamp_ms: ts,
                source: None,
            })
            .await
            .unwrap();
        session.token.expose_secret().to_owned()
    };
    let (kept, ended) = {
        let (keys, admins, sessions) = open().await;
        keys.create_org(&org()).await.unwrap();
        keys.subscribe(&org(), &alice()).await.unwrap();
        keys.edit(&org(), ApiKey::parse("AbCdEf123456").unwrap(), &alice())
            .await
            .unwrap();
        admins
            .create(
                &alice_name,
                &org(),
                &Password::new("CorrectHorse12!"),
                Scopes::ALL,
            )
            .await
            .unwrap();
        let kept = login(sessions.clone()).await;
        let ended = login(sessions.clone()).await;
        assert!(sessions.logout(ended.as_bytes()).await.unwrap());
        (kept, ended)
    };
    let (_keys, _admins, sessions) = open().await;
    assert!(
        sessions.validate(kept.as_bytes()).is_ok(),
        "a live session survives"
    );
    assert!(
        sessions.validate(ended.as_bytes()).is_err(),
        "a logged-out one stays dead"
    );
    assert_eq!(sessions.len(), 1);
}

/// P5 (issue 9 item 5): a state file serves one process. While a store is open on it, a
/// second open (here in the same process; `tests/gateway.rs` starts a second gateway
/// process) is refused with `InUse`, naming the holder's pid, and opens nothing; once the
/// first store is gone, the file opens again.
#[tokio::test]
async fn a_second_open_of_a_held_sqlite_file_is_refused_until_the_first_is_closed() {
    use orgkey::store::StoreError;
    let db = TempDb::new("p5");
    let first = SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap();
    let keys = KeyAdmin::open(OrgTable::default(), first.clone())
        .await
        .unwrap();
    keys.create_org(&org()).await.unwrap();
    let refused =
        SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap_err();
    match &refused {
        StoreError::InUse { pid } => assert_eq!(*pid, Some(std::process::id())),
        other => panic!("expected InUse, got {other:?}"),
    }
    let message = refused.to_string();
    assert!(
        message.contains("in use by another orgkey process"),
        "{message}"
    );
    assert!(
        message.contains(&std::process::id().to_string()),
        "{message}"
    );
    // A clone of the store is the same holder; dropping one clone keeps the lock.
    drop(first);
    assert!(SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).is_err());
    drop(keys);
    let reopened = KeyAdmin::open(
        OrgTable::default(),
        SqliteStore::open(&db.0, KeyFormat::default(), common::master_for(&db.0)).unwrap(),
    )
    .await
    .unwrap();
    assert!(reopened.table().state("acme").is_some());
}
