//! Durable state: the store trait and its backends (P1-P3).
//!
//! This module defines the trait and ships an in-memory store, the embedded SQLite store and
//! (feature `postgres`) a PostgreSQL store for fleets, all passing one contract test suite
//! (`tests/store_contract.rs`). [`KeyAdmin::open`](crate::KeyAdmin::open) loads the orgs from
//! a store and commits every key and subscription change to it before the change takes
//! effect (P1); [`Admins::open`](crate::Admins::open) and
//! [`Sessions::open`](crate::Sessions::open) do the same for admin accounts and sessions. On
//! PostgreSQL every replica follows every change (F1, F2; see
//! `PostgresStore::follow`, feature `postgres`).
//!
//! A commit that fails with [`StoreError::Backend`] while the connection broke may still
//! have been written (the outcome is unknown to the client); treat such an error as "reload
//! before retrying".
//!
//! # The contract
//!
//! - [`Store::create_org`] creates an org with no subscription, no key and generation 0,
//!   and fails with [`StoreError::Exists`] if it exists.
//! - [`Store::commit`] is a compare-and-set on the org's generation: it writes the next state
//!   and appends the audit record **in one transaction**, and fails with
//!   [`StoreError::Conflict`] (writing nothing) if the stored generation is not the expected
//!   one, so two writers racing on one org get one success and one conflict. It returns only
//!   once the change is durable.
//! - [`Store::load_orgs`] returns every org as last committed (P2: a restart never
//!   resurrects an old or deleted key).
//! - [`Store::put_admin`] / [`Store::delete_admin`] / [`Store::load_admins`] keep admin
//!   accounts (passwords only as argon2id PHC strings).
//! - [`Store::put_session`] / [`Store::delete_session`] / [`Store::load_sessions`] keep
//!   sessions by the SHA-256 digest of their id (never the id); [`Store::take_session`]
//!   deletes one and says whether this call did (between replicas, the one decision between
//!   a logout and a carry-over); [`Store::sync_session_use`] and [`Store::collect_sessions`]
//!   share idle time and delete dead rows in a fleet.
//! - [`Store::create_admin`] creates an account unless it exists, atomically across the
//!   processes sharing the store.
//! - [`Store::throttle_take`] / [`Store::throttle_succeeded`] / [`Store::throttle_collect`]
//!   keep the failed-login throttle (A3) where every process sharing the store sees it (F2):
//!   token buckets per source address and per username, and the addresses each admin logged
//!   in from (see [`ThrottleKeys`], and the arithmetic in [`ThrottleBucket`]). A take is
//!   atomic across every process sharing the store: it checks both buckets and charges both
//!   or neither, so N processes allow no more attempts than one; the state is as durable as
//!   the store (a restart refills nothing, except in memory). Usernames and addresses are
//!   stored, never a password or a key.
//! - [`Store::follow_changes`] is the change feed for stores that several processes share
//!   (PostgreSQL): org id and generation only, never key material.
//! - [`Store::audit_page`] reads an org's audit log newest first, `limit` records before a
//!   sequence number (exclusive), for paging. Audit records never contain key material.
//!
//! # Keys at rest (P4)
//!
//! The durable stores keep an org's key only sealed ([`MasterKeys::seal`]: XChaCha20-Poly1305
//! under a master key kept outside the store, bound to the org and its generation), and open
//! it when they load or follow the org, so a copied file, dump or backup reveals no key without
//! the master key file. A row that does not open is an error naming the org
//! ([`StoreError::Sealed`]); nothing is served from it. Stores written by releases before
//! sealing are sealed on their first open (see each backend). [`MemoryStore`] keeps nothing
//! at rest.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use crate::audit::AuditEvent;
use crate::identity::{Scopes, Username};
use crate::key::ApiKey;
use crate::org::{Actor, Generation, OrgId};
use crate::seal::{MasterKeyId, MasterKeys, SealError};
use crate::table::OrgTable;

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
mod throttle;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{FleetConfig, FleetMode, PostgresStore, HEARTBEAT_INTERVAL, STALL_BOUND};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub(crate) use throttle::MemoryThrottle;
pub use throttle::{
    ThrottleBucket, ThrottleKeys, ThrottlePolicy, ThrottleVerdict, KNOWN_ADDRESSES_PER_ADMIN,
};

