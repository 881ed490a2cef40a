//! P4 on PostgreSQL, for a fleet: keys at rest only sealed (no key in any row of any table, nor
//! in a notification), the migration of a schema written before sealing (all or nothing), a
//! master key rotation on a live fleet (the new key reaches the replicas through their files;
//! no request fails; a replica whose file lacks the new key stops the rotation, named, and a
//! rerun finishes it), a reseal killed midway (`kill -9` of a child process), and a wrong
//! master key file (refused, nothing changed). Each test has its own schema
//! (`tests/common/pg.rs`); without PostgreSQL they say SKIPPED.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orgkey::store::{
    ChangeFollower, FleetConfig, FleetMode, OrgRecord, PostgresStore, Replica, Store, StoreError,
};
use orgkey::{
    Actor, ApiKey, AuditEvent, Generation, KeyAction, KeyAdmin, KeyFormat, MasterKeys, OrgId,
    OrgTable, SealError,
};

/// The tests of this file run one at a time: they time leases, hammer replicas and kill a
/// process, and a small machine running them together starves the fleets' lease renewals
/// (a replica that cannot renew fails closed, which a test would take for a rotation's fault).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn schema() -> Option<common::pg::TempSchema> {
    common::pg::TempSchema::new(
        "tests/sealing_postgres.rs",
        "the PostgreSQL tests of keys at rest and master key rotation (P4) pass without running",
    )
}

fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

fn ops() -> Actor {
    Actor::new("ops@acme.example").unwrap()
}

/// A fast strict fleet: a dead replica costs little time, and a rotation that cannot finish
/// fails after 2.5 s.
fn fleet(name: &str) -> FleetConfig {
    FleetConfig {
        mode: FleetMode::Strict,
        lease: Duration::from_millis(1000),
        renewal: Duration::from_millis(100),
        wait: Duration::from_millis(2500),
        name: name.to_owned(),
    }
}

/// A directory of master key files, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("orgkey-sealing-{tag}-{hex}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store on the test schema with the keys in `master`, as replica (or operator) `name`.
async fn connect(
    schema: &common::pg::TempSchema,
    name: &str,
    master: MasterKeys,
) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect_with(
        &schema.url,
        &schema.name,
        KeyFormat::default(),
        fleet(name),
        master,
    )
    .await
}

/// One replica of the fleet: its store (master keys read from its own file), its org table,
/// following the feed with a lease.
struct Node {
    name: String,
    store: PostgresStore,
    keys: KeyAdmin,
    _follower: ChangeFollower,
}

