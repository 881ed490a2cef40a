//! [`SqliteStore`]: the embedded default, one file (P3).
//!
//! Opened in WAL mode with `synchronous=FULL`, both asserted at open: a commit that returned is
//! on disk, and survives a crash of the process or the machine. Schema migrations run at open
//! (`PRAGMA user_version`). One connection, used from tokio's blocking pool.
//!
//! The failed-login throttle (A3) lives in the file too (tables `throttle_buckets` and
//! `throttle_known`), so a restart refills nothing. Its writes commit with
//! `synchronous=NORMAL` (the WAL is not fsynced for them): an attempt must not wait for a
//! disk flush, and they survive a crash or restart of the process; an OS crash or power loss
//! may lose the last moments of charges, which only refills those buckets a little early.
//!
//! # One state, one truth (P5)
//!
//! A state file serves one process at a time. [`SqliteStore::open`] takes an exclusive lock on
//! `<file>.lock` beside it (an OS advisory lock, released when the process ends, even by
//! `kill -9`) and holds it while any clone of the store lives; a second process, or a second
//! open in the same process, gets [`StoreError::InUse`] naming the holder's pid, and nothing
//! is opened. Two gateways on one file would otherwise each judge requests by their own
//! memory, and one would go on accepting a key the other had regenerated. Replicas that share
//! state run on PostgreSQL, which has a change feed.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    admin_record, backend, corrupt, from_millis, millis, org_record, sealed_key, session_record,
    AdminRecord, AuditRecord, OrgRecord, SessionRecord, Store, StoreError, StoreFuture,
    ThrottleKeys, ThrottlePolicy, ThrottleVerdict, KNOWN_ADDRESSES_PER_ADMIN,
};
use crate::audit::{AuditEvent, KeyAction};
use crate::identity::Username;
use crate::key::{ApiKey, KeyFormat};
use crate::org::{Actor, Generation, OrgId};
use crate::seal::{sealed_by, sealed_prefix, MasterKeyId, MasterKeys};

/// The schema, one entry per version; `user_version` says how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: orgs and the audit log.
    "CREATE TABLE orgs (
         id            TEXT PRIMARY KEY,
         subscribed    INTEGER NOT NULL,
         api_key       TEXT,
         generation    INTEGER NOT NULL,
         modified_by   TEXT,
         modified_ms   INTEGER
     );
     CREATE TABLE audit (
         seq           INTEGER PRIMARY KEY AUTOINCREMENT,
         org           TEXT NOT NULL,
         actor         TEXT NOT NULL,
         action        TEXT NOT NULL,
         at_ms         INTEGER NOT NULL,
         generation    INTEGER NOT NULL
     );
     CREATE INDEX audit_by_org ON audit (org, seq);",
    // 2: admin accounts.
    "CREATE TABLE admins (
         username            TEXT PRIMARY KEY,
         org                 TEXT NOT NULL,
         enabled             INTEGER NOT NULL,
         scopes              INTEGER NOT NULL,
         password_hash       TEXT NOT NULL,
         credential_version  INTEGER NOT NULL
     );",
    // 3: sessions, by the digest of their id.
    "CREATE TABLE sessions (
         digest              BLOB PRIMARY KEY,
         org                 TEXT NOT NULL,
         admin               TEXT NOT NULL,
         generation          INTEGER NOT NULL,
         credential_version  INTEGER NOT NULL,
         created_ms          INTEGER NOT NULL
     );",
    // 4: the failed-login throttle (A3): buckets by key ('a:<address>', 'u:<username>') as
    // the time each is full again, and the addresses each admin logged in from.
    "CREATE TABLE throttle_buckets (
         key                 TEXT PRIMARY KEY,
         full_at_ms          INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE throttle_known (
         username            TEXT NOT NULL,
         address             TEXT NOT NULL,
         expires_ms          INTEGER NOT NULL,
         PRIMARY KEY (username, address)
     ) WITHOUT ROWID;",
    // 5: keys at rest only sealed (P4): `sealed_key` replaces `api_key`, which `open` empties
    // (sealing the keys a release before P4 wrote, see `seal_plaintext`); `orgkey_meta` holds
    // `scrub_pending` while the old plaintext may still be in free pages.
    "ALTER TABLE orgs ADD COLUMN sealed_key BLOB;
     CREATE TABLE orgkey_meta (
         name                TEXT PRIMARY KEY,
         value               TEXT NOT NULL
     ) WITHOUT ROWID;",
];