/// The future a [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One org's durable state.
#[derive(Debug, Clone)]
pub struct OrgRecord {
    /// The org.
    pub org: OrgId,
    /// Whether it has an API subscription.
    pub subscribed: bool,
    /// Its key, if any.
    pub key: Option<ApiKey>,
    /// Its generation.
    pub generation: Generation,
    /// Who made the last change.
    pub last_modified_by: Option<Actor>,
    /// When the last change was made (millisecond precision once stored).
    pub last_modified_on: Option<SystemTime>,
}

/// One admin account as stored (A1: the password only as an argon2id PHC string).
#[derive(Clone)]
pub struct AdminRecord {
    /// The username (normalized).
    pub username: Username,
    /// The admin's org.
    pub org: OrgId,
    /// Whether the account is enabled.
    pub enabled: bool,
    /// The functional scopes.
    pub scopes: Scopes,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Changes whenever the account changes in a way that must end its sessions.
    pub credential_version: u64,
}

impl fmt::Debug for AdminRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not the password, but it is what an offline attack starts from.
        f.debug_struct("AdminRecord")
            .field("username", &self.username)
            .field("org", &self.org)
            .field("enabled", &self.enabled)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// One session as stored (S1: only the digest of its id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 of the session id.
    pub digest: [u8; 32],
    /// The admin's org.
    pub org: OrgId,
    /// The admin.
    pub admin: Username,
    /// The org's generation at login (K6).
    pub generation: Generation,
    /// The admin's credential version at login (S2).
    pub credential_version: u64,
    /// When the session was created (millisecond precision once stored).
    pub created: SystemTime,
    /// When it was last used, as far as the store knows: stores shared by a fleet keep the
    /// uses replicas report ([`Store::sync_session_use`]); the others keep `created`.
    pub last_used: SystemTime,
}

/// An audit event as stored, with its sequence number (increasing, unique per store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The sequence number, for paging.
    pub seq: u64,
    /// The event.
    pub event: AuditEvent,
}

/// Why a store call failed. Nothing was written.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The org's stored generation is not the one the change was built from.
    Conflict,
    /// The org already exists.
    Exists,
    /// The org does not exist.
    NotFound,
    /// The state is held by another process: an SQLite file serves one process at a time
    /// (P5). Nothing was opened or written.
    InUse {
        /// The holder's process id, if it recorded one.
        pid: Option<u32>,
    },
    /// The backend failed (I/O, database error, corrupt data); the source says why.
    Backend(BackendError),
    /// **The change is committed**, but some replicas of the fleet did not confirm that they
    /// applied it within the wait bound (strict mode, F1). They hold live leases, so until
    /// they apply it or their leases run out they may still judge by the old state. Callers
    /// treat the change as made and tell the admin which replicas are behind.
    Unconfirmed(Unconfirmed),
    /// An org's stored key cannot be opened with the master key file (P4): sealed under a
    /// master key the file does not hold, or altered, copied from another org, or replayed
    /// from another generation. Nothing was loaded.
    Sealed {
        /// The org whose row failed.
        org: OrgId,
        /// Why.
        error: SealError,
        /// The master key file, as [`MasterKeys::describe`] says it.
        file: String,
    },
    /// The fleet seals keys under a master key this process's master key file does not hold
    /// (P4, PostgreSQL): a commit that had a key to seal wrote nothing; a connect or a
    /// follower's reload opened nothing. Give the process the fleet's current master key
    /// file, then `SIGHUP` or restart it.
    MasterKeyMissing {
        /// The master key the fleet seals under.
        key: MasterKeyId,
        /// The master key file, as [`MasterKeys::describe`] says it.
        file: String,
    },
    /// A fleet could not start sealing under a new master key (P4, PostgreSQL): these
    /// replicas, holding live leases, did not hold it within the wait bound. The fleet still
    /// seals under its previous key and nothing was sealed again; this store took the new
    /// keys (they open everything stored).
    MasterKeyNotShared {
        /// The new master key.
        key: MasterKeyId,
        /// The replicas that do not hold it, as they registered (`--replica-name`).
        replicas: Vec<String>,
        /// How long the call waited for them.
        waited: std::time::Duration,
    },
}

