//! The in-memory org table: every org's current state, read on the hot path.
//!
//! The table is a [`DashMap`] from [`OrgId`] to an [`ArcSwap`] snapshot of the org's
//! [`OrgState`]. A check does one map lookup, one snapshot load and one constant-time compare;
//! a change builds a new snapshot and installs it with a compare-and-swap, so a reader always
//! sees one whole state (key and generation together), never a mix.
//!
//! The table is changed only through [`KeyAdmin`](crate::KeyAdmin); this module exposes
//! reading.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::key::{ApiKey, KeyFormat};
use crate::org::{Actor, Generation, OrgId};

/// One org's state at one instant: an immutable snapshot.
#[derive(Debug, Clone)]
pub struct OrgState {
    pub(crate) subscribed: bool,
    pub(crate) key: Option<ApiKey>,
    pub(crate) generation: Generation,
    pub(crate) last_modified_by: Option<Actor>,
    pub(crate) last_modified_on: Option<SystemTime>,
}

impl OrgState {
    // Used by the PostgreSQL change feed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn from_record(
        subscribed: bool,
        key: Option<ApiKey>,
        generation: Generation,
        last_modified_by: Option<Actor>,
        last_modified_on: Option<SystemTime>,
    ) -> Self {
        Self {
            subscribed,
            key,
            generation,
            last_modified_by,
            last_modified_on,
        }
    }

    fn new_unsubscribed() -> Self {
        Self {
            subscribed: false,
            key: None,
            generation: Generation::default(),
            last_modified_by: None,
            last_modified_on: None,
        }
    }

    /// Whether the org has an API subscription (K8).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed
    }

    /// The org's key, if it has one.
    pub fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref()
    }

    /// The generation of this state (K6).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Who made the last change (K7).
    pub fn last_modified_by(&self) -> Option<&Actor> {
        self.last_modified_by.as_ref()
    }

    /// When the last change was made (K7).
    pub fn last_modified_on(&self) -> Option<SystemTime> {
        self.last_modified_on
    }
}

/// Why a presented org + key pair was not accepted by [`OrgTable::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// The presented key does not have the configured format (K1).
    MalformedKey,
    /// No org has this id (or the id is not a valid [`OrgId`]).
    UnknownOrg,
    /// The org has no API subscription (K8).
    NoSubscription,
    /// The org has no key (K5).
    NoKey,
    /// The key does not match.
    WrongKey,
}

/// The result of a successful [`OrgTable::verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// The org, as stored in the table (cheap to clone).
    pub org: OrgId,
    /// The generation of the snapshot the key was checked against.
    pub generation: Generation,
}

/// The table of orgs. Cheap to clone: clones share the same table.
#[derive(Clone)]
pub struct OrgTable {
    inner: Arc<Inner>,
}

struct Inner {
    /// Hashed with foldhash, seeded at random per table: org ids are created by operators,
    /// and requests only look up, so an attacker can probe but not build collision chains;
    /// SipHash cost about 180 instructions more per request (docs/hot-path-profile.md).
    orgs: DashMap<OrgId, ArcSwap<OrgState>, foldhash::fast::RandomState>,
    format: KeyFormat,
    /// False while a change feed has lost its connection and not yet reloaded (F1): every
    /// check then fails closed.
    trusted: AtomicBool,
    /// The end of this replica's fleet lease, in [`monotonic_ms`] ([`NO_LEASE`] when no
    /// lease applies): past it, every check fails closed (F1) until the lease is renewed.
    /// Checked on every request, so a replica that was frozen (SIGSTOP, a long pause) never
    /// judges a request between waking up and its timers running.
    lease_until: AtomicU64,
}

/// [`Inner::lease_until`] when the table holds no lease (a single process, loose mode).
const NO_LEASE: u64 = u64::MAX;

/// Milliseconds on the monotonic clock since the first call in this process.
pub(crate) fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl std::fmt::Debug for OrgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgTable")
            .field("orgs", &self.inner.orgs.len())
            .field("format", &self.inner.format)
            .finish_non_exhaustive()
    }
}

impl Default for OrgTable {
    fn default() -> Self {
        Self::new(KeyFormat::default())
    }
}

