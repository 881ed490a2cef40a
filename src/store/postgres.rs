//! [`PostgresStore`]: one PostgreSQL database shared by a fleet of replicas (P3, F1). The
//! public documentation is on the type (this module is private).

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::{
    admin_record, backend, corrupt, from_millis, millis, org_record, session_record, AdminRecord,
    AuditRecord, ChangeFollower, OrgRecord, SessionRecord, Store, StoreError, StoreFuture,
    ThrottleKeys, ThrottlePolicy, ThrottleVerdict, KNOWN_ADDRESSES_PER_ADMIN,
};
use crate::audit::{AuditEvent, KeyAction};
use crate::identity::Username;
use crate::key::{ApiKey, KeyFormat};
use crate::org::{Actor, Generation, OrgId};
use crate::table::{OrgState, OrgTable};
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// The schema, one entry per version; `orgkey_schema_version` has one row per entry that ran.
const MIGRATIONS: &[&str] = &[
    // 1: orgs and the audit log.
    "CREATE TABLE orgs (
         id            TEXT PRIMARY KEY,
         subscribed    BOOLEAN NOT NULL,
         api_key       TEXT,
         generation    BIGINT NOT NULL,
         modified_by   TEXT,
         modified_ms   BIGINT
     );
     CREATE TABLE audit (
         seq           BIGSERIAL PRIMARY KEY,
         org           TEXT NOT NULL,
         actor         TEXT NOT NULL,
         action        TEXT NOT NULL,
         at_ms         BIGINT NOT NULL,
         generation    BIGINT NOT NULL
     );
     CREATE INDEX audit_by_org ON audit (org, seq);",
    // 2: admin accounts.
    "CREATE TABLE admins (
         username            TEXT PRIMARY KEY,
         org                 TEXT NOT NULL,
         enabled             BOOLEAN NOT NULL,
         scopes              SMALLINT NOT NULL,
         password_hash       TEXT NOT NULL,
         credential_version  BIGINT NOT NULL
     );",
    // 3: sessions, by the digest of their id.
    "CREATE TABLE sessions (
         digest              BYTEA PRIMARY KEY,
         org                 TEXT NOT NULL,
         admin               TEXT NOT NULL,
         generation          BIGINT NOT NULL,
         credential_version  BIGINT NOT NULL,
         created_ms          BIGINT NOT NULL
     );",
    // 4: the failed-login throttle (A3, F2): buckets by key ('a:<address>', 'u:<username>')
    // as the time each is full again, the addresses each admin logged in from, and the two
    // functions that change them, each in one statement (one round trip), atomically across
    // replicas (see `PostgresStore`'s docs).
    "CREATE TABLE throttle_buckets (
         key                 TEXT PRIMARY KEY,
         full_at_ms          BIGINT NOT NULL
     );
     CREATE TABLE throttle_known (
         username            TEXT NOT NULL,
         address             TEXT NOT NULL,
         expires_ms          BIGINT NOT NULL,
         PRIMARY KEY (username, address)
     );
     -- Serializes every take and success that touches this address or this username, in
     -- every replica, until the caller's transaction ends. Transaction-level advisory locks,
     -- because a bucket that has no row yet has nothing to lock; taken in ascending order,
     -- so two callers never wait for each other in a cycle.
     CREATE FUNCTION throttle_lock(p_address TEXT, p_username TEXT) RETURNS VOID
     LANGUAGE plpgsql AS $$
     DECLARE
         a BIGINT := hashtextextended(current_schema() || ' a:' || p_address, 0);
         u BIGINT := hashtextextended(current_schema() || ' u:' || p_username, 0);
     BEGIN
         PERFORM pg_advisory_xact_lock(LEAST(a, u));
         PERFORM pg_advisory_xact_lock(GREATEST(a, u));
         -- The throttle's commits do not wait for the WAL to reach the disk (an attempt must
         -- not wait for a flush): other replicas see them at once all the same; a crash of
         -- the database server may lose the last fraction of a second of charges.
         SET LOCAL synchronous_commit = off;
     END $$;
     -- Store::throttle_take. Under the locks each statement reads the latest committed state
     -- (a volatile function takes a fresh snapshot per statement): check the address bucket,
     -- then (unless the address is known for the username) the username bucket, and charge
     -- both or neither. The arithmetic is ThrottleBucket's; the capacities come from it.
     CREATE FUNCTION throttle_take(
         p_address TEXT, p_username TEXT, p_now BIGINT,
         p_address_refill BIGINT, p_address_capacity BIGINT,
         p_username_refill BIGINT, p_username_capacity BIGINT
     ) RETURNS TABLE (wait_for_ms BIGINT, charged_username BOOLEAN)
     LANGUAGE plpgsql AS $$
     DECLARE
         a_next BIGINT;
         u_next BIGINT;
         is_known BOOLEAN;
     BEGIN
         PERFORM throttle_lock(p_address, p_username);
         SELECT GREATEST(b.full_at_ms, p_now) + p_address_refill INTO a_next
             FROM throttle_buckets b WHERE b.key = 'a:' || p_address;
         a_next := COALESCE(a_next, p_now + p_address_refill);
         IF a_next - p_now > p_address_capacity THEN
             RETURN QUERY SELECT a_next - p_now - p_address_capacity, FALSE;
             RETURN;
         END IF;
         SELECT EXISTS (SELECT 1 FROM throttle_known k
                 WHERE k.username = p_username AND k.address = p_address
                   AND k.expires_ms > p_now)
             INTO is_known;
         IF NOT is_known THEN
             SELECT GREATEST(b.full_at_ms, p_now) + p_username_refill INTO u_next
                 FROM throttle_buckets b WHERE b.key = 'u:' || p_username;
             u_next := COALESCE(u_next, p_now + p_username_refill);
             IF u_next - p_now > p_username_capacity THEN
                 RETURN QUERY SELECT u_next - p_now - p_username_capacity, FALSE;
                 RETURN;
             END IF;
             INSERT INTO throttle_buckets AS b (key, full_at_ms) VALUES ('u:' || p_username, u_next)
                 ON CONFLICT (key) DO UPDATE SET full_at_ms = EXCLUDED.full_at_ms;
         END IF;
         INSERT INTO throttle_buckets AS b (key, full_at_ms) VALUES ('a:' || p_address, a_next)
             ON CONFLICT (key) DO UPDATE SET full_at_ms = EXCLUDED.full_at_ms;
         RETURN QUERY SELECT 0::BIGINT, NOT is_known;
     END $$;
     -- Store::throttle_succeeded: refund, remember the address, keep the newest p_known_max.
     CREATE FUNCTION throttle_succeeded(
         p_address TEXT, p_username TEXT, p_now BIGINT,
         p_address_refill BIGINT, p_username_refill BIGINT, p_username_charged BOOLEAN,
         p_known_until BIGINT, p_known_max BIGINT
     ) RETURNS VOID
     LANGUAGE plpgsql AS $$
     BEGIN
         PERFORM throttle_lock(p_address, p_username);
         UPDATE throttle_buckets b SET full_at_ms = GREATEST(b.full_at_ms - p_address_refill, p_now)
             WHERE b.key = 'a:' || p_address;
         IF p_username_charged THEN
             UPDATE throttle_buckets b
                 SET full_at_ms = GREATEST(b.full_at_ms - p_username_refill, p_now)
                 WHERE b.key = 'u:' || p_username;
         END IF;
         INSERT INTO throttle_known AS k (username, address, expires_ms)
             VALUES (p_username, p_address, p_known_until)
             ON CONFLICT (username, address)
             DO UPDATE SET expires_ms = GREATEST(k.expires_ms, EXCLUDED.expires_ms);
         DELETE FROM throttle_known k WHERE k.username = p_username AND k.address NOT IN (
             SELECT n.address FROM throttle_known n WHERE n.username = p_username
             ORDER BY n.expires_ms DESC, n.address LIMIT p_known_max);
     END $$;",
];