/// The replicas that had not confirmed a committed change when the strict-mode wait bound
/// ran out (F1); see [`StoreError::Unconfirmed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unconfirmed {
    /// The replicas' names, as they registered (`--replica-name`).
    pub replicas: Vec<String>,
    /// How long the call waited.
    pub waited: std::time::Duration,
}

impl fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.replicas.is_empty() {
            return write!(
                f,
                "the change is committed, but the fleet could not be asked whether every \
                 replica applied it (after {} ms); a replica that did not may judge by the old \
                 state until its lease runs out",
                self.waited.as_millis()
            );
        }
        write!(
            f,
            "the change is committed, but replica(s) {} did not confirm it within {} ms; they \
             may judge by the old state until they apply it or their leases run out",
            self.replicas.join(", "),
            self.waited.as_millis()
        )
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conflict => f.write_str("the org was changed concurrently"),
            Self::Exists => f.write_str("the org already exists"),
            Self::NotFound => f.write_str("no such org"),
            Self::InUse { pid } => {
                f.write_str("the state file is in use by another orgkey process")?;
                if let Some(pid) = pid {
                    write!(f, " (pid {pid})")?;
                }
                f.write_str(
                    "; one state file serves one process (P5): stop that process, or run \
                     several replicas on PostgreSQL",
                )
            }
            Self::Backend(_) => f.write_str("the store failed"),
            Self::Unconfirmed(unconfirmed) => fmt::Display::fmt(unconfirmed, f),
            Self::Sealed { org, error, file } => write!(
                f,
                "the stored key of org {} cannot be opened with {file}: {error}",
                org.as_str()
            ),
            Self::MasterKeyMissing { key, file } => write!(
                f,
                "the fleet seals keys under master key {key}, which {file} does not hold; \
                 nothing was written. Give this process the fleet's current master key file, \
                 then SIGHUP or restart it"
            ),
            Self::MasterKeyNotShared {
                key,
                replicas,
                waited,
            } => write!(
                f,
                "the fleet still seals under its previous master key: replica(s) {} did not \
                 hold the new master key {key} within {} ms (their master key files lack it). \
                 Give them the new master key file, SIGHUP or restart them, then run \
                 master-key rotate again (it resumes this rotation); no key was sealed again",
                replicas.join(", "),
                waited.as_millis()
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(e),
            // `Sealed` says its reason in its message (the `error` field is the value).
            _ => None,
        }
    }
}

/// A backend's own error, kept opaque so no driver type is in orgkey's API.
pub struct BackendError(Box<dyn std::error::Error + Send + Sync>);