impl OrgTable {
    /// An empty table whose keys have `format`.
    pub fn new(format: KeyFormat) -> Self {
        Self {
            inner: Arc::new(Inner {
                orgs: DashMap::with_hasher(foldhash::fast::RandomState::default()),
                format,
                trusted: AtomicBool::new(true),
                lease_until: AtomicU64::new(NO_LEASE),
            }),
        }
    }

    /// An empty table sized for `capacity` orgs.
    pub fn with_capacity(format: KeyFormat, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                orgs: DashMap::with_capacity_and_hasher(
                    capacity,
                    foldhash::fast::RandomState::default(),
                ),
                format,
                trusted: AtomicBool::new(true),
                lease_until: AtomicU64::new(NO_LEASE),
            }),
        }
    }

    /// Whether the table can be trusted: false while a change feed that keeps it in step
    /// with other replicas is disconnected and has not reloaded (F1). The layer answers 503
    /// meanwhile.
    /// With a fleet lease (strict mode, F1), also false once the lease has run out without
    /// being renewed.
    pub fn is_trusted(&self) -> bool {
        if !self.inner.trusted.load(Ordering::Acquire) {
            return false;
        }
        let lease_until = self.inner.lease_until.load(Ordering::Acquire);
        lease_until == NO_LEASE || monotonic_ms() < lease_until
    }

    /// Holds the table to a fleet lease that ends at `until` ([`monotonic_ms`]); `None`
    /// removes the lease (a replica in loose mode, or one that stopped following).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn set_lease_until(&self, until: Option<u64>) {
        let value = until.map_or(NO_LEASE, |t| t.min(NO_LEASE - 1));
        self.inner.lease_until.store(value, Ordering::Release);
    }

    // Used by the PostgreSQL change feed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn set_trusted(&self, trusted: bool) {
        self.inner.trusted.store(trusted, Ordering::Release);
    }

    /// Installs `state` for `org` unless the table already has that generation or a newer one
    /// (a change feed may deliver a change after a reload already brought it).
    // Used by the PostgreSQL change feed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn install_if_newer(&self, org: OrgId, state: Arc<OrgState>) {
        match self.inner.orgs.entry(org) {
            Entry::Occupied(slot) => install_monotonic(slot.get(), state),
            Entry::Vacant(slot) => {
                slot.insert(ArcSwap::new(state));
            }
        }
    }

    /// Installs a state that the store has committed (P1), unless the table already holds
    /// that generation or a newer one: the change feed of this very process may have
    /// installed the same commit first, or a later one. Either way the committed change is in
    /// force when this returns, so the writer reports it as done.
    pub(crate) fn install_committed(&self, org: &OrgId, next: Arc<OrgState>) {
        self.install_if_newer(org.clone(), next);
    }

    /// The key format of this table (K1).
    pub fn format(&self) -> KeyFormat {
        self.inner.format
    }

    /// The number of orgs.
    pub fn len(&self) -> usize {
        self.inner.orgs.len()
    }

    /// Whether the table has no orgs.
    pub fn is_empty(&self) -> bool {
        self.inner.orgs.is_empty()
    }

    /// The current state of `org`, or `None` if there is no such org.
    pub fn state(&self, org: &str) -> Option<Arc<OrgState>> {
        self.inner.orgs.get(org).map(|cell| cell.load_full())
    }

    /// Checks a presented key for an org: the hot path of the layer.
    ///
    /// Order of checks: the presented value's length (a value of the wrong length is never
    /// compared), then the org, then its subscription and key, then one constant-time compare
    /// against the key of one snapshot; a failure is reported as `MalformedKey` whenever the
    /// value is not of the key format (its characters are checked only then: a value equal
    /// to a key has the format).
    ///
    /// # Errors
    ///
    /// A [`VerifyError`] naming the precise reason, for tracing and metrics; callers must not
    /// show it to clients (L3).
    pub fn verify(&self, org: &str, presented: &[u8]) -> Result<Verified, VerifyError> {
        self.check(org, presented, |id, generation| Verified {
            org: id.clone(),
            generation,
        })
    }

    /// [`OrgTable::verify`] without cloning the org id: `accept` sees the stored id and the
    /// generation of the snapshot that matched.
    pub(crate) fn check<T>(
        &self,
        org: &str,
        presented: &[u8],
        accept: impl FnOnce(&OrgId, Generation) -> T,
    ) -> Result<T, VerifyError> {
        // A value of another length is never compared (the length is public, L4).
        if presented.len() != self.inner.format.len() {
            return Err(VerifyError::MalformedKey);
        }
        let result = self.lookup_and_compare(org, presented, accept);
        // A value equal to a stored key has the format, so the character check only has to
        // run on a failure, to name it: a malformed value still wins over every other reason.
        if result.is_err() && self.inner.format.validate(presented).is_err() {
            return Err(VerifyError::MalformedKey);
        }
        result
    }

    fn lookup_and_compare<T>(
        &self,
        org: &str,
        presented: &[u8],
        accept: impl FnOnce(&OrgId, Generation) -> T,
    ) -> Result<T, VerifyError> {
        let entry = self.inner.orgs.get(org).ok_or(VerifyError::UnknownOrg)?;
        let snapshot = entry.value().load();
        if !snapshot.subscribed {
            return Err(VerifyError::NoSubscription);
        }
        let key = snapshot.key.as_ref().ok_or(VerifyError::NoKey)?;
        if key.ct_eq_bytes(presented) {
            Ok(accept(entry.key(), snapshot.generation))
        } else {
            Err(VerifyError::WrongKey)
        }
    }

    /// Adds an org without subscription or key. Returns `false` if it already exists.
    pub(crate) fn insert_new(&self, org: OrgId) -> bool {
        match self.inner.orgs.entry(org) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(ArcSwap::from_pointee(OrgState::new_unsubscribed()));
                true
            }
        }
    }

    /// Sets the state of `org`, creating it if needed (loading from a store).
    pub(crate) fn install(&self, org: OrgId, state: OrgState) {
        match self.inner.orgs.entry(org) {
            Entry::Occupied(slot) => slot.get().store(Arc::new(state)),
            Entry::Vacant(slot) => {
                slot.insert(ArcSwap::from_pointee(state));
            }
        }
    }

    /// Installs `next` as the state of `org` if the current state is still `expected`.
    ///
    /// Returns `Ok(true)` when installed, `Ok(false)` when another change came first, and
    /// `Err(())` when the org does not exist.
    pub(crate) fn compare_and_swap(
        &self,
        org: &str,
        expected: &Arc<OrgState>,
        next: Arc<OrgState>,
    ) -> Result<bool, ()> {
        let entry = self.inner.orgs.get(org).ok_or(())?;
        let previous = entry.value().compare_and_swap(expected, next);
        Ok(Arc::ptr_eq(&previous, expected))
    }
}