/// The first key of the advisory lock that serializes migrations (`orgk`); the second key is
/// a hash of the schema name.
const MIGRATION_LOCK: i32 = 0x6f72_676b;

/// The longest schema name PostgreSQL keeps whole (`NAMEDATALEN - 1`).
const MAX_SCHEMA_LEN: usize = 63;

/// A [`Store`] in one schema of a PostgreSQL database, for a fleet of replicas sharing it
/// (P3, F1). Cheap to clone (shared connection).
///
/// The store keeps everything in one schema of the database, named at
/// [`PostgresStore::connect`]: the tables `orgs` and `audit` (as in the SQLite store: keys as `TEXT`, times as `BIGINT`
/// milliseconds since the Unix epoch) and `orgkey_schema_version`, which records the
/// migrations that ran. Migrations run at connect, in one transaction, under an advisory lock,
/// so replicas starting together do not race.
///
/// # Concurrency
///
/// [`Store::commit`] is a transaction: `SELECT generation ... FOR UPDATE` locks the org's row,
/// the generation is compared, then the row is updated and the audit record inserted, then
/// `COMMIT`. Two writers racing on one org, through one store or through two processes,
/// queue on the row lock; the second one reads the first one's committed generation and gets
/// [`StoreError::Conflict`]. A commit waits at most 5 seconds for the lock (`lock_timeout`),
/// then fails with [`StoreError::Backend`].
///
/// One store holds one connection. Statements that are not in a transaction are pipelined on
/// it; a transaction takes the connection for itself (a statement sent on a connection while
/// it is in a transaction would run inside that transaction). If the connection is lost, the
/// calls in flight fail with [`StoreError::Backend`] and the next call reconnects. A commit
/// whose connection is lost while `COMMIT` is in flight is in doubt: it fails with
/// [`StoreError::Backend`] but may have been written, so reload before retrying it.
///
/// # The failed-login throttle (A3, F2)
///
/// The throttle's buckets and known addresses are the tables `throttle_buckets` and
/// `throttle_known`, shared by every replica. [`Store::throttle_take`] and
/// [`Store::throttle_succeeded`] are one statement each (one round trip), a call of a
/// PL/pgSQL function the migrations create: it takes transaction-level advisory locks on the
/// address and the username (hashed with the schema name; in ascending order, so never a
/// deadlock), then reads and writes the two buckets, and the locks go at its commit. So
/// attempts on any number of replicas queue per address and username and never take more
/// tokens than there are. A lock is waited for at most 5 seconds (`lock_timeout`), then the
/// call fails (and the login fails closed). These commits do not wait for the WAL flush
/// (`synchronous_commit = off` for their transaction only): other replicas see them at once
/// all the same, and a crash of the database server may lose the last fraction of a second
/// of charges. Measured on loopback: about 0.25 ms a call, against 0.13 ms for a bare
/// `SELECT 1` (argon2 takes about 18 ms). Times are the callers' clocks: keep the replicas'
/// clocks in sync (NTP). Rows that no longer matter (full buckets, expired known addresses)
/// are deleted by [`Store::throttle_collect`].
///
/// # Deployment notes
///
/// - The connection is not encrypted (no TLS connector is built in): reach the server over
///   loopback, a Unix socket (`host=/var/run/postgresql`) or a trusted network.
/// - The connection keeps session state (`search_path`, prepared statements): point it at
///   PostgreSQL or at a session-mode pooler, not at a transaction-mode pooler.
/// - Keys are stored as they are: protect the database like the keys themselves.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    schema: String,
    format: KeyFormat,
    conn: RwLock<Conn>,
}

