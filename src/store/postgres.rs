//! [`PostgresStore`]: one PostgreSQL database shared by a fleet of replicas (P3, F1). The
//! public documentation is on the type (this module is private).

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement};

use super::{
    admin_record, backend, corrupt, from_millis, millis, org_record, sealed_key, session_record,
    AdminRecord, AuditRecord, ChangeFollower, OrgRecord, Replica, SessionRecord, Store, StoreError,
    StoreFuture, ThrottleKeys, ThrottlePolicy, ThrottleVerdict, Unconfirmed,
    KNOWN_ADDRESSES_PER_ADMIN,
};
use crate::audit::{AuditEvent, KeyAction};
use crate::identity::Username;
use crate::key::{ApiKey, KeyFormat};
use crate::org::{Actor, Generation, OrgId};
use crate::seal::{sealed_by, sealed_prefix, MasterKeyId, MasterKeys, SealError};
use crate::table::OrgState;
use arc_swap::ArcSwap;
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
    // 5: the fleet (F1, F2). Every change that decides who gets in (an org's key or
    // subscription, an admin account, a session created or ended) takes the next number of
    // one sequence, under the row lock of `fleet_head`, so numbers are in commit order, and
    // announces `<seq>|<kind>|<subject>` on the schema's channel (delivered at commit, never
    // key material). Each replica in strict mode holds a lease in `fleet_replicas` (by the
    // database's clock) and records the last number it applied; writers wait for it.
    // Sessions keep their last use as replicas report it (idle time is fleet-wide).
    "ALTER TABLE sessions ADD COLUMN last_used_ms BIGINT;
     UPDATE sessions SET last_used_ms = created_ms;
     ALTER TABLE sessions ALTER COLUMN last_used_ms SET NOT NULL;
     CREATE TABLE fleet_head (
         only_row      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
         seq           BIGINT NOT NULL
     );
     INSERT INTO fleet_head (only_row, seq) VALUES (TRUE, 0);
     CREATE TABLE fleet_replicas (
         id            TEXT PRIMARY KEY,
         name          TEXT NOT NULL,
         applied_seq   BIGINT NOT NULL,
         lease_until   TIMESTAMPTZ NOT NULL,
         started       TIMESTAMPTZ NOT NULL
     );
     CREATE FUNCTION fleet_announce(p_channel TEXT, p_kind TEXT, p_subject TEXT) RETURNS BIGINT
     LANGUAGE plpgsql AS $$
     DECLARE
         s BIGINT;
     BEGIN
         UPDATE fleet_head SET seq = seq + 1 RETURNING seq INTO s;
         PERFORM pg_notify(p_channel, s || '|' || p_kind || '|' || p_subject);
         RETURN s;
     END $$;
     -- A replica's lease, from the database's clock now, and the last change it applied.
     -- Sent on the replica's feed connection, which must never NOTIFY: PostgreSQL
     -- serializes the commits of transactions that notify, so a feed backend stopped in
     -- such a commit would stop every replica. Not flushed to disk before it answers: a
     -- database crash ends every feed connection, and a replica fails closed at once when
     -- its feed connection ends.
     -- Answers whether the replica's lease had already run out in the database: writers
     -- stopped waiting for it then, so it must reload before it may judge again.
     CREATE FUNCTION fleet_renew(
         p_id TEXT, p_name TEXT, p_applied BIGINT, p_lease_ms BIGINT
     ) RETURNS BOOLEAN
     LANGUAGE plpgsql AS $$
     DECLARE
         lapsed BOOLEAN;
     BEGIN
         SET LOCAL synchronous_commit = off;
         SELECT r.lease_until <= clock_timestamp() INTO lapsed
             FROM fleet_replicas r WHERE r.id = p_id;
         INSERT INTO fleet_replicas AS r (id, name, applied_seq, lease_until, started)
             VALUES (p_id, p_name, p_applied,
                     clock_timestamp() + p_lease_ms * INTERVAL '1 millisecond',
                     clock_timestamp())
             ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until,
                 applied_seq = GREATEST(r.applied_seq, EXCLUDED.applied_seq);
         RETURN COALESCE(lapsed, FALSE);
     END $$;",
    // 6: keys at rest only sealed (P4): `sealed_key` replaces `api_key`, which the first
    // connect empties, sealing the keys a release before P4 wrote (in this transaction).
    "ALTER TABLE orgs ADD COLUMN sealed_key BYTEA;",
    // 7: the fleet's master keys (P4). `fleet_head.sealing_key`: the id (hex) of the master
    // key every replica seals under, set by the first connect and switched only once every
    // replica with a live lease holds the new key (`PostgresStore::set_master_keys`);
    // `fleet_head.wanted_key`: the key a rotation asked every replica to fetch from its file
    // (a replica that reloads fetches it too, so a feed down while it was asked misses
    // nothing); `fleet_replicas.master_keys`: the ids (hex, comma-separated) of the keys each
    // replica holds, written with every renewal of its lease. Migration 5's four-argument
    // `fleet_renew` stays for replicas still running a release before this one: it leaves
    // their keys unknown, so a rotation waits for them (and names them) until they upgrade.
    "ALTER TABLE fleet_head ADD COLUMN sealing_key TEXT;
     ALTER TABLE fleet_head ADD COLUMN wanted_key TEXT;
     ALTER TABLE fleet_replicas ADD COLUMN master_keys TEXT;
     CREATE FUNCTION fleet_renew(
         p_id TEXT, p_name TEXT, p_applied BIGINT, p_lease_ms BIGINT, p_master_keys TEXT
     ) RETURNS BOOLEAN
     LANGUAGE plpgsql AS $$
     DECLARE
         lapsed BOOLEAN;
     BEGIN
         SET LOCAL synchronous_commit = off;
         SELECT r.lease_until <= clock_timestamp() INTO lapsed
             FROM fleet_replicas r WHERE r.id = p_id;
         INSERT INTO fleet_replicas AS r
                 (id, name, applied_seq, lease_until, started, master_keys)
             VALUES (p_id, p_name, p_applied,
                     clock_timestamp() + p_lease_ms * INTERVAL '1 millisecond',
                     clock_timestamp(), p_master_keys)
             ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until,
                 applied_seq = GREATEST(r.applied_seq, EXCLUDED.applied_seq),
                 master_keys = EXCLUDED.master_keys;
         RETURN COALESCE(lapsed, FALSE);
     END $$;",
];

/// Rows per batch (one statement, so one transaction) when sealing again (P4).
const RESEAL_BATCH: usize = 1000;

/// What one attempt to switch the fleet's sealing key found.
enum Switched {
    /// Switched; the `k` announcement's number.
    Now(i64),
    /// The fleet already seals under the new key.
    Already,
    /// These replicas, with live leases, do not list the new key yet.
    Lacking(Vec<String>),
}

/// The first key of the advisory lock that serializes migrations (`orgk`); the second key is
/// a hash of the schema name.
const MIGRATION_LOCK: i32 = 0x6f72_676b;

/// The longest schema name PostgreSQL keeps whole (`NAMEDATALEN - 1`).
const MAX_SCHEMA_LEN: usize = 63;