impl BackendError {
    /// Wraps a backend error (for implementations of [`Store`] outside orgkey).
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(error))
    }

    pub(crate) fn msg(message: &str) -> Self {
        Self(message.into())
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Where orgs, keys and the audit log persist. See the [module docs](self) for the contract.
pub trait Store: Send + Sync + 'static {
    /// Every org, as last committed.
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>>;

    /// Creates an org with no subscription, no key, generation 0.
    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()>;

    /// Writes `next` and appends `audit` in one transaction, if the stored generation is
    /// `expected`.
    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()>;

    /// Up to `limit` audit records of `org`, newest first, with `seq < before` if given.
    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>>;

    /// Every admin account.
    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>>;

    /// Creates or replaces the account `admin.username`; durable when it returns.
    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()>;

    /// Creates the account `admin.username` unless it exists, atomically across every process
    /// sharing the store ([`StoreError::Exists`] then, and nothing written), so two processes
    /// creating one admin at once get one success. The default, for stores one process owns
    /// (whose caller has checked), is [`Store::put_admin`].
    fn create_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        self.put_admin(admin)
    }

    /// Deletes an account; [`StoreError::NotFound`] if there is none.
    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()>;

    /// Every stored session.
    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>>;

    /// Stores a new session; durable when it returns.
    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()>;

    /// Deletes a session (logout, expiry); deleting one that is not there is not an error.
    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()>;

    /// Deletes a session and answers whether this call deleted it (it was there): the one
    /// decision between a logout and a carry-over of the same session on two replicas (W2,
    /// S3). The default, for stores one process owns (whose callers decide in memory),
    /// deletes and answers `true`.
    fn take_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.delete_session(digest).await?;
            Ok(true)
        })
    }

    /// Shares session use across the processes of a fleet (F2, idle time counts the last use
    /// on any replica): records that each session of `used` was last used at its time (only
    /// ever moving a use later), and returns every session whose recorded last use is after
    /// `since_ms`. The default, for stores no other process shares, records nothing and
    /// returns nothing.
    fn sync_session_use<'a>(
        &'a self,
        used: &'a [([u8; 32], u64)],
        since_ms: u64,
    ) -> StoreFuture<'a, Vec<([u8; 32], u64)>> {
        let _ = (used, since_ms);
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Deletes stored sessions that can never be valid again at `now_ms`: older than
    /// `lifetime_ms`, unused (on any replica) for `idle_ms`, or stamped with a generation
    /// their org no longer has (K6); returns how many. The default deletes nothing (a store
    /// of one process deletes dead sessions as that process finds them).
    fn collect_sessions(
        &self,
        now_ms: u64,
        idle_ms: u64,
        lifetime_ms: u64,
    ) -> StoreFuture<'_, u64> {
        let _ = (now_ms, idle_ms, lifetime_ms);
        Box::pin(async { Ok(0) })
    }

    /// Charges one login attempt to the failed-login throttle (A3), atomically across every
    /// process sharing the store (F2), before its password is checked: if the bucket of
    /// `keys.address()` has no token, answers [`ThrottleVerdict::Wait`] and charges nothing;
    /// else, unless the address is known for `keys.username()` (a success from it within
    /// [`ThrottlePolicy::known_address_ttl`]), if the username's bucket has no token, the
    /// same; else takes one token from the address bucket and (unless known) one from the
    /// username bucket. Concurrent takes never take more tokens than the buckets hold.
    fn throttle_take<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ThrottleVerdict>;

    /// The login charged by [`Store::throttle_take`] with `keys` succeeded: gives the address
    /// bucket its token back (and the username bucket, if `username_charged`), and remembers
    /// the address as known for the username until `now_ms` plus the policy's
    /// `known_address_ttl`, keeping the [`KNOWN_ADDRESSES_PER_ADMIN`] most recent.
    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()>;

    /// Deletes the throttle state that can no longer change a decision at or after `now_ms`
    /// (buckets that are full again, known addresses past their time); returns how many
    /// entries went. Decisions are the same before and after. [`Sessions`](crate::Sessions)
    /// calls it in the background at most once a minute.
    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64>;

    /// The change feed (F1, F2): keeps `replica` (its org table, admins and sessions) in
    /// step with changes that *other* processes commit to this store, hearing only what
    /// changed (never key material) and reloading it; `None` for a store no other process can
    /// write (memory, an SQLite file owned by one process). While the feed cannot be trusted
    /// the table fails closed.
    fn follow_changes(&self, replica: Replica) -> Option<ChangeFollower> {
        let _ = replica;
        None
    }
    /// The master keys that seal at least one stored key (P4), and, for a store a fleet
    /// shares, the key it seals under (PostgreSQL: `fleet_head.sealing_key`); empty for
    /// stores that keep nothing at rest.
    fn master_keys_in_use(&self) -> StoreFuture<'_, Vec<MasterKeyId>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Makes `master` this store's master keys (a master key file read again: `SIGHUP`, or a
    /// rotation's first half), if they open every stored key; otherwise changes nothing and
    /// fails with [`StoreError::Sealed`]. In a fleet, the store seals under a new key only
    /// once every live replica holds it, else fails with [`StoreError::MasterKeyNotShared`]
    /// (see `PostgresStore`'s "Master keys in a fleet").
    fn set_master_keys(&self, master: MasterKeys) -> StoreFuture<'_, ()> {
        let _ = master;
        Box::pin(std::future::ready(Ok(())))
    }

    /// Seals again, under the sealing (first) master key, every stored key another master
    /// key sealed (a rotation's second half, P4); returns how many. Requests and changes go
    /// on meanwhile, and a crash leaves every key sealed under one of the file's keys.
    fn reseal(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(0)))
    }

    /// Makes a state restored from a backup by the database's own tools (PostgreSQL's
    /// `pg_restore`) what orgkey's restore promises (P4): every stored key must open with
    /// this store's master keys, every session ends, and each org's audit log records
    /// [`KeyAction::Restore`](crate::KeyAction) by `actor`, in one transaction; returns the
    /// orgs. Stores with their own restore (SQLite: [`SqliteStore::restore`]) or nothing at
    /// rest refuse.
    fn restored<'a>(&'a self, actor: &'a Actor) -> StoreFuture<'a, u64> {
        let _ = actor;
        Box::pin(std::future::ready(Err(StoreError::Backend(
            BackendError::msg("this store has no restore of this kind"),
        ))))
    }
}

