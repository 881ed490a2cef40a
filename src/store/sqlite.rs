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

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    admin_record, backend, corrupt, from_millis, millis, org_record, session_record, AdminRecord,
    AuditRecord, OrgRecord, SessionRecord, Store, StoreError, StoreFuture, ThrottleKeys,
    ThrottlePolicy, ThrottleVerdict, KNOWN_ADDRESSES_PER_ADMIN,
};
use crate::audit::{AuditEvent, KeyAction};
use crate::identity::Username;
use crate::key::{ApiKey, KeyFormat};
use crate::org::{Actor, Generation, OrgId};

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
    /// process alone (P5).
    ///
    /// # Errors
    ///
    /// [`StoreError::InUse`] if another process (or another open store in this one) holds the
    /// file; [`StoreError::Backend`] if the file or its lock file cannot be opened, WAL or
    /// `synchronous=FULL` cannot be set (asserted by reading them back), or a migration fails.
    pub fn open(path: impl AsRef<Path>, format: KeyFormat) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let lock = lock_exclusively(path)?;
        let mut conn = Connection::open(path).map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(backend)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt("SQLite refused WAL journal mode"));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(backend)?;
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .map_err(backend)?;
        if synchronous != 2 {
            return Err(corrupt("SQLite refused synchronous=FULL"));
        }
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            format,
            _lock: Arc::new(lock),
        })
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

fn org_from_row(row: &rusqlite::Row<'_>, format: KeyFormat) -> Result<OrgRecord, StoreError> {
    let id: String = row.get(0).map_err(backend)?;
    let key: Option<String> = row.get(2).map_err(backend)?;
    let by: Option<String> = row.get(4).map_err(backend)?;
    org_record(
        &id,
        row.get(1).map_err(backend)?,
        key.as_deref(),
        row.get(3).map_err(backend)?,
        by.as_deref(),
        row.get(5).map_err(backend)?,
        format,
    )
}

impl Store for SqliteStore {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        self.run(|conn, format| {
            let mut statement = conn
                .prepare(
                    "SELECT id, subscribed, api_key, generation, modified_by, modified_ms
                     FROM orgs ORDER BY id",
                )
                .map_err(backend)?;
            let mut rows = statement.query([]).map_err(backend)?;
            let mut orgs = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                orgs.push(org_from_row(row, format)?);
            }
            Ok(orgs)
        })
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
        let next = next.clone();
        let audit = audit.clone();
        self.run(move |conn, _| {
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
                "UPDATE orgs SET subscribed = ?2, api_key = ?3, generation = ?4,
                     modified_by = ?5, modified_ms = ?6
                 WHERE id = ?1",
                params![
                    next.org.as_str(),
                    next.subscribed,
                    next.key.as_ref().map(ApiKey::expose_secret),
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
}