/// The notification channel of a schema (at most 63 bytes, as PostgreSQL identifiers).
fn channel(schema: &str) -> String {
    let mut name = format!("orgkey_{schema}");
    name.truncate(MAX_SCHEMA_LEN);
    name
}

fn state_of(record: OrgRecord) -> (OrgId, OrgState) {
    (
        record.org,
        OrgState::from_record(
            record.subscribed,
            record.key,
            record.generation,
            record.last_modified_by,
            record.last_modified_on,
        ),
    )
}

/// How often a follower sends itself a heartbeat through the database (F3).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A follower that has heard nothing of its own heartbeats for this long stops vouching for
/// its table (fails closed) and reconnects. Checked at every heartbeat, so a stall is
/// detected within this plus one [`HEARTBEAT_INTERVAL`] (1.25 s), inside DESIGN.md's bound of
/// 2 s for a stalled, half-open or silently dropped feed.
pub const STALL_BOUND: Duration = Duration::from_millis(1000);
/// A connection that followed for this long is healthy: the next failure starts the
/// reconnect back-off from the beginning again.
const HEALTHY_PERIOD: Duration = Duration::from_secs(5);

/// The payload prefix of heartbeats; a change is `org:generation` and org ids have no `~`.
const HEARTBEAT_PREFIX: &str = "~hb:";