/// What a change feed keeps in step in this process ([`Store::follow_changes`]): the org
/// table, and, when [`OrgKey::builder`](crate::OrgKey::builder) builds it, the admin
/// directory and the session table too (F2).
#[derive(Clone)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub struct Replica {
    pub(crate) table: OrgTable,
    pub(crate) admins: Option<Arc<dyn FollowAdmins>>,
    pub(crate) sessions: Option<Arc<dyn FollowSessions>>,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("table", &self.table)
            .field("admins", &self.admins.is_some())
            .field("sessions", &self.sessions.is_some())
            .finish()
    }
}

impl Replica {
    /// A replica that follows org changes into `table`.
    pub fn new(table: OrgTable) -> Self {
        Self {
            table,
            admins: None,
            sessions: None,
        }
    }

    /// Follows admin account changes into `admins` too.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn with_admins(mut self, admins: Arc<dyn FollowAdmins>) -> Self {
        self.admins = Some(admins);
        self
    }

    /// Follows logins and logouts into `sessions` too.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn with_sessions(mut self, sessions: Arc<dyn FollowSessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// The org table.
    pub fn table(&self) -> &OrgTable {
        &self.table
    }
}

/// What a change feed applies to the admin directory (implemented by `Admins`; the store
/// does not know the directory).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // only PostgreSQL's feed calls it
pub(crate) trait FollowAdmins: Send + Sync {
    /// From now on the feed applies every change, this process's own included.
    fn followed(&self);
    /// An account as stored, created or changed on any replica.
    fn stored(&self, record: AdminRecord);
    /// An account deleted on any replica.
    fn deleted(&self, username: &Username);
    /// Every stored account, after a reconnect.
    fn reload(&self, records: Vec<AdminRecord>);
}