/// A [`Store`] in one SQLite file. Cheap to clone (shared connection).
///
/// Opened in WAL mode with `synchronous=FULL`, both asserted: a commit that returned is on
/// disk. One state, one truth (P5): the file serves one process at a time, through an
/// exclusive OS lock on `<file>.lock` held while any clone lives; a second open gets
/// [`StoreError::InUse`] naming the holder's pid. Replicas that share state use PostgreSQL.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    format: KeyFormat,
    /// The master keys that seal and open the stored keys (P4); replaced by
    /// [`SqliteStore::set_master_keys`].
    master: Arc<ArcSwap<MasterKeys>>,
    /// The exclusive lock on `<file>.lock`, held while any clone lives.
    _lock: Arc<std::fs::File>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, for keys of `format`, for this
    /// process alone (P5), its keys sealed and opened with `master` (P4).
    ///
    /// A state written before sealing (schema 4 or older, keys in clear) is sealed here, in
    /// one transaction, and its free pages and write-ahead log are then scrubbed of the old
    /// keys (`secure_delete`, `VACUUM`, a truncating checkpoint; a crash before the scrub
    /// ends is finished by the next open). `secure_delete` stays on.
    ///
    /// # Errors
    ///
    /// [`StoreError::InUse`] if another process (or another open store in this one) holds the
    /// file; [`StoreError::Sealed`] if a stored key was sealed under a master key `master` does
    /// not hold (a wrong master key file; nothing is changed); [`StoreError::Backend`] if the
    /// file or its lock file cannot be opened, WAL or `synchronous=FULL` cannot be set
    /// (asserted by reading them back), or a migration fails.
    pub fn open(
        path: impl AsRef<Path>,
        format: KeyFormat,
        master: MasterKeys,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let lock = lock_exclusively(path)?;
        // A wrong master key file must not change a byte (a read-write open may checkpoint
        // the write-ahead log when it closes): check it read-only first.
        if path.exists() {
            let reader =
                Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .map_err(backend)?;
            let version: i64 = reader
                .query_row("PRAGMA user_version", [], |row| row.get(0))
                .map_err(backend)?;
            if version >= 5 {
                check_master(&reader, &master)?;
            }
        }
        let mut conn = Connection::open(path).map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(backend)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt("SQLite refused WAL journal mode"));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON;",
        )
        .map_err(backend)?;
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .map_err(backend)?;
        if synchronous != 2 {
            return Err(corrupt("SQLite refused synchronous=FULL"));
        }
        migrate(&mut conn)?;
        // The master keys were checked above, under the lock, on every key stored (a state
        // older than schema 5 or a new file holds none yet).
        seal_plaintext(&mut conn, format, &master)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            format,
            master: Arc::new(ArcSwap::from_pointee(master)),
            _lock: Arc::new(lock),
        })
    }

    /// Whether the state at `path` holds keys sealed under some master key (so a new master
    /// key file must not be made for it); `false` for no file, or a state written before
    /// sealing. Reads without taking the state's lock.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if the file exists but cannot be read as an SQLite state.
    pub fn holds_sealed_keys(path: impl AsRef<Path>) -> Result<bool, StoreError> {
        let path = path.as_ref();
        if !path.exists() {
            return Ok(false);
        }
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(backend)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(backend)?;
        if version < 5 {
            return Ok(false);
        }
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM orgs WHERE sealed_key IS NOT NULL)",
            [],
            |row| row.get(0),
        )
        .map_err(backend)
    }

    /// The master keys this store seals and opens with.
    pub fn master_keys(&self) -> Arc<MasterKeys> {
        self.master.load_full()
    }

    /// Writes a consistent copy of the state to `to` with SQLite's online backup, while the
    /// store serves (P4): the copy holds keys sealed as the state does, and is useless
    /// without the master key file. `to` must not exist; it is created owner-only.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if `to` exists or cannot be written.
    pub async fn backup(&self, to: impl AsRef<Path>) -> Result<(), StoreError> {
        let to = to.as_ref().to_owned();
        self.run(move |conn, _| {
            create_owner_only(&to)?;
            let result = (|| {
                let mut copy = Connection::open(&to).map_err(backend)?;
                let backup = rusqlite::backup::Backup::new(conn, &mut copy).map_err(backend)?;
                backup
                    .run_to_completion(256, std::time::Duration::ZERO, None)
                    .map_err(backend)?;
                drop(backup);
                // The copy stands alone: one file, no write-ahead log beside it.
                copy.execute_batch("PRAGMA journal_mode=DELETE;")
                    .map_err(backend)?;
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&to);
            }
            result
        })
        .await
    }

    /// Replaces this store's state with the backup at `from` (P4), as one transaction: the
    /// backup's keys are current again. Before anything changes, every key in the backup must
    /// open with this store's master keys. Every session is ended (a session younger than
    /// the backup must not outlive the keys it was born under, and an old one must not come
    /// back), and each org gets a `restore` audit record by `actor`. Returns the orgs
    /// restored. The state must then be loaded again (a gateway restarts).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sealed`] if a key in the backup does not open (a backup of another
    /// state, or a master key file without its key); [`StoreError::Backend`] if `from`
    /// is not an orgkey state or cannot be read.
    pub async fn restore(&self, from: impl AsRef<Path>, actor: Actor) -> Result<u64, StoreError> {
        let from = from.as_ref().to_owned();
        let master = self.master.load_full();
        self.run(move |conn, format| restore_from(conn, format, &master, &from, &actor))
            .await
    }

    /// Runs `f` with the connection on tokio's blocking pool (inline without a runtime).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, KeyFormat) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let conn = Arc::clone(&self.conn);
        let format = self.format;
        let job = move || {
            let mut conn = conn
                .lock()
                .map_err(|_| corrupt("SQLite connection lock poisoned"))?;
            f(&mut conn, format)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Box::pin(async move {
                runtime
                    .spawn_blocking(job)
                    .await
                    .map_err(|_| corrupt("SQLite task panicked"))?
            }),
            Err(_) => Box::pin(std::future::ready(job())),
        }
    }

    /// Runs SQLite's integrity check; `Ok(true)` if the database is sound.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if the check cannot run.
    pub async fn integrity_check(&self) -> Result<bool, StoreError> {
        self.run(|conn, _| {
            let result: String = conn
                .query_row("PRAGMA integrity_check", [], |row| row.get(0))
                .map_err(backend)?;
            Ok(result == "ok")
        })
        .await
    }
}