/// One life of the follower's connection: LISTEN, reload everything, then apply each change
/// until the connection fails or its heartbeats stop coming back (F3).
///
/// The heartbeat goes out through the store's other connection (`pg_notify` on this schema's
/// channel) and must come back on this one: a LISTEN backend that is stopped, a half-open
/// connection, or a pooler that silently drops LISTEN (PgBouncer in transaction mode) all
/// stop it, and within [`STALL_BOUND`] the table is no longer trusted.
async fn follow_once(store: &PostgresStore, table: &OrgTable) -> Result<(), StoreError> {
    let inner = &*store.inner;
    let mut config = inner.config.clone();
    config.application_name(format!("orgkey-follow:{}", inner.schema));
    let (client, mut connection) = config.connect(NoTls).await.map_err(backend)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!(
                "SET search_path TO \"{}\"; LISTEN \"{}\"",
                inner.schema,
                channel(&inner.schema)
            ))
            .await
            .map_err(backend)?;
        // Reload after LISTEN, so that no change falls between the two.
        let rows = client
            .query(
                "SELECT id, subscribed, api_key, generation, modified_by, modified_ms FROM orgs",
                &[],
            )
            .await
            .map_err(backend)?;
        for row in &rows {
            let (org, state) = state_of(org_from_row(row, inner.format)?);
            table.install_if_newer(org, Arc::new(state));
        }
        table.set_trusted(true);
        tracing::info!(schema = %inner.schema, orgs = rows.len(), "change feed following");
        // This follower's heartbeats: a random tag, so that other replicas' are not taken for
        // ours.
        let mut tag = [0u8; 8];
        crate::key::fill_random(&mut tag).map_err(|_| corrupt("no randomness for the heartbeat"))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let mut last_heard = tokio::time::Instant::now();
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let payload = tokio::select! {
                payload = rx.recv() => match payload {
                    Some(payload) => payload,
                    None => break,
                },
                _ = ticker.tick() => {
                    if last_heard.elapsed() > STALL_BOUND {
                        return Err(corrupt("the change feed is stalled: its heartbeat did not come back"));
                    }
                    // Sent on the other connection, in the background: a slow send must not
                    // hold up the changes arriving here.
                    let sender = store.clone();
                    let beat = format!("{HEARTBEAT_PREFIX}{tag}");
                    tokio::spawn(async move {
                        if let Err(error) = sender.notify(&beat).await {
                            tracing::debug!(%error, "heartbeat not sent");
                        }
                    });
                    continue;
                }
            };
            if let Some(beat) = payload.strip_prefix(HEARTBEAT_PREFIX) {
                if beat == tag {
                    last_heard = tokio::time::Instant::now();
                }
                continue;
            }
            let Some((org, generation)) = payload.rsplit_once(':') else {
                continue;
            };
            let (Ok(org), Ok(generation)) = (OrgId::new(org), generation.parse::<u64>()) else {
                continue;
            };
            if table
                .state(org.as_str())
                .is_some_and(|s| s.generation().get() >= generation)
            {
                continue; // already have it (or newer)
            }
            let row = client
                .query_opt(
                    "SELECT id, subscribed, api_key, generation, modified_by, modified_ms
                     FROM orgs WHERE id = $1",
                    &[&org.as_str()],
                )
                .await
                .map_err(backend)?;
            if let Some(row) = row {
                let (org, state) = state_of(org_from_row(&row, inner.format)?);
                table.install_if_newer(org, Arc::new(state));
            }
        }
        Err(corrupt("the change feed connection closed"))
    }
    .await;
    driver.abort();
    result
}

/// One live connection and its prepared statements.
struct Conn {
    client: Client,
    statements: Statements,
}

struct Statements {
    load_orgs: Statement,
    create_org: Statement,
    lock_org: Statement,
    update_org: Statement,
    insert_audit: Statement,
    audit_page: Statement,
    throttle_take: Statement,
    throttle_succeeded: Statement,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the connection string: it may carry a password.
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

/// Whether `name` may be used as the schema: 1 to 63 ASCII letters, digits and `_`, not
/// starting with `pg_` (reserved by PostgreSQL).
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SCHEMA_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name
            .get(..3)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("pg_"))
}

fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| corrupt(what))
}