/// What a change feed applies to the session table (implemented by `Sessions`).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // only PostgreSQL's feed calls it
pub(crate) trait FollowSessions: Send + Sync {
    /// A session created on any replica.
    fn stored(&self, record: SessionRecord);
    /// A session ended on any replica.
    fn deleted(&self, digest: &[u8; 32]);
    /// Every stored session, after a reconnect.
    fn reload(&self, records: Vec<SessionRecord>);
    /// Shares session use with the fleet through `store`, until dropped.
    fn share_use(&self, store: Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The handle of a running change feed ([`Store::follow_changes`]); dropping it stops
/// following (the table keeps the state it has).
#[derive(Debug)]
pub struct ChangeFollower {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ChangeFollower {
    /// Wraps the task that follows (for implementations of [`Store`] outside orgkey).
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self { tasks: vec![task] }
    }

    /// Stops `task` too when this handle is dropped.
    pub fn also(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }
}

impl Drop for ChangeFollower {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A shared store is a store: `KeyAdmin::open(table, Arc::clone(&store))` and
/// `Admins::open(orgs, store)` can share one database.
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        (**self).load_orgs()
    }
    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        (**self).create_org(org)
    }
    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()> {
        (**self).commit(expected, next, audit)
    }
    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        (**self).audit_page(org, before, limit)
    }
    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        (**self).load_admins()
    }
    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        (**self).put_admin(admin)
    }
    fn create_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        (**self).create_admin(admin)
    }
    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        (**self).delete_admin(username)
    }
    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        (**self).load_sessions()
    }
    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        (**self).put_session(session)
    }
    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        (**self).delete_session(digest)
    }
    fn take_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, bool> {
        (**self).take_session(digest)
    }
    fn sync_session_use<'a>(
        &'a self,
        used: &'a [([u8; 32], u64)],
        since_ms: u64,
    ) -> StoreFuture<'a, Vec<([u8; 32], u64)>> {
        (**self).sync_session_use(used, since_ms)
    }
    fn collect_sessions(
        &self,
        now_ms: u64,
        idle_ms: u64,
        lifetime_ms: u64,
    ) -> StoreFuture<'_, u64> {
        (**self).collect_sessions(now_ms, idle_ms, lifetime_ms)
    }
    fn throttle_take<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ThrottleVerdict> {
        (**self).throttle_take(keys, policy, now_ms)
    }
    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        (**self).throttle_succeeded(keys, username_charged, policy, now_ms)
    }
    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        (**self).throttle_collect(now_ms)
    }
    fn follow_changes(&self, replica: Replica) -> Option<ChangeFollower> {
        (**self).follow_changes(replica)
    }
    fn master_keys_in_use(&self) -> StoreFuture<'_, Vec<MasterKeyId>> {
        (**self).master_keys_in_use()
    }
    fn set_master_keys(&self, master: MasterKeys) -> StoreFuture<'_, ()> {
        (**self).set_master_keys(master)
    }
    fn reseal(&self) -> StoreFuture<'_, u64> {
        (**self).reseal()
    }
    fn restored<'a>(&'a self, actor: &'a Actor) -> StoreFuture<'a, u64> {
        (**self).restored(actor)
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// A driver error, kept opaque.
pub(crate) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(BackendError::new(e))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// A stored value that does not make sense (never includes the value: it may be a key).
pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(BackendError::msg(what))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn stored_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(what))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// An org from its stored columns, validated as the API validates them, its sealed key opened
/// with `master` (shared by the SQL backends).
#[allow(clippy::too_many_arguments)]
pub(crate) fn org_record(
    id: &str,
    subscribed: bool,
    sealed_key: Option<&[u8]>,
    generation: i64,
    modified_by: Option<&str>,
    modified_ms: Option<i64>,
    format: crate::key::KeyFormat,
    master: &MasterKeys,
) -> Result<OrgRecord, StoreError> {
    let org = OrgId::new(id).map_err(|_| corrupt("stored org id is invalid"))?;
    let generation = Generation::new(stored_u64(generation, "stored generation is negative")?);
    let key =
        match sealed_key {
            None => None,
            Some(sealed) => Some(master.open(&org, generation, sealed, format).map_err(
                |error| StoreError::Sealed {
                    org: org.clone(),
                    error,
                    file: master.describe(),
                },
            )?),
        };
    Ok(OrgRecord {
        org,
        subscribed,
        key,
        generation,
        last_modified_by: modified_by
            .map(Actor::new)
            .transpose()
            .map_err(|_| corrupt("stored actor is invalid"))?,
        last_modified_on: modified_ms.map(from_millis),
    })
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// `record`'s key sealed with `master` for its row (shared by the SQL backends).
pub(crate) fn sealed_key(
    master: &MasterKeys,
    under: crate::seal::MasterKeyId,
    record: &OrgRecord,
) -> Result<Option<Vec<u8>>, StoreError> {
    record
        .key
        .as_ref()
        .map(|key| master.seal_under(under, &record.org, record.generation, key))
        .transpose()
        .map_err(backend)
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// An admin account from its stored columns (credential versions are stored as the same 64
/// bits in a signed column).
pub(crate) fn admin_record(
    username: &str,
    org: &str,
    enabled: bool,
    scopes: i64,
    password_hash: String,
    credential_version: i64,
) -> Result<AdminRecord, StoreError> {
    Ok(AdminRecord {
        username: Username::new(username).map_err(|_| corrupt("stored username is invalid"))?,
        org: OrgId::new(org).map_err(|_| corrupt("stored org id is invalid"))?,
        enabled,
        scopes: Scopes::from_bits(u8::try_from(scopes).map_err(|_| corrupt("stored scopes"))?),
        password_hash,
        credential_version: credential_version as u64,
    })
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// A session from its stored columns.
pub(crate) fn session_record(
    digest: Vec<u8>,
    org: &str,
    admin: &str,
    generation: i64,
    credential_version: i64,
    created_ms: i64,
    last_used_ms: Option<i64>,
) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord {
        digest: digest
            .try_into()
            .map_err(|_| corrupt("stored session digest is not 32 bytes"))?,
        org: OrgId::new(org).map_err(|_| corrupt("stored org id is invalid"))?,
        admin: Username::new(admin).map_err(|_| corrupt("stored username is invalid"))?,
        generation: Generation::new(stored_u64(generation, "stored generation is negative")?),
        credential_version: credential_version as u64,
        created: from_millis(created_ms),
        last_used: from_millis(last_used_ms.unwrap_or(created_ms).max(created_ms)),
    })
}

pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}