/// Takes the exclusive lock of the state at `path` (`<path>.lock`), writing this process's
/// id into the lock file for the message a second process gets.
fn lock_exclusively(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&name)
        .map_err(backend)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StoreError::InUse {
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(error)) => return Err(backend(error)),
    }
    // Best effort: the pid only improves the message.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(backend)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(corrupt(
            "the database was written by a newer orgkey (unknown schema version)",
        ));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
}

/// Runs `f` in an immediate transaction committed with `synchronous=NORMAL` (not fsynced:
/// for the throttle's writes, see the module docs), then puts `synchronous=FULL` back.
fn relaxed_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(backend)?;
    let result = (|| {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let value = f(&tx)?;
        tx.commit().map_err(backend)?;
        Ok(value)
    })();
    // Every other write must stay durable when it returns (P1): if FULL cannot be put back,
    // the connection is not to be trusted.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    result
}

/// A throttle bucket's `full_at_ms`, if it has a row.
fn bucket_full_at(tx: &rusqlite::Transaction<'_>, key: &str) -> Result<Option<u64>, StoreError> {
    let full_at: Option<i64> = tx
        .prepare_cached("SELECT full_at_ms FROM throttle_buckets WHERE key = ?1")
        .and_then(|mut s| s.query_row(params![key], |row| row.get(0)).optional())
        .map_err(backend)?;
    full_at
        .map(|t| u64::try_from(t).map_err(|_| corrupt("stored throttle time is negative")))
        .transpose()
}