async fn node(schema: &common::pg::TempSchema, name: &str, file: &Path) -> Node {
    let store = connect(schema, name, MasterKeys::load(file).unwrap())
        .await
        .unwrap();
    let keys = KeyAdmin::open(OrgTable::default(), store.clone())
        .await
        .unwrap();
    let follower = store.follow(Replica::new(keys.table().clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !keys.table().is_trusted() {
        assert!(Instant::now() < deadline, "replica {name} never followed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Node {
        name: name.to_owned(),
        store,
        keys,
        _follower: follower,
    }
}

/// Creates `n` subscribed orgs `<prefix><i>` through `keys`; their keys by org.
async fn orgs_with_keys(keys: &KeyAdmin, prefix: &str, n: usize) -> HashMap<String, String> {
    let mut made = HashMap::new();
    for i in 0..n {
        let id = format!("{prefix}{i}");
        keys.create_org(&org(&id)).await.unwrap();
        let info = keys.subscribe(&org(&id), &ops()).await.unwrap();
        made.insert(id, info.key().unwrap().expose_secret().to_owned());
    }
    made
}

/// What `master-key rotate` does (`src/gateway/ops.rs`), through `op`, a store that does not
/// follow, with the operator's master key file `file`: a fresh key first in the file unless
/// an interrupted rotation is resumed, `distribute` (the file reaches the replicas that do not
/// share it), `set_master_keys`, `reseal`. Answers how many keys were sealed again.
async fn rotate(
    op: &PostgresStore,
    file: &Path,
    distribute: impl FnOnce(),
) -> Result<u64, StoreError> {
    let in_use = op.master_keys_in_use().await?;
    let master = MasterKeys::load(file).unwrap();
    let resuming = in_use.iter().any(|id| *id != master.current());
    let master = if resuming {
        master
    } else {
        let rotated = master.with_new_key().unwrap();
        rotated.save(file).unwrap();
        rotated
    };
    distribute();
    op.set_master_keys(master).await?;
    op.reseal().await
}

/// Every row of every table of the schema, as JSON text, one line per row.
async fn dump(raw: &tokio_postgres::Client, schema: &str) -> String {
    let tables = raw
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
            &[&schema],
        )
        .await
        .unwrap();
    assert!(tables.len() >= 8, "the schema's tables");
    let mut text = String::new();
    for table in &tables {
        let table: &str = table.get(0);
        let rows = raw
            .query(
                &format!("SELECT row_to_json(t)::text FROM \"{schema}\".\"{table}\" t"),
                &[],
            )
            .await
            .unwrap();
        for row in &rows {
            text.push_str(table);
            text.push_str(": ");
            text.push_str(row.get::<_, &str>(0));
            text.push('\n');
        }
    }
    text
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails if `text` holds `secret`, as it is or in hex (how `row_to_json` shows `BYTEA`).
fn assert_absent(text: &str, secret: &str, what: &str) {
    assert!(!text.contains(secret), "{what} holds a secret in clear");
    assert!(
        !text.contains(&hex(secret.as_bytes())),
        "{what} holds a secret in hex"
    );
}

/// The master key under which each stored key is sealed, by org (hex id).
async fn sealed_under(raw: &tokio_postgres::Client, schema: &str) -> HashMap<String, String> {
    raw.query(
        &format!(
            "SELECT id, encode(substring(sealed_key FROM 2 FOR 8), 'hex') FROM \"{schema}\".orgs
             WHERE sealed_key IS NOT NULL"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

async fn fleet_sealing_key(raw: &tokio_postgres::Client, schema: &str) -> String {
    raw.query_one(
        &format!("SELECT sealing_key FROM \"{schema}\".fleet_head"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The notifications on the schema's channel, as they arrive.
async fn listen(
    schema: &common::pg::TempSchema,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if tx.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    let mut channel = format!("orgkey_{}", schema.name);
    channel.truncate(63);
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .unwrap();
    (client, rx)
}

/// The server processes of the connections named (`application_name`) in `names`.
async fn backends(raw: &tokio_postgres::Client, names: &[String]) -> Vec<i32> {
    raw.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1)",
        &[&names],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get::<_, i32>(0))
    .collect()
}

/// The base64 of each key in a master key file (what must never reach the database).
fn master_key_texts(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("orgkey-master-key-v1 "))
        .map(|key| key.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_is_in_any_row_of_any_table_nor_in_any_notification() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let dir = Dir::new("raw");
    let file = dir.file("master.key");
    MasterKeys::create(&file).unwrap();
    let (_listener, mut payloads) = listen(&schema).await;
    let a = node(&schema, "a", &file).await;
    let b = node(&schema, "b", &file).await;
    let mut secrets: Vec<String> = Vec::new();
    let made = orgs_with_keys(&a.keys, "org", 10).await;
    secrets.extend(made.values().cloned());
    for (i, id) in made.keys().enumerate() {
        let writer = if i % 2 == 0 { &a.keys } else { &b.keys };
        let info = writer.regenerate(&org(id), &ops()).await.unwrap();
        secrets.push(info.key().unwrap().expose_secret().to_owned());
        if i % 3 == 0 {
            let chosen = format!("Chosen{i:06}");
            writer
                .edit(&org(id), ApiKey::parse(&chosen).unwrap(), &ops())
                .await
                .unwrap();
            secrets.push(chosen);
        }
    }
    // A rotation too: its announcements carry ids only.
    let op = connect(&schema, "op", MasterKeys::load(&file).unwrap())
        .await
        .unwrap();
    assert_eq!(rotate(&op, &file, || {}).await.unwrap(), 10);
    let info = a.keys.regenerate(&org("org0"), &ops()).await.unwrap();
    secrets.push(info.key().unwrap().expose_secret().to_owned());

    let raw = schema.raw().await;
    let text = dump(&raw, &schema.name).await;
    assert!(text.contains("org7"), "the dump reads the orgs");
    for secret in &secrets {
        assert_absent(&text, secret, "the database");
    }
    for master in master_key_texts(&file) {
        assert_absent(&text, &master, "the database");
    }
    // Every stored key is a sealed value under the new master key.
    let current = MasterKeys::load(&file).unwrap().current().to_hex();
    let under = sealed_under(&raw, &schema.name).await;
    assert_eq!(under.len(), 10);
    assert!(under.values().all(|id| *id == current), "{under:?}");
    let clear: i64 = raw
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".orgs WHERE api_key IS NOT NULL",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clear, 0);

    let mut heard = Vec::new();
    while let Ok(payload) = payloads.try_recv() {
        heard.push(payload);
    }
    let all = heard.join("\n");
    assert!(all.contains("|o|org3:"), "the listener heard the changes");
    assert!(all.contains(&format!("|r|{current}")), "{all}");
    assert!(all.contains(&format!("|k|{current}")), "{all}");
    for secret in &secrets {
        assert_absent(&all, secret, "a notification");
    }
    for master in master_key_texts(&file) {
        assert_absent(&all, &master, "a notification");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_written_before_sealing_is_sealed_at_connect_all_or_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let made = {
        let store = schema.connect().await;
        let keys = KeyAdmin::open(OrgTable::default(), store).await.unwrap();
        orgs_with_keys(&keys, "old", 12).await
    };
    // The schema as release 5 left it: keys in clear in `api_key`, no `sealed_key`, none of
    // migrations 6 and 7.
    let raw = schema.raw().await;
    let s = &schema.name;
    for (id, key) in &made {
        raw.execute(
            &format!("UPDATE \"{s}\".orgs SET api_key = $2 WHERE id = $1"),
            &[id, key],
        )
        .await
        .unwrap();
    }
    raw.batch_execute(&format!(
        "SET search_path TO \"{s}\";
         ALTER TABLE orgs DROP COLUMN sealed_key;
         ALTER TABLE fleet_head DROP COLUMN sealing_key, DROP COLUMN wanted_key;
         ALTER TABLE fleet_replicas DROP COLUMN master_keys;
         DROP FUNCTION fleet_renew(TEXT, TEXT, BIGINT, BIGINT, TEXT);
         DELETE FROM orgkey_schema_version WHERE version >= 6;
         INSERT INTO orgs (id, subscribed, api_key, generation) VALUES ('broken', TRUE, 'short', 1);
         RESET search_path;"
    ))
    .await
    .unwrap();

    // All or nothing: one clear key that is not a key stops the connect, and every key stays
    // as it was (in clear, no `sealed_key`, still version 5).
    let err = PostgresStore::connect(&schema.url, s, KeyFormat::default(), schema.master.clone())
        .await
        .unwrap_err();
    let reason = std::error::Error::source(&err).unwrap().to_string();
    assert!(reason.contains("clear key"), "{reason}");
    let version: i64 = raw
        .query_one(
            &format!("SELECT max(version) FROM \"{s}\".orgkey_schema_version"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 5);
    let sealed_column: i64 = raw
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = 'orgs' AND column_name = 'sealed_key'",
            &[s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sealed_column, 0);
    let clear = raw
        .query(
            &format!("SELECT id, api_key FROM \"{s}\".orgs WHERE api_key IS NOT NULL"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(clear.len(), made.len() + 1);
    for row in &clear {
        let (id, key): (String, String) = (row.get(0), row.get(1));
        if id != "broken" {
            assert_eq!(made[&id], key, "org {id} kept its key");
        }
    }

    // Fixed, the next connect seals every key, in clear nowhere in the table.
    raw.execute(
        &format!("UPDATE \"{s}\".orgs SET api_key = 'Broken123456' WHERE id = 'broken'"),
        &[],
    )
    .await
    .unwrap();
    let store = schema.connect().await;
    assert_eq!(store.sealing_key(), schema.master.current());
    let loaded: HashMap<String, Option<String>> = store
        .load_orgs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.org.as_str().to_owned(),
                r.key.map(|k| k.expose_secret().to_owned()),
            )
        })
        .collect();
    assert_eq!(loaded.len(), made.len() + 1);
    for (id, key) in &made {
        assert_eq!(loaded[id].as_deref(), Some(key.as_str()), "org {id}");
    }
    assert_eq!(loaded["broken"].as_deref(), Some("Broken123456"));
    let clear: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".orgs WHERE api_key IS NOT NULL"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clear, 0);
    let under = sealed_under(&raw, s).await;
    assert_eq!(under.len(), made.len() + 1);
    let current = schema.master.current().to_hex();
    assert!(under.values().all(|id| *id == current));
    let text = dump(&raw, s).await;
    for key in made.values() {
        assert_absent(&text, key, "the migrated database");
    }
    assert_absent(&text, "Broken123456", "the migrated database");
}

/// Requests on every replica while a rotation runs: each replica checks every static org's key
/// in a loop; a check fails if the replica stops vouching for its table or refuses the key.
struct Load {
    stop: Arc<AtomicBool>,
    checks: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(nodes: &[Node], keys: &HashMap<String, String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let keys: Arc<Vec<(String, String)>> =
            Arc::new(keys.iter().map(|(o, k)| (o.clone(), k.clone())).collect());
        let tasks = nodes
            .iter()
            .map(|node| {
                let table = node.keys.table().clone();
                let (stop, checks, failures, keys) = (
                    Arc::clone(&stop),
                    Arc::clone(&checks),
                    Arc::clone(&failures),
                    Arc::clone(&keys),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        for (id, key) in keys.iter() {
                            let ok = table.is_trusted() && table.verify(id, key.as_bytes()).is_ok();
                            checks.fetch_add(1, Ordering::Relaxed);
                            if !ok {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            checks,
            failures,
            tasks,
        }
    }

    /// Stops; (checks, failures).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.checks.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_fleet_rotates_its_master_key_without_failing_a_request() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let dir = Dir::new("rotate");
    // Replicas a and b share the operator's file; c has its own copy (a mounted secret),
    // which the rotation's distribution step replaces.
    let shared = dir.file("master.key");
    let own = dir.file("c.key");
    let only_old = dir.file("only-old.key");
    MasterKeys::create(&shared).unwrap();
    std::fs::copy(&shared, &own).unwrap();
    std::fs::copy(&shared, &only_old).unwrap();
    let nodes = vec![
        node(&schema, "a", &shared).await,
        node(&schema, "b", &shared).await,
        node(&schema, "c", &own).await,
    ];
    let old = MasterKeys::load(&shared).unwrap().current();
    let made = orgs_with_keys(&nodes[0].keys, "org", 40).await;
    nodes[0].keys.create_org(&org("busy")).await.unwrap();
    nodes[0].keys.subscribe(&org("busy"), &ops()).await.unwrap();
    let op = connect(&schema, "op", MasterKeys::load(&shared).unwrap())
        .await
        .unwrap();

    // Requests on every replica, and key changes through b, all through the rotation.
    let load = Load::start(&nodes, &made);
    let writer = nodes[1].keys.clone();
    let writing = Arc::new(AtomicBool::new(true));
    let changes = tokio::spawn({
        let writing = Arc::clone(&writing);
        async move {
            let mut last = None;
            let mut count = 0u32;
            while writing.load(Ordering::Relaxed) || count < 5 {
                let info = writer.regenerate(&org("busy"), &ops()).await.unwrap();
                last = Some(info.key().unwrap().expose_secret().to_owned());
                count += 1;
            }
            (last.unwrap(), count)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resealed = rotate(&op, &shared, || {
        std::fs::copy(&shared, &own).unwrap();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    writing.store(false, Ordering::Relaxed);
    let (busy_key, busy_changes) = changes.await.unwrap();
    let (checks, failures) = load.finish().await;
    assert!(
        checks > 1000,
        "requests ran through the rotation ({checks})"
    );
    assert_eq!(failures, 0, "{failures} of {checks} requests failed");
    assert!(busy_changes >= 5);
    assert!(
        resealed >= 40,
        "the 40 static keys were sealed again ({resealed})"
    );

    // Every stored key is sealed under the new key, which every replica holds and seals
    // under; the operator's store says nothing else is in use.
    let new = MasterKeys::load(&shared).unwrap().current();
    assert_ne!(new, old);
    let raw = schema.raw().await;
    let under = sealed_under(&raw, &schema.name).await;
    assert_eq!(under.len(), 41);
    assert!(under.values().all(|id| *id == new.to_hex()), "{under:?}");
    assert_eq!(fleet_sealing_key(&raw, &schema.name).await, new.to_hex());
    assert_eq!(op.master_keys_in_use().await.unwrap(), vec![new]);
    for node in &nodes {
        assert_eq!(node.store.sealing_key(), new, "replica {}", node.name);
        assert!(node.store.master_keys().contains(new));
        assert!(node.store.master_keys().contains(old));
        // Reloads open everything, and the busy org's last key is in force.
        let loaded = node.store.load_orgs().await.unwrap();
        assert_eq!(loaded.len(), 41);
        for record in &loaded {
            let key = record.key.as_ref().unwrap().expose_secret();
            match made.get(record.org.as_str()) {
                Some(expected) => assert_eq!(key, expected),
                None => assert_eq!(key, busy_key),
            }
        }
        assert!(node
            .keys
            .table()
            .verify("busy", busy_key.as_bytes())
            .is_ok());
    }
    // Each replica's feed reloads everything after losing its connection.
    let feeds: Vec<String> = nodes
        .iter()
        .map(|n| format!("orgkey-follow:{}", n.name))
        .collect();
    let before = backends(&raw, &feeds).await;
    assert_eq!(before.len(), 3);
    raw.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
        &[&before],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = backends(&raw, &feeds).await;
        let fresh = now.iter().filter(|pid| !before.contains(pid)).count();
        if fresh == 3 && nodes.iter().all(|n| n.keys.table().is_trusted()) {
            break;
        }
        assert!(Instant::now() < deadline, "the feeds did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &nodes {
        for (id, key) in &made {
            assert!(node.keys.table().verify(id, key.as_bytes()).is_ok());
        }
    }
    // A restart of a replica (a new store and table from its file) serves every key.
    let restarted = node(&schema, "c2", &own).await;
    for (id, key) in &made {
        assert!(restarted.keys.table().verify(id, key.as_bytes()).is_ok());
    }

    // Retire: the old key leaves the files; every replica still opens everything, a key
    // change seals under the new key, and a file with only the old key is refused.
    let in_use = op.master_keys_in_use().await.unwrap();
    let master = MasterKeys::load(&shared).unwrap();
    let kept = master.without(|id| id != master.current() && !in_use.contains(&id));
    assert_eq!(kept.ids().collect::<Vec<_>>(), vec![new]);
    kept.save(&shared).unwrap();
    std::fs::copy(&shared, &own).unwrap();
    op.set_master_keys(MasterKeys::load(&shared).unwrap())
        .await
        .unwrap();
    let after = node(&schema, "after-retire", &shared).await;
    for (id, key) in &made {
        assert!(after.keys.table().verify(id, key.as_bytes()).is_ok());
    }
    after.keys.regenerate(&org("org1"), &ops()).await.unwrap();
    assert!(!MasterKeys::load(&shared).unwrap().contains(old));
    let err = connect(&schema, "stale", MasterKeys::load(&only_old).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Sealed {
                error: SealError::UnknownMasterKey(id),
                ..
            } if *id == new
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_without_the_new_key_stops_the_rotation_and_a_rerun_finishes_it() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let dir = Dir::new("lacking");
    let operator = dir.file("op.key");
    let (a_file, b_file) = (dir.file("a.key"), dir.file("b.key"));
    MasterKeys::create(&operator).unwrap();
    std::fs::copy(&operator, &a_file).unwrap();
    std::fs::copy(&operator, &b_file).unwrap();
    let a = node(&schema, "replica-a", &a_file).await;
    let b = node(&schema, "replica-b", &b_file).await;
    let old = MasterKeys::load(&operator).unwrap().current();
    let made = orgs_with_keys(&a.keys, "org", 15).await;
    let op = connect(&schema, "op", MasterKeys::load(&operator).unwrap())
        .await
        .unwrap();

    // The new file reaches a, not b.
    let started = Instant::now();
    let err = rotate(&op, &operator, || {
        std::fs::copy(&operator, &a_file).unwrap();
    })
    .await
    .unwrap_err();
    let new = MasterKeys::load(&operator).unwrap().current();
    match &err {
        StoreError::MasterKeyNotShared { key, replicas, .. } => {
            assert_eq!(*key, new);
            assert_eq!(replicas, &["replica-b".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "it waited"
    );
    let message = err.to_string();
    assert!(
        message.contains("replica-b")
            && message.contains(&new.to_hex())
            && message.contains("master-key rotate again"),
        "{message}"
    );
    // Nothing was sealed again; the fleet still seals under the old key, and both replicas
    // change keys under it; a took the new key from its file.
    let raw = schema.raw().await;
    let under = sealed_under(&raw, &schema.name).await;
    assert!(under.values().all(|id| *id == old.to_hex()), "{under:?}");
    assert_eq!(fleet_sealing_key(&raw, &schema.name).await, old.to_hex());
    assert!(a.store.master_keys().contains(new));
    assert!(!b.store.master_keys().contains(new));
    let lists: HashMap<String, String> = raw
        .query(
            &format!(
                "SELECT name, master_keys FROM \"{}\".fleet_replicas
                 WHERE lease_until > clock_timestamp()",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(lists["replica-a"].contains(&new.to_hex()), "{lists:?}");
    assert!(!lists["replica-b"].contains(&new.to_hex()), "{lists:?}");
    b.keys.regenerate(&org("org0"), &ops()).await.unwrap();
    a.keys.regenerate(&org("org1"), &ops()).await.unwrap();
    let under = sealed_under(&raw, &schema.name).await;
    assert!(under.values().all(|id| *id == old.to_hex()), "{under:?}");

    // The file reaches b, and b's feed reconnects before anyone asks again: its reload fetches
    // the key the rotation wants (`fleet_head.wanted_key`).
    std::fs::copy(&operator, &b_file).unwrap();
    let feed = [format!("orgkey-follow:{}", b.name)];
    let before = backends(&raw, &feed).await;
    raw.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
        &[&before],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.store.master_keys().contains(new) {
        assert!(
            Instant::now() < deadline,
            "b's reload did not fetch the key"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!before.is_empty() && backends(&raw, &feed).await != before);
    // The rerun resumes the same rotation (no third key) and finishes.
    let resealed = rotate(&op, &operator, || {}).await.unwrap();
    assert_eq!(resealed, made.len() as u64);
    assert_eq!(MasterKeys::load(&operator).unwrap().ids().count(), 2);
    let under = sealed_under(&raw, &schema.name).await;
    assert!(under.values().all(|id| *id == new.to_hex()), "{under:?}");
    for replica in [&a, &b] {
        assert_eq!(replica.store.sealing_key(), new);
        assert_eq!(replica.store.load_orgs().await.unwrap().len(), made.len());
    }
}

/// Writes `n` subscribed orgs `org<i>` straight into the table, each with a random key sealed
/// under `master`'s first key at generation 1; their keys by org.
async fn insert_orgs(
    raw: &tokio_postgres::Client,
    schema: &str,
    master: &MasterKeys,
    n: usize,
) -> HashMap<String, String> {
    let mut keys = HashMap::new();
    let (mut ids, mut sealed) = (Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("org{i:05}");
        let key = ApiKey::generate().unwrap();
        sealed.push(master.seal(&org(&id), Generation::new(1), &key).unwrap());
        keys.insert(id.clone(), key.expose_secret().to_owned());
        ids.push(id);
    }
    raw.execute(
        &format!(
            "INSERT INTO \"{schema}\".orgs (id, subscribed, sealed_key, generation)
             SELECT id, TRUE, sealed, 1 FROM unnest($1::TEXT[], $2::BYTEA[]) AS u(id, sealed)"
        ),
        &[&ids, &sealed],
    )
    .await
    .unwrap();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reseal_never_overwrites_a_concurrent_key_change() {
    let _serial = SERIAL.lock().await;
    const ORGS: usize = 4_000;
    let Some(schema) = schema() else { return };
    let raw = schema.raw().await;
    let op = schema.connect().await;
    let mut expected = insert_orgs(&raw, &schema.name, &schema.master, ORGS).await;
    // The rotation's first half (no replica here), then a reseal while a writer on another
    // connection changes keys all over the table.
    let rotated = schema.master.with_new_key().unwrap();
    let new = rotated.current();
    op.set_master_keys(rotated.clone()).await.unwrap();
    let writer_store = connect(&schema, "writer", rotated).await.unwrap();
    let writer = KeyAdmin::open(OrgTable::default(), writer_store)
        .await
        .unwrap();
    let resealing = Arc::new(AtomicBool::new(true));
    let changes = tokio::spawn({
        let resealing = Arc::clone(&resealing);
        async move {
            let mut changed = HashMap::new();
            let mut i = 0usize;
            while resealing.load(Ordering::Relaxed) || changed.len() < 50 {
                // Spread over the table, so that changes meet every batch.
                let id = format!("org{:05}", (i * 997) % ORGS);
                let info = writer.regenerate(&org(&id), &ops()).await.unwrap();
                changed.insert(id, info.key().unwrap().expose_secret().to_owned());
                i += 1;
            }
            changed
        }
    });
    let resealed = op.reseal().await.unwrap();
    resealing.store(false, Ordering::Relaxed);
    let changed = changes.await.unwrap();
    assert!(resealed as usize <= ORGS);
    expected.extend(changed);
    // Every key is the last one committed (a reseal that wrote over a change would leave a
    // value bound to the old generation, which does not open), and sealed under the new key.
    let loaded = op.load_orgs().await.unwrap();
    assert_eq!(loaded.len(), ORGS);
    for record in &loaded {
        assert_eq!(
            record.key.as_ref().unwrap().expose_secret(),
            expected[record.org.as_str()],
            "org {}",
            record.org.as_str()
        );
    }
    let under = sealed_under(&raw, &schema.name).await;
    assert!(under.values().all(|id| *id == new.to_hex()));
}

const CHILD_ENV: &str = "ORGKEY_RESEAL_CHILD";

/// The child: connects (url, schema and master key file from `ORGKEY_RESEAL_CHILD`, separated
/// by newlines) and seals again until killed. Run only by the test below.
#[test]
#[ignore = "run as a child process by a_reseal_killed_midway_leaves_every_key_open_and_a_rerun_finishes"]
fn reseal_child_until_killed() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        panic!("{CHILD_ENV} not set: this test is the reseal crash test's child process");
    };
    let mut parts = spec.lines();
    let (url, schema, file) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let store = PostgresStore::connect_with(
            &url,
            &schema,
            KeyFormat::default(),
            fleet(&format!("reseal-child-{schema}")),
            MasterKeys::load(&file).unwrap(),
        )
        .await
        .unwrap();
        println!("RESEALING");
        let done = store.reseal().await.unwrap();
        println!("DONE {done}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseal_killed_midway_leaves_every_key_open_and_a_rerun_finishes() {
    let _serial = SERIAL.lock().await;
    const ORGS: usize = 12_000;
    let Some(schema) = schema() else { return };
    let dir = Dir::new("crash");
    let file = dir.file("master.key");
    let old_only = dir.file("old.key");
    let old = MasterKeys::create(&file).unwrap();
    old.save(&old_only).unwrap();
    let s = &schema.name;
    // Many orgs, sealed under the old key, written straight into the table.
    let store = connect(&schema, "setup", MasterKeys::load(&file).unwrap())
        .await
        .unwrap();
    let raw = schema.raw().await;
    let keys = insert_orgs(&raw, s, &old, ORGS).await;
    // The rotation's first half: the fleet (no replica here) seals under the new key.
    let rotated = MasterKeys::load(&file).unwrap().with_new_key().unwrap();
    rotated.save(&file).unwrap();
    let new = rotated.current();
    store.set_master_keys(rotated).await.unwrap();
    assert_eq!(fleet_sealing_key(&raw, s).await, new.to_hex());
    drop(store);

    let count_new = || {
        let sql = format!(
            "SELECT count(*) FROM \"{s}\".orgs
             WHERE encode(substring(sealed_key FROM 2 FOR 8), 'hex') = '{}'",
            new.to_hex()
        );
        let raw = &raw;
        async move { raw.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "reseal_child_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}\n{s}\n{}", schema.url, file.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if count_new().await > 0 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the reseal ended before it sealed anything"
        );
        assert!(Instant::now() < deadline, "the reseal never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Until its backend is gone, a statement it sent may still commit.
    let gone = [format!("orgkey:reseal-child-{s}")];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if backends(&raw, &gone).await.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the child's backend stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resealed = count_new().await as usize;
    assert!(
        resealed > 0 && resealed < ORGS,
        "killed midway: {resealed} of {ORGS} sealed again (raise ORGS if the reseal finished first)"
    );

    // Every key opens with the two-key file; the old file alone is refused, naming an org.
    let two = connect(&schema, "after", MasterKeys::load(&file).unwrap())
        .await
        .unwrap();
    let loaded = two.load_orgs().await.unwrap();
    assert_eq!(loaded.len(), ORGS);
    for record in &loaded {
        assert_eq!(
            record.key.as_ref().unwrap().expose_secret(),
            keys[record.org.as_str()]
        );
    }
    let err = connect(&schema, "old", MasterKeys::load(&old_only).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Sealed { error: SealError::UnknownMasterKey(id), .. } if *id == new),
        "{err:?}"
    );
    // The rerun finishes: the rest, and only the rest, sealed again.
    assert_eq!(two.reseal().await.unwrap() as usize, ORGS - resealed);
    assert_eq!(count_new().await as usize, ORGS);
    assert_eq!(two.master_keys_in_use().await.unwrap(), vec![new]);
    assert_eq!(two.reseal().await.unwrap(), 0);
}

fn record(id: &str, key: Option<&str>, generation: u64) -> OrgRecord {
    OrgRecord {
        org: org(id),
        subscribed: true,
        key: key.map(|k| ApiKey::parse(k).unwrap()),
        generation: Generation::new(generation),
        last_modified_by: Some(ops()),
        last_modified_on: Some(std::time::SystemTime::now()),
    }
}

fn event(id: &str, generation: u64) -> AuditEvent {
    AuditEvent {
        org: org(id),
        actor: ops(),
        action: KeyAction::Regenerate,
        at: std::time::SystemTime::now(),
        generation: Generation::new(generation),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_file_is_refused_and_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let store = schema.connect().await;
    for id in ["acme", "globex"] {
        store.create_org(&org(id)).await.unwrap();
        store
            .commit(
                Generation::new(0),
                &record(id, Some("AbCdEf123456"), 1),
                &event(id, 1),
            )
            .await
            .unwrap();
    }
    let raw = schema.raw().await;
    let before = dump(&raw, &schema.name).await;

    // A file without the schema's key: refused at connect, naming an org; nothing changed.
    let stranger = MasterKeys::generate().unwrap();
    let err = connect(&schema, "stranger", stranger).await.unwrap_err();
    match &err {
        StoreError::Sealed {
            org,
            error: SealError::UnknownMasterKey(id),
            ..
        } => {
            assert!(["acme", "globex"].contains(&org.as_str()));
            assert_eq!(*id, schema.master.current());
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("org acme") || message.contains("org globex"),
        "{message}"
    );
    assert!(message.contains(&schema.master.current().to_hex()));
    assert!(!message.contains("AbCdEf123456"));
    assert_eq!(dump(&raw, &schema.name).await, before);

    // A store that connected with the old key alone, before the fleet switched to a new key
    // (the rotation's first half): its commits write nothing; and a connect with that file
    // now is refused, though it opens every stored key.
    let stale = schema.connect().await;
    let rotated = schema.master.with_new_key().unwrap();
    let new = rotated.current();
    store.set_master_keys(rotated).await.unwrap();
    let before = dump(&raw, &schema.name).await;
    let err = stale
        .commit(
            Generation::new(1),
            &record("acme", Some("XyZ987654321"), 2),
            &event("acme", 2),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MasterKeyMissing { key, .. } if *key == new),
        "{err:?}"
    );
    assert!(err.to_string().contains(&new.to_hex()));
    let err = connect(&schema, "old-file", schema.master.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MasterKeyMissing { key, .. } if *key == new),
        "{err:?}"
    );
    assert_eq!(dump(&raw, &schema.name).await, before);
    // The store that holds both keys seals under the new one.
    store
        .commit(
            Generation::new(1),
            &record("acme", Some("XyZ987654321"), 2),
            &event("acme", 2),
        )
        .await
        .unwrap();
    let under = sealed_under(&raw, &schema.name).await;
    assert_eq!(under["acme"], new.to_hex());
    assert_eq!(under["globex"], schema.master.current().to_hex());
}

/// The operator's `master-key rotate`, `status` and `retire` (`orgkey-gateway`) on a fleet of
/// real gateway processes sharing one master key file: requests through both replicas never
/// fail, the replicas take the new key from the file (no `SIGHUP`), and a replica restarted
/// after the retirement serves.
#[cfg(feature = "gateway")]
#[test]
fn the_gateway_commands_rotate_and_retire_on_a_running_fleet() {
    use common::fleet::{whoami_key, Fleet};
    let _serial = SERIAL.blocking_lock();
    let Some(schema) = schema() else { return };
    let mut fleet = Fleet::start(&schema.url, &schema.name, 2, &[]);
    let file = fleet.master_key.path().to_owned();
    let old = MasterKeys::load(&file).unwrap().current();
    let command = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
            .args(["--postgres", &schema.url, "--schema", &schema.name])
            .args(["--master-key-file", &file])
            .args(args)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{args:?}: {out}{err}");
        out
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = fleet
        .addrs()
        .into_iter()
        .map(|addr| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut checks, mut failures) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match whoami_key(addr, common::KEY) {
                        Ok(reply) if reply.status == 200 => {}
                        Ok(reply) => failures.push(reply.brief()),
                        Err(e) => failures.push(e.to_string()),
                    }
                    checks += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                (checks, failures)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let rotated = command(&["master-key", "rotate"]);
    let new = MasterKeys::load(&file).unwrap().current();
    assert_ne!(new, old);
    assert!(rotated.contains(&format!("seals: {new}")), "{rotated}");
    assert!(rotated.contains("resealed: 1"), "{rotated}");
    let status = command(&["master-key", "status"]);
    assert!(
        status.contains(&format!("stored keys sealed under: {new}")),
        "{status}"
    );
    let retired = command(&["master-key", "retire"]);
    assert!(retired.contains(&format!("retired: {old}")), "{retired}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for (i, thread) in load.into_iter().enumerate() {
        let (checks, failures) = thread.join().unwrap();
        assert!(checks > 10, "replica {i}: {checks} requests");
        assert!(
            failures.is_empty(),
            "replica {i}: {} of {checks} requests failed, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
    fleet.restart(1);
    assert_eq!(whoami_key(fleet.addr(1), common::KEY).unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_after_pg_restore_ends_every_session_and_audits_each_org() {
    let _serial = SERIAL.lock().await;
    let Some(schema) = schema() else { return };
    let store = schema.connect().await;
    for id in ["acme", "globex"] {
        store.create_org(&org(id)).await.unwrap();
        store
            .commit(
                Generation::new(0),
                &record(id, Some("AbCdEf123456"), 1),
                &event(id, 1),
            )
            .await
            .unwrap();
    }
    for n in 0..3u8 {
        let session = orgkey::store::SessionRecord {
            digest: [n; 32],
            org: org("acme"),
            admin: orgkey::Username::new("admin@acme.example").unwrap(),
            generation: Generation::new(1),
            credential_version: 1,
            created: std::time::SystemTime::now(),
            last_used: std::time::SystemTime::now(),
        };
        store.put_session(&session).await.unwrap();
    }
    assert_eq!(store.load_sessions().await.unwrap().len(), 3);
    // Another master key file: refused before anything changes.
    let stranger = connect(&schema, "stranger", MasterKeys::generate().unwrap()).await;
    assert!(
        stranger.is_err(),
        "a stranger's master key opens the schema"
    );
    assert_eq!(store.restored(&ops()).await.unwrap(), 2);
    assert!(store.load_sessions().await.unwrap().is_empty());
    for id in ["acme", "globex"] {
        let last = &store.audit_page(&org(id), None, 1).await.unwrap()[0];
        assert_eq!(last.event.action, KeyAction::Restore);
        assert_eq!(last.event.actor, ops());
        assert_eq!(last.event.generation, Generation::new(1));
    }
    // The keys are the restored ones, still sealed and still opening.
    let orgs = store.load_orgs().await.unwrap();
    assert!(orgs
        .iter()
        .all(|o| o.key.as_ref().unwrap().expose_secret() == "AbCdEf123456"));
}