impl PostgresStore {
    /// Connects to the database at `url`, for keys of `format`, and keeps everything in the
    /// schema `schema`, creating it and running migrations if needed.
    ///
    /// `url` is a libpq-style connection string, either a URL
    /// (`postgres://user:password@host:5432/database`) or `key=value` pairs. Unless it names
    /// one, the connection's `application_name` is `orgkey:<schema>`. The connection task is
    /// spawned on the current tokio runtime, so this must be called within one.
    ///
    /// `schema` is used exactly as given (quoted, so case-sensitive). Because it is written
    /// into SQL, it must be 1 to 63 ASCII letters, digits or `_`, and must not start with
    /// `pg_`. Creating the schema needs the `CREATE` privilege on the database; if it already
    /// exists (created by an administrator), creating tables in it is enough, and after the
    /// first connect only reading and writing the tables is needed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if the schema name is invalid, the connection string cannot be
    /// parsed, the server cannot be reached or refuses the connection, the schema was written
    /// by a newer orgkey, or a migration fails.
    pub async fn connect(url: &str, schema: &str, format: KeyFormat) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(corrupt(
                "invalid PostgreSQL schema name: use 1 to 63 ASCII letters, digits or '_', \
                 not starting with 'pg_'",
            ));
        }
        let mut config: Config = url.parse().map_err(backend)?;
        if config.get_application_name().is_none() {
            config.application_name(format!("orgkey:{schema}"));
        }
        let conn = Conn::open(&config, schema).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                schema: schema.to_owned(),
                format,
                conn: RwLock::new(conn),
            }),
        })
    }

    /// The schema this store keeps its tables in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Sends `payload` to every follower of this schema, on the shared connection.
    async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        let conn = self.shared().await?;
        let channel = channel(&self.inner.schema);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&channel, &payload];
        let send = conn.client.execute("SELECT pg_notify($1, $2)", &params);
        match tokio::time::timeout(STALL_BOUND, send).await {
            Ok(result) => result.map(|_| ()).map_err(backend),
            Err(_) => Err(corrupt("the heartbeat could not be sent in time")),
        }
    }

    /// Keeps `table` in step with every change committed to this schema, by any replica
    /// (F1): a dedicated connection `LISTEN`s for the `org:generation` notifications that
    /// commits send (never key material), and reloads each changed org.
    ///
    /// The table is untrusted (the layer answers 503, fail closed) from this call until the
    /// first reload, and again at once whenever the connection is lost or its heartbeat
    /// stops coming back (F3: one every [`HEARTBEAT_INTERVAL`], a stall is detected within
    /// [`STALL_BOUND`] plus one interval, 1.25 s); the follower reconnects with a
    /// back-off (50 ms doubling to 2 s, back to 50 ms after 5 s of health), `LISTEN`s again,
    /// reloads every org, and trusts the table again. Stops when the returned handle is
    /// dropped.
    pub fn follow(&self, table: OrgTable) -> ChangeFollower {
        let store = self.clone();
        // Not trusted until the first reload: no request is judged before the feed follows.
        table.set_trusted(false);
        let task = tokio::spawn(async move {
            const FIRST_BACKOFF: Duration = Duration::from_millis(50);
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = tokio::time::Instant::now();
                let result = follow_once(&store, &table).await;
                table.set_trusted(false);
                if let Err(error) = result {
                    tracing::warn!(schema = %store.inner.schema, %error, "change feed lost; failing closed until reloaded");
                }
                if started.elapsed() >= HEALTHY_PERIOD {
                    // It had been following fine: this is a new failure, not the same one.
                    backoff = FIRST_BACKOFF;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        ChangeFollower::new(task)
    }

    /// The connection, shared with other statements outside transactions; reconnects first
    /// if it was lost.
    async fn shared(&self) -> Result<RwLockReadGuard<'_, Conn>, StoreError> {
        {
            let conn = self.inner.conn.read().await;
            if !conn.client.is_closed() {
                return Ok(conn);
            }
        }
        Ok(self.exclusive().await?.downgrade())
    }

    /// The connection, for this caller alone (a transaction); reconnects first if it was lost.
    async fn exclusive(&self) -> Result<RwLockWriteGuard<'_, Conn>, StoreError> {
        let mut conn = self.inner.conn.write().await;
        if conn.client.is_closed() {
            tracing::info!(schema = %self.inner.schema, "reconnecting to PostgreSQL");
            *conn = Conn::open(&self.inner.config, &self.inner.schema).await?;
        }
        Ok(conn)
    }
}