fn put_bucket(tx: &rusqlite::Transaction<'_>, key: &str, full_at: u64) -> Result<(), StoreError> {
    let full_at = i64::try_from(full_at).map_err(|_| corrupt("throttle time out of range"))?;
    tx.prepare_cached(
        "INSERT INTO throttle_buckets (key, full_at_ms) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET full_at_ms = excluded.full_at_ms",
    )
    .and_then(|mut s| s.execute(params![key, full_at]))
    .map_err(backend)?;
    Ok(())
}

fn ms(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| corrupt("throttle time out of range"))
}

fn org_from_row(
    row: &rusqlite::Row<'_>,
    format: KeyFormat,
    master: &MasterKeys,
) -> Result<OrgRecord, StoreError> {
    let id: String = row.get(0).map_err(backend)?;
    let sealed: Option<Vec<u8>> = row.get(2).map_err(backend)?;
    let by: Option<String> = row.get(4).map_err(backend)?;
    org_record(
        &id,
        row.get(1).map_err(backend)?,
        sealed.as_deref(),
        row.get(3).map_err(backend)?,
        by.as_deref(),
        row.get(5).map_err(backend)?,
        format,
        master,
    )
}

/// Every org, its key opened.
fn load_all(
    conn: &Connection,
    format: KeyFormat,
    master: &MasterKeys,
) -> Result<Vec<OrgRecord>, StoreError> {
    let mut statement = conn
        .prepare(
            "SELECT id, subscribed, sealed_key, generation, modified_by, modified_ms
             FROM orgs ORDER BY id",
        )
        .map_err(backend)?;
    let mut rows = statement.query([]).map_err(backend)?;
    let mut orgs = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        orgs.push(org_from_row(row, format, master)?);
    }
    Ok(orgs)
}

/// The master keys that seal at least one stored key.
fn keys_in_use(conn: &Connection) -> Result<Vec<MasterKeyId>, StoreError> {
    let mut statement = conn
        .prepare("SELECT DISTINCT substr(sealed_key, 1, 9) FROM orgs WHERE sealed_key IS NOT NULL")
        .map_err(backend)?;
    let mut rows = statement.query([]).map_err(backend)?;
    let mut ids = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        let head: Vec<u8> = row.get(0).map_err(backend)?;
        ids.push(sealed_by(&head).ok_or_else(|| corrupt("a stored key is not a sealed value"))?);
    }
    Ok(ids)
}

/// Fails with [`StoreError::Sealed`] if a stored key was sealed under a key `master` lacks
/// (before anything is written: a wrong master key file changes nothing).
fn check_master(conn: &Connection, master: &MasterKeys) -> Result<(), StoreError> {
    let mut statement = conn
        .prepare(
            "SELECT id, sealed_key FROM orgs WHERE sealed_key IS NOT NULL
             AND substr(sealed_key, 1, 9) = ?1 LIMIT 1",
        )
        .map_err(backend)?;
    for id in keys_in_use(conn)? {
        if master.contains(id) {
            continue;
        }
        let org: String = statement
            .query_row(params![sealed_prefix(id).to_vec()], |row| row.get(0))
            .map_err(backend)?;
        return Err(StoreError::Sealed {
            org: OrgId::new(&org).map_err(|_| corrupt("stored org id is invalid"))?,
            error: crate::seal::SealError::UnknownMasterKey(id),
            file: master.describe(),
        });
    }
    Ok(())
}