/// A [`Store`] in one schema of a PostgreSQL database, for a fleet of replicas sharing it
/// (P3, F1). Cheap to clone (shared connection).
///
/// The store keeps everything in one schema of the database, named at
/// [`PostgresStore::connect`]: the tables `orgs` and `audit` (as in the SQLite store: keys
/// only sealed, as `BYTEA`, times as `BIGINT` milliseconds since the Unix epoch), the fleet's
/// tables, and `orgkey_schema_version`, which records the migrations that ran. Migrations run
/// at connect, in one transaction, under an advisory lock, so replicas starting together do
/// not race.
///
/// # Master keys in a fleet (P4)
///
/// Every key is stored sealed ([`MasterKeys::seal`]); each replica has its own master key
/// file. A fleet never seals under a master key that some live replica cannot open:
///
/// - **One sealing key for the fleet.** `fleet_head.sealing_key` names the master key every
///   commit seals under, whichever replica makes it: a commit reads it in its own transaction
///   (with the org's row lock), and one by a process whose file lacks it fails with
///   [`StoreError::MasterKeyMissing`], writing nothing. A new schema's sealing key is the
///   first connecting store's [`MasterKeys::current`]. A connect fails, changing nothing,
///   if its file lacks a key some stored key is sealed under ([`StoreError::Sealed`], naming
///   an org) or the sealing key ([`StoreError::MasterKeyMissing`]).
/// - **Every replica says which keys it holds**: the ids (never key material) go into its
///   lease row (`fleet_replicas.master_keys`) with every renewal and whenever its keys
///   change.
/// - **Rotation** (`master-key rotate`: the file gets a new first key, then
///   [`Store::set_master_keys`], then [`Store::reseal`]). `set_master_keys(ring)` refuses
///   (nothing changed) keys that lack a key some stored key is sealed under, or the sealing
///   key; takes them; records their ids in this store's lease rows; and if `ring`'s first
///   key is not the sealing key: records it as wanted (`fleet_head.wanted_key`) and
///   announces `r|<id>` (again every second), on which every replica (and every replica
///   that reloads) reads *its own* master key file again ([`MasterKeys::path`]: a shared
///   file or a mounted secret brings the new key without a `SIGHUP`) and takes it, keeping
///   the keys it had; waits, at most [`FleetConfig::wait`], until every replica with a live
///   lease lists the new key; then, in one transaction that checks the leases again under
///   `fleet_head`'s row lock, switches the sealing key and announces `k|<id>` (strict mode:
///   returns once every live replica applied it). If some live replica does not hold the new
///   key in time, it fails with [`StoreError::MasterKeyNotShared`] naming them: the fleet
///   still seals under the old key, and the operator gives them the new file (`SIGHUP` or
///   restart) and runs `master-key rotate` again, which resumes. Only then does
///   [`Store::reseal`] seal the stored keys again under the new key: batches of 1,000 rows,
///   one statement each, each row written only if its generation and sealed value are
///   unchanged (a concurrent commit is never overwritten), until a pass finds none left.
///   Nothing is announced for a reseal (no key and no generation changes); every replica
///   holds both keys, so a reload opens either. A crash leaves every key under the old or the
///   new key; running the rotation again finishes it.
/// - **A replica without the sealing key fails closed**: one that takes its lease while the
///   key switches, or hears `k` for a key its file lacks, reads its file again, and if the key
///   is not there stops vouching for its table (503) and says so, until it has the file.
/// - `master-key retire` drops from the file the keys [`Store::master_keys_in_use`] does not
///   name (the keys stored keys are sealed under, and the sealing key).
///
/// In loose mode ([`FleetMode::Loose`]) replicas hold no lease, so the switch cannot wait for
/// them: they read their files again on `r` and fail closed on `k` if the key is not there.
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
/// - Keys are stored sealed (P4): a dump or a copy of the database reveals no key without a
///   replica's master key file; keep that file apart from the database and its backups.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    schema: String,
    format: KeyFormat,
    /// The master keys that open the stored keys (P4).
    master: ArcSwap<MasterKeys>,
    /// The master key the fleet seals under, as this store last heard it (at connect, at a
    /// follower's reload, from a `k` announcement, at a commit). Commits read it again in
    /// their own transaction.
    sealing: std::sync::Mutex<MasterKeyId>,
    /// The lease rows of this store's followers (strict mode), whose `master_keys` it updates
    /// when its keys change.
    leases: std::sync::Mutex<Vec<String>>,
    conn: RwLock<Conn>,
    fleet: FleetConfig,
    /// The last change this process's follower applied (-1: no follower).
    applied: tokio::sync::watch::Sender<i64>,
}

impl Inner {
    fn sealing(&self) -> MasterKeyId {
        *self.sealing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_sealing(&self, id: MasterKeyId) {
        *self.sealing.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// A follower's new life replaced its lease row `previous` with `next`.
    fn lease_changed(&self, previous: &str, next: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.retain(|id| id != previous);
        leases.push(next.to_owned());
    }

    fn leases(&self) -> Vec<String> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The ids of `master`'s keys as a lease row lists them: hex, comma-separated.
fn id_list(master: &MasterKeys) -> String {
    master
        .ids()
        .map(MasterKeyId::to_hex)
        .collect::<Vec<_>>()
        .join(",")
}

/// The fleet's sealing key as `fleet_head` stores it.
fn parse_sealing(text: Option<&str>) -> Result<MasterKeyId, StoreError> {
    text.and_then(MasterKeyId::from_hex)
        .ok_or_else(|| corrupt("the fleet's sealing key id (fleet_head.sealing_key) is invalid"))
}

/// The master key the fleet seals under, read now.
async fn read_sealing<C: GenericClient + Sync>(client: &C) -> Result<MasterKeyId, StoreError> {
    let row = client
        .query_one("SELECT sealing_key FROM fleet_head", &[])
        .await
        .map_err(backend)?;
    parse_sealing(row.try_get(0).map_err(backend)?)
}

/// The master keys that seal at least one stored key (P4).
async fn stored_key_ids<C: GenericClient + Sync>(
    client: &C,
) -> Result<Vec<MasterKeyId>, StoreError> {
    let rows = client
        .query(
            "SELECT DISTINCT substring(sealed_key FROM 1 FOR 9) FROM orgs
             WHERE sealed_key IS NOT NULL",
            &[],
        )
        .await
        .map_err(backend)?;
    rows.iter()
        .map(|row| {
            let head: &[u8] = row.try_get(0).map_err(backend)?;
            sealed_by(head).ok_or_else(|| corrupt("a stored key is not a sealed value"))
        })
        .collect()
}

/// Fails if `master` lacks a key that seals a stored key ([`StoreError::Sealed`], naming an
/// org sealed under it) or, if given, the fleet's sealing key
/// ([`StoreError::MasterKeyMissing`]). Reads only: a wrong master key file changes nothing.
async fn check_master<C: GenericClient + Sync>(
    client: &C,
    master: &MasterKeys,
    sealing: Option<MasterKeyId>,
) -> Result<(), StoreError> {
    for id in stored_key_ids(client).await? {
        if master.contains(id) {
            continue;
        }
        let row = client
            .query_one(
                "SELECT id FROM orgs WHERE substring(sealed_key FROM 1 FOR 9) = $1 LIMIT 1",
                &[&&sealed_prefix(id)[..]],
            )
            .await
            .map_err(backend)?;
        let org: &str = row.try_get(0).map_err(backend)?;
        return Err(StoreError::Sealed {
            org: OrgId::new(org).map_err(|_| corrupt("stored org id is invalid"))?,
            error: SealError::UnknownMasterKey(id),
            file: master.describe(),
        });
    }
    match sealing {
        Some(key) if !master.contains(key) => Err(StoreError::MasterKeyMissing {
            key,
            file: master.describe(),
        }),
        _ => Ok(()),
    }
}

/// The notification channel of a schema (at most 63 bytes, as PostgreSQL identifiers).
fn channel(schema: &str) -> String {
    let mut name = format!("orgkey_{schema}");
    name.truncate(MAX_SCHEMA_LEN);
    name
}

/// Announces `<seq>|<kind>|<subject>` on `schema`'s channel from within `tx` (delivered when
/// it commits); the change's number.
async fn announce_in(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    kind: &str,
    subject: &str,
) -> Result<i64, StoreError> {
    tx.query_one(
        "SELECT fleet_announce($1, $2, $3)",
        &[&channel(schema), &kind, &subject],
    )
    .await
    .and_then(|row| row.try_get(0))
    .map_err(backend)
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

/// The default interval of a follower's heartbeat and lease renewal (F1, F3).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A follower that has heard none of its own heartbeats for this long (by default; six
/// renewal intervals in general) stops vouching for its table (fails closed) and reconnects.
/// Checked at every heartbeat, so a stall is detected within this plus one
/// [`HEARTBEAT_INTERVAL`] (1.75 s by default), inside DESIGN.md's bound of 2 s for a stalled,
/// half-open or silently dropped feed.
pub const STALL_BOUND: Duration = Duration::from_millis(1500);
/// The longest the feed may take to connect, take its lease, LISTEN and reload everything.
const SETUP_BOUND: Duration = Duration::from_secs(30);

/// A connection that followed for this long is healthy: the next failure starts the
/// reconnect back-off from the beginning again.
const HEALTHY_PERIOD: Duration = Duration::from_secs(5);

/// The payload prefix of heartbeats; changes start with their sequence number.
const HEARTBEAT_PREFIX: &str = "~hb:";

/// How a fleet of replicas sharing a [`PostgresStore`] keeps F1's promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetMode {
    /// The default (F1): every replica holds a lease; a change returns only when every replica
    /// with a live lease has applied it (or the wait bound ran out, and the change says
    /// which replicas did not confirm); a replica whose lease runs out fails closed.
    Strict,
    /// Replicas follow the feed as fast as it goes (typically a few milliseconds), but a
    /// change returns as soon as it is committed: another replica may accept the old key or
    /// a logged-out session for that long. F3 (fail closed on a stalled feed) still holds.
    Loose,
}

/// The fleet settings of a [`PostgresStore`] (F1, F3).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Strict (the default) or loose.
    pub mode: FleetMode,
    /// How long a lease lasts after the renewal that set it was sent. Default 2 s: eight
    /// renewals, so a replica rides out a slow statement or a short pause, while a replica
    /// that died holds up admin calls for at most this long.
    pub lease: Duration,
    /// How often the lease is renewed and a heartbeat sent through the database. Default
    /// 250 ms; a stalled feed is detected within seven of these (1.75 s).
    pub renewal: Duration,
    /// How long a change waits for the replicas' confirmations. Default 5 s: longer than
    /// the lease, so a replica that died or was cut off has lost its lease before the bound
    /// runs out, and the bound is reached only if a replica renews but does not apply.
    pub wait: Duration,
    /// This replica's name in the fleet, as errors and the `fleet_replicas` table show it.
    /// Default: the host name and the process id.
    pub name: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "replica".to_owned());
        Self {
            mode: FleetMode::Strict,
            lease: Duration::from_secs(2),
            renewal: HEARTBEAT_INTERVAL,
            wait: Duration::from_secs(5),
            name: format!("{host}:{}", std::process::id()),
        }
    }
}