/// Moves `cell` forward to `next` unless it already holds `next`'s generation or a newer one.
/// A compare-and-swap loop, so that two installers racing (a writer and a change feed) can
/// never move an org back to an older generation.
fn install_monotonic(cell: &ArcSwap<OrgState>, next: Arc<OrgState>) {
    let mut current = cell.load_full();
    while current.generation < next.generation {
        let previous = cell.compare_and_swap(&current, Arc::clone(&next));
        if Arc::ptr_eq(&previous, &current) {
            return;
        }
        current = Arc::clone(&previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(generation: u64) -> OrgState {
        OrgState::from_record(true, None, Generation::new(generation), None, None)
    }

    /// A writer and a change feed installing the same org's commits in any order, from two
    /// threads, never move it back: it ends at the newest generation, and no reader ever sees
    /// a generation go down (issue 9, item 3).
    #[test]
    fn racing_installs_never_move_an_org_back() {
        let table = OrgTable::default();
        let org = OrgId::new("acme").unwrap();
        assert!(table.insert_new(org.clone()));
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut last = 0;
                while !stop.load(Ordering::Relaxed) {
                    let now = table.state("acme").unwrap().generation().get();
                    assert!(now >= last, "went back from {last} to {now}");
                    last = now;
                }
            });
            let writer = scope.spawn(|| {
                for g in 1..=20_000u64 {
                    table.install_committed(&org, Arc::new(at(g)));
                }
            });
            let feed = scope.spawn(|| {
                // The feed delivers the same commits, late and out of order.
                for g in (1..=20_000u64).rev().step_by(3) {
                    table.install_if_newer(org.clone(), Arc::new(at(g)));
                }
            });
            writer.join().unwrap();
            feed.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap();
        });
        assert_eq!(table.state("acme").unwrap().generation().get(), 20_000);
    }
}