/// Seals the keys a release before P4 stored in clear (migration 5), in one transaction, then
/// scrubs the old bytes from free pages and the write-ahead log; `scrub_pending` makes a
/// crash before the scrub ends finish it at the next open.
fn seal_plaintext(
    conn: &mut Connection,
    format: KeyFormat,
    master: &MasterKeys,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let mut plain: Vec<(String, String, i64)> = {
        let mut statement = tx
            .prepare("SELECT id, api_key, generation FROM orgs WHERE api_key IS NOT NULL")
            .map_err(backend)?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    for (id, key, generation) in &plain {
        let org = OrgId::new(id).map_err(|_| corrupt("stored org id is invalid"))?;
        let key = ApiKey::parse_with(key, format)
            .map_err(|_| corrupt("a stored clear key does not match the key format"))?;
        let generation = Generation::new(
            u64::try_from(*generation).map_err(|_| corrupt("stored generation is negative"))?,
        );
        let sealed = master.seal(&org, generation, &key).map_err(backend)?;
        tx.execute(
            "UPDATE orgs SET sealed_key = ?2, api_key = NULL WHERE id = ?1",
            params![id, sealed],
        )
        .map_err(backend)?;
    }
    if !plain.is_empty() {
        tx.execute(
            "INSERT INTO orgkey_meta (name, value) VALUES ('scrub_pending', '1')
             ON CONFLICT (name) DO UPDATE SET value = '1'",
            [],
        )
        .map_err(backend)?;
    }
    let sealed = plain.len();
    for (_, key, _) in &mut plain {
        zeroize::Zeroize::zeroize(key);
    }
    tx.commit().map_err(backend)?;
    let pending: Option<String> = conn
        .query_row(
            "SELECT value FROM orgkey_meta WHERE name = 'scrub_pending'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(backend)?;
    if pending.is_some() {
        // VACUUM rewrites every page (free pages and slack included) and the truncating
        // checkpoint moves it into the file and empties the log.
        conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(backend)?;
        conn.execute("DELETE FROM orgkey_meta WHERE name = 'scrub_pending'", [])
            .map_err(backend)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(backend)?;
        tracing::info!(
            target: "orgkey::store::sqlite",
            sealed,
            "keys written before sealing (P4) are sealed; old bytes scrubbed"
        );
    }
    Ok(())
}

/// Rows per transaction when sealing again.
const RESEAL_BATCH: usize = 1000;

fn reseal_all(
    conn: &mut Connection,
    format: KeyFormat,
    master: &MasterKeys,
) -> Result<u64, StoreError> {
    let head = sealed_prefix(master.current()).to_vec();
    let mut done = 0u64;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let rows: Vec<(String, Vec<u8>, i64)> = {
            let mut statement = tx
                .prepare_cached(
                    "SELECT id, sealed_key, generation FROM orgs
                     WHERE sealed_key IS NOT NULL AND substr(sealed_key, 1, 9) <> ?1
                     ORDER BY id LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map(params![head, RESEAL_BATCH as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)?
        };
        if rows.is_empty() {
            return Ok(done);
        }
        for (id, sealed, generation) in &rows {
            let org = OrgId::new(id).map_err(|_| corrupt("stored org id is invalid"))?;
            let generation = Generation::new(
                u64::try_from(*generation).map_err(|_| corrupt("stored generation is negative"))?,
            );
            let key = master
                .open(&org, generation, sealed, format)
                .map_err(|error| StoreError::Sealed {
                    org: org.clone(),
                    error,
                    file: master.describe(),
                })?;
            let again = master.seal(&org, generation, &key).map_err(backend)?;
            tx.execute(
                "UPDATE orgs SET sealed_key = ?2 WHERE id = ?1",
                params![id, again],
            )
            .map_err(backend)?;
            done += 1;
        }
        tx.commit().map_err(backend)?;
    }
}

/// Creates `path` empty and owner-only; an existing file is an error.
fn create_owner_only(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(drop).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            corrupt("the backup file already exists (it is never overwritten)")
        } else {
            backend(e)
        }
    })
}