impl FleetConfig {
    /// Checks the settings: the renewal interval at least 10 ms and at most half the lease,
    /// the lease at most 10 minutes, a name of 1 to 200 printable characters.
    fn check(&self) -> Result<(), StoreError> {
        let ok = self.renewal >= Duration::from_millis(10)
            && self.renewal * 2 <= self.lease
            && self.lease <= Duration::from_secs(600)
            && self.wait <= Duration::from_secs(600)
            && !self.name.is_empty()
            && self.name.len() <= 200
            && !self.name.chars().any(char::is_control);
        if ok {
            Ok(())
        } else {
            Err(corrupt(
                "invalid fleet settings: the renewal interval must be at least 10 ms and at \
                 most half the lease, the lease and the wait at most 600 s, the replica name \
                 1 to 200 printable characters",
            ))
        }
    }

    /// Silence on the feed for this long means it is stalled (F3): six renewal intervals,
    /// so that a busy machine that runs the follower late now and then is not taken for a
    /// stalled feed.
    fn stall_bound(&self) -> Duration {
        self.renewal * 6
    }

    /// The lease as this replica counts it: a sixteenth shorter than the database does, so
    /// the replica fences itself before any writer stops waiting for it.
    fn local_lease_ms(&self) -> u64 {
        let lease = self.lease.as_millis() as u64;
        lease - lease / 16
    }
}

/// Runs the follower on a thread and runtime of its own, so that a flood of requests on the
/// application's runtime cannot hold up its heartbeats and lease renewals (a replica under
/// load would otherwise fence itself). Falls back to the current runtime if no runtime can
/// be built; the thread ends when the task does (it is aborted when its handle is dropped).
fn run_apart(follow: impl Future<Output = ()> + Send + 'static) -> tokio::task::JoinHandle<()> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::warn!(%error, "no runtime of its own for the change feed; it shares the application's");
            return tokio::spawn(follow);
        }
    };
    let task = runtime.spawn(follow);
    let watch = task.abort_handle();
    let driven = std::thread::Builder::new()
        .name("orgkey-follow".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                while !watch.is_finished() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        });
    if let Err(error) = driven {
        // The task cannot run: the table stays untrusted (fail closed), and says why.
        tracing::error!(%error, "no thread for the change feed; failing closed");
    }
    task
}

/// A random id for a lease row and its heartbeats (unique enough without randomness: the
/// process id and the time).
fn random_id() -> String {
    let mut id = [0u8; 8];
    match crate::key::fill_random(&mut id) {
        Ok(()) => id.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => format!(
            "{:x}{:x}",
            std::process::id(),
            crate::store::millis(SystemTime::now())
        ),
    }
}

/// One parsed change announcement: `<seq>|<kind>|<subject>`.
struct Announcement<'a> {
    seq: i64,
    kind: &'a str,
    subject: &'a str,
}

fn parse_announcement(payload: &str) -> Option<Announcement<'_>> {
    let mut parts = payload.splitn(3, '|');
    let seq = parts.next()?.parse().ok()?;
    let kind = parts.next()?;
    let subject = parts.next()?;
    Some(Announcement { seq, kind, subject })
}

fn digest_from_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        digest[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(digest)
}

/// What a follower keeps between the lives of its connection.
struct Follower {
    store: PostgresStore,
    replica: Replica,
    /// A random id for this follower's lease row and heartbeats.
    id: String,
    /// The last change this replica applied (its own state includes every change up to it).
    applied: i64,
}

impl Follower {
    fn fleet(&self) -> &FleetConfig {
        &self.store.inner.fleet
    }

    fn strict(&self) -> bool {
        self.fleet().mode == FleetMode::Strict
    }