impl Conn {
    /// Connects, points `search_path` at `schema`, migrates, and prepares the statements.
    async fn open(config: &Config, schema: &str) -> Result<Self, StoreError> {
        let (mut client, connection) = config.connect(NoTls).await.map_err(backend)?;
        let name = schema.to_owned();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(schema = %name, %error, "PostgreSQL connection failed");
            }
        });
        // `schema` was validated: letters, digits and '_' only, so quoting it is enough. A
        // commit waits at most 5 s for another writer's row lock (as SQLite's busy timeout).
        client
            .batch_execute(&format!(
                "SET search_path TO \"{schema}\"; SET lock_timeout = '5s'"
            ))
            .await
            .map_err(backend)?;
        migrate(&mut client, schema).await?;
        let statements = Statements::prepare(&client).await?;
        Ok(Self { client, statements })
    }
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, StoreError> {
        let prepare = |sql: &'static str| async move { client.prepare(sql).await.map_err(backend) };
        Ok(Self {
            load_orgs: prepare(
                "SELECT id, subscribed, api_key, generation, modified_by, modified_ms
                 FROM orgs ORDER BY id",
            )
            .await?,
            create_org: prepare(
                "INSERT INTO orgs (id, subscribed, generation) VALUES ($1, FALSE, 0)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?,
            lock_org: prepare("SELECT generation FROM orgs WHERE id = $1 FOR UPDATE").await?,
            update_org: prepare(
                "UPDATE orgs SET subscribed = $2, api_key = $3, generation = $4,
                     modified_by = $5, modified_ms = $6
                 WHERE id = $1",
            )
            .await?,
            insert_audit: prepare(
                "INSERT INTO audit (org, actor, action, at_ms, generation)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?,
            audit_page: prepare(
                "SELECT seq, actor, action, at_ms, generation FROM audit
                 WHERE org = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            )
            .await?,
            throttle_take: prepare(
                "SELECT wait_for_ms, charged_username
                 FROM throttle_take($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?,
            throttle_succeeded: prepare(
                "SELECT throttle_succeeded($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await?,
        })
    }
}

/// Creates the schema if missing and runs the migrations it has not had, in one transaction
/// under an advisory lock (so concurrent connects wait for each other).
async fn migrate(client: &mut Client, schema: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(backend)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK, &schema],
    )
    .await
    .map_err(backend)?;
    // Only issue DDL that is needed, so that an existing schema needs no CREATE privilege on
    // the database.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(backend)?;
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .await
            .map_err(backend)?;
    }
    let versioned: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables
                 WHERE schemaname = $1 AND tablename = 'orgkey_schema_version')",
            &[&schema],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(backend)?;
    if !versioned {
        tx.batch_execute(
            "CREATE TABLE orgkey_schema_version (
                 version       BIGINT PRIMARY KEY,
                 applied_ms    BIGINT NOT NULL
             )",
        )
        .await
        .map_err(backend)?;
    }
    let version: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM orgkey_schema_version",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(backend)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(corrupt(
            "the database was written by a newer orgkey (unknown schema version)",
        ));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql).await.map_err(backend)?;
        tx.execute(
            "INSERT INTO orgkey_schema_version (version, applied_ms) VALUES ($1, $2)",
            &[&(index as i64 + 1), &millis(SystemTime::now())],
        )
        .await
        .map_err(backend)?;
    }
    tx.commit().await.map_err(backend)
}

fn org_from_row(row: &Row, format: KeyFormat) -> Result<OrgRecord, StoreError> {
    org_record(
        row.try_get(0).map_err(backend)?,
        row.try_get(1).map_err(backend)?,
        row.try_get(2).map_err(backend)?,
        row.try_get(3).map_err(backend)?,
        row.try_get(4).map_err(backend)?,
        row.try_get(5).map_err(backend)?,
        format,
    )
}