fn restore_from(
    conn: &mut Connection,
    format: KeyFormat,
    master: &MasterKeys,
    from: &Path,
    actor: &Actor,
) -> Result<u64, StoreError> {
    // Prepare the restored state in memory: check it, end its sessions, audit; then copy it
    // over the state in one step (SQLite's backup writes the destination as one transaction).
    let source = Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(backend)?;
    let mut staged = Connection::open_in_memory().map_err(backend)?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut staged).map_err(backend)?;
        backup
            .run_to_completion(256, std::time::Duration::ZERO, None)
            .map_err(backend)?;
    }
    drop(source);
    let version: i64 = staged
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|_| corrupt("the backup is not an orgkey state"))?;
    if version < 1 || version > MIGRATIONS.len() as i64 {
        return Err(corrupt(
            "the backup is not an orgkey state this release can read",
        ));
    }
    migrate(&mut staged)?;
    check_master(&staged, master)?;
    seal_plaintext(&mut staged, format, master)?;
    let orgs = load_all(&staged, format, master)?;
    let now = millis(std::time::SystemTime::now());
    let tx = staged.transaction().map_err(backend)?;
    tx.execute("DELETE FROM sessions", []).map_err(backend)?;
    for org in &orgs {
        tx.execute(
            "INSERT INTO audit (org, actor, action, at_ms, generation)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                org.org.as_str(),
                actor.as_str(),
                KeyAction::Restore.as_str(),
                now,
                org.generation.get() as i64,
            ],
        )
        .map_err(backend)?;
    }
    tx.commit().map_err(backend)?;
    let backup = rusqlite::backup::Backup::new(&staged, conn).map_err(backend)?;
    backup
        .run_to_completion(256, std::time::Duration::ZERO, None)
        .map_err(backend)?;
    drop(backup);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(backend)?;
    Ok(orgs.len() as u64)
}