    /// Renews this replica's lease (strict mode) and records the last change it applied, on
    /// the feed's own connection, so that a stalled feed can neither renew nor confirm. The
    /// lease counts from the moment the renewal was sent.
    async fn renew(&self, client: &Client) -> Result<(), StoreError> {
        if !self.strict() {
            return Ok(());
        }
        let fleet = self.fleet();
        let lease_ms = fleet.lease.as_millis() as i64;
        // The master keys this replica holds go with every renewal (P4): a rotation switches
        // the fleet to a new key only once every live lease lists it.
        let keys = id_list(&self.store.inner.master.load());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&self.id, &fleet.name, &self.applied, &lease_ms, &keys];
        let sent = crate::table::monotonic_ms();
        let renewal = client.query_one("SELECT fleet_renew($1, $2, $3, $4, $5)", &params);
        match tokio::time::timeout(fleet.stall_bound(), renewal).await {
            Ok(Ok(row)) => {
                if row.try_get::<_, bool>(0).map_err(backend)? {
                    // Writers stopped waiting for this replica: changes may have gone by
                    // unapplied. Start a new life (reload) rather than judge again.
                    return Err(corrupt("the lease had run out before it was renewed"));
                }
                self.replica
                    .table
                    .set_lease_until(Some(sent + fleet.local_lease_ms()));
                let took = crate::table::monotonic_ms().saturating_sub(sent);
                if took > fleet.renewal.as_millis() as u64 {
                    tracing::warn!(schema = %self.store.inner.schema, took_ms = took, "a lease renewal was slow (the database or this host is overloaded)");
                }
                Ok(())
            }
            Ok(Err(error)) => Err(backend(error)),
            Err(_) => Err(corrupt("the lease could not be renewed in time")),
        }
    }

    /// Reloads everything this replica follows, from one snapshot, and returns the number of
    /// the last change that snapshot includes.
    async fn reload(&self, client: &mut Client) -> Result<i64, StoreError> {
        let inner = &*self.store.inner;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(backend)?;
        let head = tx
            .query_one("SELECT seq, sealing_key, wanted_key FROM fleet_head", &[])
            .await
            .map_err(backend)?;
        let sealing = parse_sealing(head.try_get(1).map_err(backend)?)?;
        let wanted: Option<&str> = head.try_get(2).map_err(backend)?;
        // A rotation's request to fetch a key, which this replica may have missed while its
        // feed was down (see `r` in `apply`).
        if let Some(wanted) = wanted.and_then(MasterKeyId::from_hex) {
            self.store.fetch_master_key(wanted);
        }
        let head: i64 = head.try_get(0).map_err(backend)?;
        // P4: this replica must hold the key the fleet seals under, or it could not open
        // what the others commit; it reads its master key file again first (the key may have
        // reached it there), else it fails closed until it does.
        inner.set_sealing(sealing);
        if !self.store.fetch_master_key(sealing) {
            let master = inner.master.load();
            return Err(StoreError::MasterKeyMissing {
                key: sealing,
                file: master.describe(),
            });
        }
        let rows = tx.query(SELECT_ORGS, &[]).await.map_err(backend)?;
        for row in &rows {
            let (org, state) = state_of(org_from_row(row, inner.format, &inner.master.load())?);
            self.replica.table.install_if_newer(org, Arc::new(state));
        }
        if let Some(admins) = &self.replica.admins {
            let rows = tx.query(SELECT_ADMINS, &[]).await.map_err(backend)?;
            let records = rows
                .iter()
                .map(admin_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            admins.reload(records);
        }
        if let Some(sessions) = &self.replica.sessions {
            let rows = tx.query(SELECT_SESSIONS, &[]).await.map_err(backend)?;
            let records = rows
                .iter()
                .map(session_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            sessions.reload(records);
        }
        tx.commit().await.map_err(backend)?;
        tracing::info!(schema = %inner.schema, orgs = rows.len(), head, "change feed following");
        Ok(head)
    }

    /// Applies one announced change: reloads what it names.
    async fn apply(&self, client: &Client, change: &Announcement<'_>) -> Result<(), StoreError> {
        let format = self.store.inner.format;
        match change.kind {
            "o" => {
                let Some((org, generation)) = change.subject.rsplit_once(':') else {
                    return Ok(());
                };
                let (Ok(org), Ok(generation)) = (OrgId::new(org), generation.parse::<u64>()) else {
                    return Ok(());
                };
                if self
                    .replica
                    .table
                    .state(org.as_str())
                    .is_some_and(|s| s.generation().get() >= generation)
                {
                    return Ok(()); // already have it (or newer)
                }
                let sql = format!("{SELECT_ORGS} WHERE id = $1");
                if let Some(row) = one_row(client, &sql, &org.as_str()).await? {
                    let master = self.store.inner.master.load();
                    let (org, state) = state_of(org_from_row(&row, format, &master)?);
                    self.replica.table.install_if_newer(org, Arc::new(state));
                }
            }
            "a" => {
                let (Some(admins), Ok(username)) =
                    (&self.replica.admins, Username::new(change.subject))
                else {
                    return Ok(());
                };
                let sql = format!("{SELECT_ADMINS_ONLY} WHERE username = $1");
                match one_row(client, &sql, &username.as_str()).await? {
                    Some(row) => admins.stored(admin_from_row(&row)?),
                    None => admins.deleted(&username),
                }
            }
            "s+" => {
                let (Some(sessions), Some(digest)) =
                    (&self.replica.sessions, digest_from_hex(change.subject))
                else {
                    return Ok(());
                };
                let sql = format!("{SELECT_SESSIONS} WHERE digest = $1");
                if let Some(row) = one_row(client, &sql, &&digest[..]).await? {
                    sessions.stored(session_from_row(&row)?);
                }
            }
            "s-" => {
                if let (Some(sessions), Some(digest)) =
                    (&self.replica.sessions, digest_from_hex(change.subject))
                {
                    sessions.deleted(&digest);
                }
            }
            // P4: a rotation asks every replica to read its master key file again (the new
            // key reaches a replica there: a shared file, a mounted secret); the ids it holds
            // go with the renewal that confirms this change.
            "r" => {
                if let Some(id) = MasterKeyId::from_hex(change.subject) {
                    self.store.fetch_master_key(id);
                }
            }
            // P4: the fleet seals under this key from now on. Every live lease listed it; a
            // replica that does not hold it (it took its lease meanwhile) fails closed.
            "k" => {
                if let Some(id) = MasterKeyId::from_hex(change.subject) {
                    self.store.inner.set_sealing(id);
                    if !self.store.fetch_master_key(id) {
                        return Err(StoreError::MasterKeyMissing {
                            key: id,
                            file: self.store.inner.master.load().describe(),
                        });
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One life of the follower's connection: (strict mode) take the lease, LISTEN, reload
    /// everything, then apply each change in order and confirm it, until the connection
    /// fails or its heartbeats stop coming back (F3).
    ///
    /// The heartbeat goes out through the store's other connection (`pg_notify` on this
    /// schema's channel) and must come back on this one: a LISTEN backend that is stopped, a
    /// half-open connection, or a pooler that silently drops LISTEN (PgBouncer in
    /// transaction mode) all stop it, and within the stall bound the table is no longer
    /// trusted. The lease is renewed on this connection too, only while the heartbeats come
    /// back, so a replica whose feed stalls also loses its lease.
    async fn follow_once(&mut self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.store.inner);
        let fleet = inner.fleet.clone();
        let mut config = inner.config.clone();
        config.application_name(format!("orgkey-follow:{}", fleet.name));
        // Every wait on the feed's connection is bounded, so that a half-open connection is
        // given up in seconds, not when TCP's keepalive (hours) notices.
        config.connect_timeout(SETUP_BOUND);
        let (mut client, mut connection) = config.connect(NoTls).await.map_err(backend)?;
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
            let setup = async {
            client
                .batch_execute(&format!(
                    "SET search_path TO \"{}\"; SET lock_timeout = '5s'",
                    inner.schema,
                ))
                .await
                .map_err(backend)?;
            // Strict mode: hold a lease *before* the reload, so that a writer committing
            // between the reload and our first confirmation waits for us. Each life of the
            // connection is a new lease row: the last life's backend may be stopped while it
            // holds its row's lock. That row is deleted unless locked (this replica fails
            // closed until it has reloaded, so nobody need wait for its last life), else it
            // runs out; rows long dead go too.
            if self.strict() {
                let previous = std::mem::replace(&mut self.id, random_id());
                inner.lease_changed(&previous, &self.id);
                client
                    .execute(
                        "DELETE FROM fleet_replicas WHERE id IN (
                             SELECT id FROM fleet_replicas
                             WHERE id = $1 OR lease_until < clock_timestamp() - INTERVAL '1 hour'
                             FOR UPDATE SKIP LOCKED)",
                        &[&previous],
                    )
                    .await
                    .map_err(backend)?;
                self.renew(&client).await?;
            }
            client
                .batch_execute(&format!("LISTEN \"{}\"", channel(&inner.schema)))
                .await
                .map_err(backend)?;
            // Reload after LISTEN, so that no change falls between the two.
            let head = self.reload(&mut client).await?;
            self.applied = self.applied.max(head);
            inner.applied.send_replace(self.applied);
            self.renew(&client).await?;
            Ok::<(), StoreError>(())
            };
            match tokio::time::timeout(SETUP_BOUND, setup).await {
                Ok(done) => done?,
                Err(_) => return Err(corrupt("the change feed did not start in time")),
            }
            self.replica.table.set_trusted(true);
            let mut last_heard = tokio::time::Instant::now();
            let mut ticker = tokio::time::interval(fleet.renewal);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let payload = tokio::select! {
                    payload = rx.recv() => match payload {
                        Some(payload) => payload,
                        None => break,
                    },
                    _ = ticker.tick() => {
                        if last_heard.elapsed() > fleet.stall_bound() {
                            return Err(corrupt("the change feed is stalled: its heartbeat did not come back"));
                        }
                        // Sent on the other connection, in the background: a slow send
                        // must not hold up the changes arriving here.
                        let sender = self.store.clone();
                        let beat = format!("{HEARTBEAT_PREFIX}{}", self.id);
                        tokio::spawn(async move {
                            if let Err(error) = sender.notify(&beat).await {
                                tracing::debug!(%error, "heartbeat not sent");
                            }
                        });
                        self.renew(&client).await?;
                        continue;
                    }
                };
                // Apply this change and every one already waiting, in order, then confirm
                // them all at once.
                let mut next = Some(payload);
                let mut applied_any = false;
                while let Some(payload) = next.take() {
                    if let Some(beat) = payload.strip_prefix(HEARTBEAT_PREFIX) {
                        if beat == self.id {
                            last_heard = tokio::time::Instant::now();
                        }
                    } else if let Some(change) = parse_announcement(&payload) {
                        if change.seq > self.applied {
                            if change.seq != self.applied + 1 {
                                // A change went by unheard: start over from a reload.
                                return Err(corrupt("the change feed skipped a change"));
                            }
                            let applying = self.apply(&client, &change);
                            match tokio::time::timeout(fleet.stall_bound(), applying).await {
                                Ok(applied) => applied?,
                                Err(_) => {
                                    return Err(corrupt(
                                        "the change feed stalled while reading a change",
                                    ))
                                }
                            }
                            self.applied = change.seq;
                            applied_any = true;
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if applied_any {
                    inner.applied.send_replace(self.applied);
                    self.renew(&client).await?;
                }
            }
            Err(corrupt("the change feed connection closed"))
        }
        .await;
        driver.abort();
        result
    }
}

const SELECT_ORGS: &str =
    "SELECT id, subscribed, sealed_key, generation, modified_by, modified_ms FROM orgs";

const SELECT_ADMINS_ONLY: &str =
    "SELECT username, org, enabled, scopes, password_hash, credential_version FROM admins";

/// The row `sql` selects by its one parameter, if any.
async fn one_row(
    client: &Client,
    sql: &str,
    key: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Option<Row>, StoreError> {
    client.query_opt(sql, &[key]).await.map_err(backend)
}

const SELECT_ADMINS: &str =
    "SELECT username, org, enabled, scopes, password_hash, credential_version
     FROM admins ORDER BY username";

const SELECT_SESSIONS: &str =
    "SELECT digest, org, admin, generation, credential_version, created_ms, last_used_ms
     FROM sessions";

fn admin_from_row(row: &Row) -> Result<AdminRecord, StoreError> {
    admin_record(
        row.try_get(0).map_err(backend)?,
        row.try_get(1).map_err(backend)?,
        row.try_get(2).map_err(backend)?,
        i64::from(row.try_get::<_, i16>(3).map_err(backend)?),
        row.try_get(4).map_err(backend)?,
        row.try_get(5).map_err(backend)?,
    )
}

fn session_from_row(row: &Row) -> Result<SessionRecord, StoreError> {
    session_record(
        row.try_get(0).map_err(backend)?,
        row.try_get(1).map_err(backend)?,
        row.try_get(2).map_err(backend)?,
        row.try_get(3).map_err(backend)?,
        row.try_get(4).map_err(backend)?,
        row.try_get(5).map_err(backend)?,
        Some(row.try_get(6).map_err(backend)?),
    )
}

/// One live connection and its prepared statements.
struct Conn {
    client: Client,
    statements: Statements,
}

struct Statements {
    load_orgs: Statement,
    lock_org: Statement,
    update_org: Statement,
    insert_audit: Statement,
    audit_page: Statement,
    throttle_take: Statement,
    throttle_succeeded: Statement,
    unconfirmed: Statement,
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
    pub async fn connect(
        url: &str,
        schema: &str,
        format: KeyFormat,
        master: MasterKeys,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, schema, format, FleetConfig::default(), master).await
    }

    /// [`PostgresStore::connect`] with explicit fleet settings (strict or loose mode, lease,
    /// renewal interval, wait bound, replica name; F1).
    ///
    /// # Errors
    ///
    /// As [`PostgresStore::connect`], and [`StoreError::Backend`] if the fleet settings are
    /// out of range (see [`FleetConfig`]).
    pub async fn connect_with(
        url: &str,
        schema: &str,
        format: KeyFormat,
        fleet: FleetConfig,
        master: MasterKeys,
    ) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(corrupt(
                "invalid PostgreSQL schema name: use 1 to 63 ASCII letters, digits or '_', \
                 not starting with 'pg_'",
            ));
        }
        fleet.check()?;
        let mut config: Config = url.parse().map_err(backend)?;
        if config.get_application_name().is_none() {
            config.application_name(format!("orgkey:{}", fleet.name));
        }
        let (conn, sealing) = Conn::open(&config, schema, Some((&master, format))).await?;
        let sealing = sealing.ok_or_else(|| corrupt("the connect did not read the sealing key"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                schema: schema.to_owned(),
                format,
                master: ArcSwap::from_pointee(master),
                sealing: std::sync::Mutex::new(sealing),
                leases: std::sync::Mutex::new(Vec::new()),
                conn: RwLock::new(conn),
                fleet,
                applied: tokio::sync::watch::Sender::new(-1),
            }),
        })
    }

    /// The fleet settings.
    pub fn fleet(&self) -> &FleetConfig {
        &self.inner.fleet
    }

    /// The schema this store keeps its tables in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The master key the fleet seals under (P4), as this store last heard it: at connect,
    /// at its follower's reloads and announcements, at its own commits and rotations.
    pub fn sealing_key(&self) -> MasterKeyId {
        self.inner.sealing()
    }

    /// The master keys this store opens with now (P4): what it connected with, or took
    /// since ([`Store::set_master_keys`], or its follower reading the file again on the
    /// fleet's request).
    pub fn master_keys(&self) -> Arc<MasterKeys> {
        self.inner.master.load_full()
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

    /// Keeps `replica` (its org table and, if given, its admins and sessions) in step with
    /// every change committed to this schema, by any replica (F1, F2): a dedicated connection
    /// `LISTEN`s for the announcements that commits send (`<seq>|<kind>|<subject>`: an org
    /// and its generation, an admin's name, a session's digest; never key material), and
    /// reloads what each names, in commit order.
    ///
    /// In strict mode (the default, [`FleetMode::Strict`]) the follower holds a lease in
    /// `fleet_replicas`, renewed every [`FleetConfig::renewal`] on the feed's own
    /// connection, and confirms each change it applied; writers through any replica wait for
    /// those confirmations (see [`FleetConfig`]). Its table fails closed when the lease runs
    /// out, counting from when the last renewal was sent.
    ///
    /// The table is untrusted (the layer answers 503, fail closed) from this call until the
    /// first reload, and again at once whenever the connection is lost or its heartbeat
    /// stops coming back (F3: one every renewal interval; a stall is detected within seven
    /// intervals, 1.75 s by default); the follower reconnects with a back-off (50 ms
    /// doubling to 2 s, back to 50 ms after 5 s of health), `LISTEN`s again, reloads
    /// everything, and trusts the table again. With sessions, it also shares their use
    /// with the fleet (idle time is fleet-wide) and deletes dead sessions from the store.
    /// Stops when the returned handle is dropped.
    pub fn follow(&self, replica: Replica) -> ChangeFollower {
        let table = replica.table.clone();
        // Not trusted until the first reload: no request is judged before the feed follows.
        table.set_trusted(false);
        if self.inner.fleet.mode == FleetMode::Loose {
            table.set_lease_until(None);
        }
        if let Some(admins) = &replica.admins {
            admins.followed();
        }
        let sessions = replica.sessions.clone();
        let mut follower = Follower {
            store: self.clone(),
            replica,
            id: random_id(),
            applied: 0,
        };
        let follow = async move {
            const FIRST_BACKOFF: Duration = Duration::from_millis(50);
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = tokio::time::Instant::now();
                let result = follower.follow_once().await;
                table.set_trusted(false);
                if let Err(error) = result {
                    let reason = std::error::Error::source(&error)
                        .map_or_else(|| error.to_string(), ToString::to_string);
                    tracing::warn!(schema = %follower.store.inner.schema, %reason, "change feed lost; failing closed until reloaded");
                }
                if started.elapsed() >= HEALTHY_PERIOD {
                    // It had been following fine: this is a new failure, not the same one.
                    backoff = FIRST_BACKOFF;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        };
        let mut handle = ChangeFollower::new(run_apart(follow));
        if let Some(sessions) = sessions {
            handle.also(run_apart(sessions.share_use(Arc::new(self.clone()))));
        }
        handle
    }

    /// Runs a statement that changes one row and announces it (`fleet_announce`): the
    /// change's number, or `None` if it changed nothing (so announced nothing).
    async fn announced(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<i64>, StoreError> {
        let conn = self.shared().await?;
        let row = conn.client.query_opt(sql, params).await.map_err(backend)?;
        row.map(|row| row.try_get::<_, i64>(0))
            .transpose()
            .map_err(backend)
    }

    /// Inserts `admin`, `on_conflict` (`DO NOTHING`, or `DO UPDATE ...`) when it exists, and
    /// announces it if a row was written; the change's number, if any.
    async fn write_admin(
        &self,
        admin: &AdminRecord,
        on_conflict: &str,
    ) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "WITH saved AS (
                 INSERT INTO admins (username, org, enabled, scopes, password_hash,
                     credential_version)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (username) {on_conflict}
                 RETURNING username
             )
             SELECT fleet_announce($7, 'a', username) FROM saved"
        );
        self.announced(
            &sql,
            &[
                &admin.username.as_str(),
                &admin.org.as_str(),
                &admin.enabled,
                &i16::from(admin.scopes.bits()),
                &admin.password_hash,
                &(admin.credential_version as i64),
                &channel(&self.inner.schema),
            ],
        )
        .await
    }

    /// Waits until every replica with a live lease has applied change `seq` (strict mode);
    /// at most the wait bound, then [`StoreError::Unconfirmed`] naming the others.
    async fn settle(&self, seq: i64) -> Result<(), StoreError> {
        let fleet = &self.inner.fleet;
        if fleet.mode != FleetMode::Strict {
            // Loose: in force on this replica when the call returns (if it follows), on the
            // others as soon as they hear it.
            let mut applied = self.inner.applied.subscribe();
            if *applied.borrow() >= 0 {
                let caught_up = applied.wait_for(|applied| *applied >= seq);
                if tokio::time::timeout(fleet.wait, caught_up).await.is_err() {
                    tracing::warn!(schema = %self.inner.schema, "committed; this replica has not applied the change yet");
                }
            }
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        // Replicas confirm by writing their progress (never by NOTIFY, see `fleet_renew`):
        // look at 1 ms, then every 2 ms, for the first 20 ms, then every 5 ms.
        let mut look = 0u32;
        loop {
            let pending = async {
                let conn = self.shared().await?;
                conn.client
                    .query(&conn.statements.unconfirmed, &[&seq])
                    .await
                    .map_err(backend)
            }
            .await;
            let waited = started.elapsed();
            let rows = match pending {
                Ok(rows) => rows,
                Err(error) => {
                    // Committed, but the fleet cannot be asked: say so, never "not done".
                    tracing::warn!(schema = %self.inner.schema, %error, "committed; could not ask the fleet whether it applied the change");
                    return Err(StoreError::Unconfirmed(Unconfirmed {
                        replicas: Vec::new(),
                        waited,
                    }));
                }
            };
            if rows.is_empty() {
                #[cfg(feature = "metrics")]
                crate::metrics::fleet_confirmed(waited);
                return Ok(());
            }
            if waited >= fleet.wait {
                let replicas = rows
                    .iter()
                    .filter_map(|row| row.try_get::<_, String>(0).ok())
                    .collect();
                return Err(StoreError::Unconfirmed(Unconfirmed { replicas, waited }));
            }
            look += 1;
            let nap = match look {
                1 => Duration::from_millis(1),
                _ if waited < Duration::from_millis(20) => Duration::from_millis(2),
                _ => Duration::from_millis(5),
            };
            tokio::time::sleep(nap.min(fleet.wait - waited)).await;
        }
    }

    /// Makes sure this process holds master key `id` (P4): if its keys lack it, reads its
    /// master key file again ([`MasterKeys::path`]) and, if the file holds it, takes the
    /// file's keys, keeping the ones it had (a replica never drops a key on the fleet's
    /// request: only [`Store::set_master_keys`] does, after its checks). Answers whether it
    /// holds `id` now.
    fn fetch_master_key(&self, id: MasterKeyId) -> bool {
        let master = self.inner.master.load_full();
        if master.contains(id) {
            return true;
        }
        let schema = &self.inner.schema;
        let Some(path) = master.path() else {
            tracing::warn!(schema = %schema, key = %id, "the fleet uses master key {id}, which this process lacks, and its master keys were not read from a file it could read again");
            return false;
        };
        match MasterKeys::load(path) {
            Ok(file) if file.contains(id) => {
                self.inner.master.rcu(|held| {
                    if held.contains(id) {
                        Arc::clone(held)
                    } else {
                        Arc::new(file.merged(held))
                    }
                });
                tracing::info!(schema = %schema, key = %id, file = %path.display(), "master key file read again; it holds the fleet's new master key");
                true
            }
            Ok(_) => {
                tracing::error!(schema = %schema, key = %id, file = %path.display(), "the fleet uses master key {id}, which this replica's master key file does not hold: give it the fleet's current file");
                false
            }
            Err(error) => {
                tracing::error!(schema = %schema, key = %id, %error, "the fleet uses master key {id}, and this replica's master key file cannot be read again");
                false
            }
        }
    }

    /// Writes the ids of this store's master keys into its followers' lease rows.
    async fn record_master_keys(&self) -> Result<(), StoreError> {
        let leases = self.inner.leases();
        if leases.is_empty() {
            return Ok(());
        }
        let ids = id_list(&self.inner.master.load());
        let conn = self.shared().await?;
        conn.client
            .execute(
                "UPDATE fleet_replicas SET master_keys = $2 WHERE id = ANY($1)",
                &[&leases, &ids],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// [`Store::set_master_keys`]: see the type's docs, "Master keys in a fleet".
    async fn take_master_keys(&self, master: MasterKeys) -> Result<(), StoreError> {
        let sealing = {
            let conn = self.shared().await?;
            let sealing = read_sealing(&conn.client).await?;
            check_master(&conn.client, &master, Some(sealing)).await?;
            sealing
        };
        let new = master.current();
        self.inner.master.store(Arc::new(master));
        self.inner.set_sealing(sealing);
        self.record_master_keys().await?;
        if new == sealing {
            return Ok(());
        }
        self.switch_sealing(new).await
    }

    /// Switches the fleet to sealing under `new` once every replica with a live lease holds
    /// it: asks them all to read their master key files again (`r`, again every second),
    /// waits at most the wait bound for every live lease to list `new`, then, in one
    /// transaction that checks the leases again, sets `fleet_head.sealing_key` and announces
    /// `k`; in strict mode it returns once every live replica has applied that.
    async fn switch_sealing(&self, new: MasterKeyId) -> Result<(), StoreError> {
        /// How often the request to read the master key file again is repeated (for replicas
        /// whose feed reconnected meanwhile and so did not hear it).
        const ASK_AGAIN: Duration = Duration::from_secs(1);
        let fleet = &self.inner.fleet;
        let hex = new.to_hex();
        let started = tokio::time::Instant::now();
        let mut asked: Option<tokio::time::Instant> = None;
        loop {
            if asked.is_none_or(|at| at.elapsed() >= ASK_AGAIN) {
                let seq = self.ask_for(&hex).await?;
                tracing::info!(schema = %self.inner.schema, key = %new, seq, "asked every replica to read its master key file again");
                asked = Some(tokio::time::Instant::now());
            }
            let lacking = match self.try_switch(&hex).await? {
                Switched::Now(seq) => {
                    self.inner.set_sealing(new);
                    tracing::info!(schema = %self.inner.schema, key = %new, "the fleet seals under a new master key");
                    match self.settle(seq).await {
                        Err(StoreError::Unconfirmed(unconfirmed)) => {
                            // Switched all the same, and commits read the key in their own
                            // transaction: a replica that did not confirm still seals under it.
                            tracing::warn!(schema = %self.inner.schema, %unconfirmed, "sealing key switched");
                            return Ok(());
                        }
                        settled => return settled,
                    }
                }
                Switched::Already => {
                    self.inner.set_sealing(new);
                    return Ok(());
                }
                Switched::Lacking(names) => names,
            };
            let waited = started.elapsed();
            if waited >= fleet.wait {
                return Err(StoreError::MasterKeyNotShared {
                    key: new,
                    replicas: lacking,
                    waited,
                });
            }
            tokio::time::sleep(Duration::from_millis(20).min(fleet.wait - waited)).await;
        }
    }

    /// Asks every replica to fetch master key `hex` from its file: records it as wanted (for
    /// replicas that reload) and announces `r`; the announcement's number.
    async fn ask_for(&self, hex: &str) -> Result<i64, StoreError> {
        let mut conn = self.exclusive().await?;
        let tx = conn.client.transaction().await.map_err(backend)?;
        tx.execute("UPDATE fleet_head SET wanted_key = $1", &[&hex])
            .await
            .map_err(backend)?;
        let seq = announce_in(&tx, &self.inner.schema, "r", hex).await?;
        tx.commit().await.map_err(backend)?;
        Ok(seq)
    }

    /// One attempt of [`PostgresStore::switch_sealing`]: under `fleet_head`'s row lock (no
    /// change is announced meanwhile), the replicas with a live lease that do not list `new`;
    /// if none, the switch, announced.
    async fn try_switch(&self, new: &str) -> Result<Switched, StoreError> {
        let mut conn = self.exclusive().await?;
        let tx = conn.client.transaction().await.map_err(backend)?;
        let current: Option<String> = tx
            .query_one("SELECT sealing_key FROM fleet_head FOR UPDATE", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(backend)?;
        if current.as_deref() == Some(new) {
            return Ok(Switched::Already);
        }
        let lacking = tx
            .query(
                "SELECT name FROM fleet_replicas
                 WHERE lease_until > clock_timestamp()
                   AND NOT ($1 = ANY(string_to_array(COALESCE(master_keys, ''), ',')))
                 ORDER BY name",
                &[&new],
            )
            .await
            .map_err(backend)?;
        if !lacking.is_empty() {
            let names = lacking
                .iter()
                .map(|row| row.try_get::<_, String>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            return Ok(Switched::Lacking(names));
        }
        tx.execute("UPDATE fleet_head SET sealing_key = $1", &[&new])
            .await
            .map_err(backend)?;
        let seq = announce_in(&tx, &self.inner.schema, "k", new).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Switched::Now(seq))
    }

    /// [`Store::reseal`]: pages through the orgs by id, [`RESEAL_BATCH`] at a time, sealing
    /// again under the fleet's sealing key every key sealed under another (one statement per
    /// batch, so one transaction); each row is written only if its generation and sealed
    /// value are still the ones read, so a concurrent commit is never overwritten (its row
    /// is looked at again in the next pass). Done when a pass from the start finds nothing.
    async fn reseal_all(&self) -> Result<u64, StoreError> {
        let format = self.inner.format;
        let mut done = 0u64;
        let mut after = String::new();
        loop {
            let conn = self.shared().await?;
            let sealing = read_sealing(&conn.client).await?;
            self.inner.set_sealing(sealing);
            let master = self.inner.master.load_full();
            if !master.contains(sealing) {
                return Err(StoreError::MasterKeyMissing {
                    key: sealing,
                    file: master.describe(),
                });
            }
            let rows = conn
                .client
                .query(
                    "SELECT id, generation, sealed_key FROM orgs
                     WHERE id > $1 AND sealed_key IS NOT NULL
                       AND substring(sealed_key FROM 1 FOR 9) <> $2
                     ORDER BY id LIMIT $3",
                    &[&after, &&sealed_prefix(sealing)[..], &(RESEAL_BATCH as i64)],
                )
                .await
                .map_err(backend)?;
            if rows.is_empty() {
                if after.is_empty() {
                    return Ok(done);
                }
                after.clear();
                continue;
            }
            let (mut ids, mut generations, mut old, mut new) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in &rows {
                let id: String = row.try_get(0).map_err(backend)?;
                let stored: i64 = row.try_get(1).map_err(backend)?;
                let sealed: Vec<u8> = row.try_get(2).map_err(backend)?;
                let org = OrgId::new(&id).map_err(|_| corrupt("stored org id is invalid"))?;
                let generation = Generation::new(
                    u64::try_from(stored).map_err(|_| corrupt("stored generation is negative"))?,
                );
                let key = master
                    .open(&org, generation, &sealed, format)
                    .map_err(|error| StoreError::Sealed {
                        org: org.clone(),
                        error,
                        file: master.describe(),
                    })?;
                new.push(
                    master
                        .seal_under(sealing, &org, generation, &key)
                        .map_err(backend)?,
                );
                ids.push(id);
                generations.push(stored);
                old.push(sealed);
            }
            after.clone_from(&ids[ids.len() - 1]);
            let written = conn
                .client
                .execute(
                    "UPDATE orgs o SET sealed_key = u.new
                     FROM unnest($1::TEXT[], $2::BIGINT[], $3::BYTEA[], $4::BYTEA[])
                         AS u(id, generation, old, new)
                     WHERE o.id = u.id AND o.generation = u.generation
                       AND o.sealed_key = u.old",
                    &[&ids, &generations, &old, &new],
                )
                .await
                .map_err(backend)?;
            done += written;
        }
    }

    /// [`Store::master_keys_in_use`]: the keys stored keys are sealed under, and the fleet's
    /// sealing key.
    async fn keys_in_use(&self) -> Result<Vec<MasterKeyId>, StoreError> {
        let conn = self.shared().await?;
        let mut ids = stored_key_ids(&conn.client).await?;
        let sealing = read_sealing(&conn.client).await?;
        if !ids.contains(&sealing) {
            ids.push(sealing);
        }
        Ok(ids)
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
            *conn = Conn::open(&self.inner.config, &self.inner.schema, None)
                .await?
                .0;
        }
        Ok(conn)
    }
}

impl Conn {
    /// Connects, points `search_path` at `schema`, migrates, and prepares the statements.
    /// With `seal` (the store's first connect) it also checks the master keys against the
    /// schema and seals keys a release before P4 wrote in clear (see [`migrate`]), and
    /// answers the fleet's sealing key.
    async fn open(
        config: &Config,
        schema: &str,
        seal: Option<(&MasterKeys, KeyFormat)>,
    ) -> Result<(Self, Option<MasterKeyId>), StoreError> {
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
        let sealing = migrate(&mut client, schema, seal).await?;
        let statements = Statements::prepare(&client).await?;
        Ok((Self { client, statements }, sealing))
    }
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, StoreError> {
        let prepare = |sql: &'static str| async move { client.prepare(sql).await.map_err(backend) };
        Ok(Self {
            load_orgs: prepare(
                "SELECT id, subscribed, sealed_key, generation, modified_by, modified_ms
                 FROM orgs ORDER BY id",
            )
            .await?,

            // The org's row, locked, and the key the fleet seals under now (P4).
            lock_org: prepare(
                "SELECT o.generation, h.sealing_key FROM orgs o, fleet_head h
                 WHERE o.id = $1 FOR UPDATE OF o",
            )
            .await?,
            update_org: prepare(
                "UPDATE orgs SET subscribed = $2, sealed_key = $3, generation = $4,
                     modified_by = $5, modified_ms = $6, api_key = NULL
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
            unconfirmed: prepare(
                "SELECT name
                 FROM fleet_replicas
                 WHERE applied_seq < $1 AND lease_until > clock_timestamp()
                 ORDER BY name",
            )
            .await?,
        })
    }
}

/// Creates the schema if missing and runs the migrations it has not had, in one transaction
/// under an advisory lock (so concurrent connects wait for each other). With `seal` (a
/// store's first connect), in the same transaction: sets the fleet's sealing key if it has
/// none yet, fails if the master keys lack a key the schema uses ([`check_master`]; the
/// transaction rolls back, so a wrong file changes nothing), and seals what a release before
/// P4 stored in clear; answers the sealing key.
async fn migrate(
    client: &mut Client,
    schema: &str,
    seal: Option<(&MasterKeys, KeyFormat)>,
) -> Result<Option<MasterKeyId>, StoreError> {
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
    let sealing = match seal {
        Some((master, format)) => {
            let sealing = first_sealing_key(&tx, master).await?;
            check_master(&tx, master, Some(sealing)).await?;
            seal_plaintext(&tx, master, sealing, format).await?;
            Some(sealing)
        }
        None => None,
    };
    tx.commit().await.map_err(backend)?;
    Ok(sealing)
}

/// The fleet's sealing key; set first if the schema has none: a new schema, or one that
/// release 6 sealed (each replica under its own file's first key). Then it is the key the
/// most recently changed sealed key is under, if `master` holds it (the fleet's replicas
/// opened it), else `master`'s first.
async fn first_sealing_key(
    tx: &tokio_postgres::Transaction<'_>,
    master: &MasterKeys,
) -> Result<MasterKeyId, StoreError> {
    let row = tx
        .query_one("SELECT sealing_key FROM fleet_head", &[])
        .await
        .map_err(backend)?;
    let stored: Option<&str> = row.try_get(0).map_err(backend)?;
    if stored.is_some() {
        return parse_sealing(stored);
    }
    let newest = tx
        .query_opt(
            "SELECT substring(sealed_key FROM 1 FOR 9) FROM orgs WHERE sealed_key IS NOT NULL
             ORDER BY modified_ms DESC NULLS LAST LIMIT 1",
            &[],
        )
        .await
        .map_err(backend)?;
    let newest = match &newest {
        Some(row) => sealed_by(row.try_get::<_, &[u8]>(0).map_err(backend)?),
        None => None,
    };
    let sealing = newest
        .filter(|id| master.contains(*id))
        .unwrap_or_else(|| master.current());
    tx.execute(
        "UPDATE fleet_head SET sealing_key = $1 WHERE sealing_key IS NULL",
        &[&sealing.to_hex()],
    )
    .await
    .map_err(backend)?;
    Ok(sealing)
}

/// Seals, in the migration's transaction, the keys a release before P4 stored in clear
/// (`api_key`), and empties that column: all or nothing. The old row versions stay in the
/// table's files until PostgreSQL reuses their space (and in WAL archives and dumps taken
/// before): the README says to regenerate keys whose old copies cannot be destroyed.
async fn seal_plaintext(
    tx: &tokio_postgres::Transaction<'_>,
    master: &MasterKeys,
    sealing: MasterKeyId,
    format: KeyFormat,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT id, api_key, generation FROM orgs WHERE api_key IS NOT NULL FOR UPDATE",
            &[],
        )
        .await
        .map_err(backend)?;
    for row in &rows {
        let id: &str = row.try_get(0).map_err(backend)?;
        let key: &str = row.try_get(1).map_err(backend)?;
        let generation: i64 = row.try_get(2).map_err(backend)?;
        let org = OrgId::new(id).map_err(|_| corrupt("stored org id is invalid"))?;
        let key = ApiKey::parse_with(key, format)
            .map_err(|_| corrupt("a stored clear key does not match the key format"))?;
        let generation = Generation::new(
            u64::try_from(generation).map_err(|_| corrupt("stored generation is negative"))?,
        );
        let sealed = master
            .seal_under(sealing, &org, generation, &key)
            .map_err(backend)?;
        tx.execute(
            "UPDATE orgs SET sealed_key = $2, api_key = NULL WHERE id = $1",
            &[&id, &sealed],
        )
        .await
        .map_err(backend)?;
    }
    if !rows.is_empty() {
        tracing::info!(
            target: "orgkey::store::postgres",
            sealed = rows.len(),
            "keys written before sealing (P4) are sealed"
        );
    }
    Ok(())
}

fn org_from_row(
    row: &Row,
    format: KeyFormat,
    master: &MasterKeys,
) -> Result<OrgRecord, StoreError> {
    org_record(
        row.try_get(0).map_err(backend)?,
        row.try_get(1).map_err(backend)?,
        row.try_get(2).map_err(backend)?,
        row.try_get(3).map_err(backend)?,
        row.try_get(4).map_err(backend)?,
        row.try_get(5).map_err(backend)?,
        format,
        master,
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
            let master = self.inner.master.load();
            rows.iter()
                .map(|row| org_from_row(row, self.inner.format, &master))
                .collect()
        })
    }

    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let seq = self
                .announced(
                    "WITH saved AS (
                         INSERT INTO orgs (id, subscribed, generation) VALUES ($1, FALSE, 0)
                         ON CONFLICT (id) DO NOTHING
                         RETURNING id
                     )
                     SELECT fleet_announce($2, 'o', id || ':0') FROM saved",
                    &[&org.as_str(), &channel(&self.inner.schema)],
                )
                .await?;
            match seq {
                // Every replica knows the org when this returns (strict mode), so an admin
                // can be created for it through any of them.
                Some(seq) => self.settle(seq).await,
                None => Err(StoreError::Exists),
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
            let master = self.inner.master.load_full();
            let mut conn = self.exclusive().await?;
            let Conn { client, statements } = &mut *conn;
            // Dropping `tx` without committing (any early return) queues a ROLLBACK ahead of
            // whatever the connection is asked next.
            let tx = client.transaction().await.map_err(backend)?;
            let stored = tx
                .query_opt(&statements.lock_org, &[&next.org.as_str()])
                .await
                .map_err(backend)?;
            let (stored, sealing): (i64, MasterKeyId) = match stored {
                None => return Err(StoreError::NotFound),
                Some(row) => (
                    row.try_get(0).map_err(backend)?,
                    parse_sealing(row.try_get(1).map_err(backend)?)?,
                ),
            };
            if stored != expected {
                return Err(StoreError::Conflict);
            }
            // P4: sealed under the key the fleet seals under as of this transaction (every
            // live replica holds it); a process that lacks it writes nothing. A change
            // without a key (delete, unsubscribe) needs no master key.
            self.inner.set_sealing(sealing);
            if next.key.is_some() && !master.contains(sealing) {
                return Err(StoreError::MasterKeyMissing {
                    key: sealing,
                    file: master.describe(),
                });
            }
            let sealed = sealed_key(&master, sealing, next)?;
            tx.execute(
                &statements.update_org,
                &[
                    &next.org.as_str(),
                    &next.subscribed,
                    &sealed,
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
            // F1: every follower of this schema hears "<seq>|o|org:generation" when this
            // commits (a notification is delivered at COMMIT, never for a rolled-back
            // change). Never key material.
            let subject = format!("{}:{}", next.org.as_str(), next.generation.get());
            let seq = announce_in(&tx, &self.inner.schema, "o", &subject).await?;
            tx.commit().await.map_err(backend)?;
            drop(conn);
            self.settle(seq).await
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
                .query(SELECT_ADMINS, &[])
                .await
                .map_err(backend)?;
            rows.iter().map(admin_from_row).collect()
        })
    }

    fn create_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self.write_admin(admin, "DO NOTHING").await? {
                Some(seq) => self.settle(seq).await,
                // Another process created it first: nothing was written.
                None => Err(StoreError::Exists),
            }
        })
    }

    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let replace = "DO UPDATE SET org = $2, enabled = $3, scopes = $4, password_hash = $5,
                 credential_version = $6";
            match self.write_admin(admin, replace).await? {
                Some(seq) => self.settle(seq).await,
                None => Err(corrupt("an admin upsert wrote nothing")),
            }
        })
    }

    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let seq = self
                .announced(
                    "WITH gone AS (DELETE FROM admins WHERE username = $1 RETURNING username)
                     SELECT fleet_announce($2, 'a', username) FROM gone",
                    &[&username.as_str(), &channel(&self.inner.schema)],
                )
                .await?;
            match seq {
                Some(seq) => self.settle(seq).await,
                None => Err(StoreError::NotFound),
            }
        })
    }

    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        Box::pin(async move {
            let conn = self.shared().await?;
            let rows = conn
                .client
                .query(SELECT_SESSIONS, &[])
                .await
                .map_err(backend)?;
            rows.iter().map(session_from_row).collect()
        })
    }

    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let generation = to_i64(session.generation.get(), "generation out of range")?;
            let seq = self
                .announced(
                    "WITH saved AS (
                         INSERT INTO sessions (digest, org, admin, generation,
                             credential_version, created_ms, last_used_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (digest) DO NOTHING
                         RETURNING digest
                     )
                     SELECT fleet_announce($8, 's+', encode(digest, 'hex')) FROM saved",
                    &[
                        &&session.digest[..],
                        &session.org.as_str(),
                        &session.admin.as_str(),
                        &generation,
                        &(session.credential_version as i64),
                        &millis(session.created),
                        &millis(session.last_used).max(millis(session.created)),
                        &channel(&self.inner.schema),
                    ],
                )
                .await?;
            match seq {
                Some(seq) => self.settle(seq).await,
                None => Ok(()), // already stored
            }
        })
    }

    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.take_session(digest).await.map(|_| ()) })
    }

    fn take_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let seq = self
                .announced(
                    "WITH gone AS (DELETE FROM sessions WHERE digest = $1 RETURNING digest)
                     SELECT fleet_announce($2, 's-', encode(digest, 'hex')) FROM gone",
                    &[&&digest[..], &channel(&self.inner.schema)],
                )
                .await?;
            match seq {
                Some(seq) => match self.settle(seq).await {
                    Ok(()) => Ok(true),
                    // Deleted by this call all the same.
                    Err(StoreError::Unconfirmed(unconfirmed)) => {
                        tracing::warn!(schema = %self.inner.schema, %unconfirmed, "session deleted");
                        Ok(true)
                    }
                    Err(other) => Err(other),
                },
                // Already gone, announced by whoever deleted it.
                None => Ok(false),
            }
        })
    }

    fn sync_session_use<'a>(
        &'a self,
        used: &'a [([u8; 32], u64)],
        since_ms: u64,
    ) -> StoreFuture<'a, Vec<([u8; 32], u64)>> {
        Box::pin(async move {
            let range = "session use time out of range";
            let digests: Vec<&[u8]> = used.iter().map(|(digest, _)| &digest[..]).collect();
            let times = used
                .iter()
                .map(|(_, ms)| to_i64(*ms, range))
                .collect::<Result<Vec<i64>, _>>()?;
            let since = to_i64(since_ms, range)?;
            let conn = self.shared().await?;
            if !used.is_empty() {
                conn.client
                    .execute(
                        "UPDATE sessions s SET last_used_ms = GREATEST(s.last_used_ms, u.ms)
                         FROM unnest($1::BYTEA[], $2::BIGINT[]) AS u(digest, ms)
                         WHERE s.digest = u.digest",
                        &[&digests, &times],
                    )
                    .await
                    .map_err(backend)?;
            }
            let rows = conn
                .client
                .query(
                    "SELECT digest, last_used_ms FROM sessions WHERE last_used_ms > $1",
                    &[&since],
                )
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|row| {
                    let digest: Vec<u8> = row.try_get(0).map_err(backend)?;
                    let digest: [u8; 32] = digest
                        .try_into()
                        .map_err(|_| corrupt("stored session digest is not 32 bytes"))?;
                    let last: i64 = row.try_get(1).map_err(backend)?;
                    Ok((digest, last.max(0) as u64))
                })
                .collect()
        })
    }

    fn collect_sessions(
        &self,
        now_ms: u64,
        idle_ms: u64,
        lifetime_ms: u64,
    ) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let range = "session time out of range";
            let now = to_i64(now_ms, range)?;
            let idle = to_i64(idle_ms, range)?;
            let lifetime = to_i64(lifetime_ms, range)?;
            let conn = self.shared().await?;
            // Dead by S2 and K6 alike, but announced all the same: a replica whose last use
            // of a session has not reached the store yet must hear that the row went, or a
            // later logout elsewhere (which finds no row) would never reach it.
            let deleted = conn
                .client
                .execute(
                    "WITH gone AS (
                         DELETE FROM sessions s
                         WHERE s.created_ms <= $1::BIGINT - $3::BIGINT
                            OR s.last_used_ms <= $1::BIGINT - $2::BIGINT
                            OR NOT EXISTS (SELECT 1 FROM orgs o
                                           WHERE o.id = s.org AND o.generation = s.generation)
                         RETURNING s.digest
                     )
                     SELECT fleet_announce($4, 's-', encode(digest, 'hex')) FROM gone",
                    &[&now, &idle, &lifetime, &channel(&self.inner.schema)],
                )
                .await
                .map_err(backend)?;
            Ok(deleted)
        })
    }

    /// After `pg_restore` (P4): every key must open; then, in one transaction, every session
    /// is deleted (each announced, so a replica left running drops it too) and each org's
    /// audit log records `restore` by `actor`.
    fn restored<'a>(&'a self, actor: &'a Actor) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let orgs = self.load_orgs().await?;
            let mut conn = self.exclusive().await?;
            let Conn { client, statements } = &mut *conn;
            let tx = client.transaction().await.map_err(backend)?;
            tx.execute(
                "WITH gone AS (DELETE FROM sessions RETURNING digest)
                 SELECT fleet_announce($1, 's-', encode(digest, 'hex')) FROM gone",
                &[&channel(&self.inner.schema)],
            )
            .await
            .map_err(backend)?;
            let at = millis(SystemTime::now());
            for org in &orgs {
                let generation = to_i64(org.generation.get(), "generation out of range")?;
                tx.execute(
                    &statements.insert_audit,
                    &[
                        &org.org.as_str(),
                        &actor.as_str(),
                        &KeyAction::Restore.as_str(),
                        &at,
                        &generation,
                    ],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(orgs.len() as u64)
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

    fn follow_changes(&self, replica: Replica) -> Option<ChangeFollower> {
        Some(self.follow(replica))
    }

    fn master_keys_in_use(&self) -> StoreFuture<'_, Vec<MasterKeyId>> {
        Box::pin(self.keys_in_use())
    }

    fn set_master_keys(&self, master: MasterKeys) -> StoreFuture<'_, ()> {
        Box::pin(self.take_master_keys(master))
    }

    fn reseal(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.reseal_all())
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