fn audit_from_row(row: &Row, org: &OrgId) -> Result<AuditRecord, StoreError> {
    let seq: i64 = row.try_get(0).map_err(backend)?;
    let actor: &str = row.try_get(1).map_err(backend)?;
    let action: &str = row.try_get(2).map_err(backend)?;
    let at: i64 = row.try_get(3).map_err(backend)?;
    let generation: i64 = row.try_get(4).map_err(backend)?;
    Ok(AuditRecord {
        seq: u64::try_from(seq).map_err(|_| corrupt("stored audit sequence is negative"))?,
        event: AuditEvent {
            org: org.clone(),
            actor: Actor::new(actor).map_err(|_| corrupt("stored actor"))?,
            action: KeyAction::from_name(action).ok_or_else(|| corrupt("stored action"))?,
            at: from_millis(at),
            generation: Generation::new(
                u64::try_from(generation).map_err(|_| corrupt("stored generation is negative"))?,
            ),
        },
    })
}

impl Store for PostgresStore {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let rows = conn
                .client
                .query(&conn.statements.load_orgs, &[])
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|row| org_from_row(row, self.inner.format))
                .collect()
        })
    }

    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let inserted = conn
                .client
                .execute(&conn.statements.create_org, &[&org.as_str()])
                .await
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
        Box::pin(async move {
            let expected = to_i64(expected.get(), "expected generation out of range")?;
            let generation = to_i64(next.generation.get(), "generation out of range")?;
            let audit_generation = to_i64(audit.generation.get(), "generation out of range")?;
            let mut conn = self.exclusive().await?;
            let Conn { client, statements } = &mut *conn;
            // Dropping `tx` without committing (any early return) queues a ROLLBACK ahead of
            // whatever the connection is asked next.
            let tx = client.transaction().await.map_err(backend)?;
            let stored = tx
                .query_opt(&statements.lock_org, &[&next.org.as_str()])
                .await
                .map_err(backend)?;
            let stored: i64 = match stored {
                None => return Err(StoreError::NotFound),
                Some(row) => row.try_get(0).map_err(backend)?,
            };
            if stored != expected {
                return Err(StoreError::Conflict);
            }
            tx.execute(
                &statements.update_org,
                &[
                    &next.org.as_str(),
                    &next.subscribed,
                    &next.key.as_ref().map(ApiKey::expose_secret),
                    &generation,
                    &next.last_modified_by.as_ref().map(Actor::as_str),
                    &next.last_modified_on.map(millis),
                ],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                &statements.insert_audit,
                &[
                    &audit.org.as_str(),
                    &audit.actor.as_str(),
                    &audit.action.as_str(),
                    &millis(audit.at),
                    &audit_generation,
                ],
            )
            .await
            .map_err(backend)?;
            // F1: every follower of this schema hears "org:generation" when this commits (a
            // notification is delivered at COMMIT, never for a rolled-back change). Never key
            // material.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[
                    &channel(&self.inner.schema),
                    &format!("{}:{}", next.org.as_str(), next.generation.get()),
                ],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)
        })
    }

    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        Box::pin(async move {
            let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let conn = self.shared().await?;
            let rows = conn
                .client
                .query(
                    &conn.statements.audit_page,
                    &[&org.as_str(), &before, &i64::from(limit)],
                )
                .await
                .map_err(backend)?;
            rows.iter().map(|row| audit_from_row(row, org)).collect()
        })
    }

    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let rows = conn
                .client
                .query(
                    "SELECT username, org, enabled, scopes, password_hash, credential_version
                     FROM admins ORDER BY username",
                    &[],
                )
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|row| {
                    admin_record(
                        row.try_get(0).map_err(backend)?,
                        row.try_get(1).map_err(backend)?,
                        row.try_get(2).map_err(backend)?,
                        i64::from(row.try_get::<_, i16>(3).map_err(backend)?),
                        row.try_get(4).map_err(backend)?,
                        row.try_get(5).map_err(backend)?,
                    )
                })
                .collect()
        })
    }

    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let conn = self.shared().await?;
            conn.client
                .execute(
                    "INSERT INTO admins (username, org, enabled, scopes, password_hash,
                         credential_version)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (username) DO UPDATE SET org = $2, enabled = $3,
                         scopes = $4, password_hash = $5, credential_version = $6",
                    &[
                        &admin.username.as_str(),
                        &admin.org.as_str(),
                        &admin.enabled,
                        &i16::from(admin.scopes.bits()),
                        &admin.password_hash,
                        &(admin.credential_version as i64),
                    ],
                )
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let deleted = conn
                .client
                .execute(
                    "DELETE FROM admins WHERE username = $1",
                    &[&username.as_str()],
                )
                .await
                .map_err(backend)?;
            if deleted == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
    }

    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let rows = conn
                .client
                .query(
                    "SELECT digest, org, admin, generation, credential_version, created_ms
                     FROM sessions",
                    &[],
                )
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|row| {
                    session_record(
                        row.try_get(0).map_err(backend)?,
                        row.try_get(1).map_err(backend)?,
                        row.try_get(2).map_err(backend)?,
                        row.try_get(3).map_err(backend)?,
                        row.try_get(4).map_err(backend)?,
                        row.try_get(5).map_err(backend)?,
                    )
                })
                .collect()
        })
    }

    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let generation = to_i64(session.generation.get(), "generation out of range")?;
            let conn = self.shared().await?;
            conn.client
                .execute(
                    "INSERT INTO sessions
                         (digest, org, admin, generation, credential_version, created_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (digest) DO NOTHING",
                    &[
                        &&session.digest[..],
                        &session.org.as_str(),
                        &session.admin.as_str(),
                        &generation,
                        &(session.credential_version as i64),
                        &millis(session.created),
                    ],
                )
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let conn = self.shared().await?;
            conn.client
                .execute("DELETE FROM sessions WHERE digest = $1", &[&&digest[..]])
                .await
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
        Box::pin(async move {
            let (address, username) = (policy.address_bucket(), policy.username_bucket());
            let range = "throttle time out of range";
            let conn = self.shared().await?;
            let row = conn
                .client
                .query_one(
                    &conn.statements.throttle_take,
                    &[
                        &keys.address(),
                        &keys.username(),
                        &to_i64(now_ms, range)?,
                        &to_i64(address.refill_ms, range)?,
                        &to_i64(address.capacity_ms, range)?,
                        &to_i64(username.refill_ms, range)?,
                        &to_i64(username.capacity_ms, range)?,
                    ],
                )
                .await
                .map_err(backend)?;
            let wait: i64 = row.try_get(0).map_err(backend)?;
            let username_charged: bool = row.try_get(1).map_err(backend)?;
            Ok(if wait > 0 {
                ThrottleVerdict::Wait { ms: wait as u64 }
            } else {
                ThrottleVerdict::Charged { username_charged }
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
        Box::pin(async move {
            let (address, username) = (policy.address_bucket(), policy.username_bucket());
            let until = now_ms.saturating_add(policy.known_address_ttl_ms());
            let range = "throttle time out of range";
            let conn = self.shared().await?;
            conn.client
                .execute(
                    &conn.statements.throttle_succeeded,
                    &[
                        &keys.address(),
                        &keys.username(),
                        &to_i64(now_ms, range)?,
                        &to_i64(address.refill_ms, range)?,
                        &to_i64(username.refill_ms, range)?,
                        &username_charged,
                        &to_i64(until, range)?,
                        &(KNOWN_ADDRESSES_PER_ADMIN as i64),
                    ],
                )
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let now = to_i64(now_ms, "throttle time out of range")?;
            let conn = self.shared().await?;
            // Without the advisory locks: a row deleted here was a full bucket (or a dead
            // address), which a take treats exactly as no row; one a take is writing is
            // re-checked on its new version and kept.
            let row = conn
                .client
                .query_one(
                    "WITH buckets AS (
                         DELETE FROM throttle_buckets WHERE full_at_ms <= $1 RETURNING 1
                     ), known AS (
                         DELETE FROM throttle_known WHERE expires_ms <= $1 RETURNING 1
                     )
                     SELECT (SELECT count(*) FROM buckets) + (SELECT count(*) FROM known)",
                    &[&now],
                )
                .await
                .map_err(backend)?;
            let deleted: i64 = row.try_get(0).map_err(backend)?;
            Ok(deleted.max(0) as u64)
        })
    }

    fn follow_changes(&self, table: OrgTable) -> Option<ChangeFollower> {
        Some(self.follow(table))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_schema;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["orgkey", "orgkey_test_0123abcd", "A", "_x", &"s".repeat(63)] {
            assert!(valid_schema(good), "{good}");
        }
        for bad in [
            "",
            "pg_orgkey",
            "PG_x",
            "a-b",
            "a\"b",
            "a b",
            "a;b",
            "é",
            &"s".repeat(64),
        ] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }
}