impl Store for SqliteStore {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        let master = self.master.load_full();
        self.run(move |conn, format| load_all(conn, format, &master))
    }

    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        let id = org.as_str().to_owned();
        self.run(move |conn, _| {
            let inserted = conn
                .execute(
                    "INSERT INTO orgs (id, subscribed, generation) VALUES (?1, 0, 0)
                     ON CONFLICT (id) DO NOTHING",
                    params![id],
                )
                .map_err(backend)?;
            if inserted == 0 {
                Err(StoreError::Exists)
            } else {
                Ok(())
            }
        })
    }

    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()> {
        let master = self.master.load_full();
        let sealed = sealed_key(&master, master.current(), next);
        let next = next.clone();
        let audit = audit.clone();
        self.run(move |conn, _| {
            let sealed = sealed?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let stored: Option<i64> = tx
                .query_row(
                    "SELECT generation FROM orgs WHERE id = ?1",
                    params![next.org.as_str()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            match stored {
                None => return Err(StoreError::NotFound),
                Some(g) if g as u64 != expected.get() => return Err(StoreError::Conflict),
                Some(_) => {}
            }
            tx.execute(
                "UPDATE orgs SET subscribed = ?2, sealed_key = ?3, generation = ?4,
                     modified_by = ?5, modified_ms = ?6, api_key = NULL
                 WHERE id = ?1",
                params![
                    next.org.as_str(),
                    next.subscribed,
                    sealed,
                    next.generation.get() as i64,
                    next.last_modified_by.as_ref().map(Actor::as_str),
                    next.last_modified_on.map(millis),
                ],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO audit (org, actor, action, at_ms, generation)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    audit.org.as_str(),
                    audit.actor.as_str(),
                    audit.action.as_str(),
                    millis(audit.at),
                    audit.generation.get() as i64,
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
    }

    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        let id = org.as_str().to_owned();
        self.run(move |conn, _| {
            let mut statement = conn
                .prepare(
                    "SELECT seq, actor, action, at_ms, generation FROM audit
                     WHERE org = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                )
                .map_err(backend)?;
            let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let mut rows = statement
                .query(params![id, before, i64::from(limit)])
                .map_err(backend)?;
            let org = OrgId::new(&id).map_err(|_| corrupt("org id"))?;
            let mut page = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                let seq: i64 = row.get(0).map_err(backend)?;
                let actor: String = row.get(1).map_err(backend)?;
                let action: String = row.get(2).map_err(backend)?;
                let at: i64 = row.get(3).map_err(backend)?;
                let generation: i64 = row.get(4).map_err(backend)?;
                page.push(AuditRecord {
                    seq: seq as u64,
                    event: AuditEvent {
                        org: org.clone(),
                        actor: Actor::new(&actor).map_err(|_| corrupt("stored actor"))?,
                        action: KeyAction::from_name(&action)
                            .ok_or_else(|| corrupt("stored action"))?,
                        at: from_millis(at),
                        generation: Generation::new(generation as u64),
                    },
                });
            }
            Ok(page)
        })
    }

    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        self.run(|conn, _| {
            let mut statement = conn
                .prepare(
                    "SELECT username, org, enabled, scopes, password_hash, credential_version
                     FROM admins ORDER BY username",
                )
                .map_err(backend)?;
            let mut rows = statement.query([]).map_err(backend)?;
            let mut admins = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                let username: String = row.get(0).map_err(backend)?;
                let org: String = row.get(1).map_err(backend)?;
                admins.push(admin_record(
                    &username,
                    &org,
                    row.get(2).map_err(backend)?,
                    row.get(3).map_err(backend)?,
                    row.get(4).map_err(backend)?,
                    row.get(5).map_err(backend)?,
                )?);
            }
            Ok(admins)
        })
    }

    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        let admin = admin.clone();
        self.run(move |conn, _| {
            conn.execute(
                "INSERT INTO admins (username, org, enabled, scopes, password_hash,
                     credential_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (username) DO UPDATE SET org = ?2, enabled = ?3, scopes = ?4,
                     password_hash = ?5, credential_version = ?6",
                params![
                    admin.username.as_str(),
                    admin.org.as_str(),
                    admin.enabled,
                    i64::from(admin.scopes.bits()),
                    admin.password_hash,
                    admin.credential_version as i64,
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        let name = username.as_str().to_owned();
        self.run(move |conn, _| {
            let deleted = conn
                .execute("DELETE FROM admins WHERE username = ?1", params![name])
                .map_err(backend)?;
            if deleted == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
    }

    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        self.run(|conn, _| {
            let mut statement = conn
                .prepare(
                    "SELECT digest, org, admin, generation, credential_version, created_ms
                     FROM sessions",
                )
                .map_err(backend)?;
            let mut rows = statement.query([]).map_err(backend)?;
            let mut sessions = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                let org: String = row.get(1).map_err(backend)?;
                let admin: String = row.get(2).map_err(backend)?;
                sessions.push(session_record(
                    row.get(0).map_err(backend)?,
                    &org,
                    &admin,
                    row.get(3).map_err(backend)?,
                    row.get(4).map_err(backend)?,
                    row.get(5).map_err(backend)?,
                    None,
                )?);
            }
            Ok(sessions)
        })
    }

    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        let session = session.clone();
        self.run(move |conn, _| {
            conn.execute(
                "INSERT OR REPLACE INTO sessions
                     (digest, org, admin, generation, credential_version, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &session.digest[..],
                    session.org.as_str(),
                    session.admin.as_str(),
                    session.generation.get() as i64,
                    session.credential_version as i64,
                    millis(session.created),
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        let digest = *digest;
        self.run(move |conn, _| {
            conn.execute(
                "DELETE FROM sessions WHERE digest = ?1",
                params![&digest[..]],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn throttle_take<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ThrottleVerdict> {
        let (keys, address, username) = (
            keys.clone(),
            policy.address_bucket(),
            policy.username_bucket(),
        );
        // One connection, one process (P5): the transaction makes the check and both charges
        // one atomic write.
        self.run(move |conn, _| {
            let now = ms(now_ms)?;
            relaxed_transaction(conn, |tx| {
                let address_key = format!("a:{}", keys.address());
                let address_next = match address.take(bucket_full_at(tx, &address_key)?, now_ms) {
                    Ok(next) => next,
                    Err(ms) => return Ok(ThrottleVerdict::Wait { ms }),
                };
                let known: bool = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM throttle_known
                             WHERE username = ?1 AND address = ?2 AND expires_ms > ?3)",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![keys.username(), keys.address(), now], |row| {
                            row.get(0)
                        })
                    })
                    .map_err(backend)?;
                if !known {
                    let username_key = format!("u:{}", keys.username());
                    match username.take(bucket_full_at(tx, &username_key)?, now_ms) {
                        Ok(next) => put_bucket(tx, &username_key, next)?,
                        Err(ms) => return Ok(ThrottleVerdict::Wait { ms }),
                    }
                }
                put_bucket(tx, &address_key, address_next)?;
                Ok(ThrottleVerdict::Charged {
                    username_charged: !known,
                })
            })
        })
    }

    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let (keys, address, username) = (
            keys.clone(),
            policy.address_bucket(),
            policy.username_bucket(),
        );
        let until = now_ms.saturating_add(policy.known_address_ttl_ms());
        self.run(move |conn, _| {
            let (now, until) = (ms(now_ms)?, ms(until)?);
            let refills = (ms(address.refill_ms)?, ms(username.refill_ms)?);
            relaxed_transaction(conn, |tx| {
                let refund = "UPDATE throttle_buckets SET full_at_ms = max(full_at_ms - ?2, ?3)
                              WHERE key = ?1";
                tx.prepare_cached(refund)
                    .and_then(|mut s| {
                        s.execute(params![format!("a:{}", keys.address()), refills.0, now])
                    })
                    .map_err(backend)?;
                if username_charged {
                    tx.prepare_cached(refund)
                        .and_then(|mut s| {
                            s.execute(params![format!("u:{}", keys.username()), refills.1, now])
                        })
                        .map_err(backend)?;
                }
                tx.prepare_cached(
                    "INSERT INTO throttle_known (username, address, expires_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (username, address)
                     DO UPDATE SET expires_ms = max(expires_ms, excluded.expires_ms)",
                )
                .and_then(|mut s| s.execute(params![keys.username(), keys.address(), until]))
                .map_err(backend)?;
                tx.prepare_cached(
                    "DELETE FROM throttle_known WHERE username = ?1 AND address NOT IN (
                         SELECT address FROM throttle_known WHERE username = ?1
                         ORDER BY expires_ms DESC, address LIMIT ?2)",
                )
                .and_then(|mut s| {
                    s.execute(params![keys.username(), KNOWN_ADDRESSES_PER_ADMIN as i64])
                })
                .map_err(backend)?;
                Ok(())
            })
        })
    }

    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        self.run(move |conn, _| {
            let now = ms(now_ms)?;
            relaxed_transaction(conn, |tx| {
                let buckets = tx
                    .execute(
                        "DELETE FROM throttle_buckets WHERE full_at_ms <= ?1",
                        params![now],
                    )
                    .map_err(backend)?;
                let known = tx
                    .execute(
                        "DELETE FROM throttle_known WHERE expires_ms <= ?1",
                        params![now],
                    )
                    .map_err(backend)?;
                Ok((buckets + known) as u64)
            })
        })
    }

    fn master_keys_in_use(&self) -> StoreFuture<'_, Vec<MasterKeyId>> {
        self.run(|conn, _| keys_in_use(conn))
    }

    fn set_master_keys(&self, master: MasterKeys) -> StoreFuture<'_, ()> {
        let master = Arc::new(master);
        let swap = Arc::clone(&self.master);
        // Under the connection's lock: no commit seals under the old keys in between.
        self.run(move |conn, _| {
            check_master(conn, &master)?;
            swap.store(master);
            Ok(())
        })
    }

    /// Batches of 1,000 rows, one transaction each (see [`Store::reseal`]).
    fn reseal(&self) -> StoreFuture<'_, u64> {
        let master = self.master.load_full();
        self.run(move |conn, format| reseal_all(conn, format, &master))
    }
}
