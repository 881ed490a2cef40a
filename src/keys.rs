//! The admin handle: subscriptions and the key life cycle (K2-K9, P1).
//!
//! [`KeyAdmin`] is the only way to change an org's key. Every change:
//!
//! 1. loads the org's current snapshot and validates the change against it;
//! 2. builds the next snapshot: new key (if any), generation + 1, "last modified by / on" (K7);
//! 3. commits it to the store, if any, with a compare-and-set on the generation (P1), then
//!    installs it in the table; without a store, the table's compare-and-swap on the snapshot
//!    it was built from is the commit. A committed change is reported as done even when this
//!    process's change feed installed it first;
//! 4. records an [`AuditEvent`] and a `tracing` event (O1);
//! 5. returns.
//!
//! So when a change returns, every request and login that begins afterwards is judged against
//! the new state (K6).
//!
//! # Concurrent changes
//!
//! Two changes to the same org that race are never merged and never lost silently: exactly one
//! installs its snapshot; every other gets [`KeyError::Conflict`] and changes nothing (no
//! audit event either). A caller that still wants its change made may look at the new state
//! ([`KeyAdmin::view`]) and try again. Changes to different orgs never conflict.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::audit::{AuditEvent, AuditSink, KeyAction, TracingAuditSink};
use crate::clock::{Clock, SharedClock};
use crate::identity::Scope;
use crate::key::{ApiKey, KeyFormatError, RandomnessError};
use crate::org::{Actor, Generation, OrgId};
use crate::store::{AuditRecord, OrgRecord, Store, StoreError};
use crate::table::{OrgState, OrgTable};
use crate::Authenticated;

/// What an admin sees of the org's key (K9).
///
/// `Debug` is redacted (the key's `Debug` is); read the key with
/// [`ApiKey::expose_secret`] on [`KeyInfo::key`].
#[derive(Debug, Clone)]
pub struct KeyInfo {
    state: Arc<OrgState>,
    base_url: Option<Arc<str>>,
    unconfirmed: Option<Arc<crate::store::Unconfirmed>>,
}

impl KeyInfo {
    fn from_state(state: Arc<OrgState>, base_url: Option<Arc<str>>) -> Self {
        Self {
            state,
            base_url,
            unconfirmed: None,
        }
    }

    /// After a change in strict fleet mode (F1): the replicas that had not confirmed it
    /// when the wait bound ran out. The change is committed either way; `None` when every
    /// live replica confirmed (or there is no fleet).
    pub fn unconfirmed(&self) -> Option<&crate::store::Unconfirmed> {
        self.unconfirmed.as_deref()
    }

    /// The key, or `None` after a delete (K5).
    pub fn key(&self) -> Option<&ApiKey> {
        self.state.key()
    }

    /// Whether the org has an enabled key: every key that exists is enabled.
    pub fn enabled(&self) -> bool {
        self.state.key().is_some()
    }

    /// The org's generation (K6).
    pub fn generation(&self) -> Generation {
        self.state.generation()
    }

    /// The last admin (or system actor) to change the key (K7).
    pub fn last_modified_by(&self) -> Option<&Actor> {
        self.state.last_modified_by()
    }

    /// When the key was last changed (K7).
    pub fn last_modified_on(&self) -> Option<SystemTime> {
        self.state.last_modified_on()
    }

    /// The base URL of this deployment's API, shown beside the key, if configured.
    pub fn base_url(&self) -> Option<&str> {
        self.base_url.as_deref()
    }
}

/// Why an admin call failed. Nothing was changed.
#[derive(Debug)]
#[non_exhaustive]
pub enum KeyError {
    /// No org has this id.
    UnknownOrg,
    /// An org with this id already exists.
    OrgExists,
    /// The org has no API subscription, so its key cannot be managed (K8; HTTP 403).
    NoSubscription,
    /// The org already has an API subscription.
    AlreadySubscribed,
    /// `add` while a key exists: delete the existing key first (K2).
    KeyExists,
    /// The org has no key to edit, regenerate or delete (K5).
    NoKey,
    /// The new key value is not valid for this deployment (K1).
    InvalidKey(KeyFormatError),
    /// Another change to the same org was made concurrently and won; this one was not applied.
    Conflict,
    /// The OS random number generator failed (K3).
    Randomness(RandomnessError),
    /// The caller may not manage keys: not an admin session, or no `key-admin` scope (403).
    Forbidden,
    /// The durable store failed; nothing was changed, in the store or in memory (P1).
    Store(StoreError),
    /// The call needs a store (the audit log), and this handle has none.
    NoStore,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOrg => f.write_str("unknown organization"),
            Self::OrgExists => f.write_str("organization already exists"),
            Self::NoSubscription => f.write_str("no API subscription"),
            Self::AlreadySubscribed => f.write_str("organization already has an API subscription"),
            Self::KeyExists => {
                f.write_str("an API key already exists: delete the existing key first")
            }
            Self::NoKey => f.write_str("the organization has no API key"),
            Self::InvalidKey(_) => f.write_str("invalid API key value"),
            Self::Conflict => f.write_str(
                "the key was changed concurrently by another request; reload and try again",
            ),
            Self::Randomness(_) => f.write_str("could not generate a key"),
            Self::Forbidden => {
                f.write_str("managing the API key needs an admin session with the key-admin scope")
            }
            Self::Store(_) => f.write_str("the store failed; nothing was changed"),
            Self::NoStore => f.write_str("no store is configured: the audit log is not kept"),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidKey(e) => Some(e),
            Self::Randomness(e) => Some(e),
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl KeyError {
    /// A stable lowercase name of the variant, for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::UnknownOrg => "unknown_org",
            Self::OrgExists => "org_exists",
            Self::NoSubscription => "no_subscription",
            Self::AlreadySubscribed => "already_subscribed",
            Self::KeyExists => "key_exists",
            Self::NoKey => "no_key",
            Self::InvalidKey(_) => "invalid_key",
            Self::Conflict => "conflict",
            Self::Randomness(_) => "randomness",
            Self::Forbidden => "forbidden",
            Self::Store(_) => "store",
            Self::NoStore => "no_store",
        }
    }
}

/// The handle that manages orgs' subscriptions and keys. Cheap to clone.
///
/// ```
/// # tokio_test_block_on(async {
/// use orgkey::{Actor, KeyAdmin, OrgId, OrgTable};
///
/// let admin = KeyAdmin::new(OrgTable::default());
/// let org = OrgId::new("acme").unwrap();
/// let alice = Actor::new("alice@acme.example").unwrap();
/// admin.create_org(&org).await.unwrap();
/// let info = admin.subscribe(&org, &alice).await.unwrap();
/// let old = info.key().unwrap().clone();
/// admin.regenerate(&org, &alice).await.unwrap();
/// // The old key is dead as soon as regenerate returned (K6).
/// assert!(admin.table().verify("acme", old.expose_secret().as_bytes()).is_err());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct KeyAdmin {
    table: OrgTable,
    store: Option<Arc<dyn Store>>,
    audit: Arc<dyn AuditSink>,
    clock: SharedClock,
    base_url: Option<Arc<str>>,
    /// Set only in a [`SessionKeyAdmin`]: the generation its session was authenticated
    /// under; a change from any other generation is a conflict.
    expected_generation: Option<Generation>,
}

impl fmt::Debug for KeyAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAdmin")
            .field("table", &self.table)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl KeyAdmin {
    /// A handle over `table`, auditing to `tracing` and using the system clock.
    pub fn new(table: OrgTable) -> Self {
        Self {
            table,
            store: None,
            audit: Arc::new(TracingAuditSink),
            clock: SharedClock::default(),
            base_url: None,
            expected_generation: None,
        }
    }

    /// The store this handle commits to, if any.
    #[cfg_attr(not(feature = "gateway"), allow(dead_code))] // the operator commands' store
    pub(crate) fn store(&self) -> Option<&Arc<dyn Store>> {
        self.store.as_ref()
    }

    /// A handle whose changes are committed to `store` before they take effect (P1), over
    /// `table` filled with the store's orgs as last committed (P2).
    ///
    /// # Errors
    ///
    /// [`KeyError::Store`] if the store cannot be read.
    pub async fn open(table: OrgTable, store: impl Store) -> Result<Self, KeyError> {
        let store: Arc<dyn Store> = Arc::new(store);
        for record in store.load_orgs().await.map_err(KeyError::Store)? {
            let org = record.org.clone();
            table.install(
                org,
                OrgState {
                    subscribed: record.subscribed,
                    key: record.key,
                    generation: record.generation,
                    last_modified_by: record.last_modified_by,
                    last_modified_on: record.last_modified_on,
                },
            );
        }
        let mut admin = Self::new(table);
        admin.store = Some(store);
        Ok(admin)
    }

    /// Sends audit events to `sink` instead of `tracing`.
    pub fn with_audit_sink(mut self, sink: impl AuditSink) -> Self {
        self.audit = Arc::new(sink);
        self
    }

    /// Uses `clock` for "last modified on" (tests inject a fixed clock).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// The base URL shown with the key (K9), if set.
    pub fn base_url(&self) -> Option<&str> {
        self.base_url.as_deref()
    }

    /// The base URL shown beside the key (K9), for example `https://gw.example/api/v1`.
    pub fn with_base_url(mut self, base_url: &str) -> Self {
        self.base_url = Some(Arc::from(base_url));
        self
    }

    /// The table this handle changes; give it to [`OrgKeyLayer`](crate::OrgKeyLayer).
    pub fn table(&self) -> &OrgTable {
        &self.table
    }

    /// Creates an org with no subscription and no key (in the store first, if there is one).
    ///
    /// # Errors
    ///
    /// [`KeyError::OrgExists`] if the org exists, [`KeyError::Store`].
    pub async fn create_org(&self, org: &OrgId) -> Result<(), KeyError> {
        if self.table.state(org.as_str()).is_some() {
            return Err(KeyError::OrgExists);
        }
        if let Some(store) = &self.store {
            match store.create_org(org).await {
                // Created by this call: this process's change feed may have installed it
                // already (a fleet), which is the same org.
                Ok(()) | Err(StoreError::Unconfirmed(_)) => {
                    self.table.insert_new(org.clone());
                    tracing::info!(target: "orgkey::keys", org = %org, "organization created");
                    return Ok(());
                }
                Err(StoreError::Exists) => return Err(KeyError::OrgExists),
                Err(other) => return Err(KeyError::Store(other)),
            }
        }
        if self.table.insert_new(org.clone()) {
            tracing::info!(target: "orgkey::keys", org = %org, "organization created");
            Ok(())
        } else {
            Err(KeyError::OrgExists)
        }
    }

    /// What an admin sees of the org's key (K9).
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownOrg`], or [`KeyError::NoSubscription`] (K8).
    pub fn view(&self, org: &OrgId) -> Result<KeyInfo, KeyError> {
        let state = self.table.state(org.as_str()).ok_or(KeyError::UnknownOrg)?;
        if !state.subscribed {
            return Err(KeyError::NoSubscription);
        }
        Ok(KeyInfo::from_state(state, self.base_url.clone()))
    }

    /// Applies an API subscription and provisions a random, enabled key (K8).
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownOrg`], [`KeyError::AlreadySubscribed`], [`KeyError::Conflict`],
    /// [`KeyError::Randomness`].
    pub async fn subscribe(&self, org: &OrgId, actor: &Actor) -> Result<KeyInfo, KeyError> {
        self.change(org, actor, KeyAction::Subscribe, |state| {
            if state.subscribed {
                return Err(KeyError::AlreadySubscribed);
            }
            Ok((true, Some(self.random_key()?)))
        })
        .await
    }

    /// Removes the API subscription and with it the key (K8, K5, K6).
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownOrg`], [`KeyError::NoSubscription`], [`KeyError::Conflict`].
    pub async fn unsubscribe(&self, org: &OrgId, actor: &Actor) -> Result<KeyInfo, KeyError> {
        self.change(org, actor, KeyAction::Unsubscribe, |state| {
            if !state.subscribed {
                return Err(KeyError::NoSubscription);
            }
            Ok((false, None))
        })
        .await
    }

    /// Adds a random key to an org that has none (K2, K3).
    ///
    /// # Errors
    ///
    /// [`KeyError::KeyExists`] while a key exists (delete it first), and
    /// [`KeyError::UnknownOrg`], [`KeyError::NoSubscription`], [`KeyError::Conflict`],
    /// [`KeyError::Randomness`].
    pub async fn add(&self, org: &OrgId, actor: &Actor) -> Result<KeyInfo, KeyError> {
        self.change(org, actor, KeyAction::Add, |state| {
            if state.key.is_some() {
                return Err(KeyError::KeyExists);
            }
            Ok((true, Some(self.random_key()?)))
        })
        .await
    }

    /// Sets the key to an admin-chosen value (K4). The same value may be used by other orgs.
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidKey`] if `key` does not have the table's format,
    /// [`KeyError::NoKey`] if the org has no key to edit (add one), and
    /// [`KeyError::UnknownOrg`], [`KeyError::NoSubscription`], [`KeyError::Conflict`].
    pub async fn edit(&self, org: &OrgId, key: ApiKey, actor: &Actor) -> Result<KeyInfo, KeyError> {
        let format = self.table.format();
        if key.format() != format {
            return Err(KeyError::InvalidKey(KeyFormatError::WrongLength {
                expected: format.len(),
                actual: key.len(),
            }));
        }
        self.change(org, actor, KeyAction::Edit, |state| {
            if state.key.is_none() {
                return Err(KeyError::NoKey);
            }
            Ok((true, Some(key.clone())))
        })
        .await
    }

    /// Replaces the key with a new random one (K3).
    ///
    /// # Errors
    ///
    /// [`KeyError::NoKey`], [`KeyError::UnknownOrg`], [`KeyError::NoSubscription`],
    /// [`KeyError::Conflict`], [`KeyError::Randomness`].
    pub async fn regenerate(&self, org: &OrgId, actor: &Actor) -> Result<KeyInfo, KeyError> {
        self.change(org, actor, KeyAction::Regenerate, |state| {
            if state.key.is_none() {
                return Err(KeyError::NoKey);
            }
            Ok((true, Some(self.random_key()?)))
        })
        .await
    }

    /// Deletes the key: no request or login for the org succeeds until a key is added (K5).
    ///
    /// # Errors
    ///
    /// [`KeyError::NoKey`], [`KeyError::UnknownOrg`], [`KeyError::NoSubscription`],
    /// [`KeyError::Conflict`].
    pub async fn delete(&self, org: &OrgId, actor: &Actor) -> Result<KeyInfo, KeyError> {
        self.change(org, actor, KeyAction::Delete, |state| {
            if state.key.is_none() {
                return Err(KeyError::NoKey);
            }
            Ok((true, None))
        })
        .await
    }

    /// The key operations of the org of an admin session, recorded as made by that admin,
    /// if the session holds the `key-admin` scope.
    ///
    /// The handle is pinned to the generation the session was checked under
    /// ([`Authenticated::generation`](crate::Authenticated::generation)): a change succeeds
    /// only from that generation, so one handle makes at most one change, and a change
    /// racing another (or made after the session died, K6) is [`KeyError::Conflict`] and
    /// changes nothing. Take a new handle for each request.
    ///
    /// # Errors
    ///
    /// [`KeyError::Forbidden`] for a direct-key request or a session without `key-admin`.
    pub fn for_session(&self, auth: &Authenticated) -> Result<SessionKeyAdmin, KeyError> {
        let admin = auth.admin().ok_or(KeyError::Forbidden)?;
        if !auth.has_scope(Scope::KeyAdmin) {
            return Err(KeyError::Forbidden);
        }
        let actor = Actor::new(admin.as_str()).map_err(|_| KeyError::Forbidden)?;
        let mut keys = self.clone();
        keys.expected_generation = Some(auth.generation());
        Ok(SessionKeyAdmin {
            admin: keys,
            org: auth.org_id(),
            actor,
        })
    }

    /// Up to `limit` (at most 500) audit records of `org`, newest first, with a sequence
    /// number below `before` if given (K7).
    ///
    /// # Errors
    ///
    /// [`KeyError::NoStore`] without a store (events then go only to the audit sink),
    /// [`KeyError::Store`].
    pub async fn audit_page(
        &self,
        org: &OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, KeyError> {
        let store = self.store.as_ref().ok_or(KeyError::NoStore)?;
        store
            .audit_page(org, before, limit.min(500))
            .await
            .map_err(KeyError::Store)
    }

    fn random_key(&self) -> Result<ApiKey, KeyError> {
        ApiKey::generate_with(self.table.format()).map_err(KeyError::Randomness)
    }

    /// The write path shared by every change (P1): validate against one snapshot, build the
    /// next, compare-and-swap, audit.
    ///
    /// `decide` sees the current state and returns the next (subscribed, key), or an error.
    /// Subscription actions may run on unsubscribed orgs; every other action needs one (K8).
    async fn change(
        &self,
        org: &OrgId,
        actor: &Actor,
        action: KeyAction,
        decide: impl FnOnce(&OrgState) -> Result<(bool, Option<ApiKey>), KeyError>,
    ) -> Result<KeyInfo, KeyError> {
        let result = self.try_change(org, actor, action, decide).await;
        if let Err(error) = &result {
            tracing::info!(
                target: "orgkey::keys",
                org = %org,
                actor = %actor,
                action = action.as_str(),
                outcome = "refused",
                reason = error.as_str(),
                "api key change refused"
            );
        }
        result
    }

    async fn try_change(
        &self,
        org: &OrgId,
        actor: &Actor,
        action: KeyAction,
        decide: impl FnOnce(&OrgState) -> Result<(bool, Option<ApiKey>), KeyError>,
    ) -> Result<KeyInfo, KeyError> {
        let current = self.table.state(org.as_str()).ok_or(KeyError::UnknownOrg)?;
        let is_subscription_action =
            matches!(action, KeyAction::Subscribe | KeyAction::Unsubscribe);
        if !is_subscription_action && !current.subscribed {
            return Err(KeyError::NoSubscription);
        }
        // A session's change applies to the state the session was checked against: if
        // another change came first, this session is already dead (K6) and loses.
        if self
            .expected_generation
            .is_some_and(|expected| expected != current.generation)
        {
            return Err(KeyError::Conflict);
        }
        let (subscribed, key) = decide(&current)?;
        // Millisecond precision, as stored.
        let at = crate::store::from_millis(crate::store::millis(self.clock.now()));
        let next = Arc::new(OrgState {
            subscribed,
            key,
            generation: current.generation.next(),
            last_modified_by: Some(actor.clone()),
            last_modified_on: Some(at),
        });
        let event = AuditEvent {
            org: org.clone(),
            actor: actor.clone(),
            action,
            at,
            generation: next.generation,
        };
        // P1: commit durably first (a compare-and-set on the generation); a failed commit
        // changes nothing, in the store or here.
        let mut unconfirmed = None;
        if let Some(store) = &self.store {
            let record = OrgRecord {
                org: org.clone(),
                subscribed: next.subscribed,
                key: next.key.clone(),
                generation: next.generation,
                last_modified_by: next.last_modified_by.clone(),
                last_modified_on: next.last_modified_on,
            };
            match store.commit(current.generation, &record, &event).await {
                Ok(()) => {}
                // Committed all the same (F1): reported as done, with the replicas behind.
                Err(StoreError::Unconfirmed(behind)) => {
                    tracing::warn!(target: "orgkey::keys", org = %org, unconfirmed = %behind, "key changed");
                    unconfirmed = Some(Arc::new(behind));
                }
                Err(StoreError::Conflict) => return Err(KeyError::Conflict),
                Err(StoreError::NotFound) => return Err(KeyError::UnknownOrg),
                Err(other) => return Err(KeyError::Store(other)),
            }
            // Committed: the change is done, whoever makes it visible first. This process's
            // change feed may already have installed it (or a later change): the install is
            // monotonic in the generation and the change is reported as done, once (P1).
            self.table.install_committed(org, Arc::clone(&next));
        } else {
            // No store: the table's compare-and-swap is the commit.
            match self
                .table
                .compare_and_swap(org.as_str(), &current, Arc::clone(&next))
            {
                Ok(true) => {}
                Ok(false) => return Err(KeyError::Conflict),
                Err(()) => return Err(KeyError::UnknownOrg),
            }
        }
        self.audit.record(&event);
        #[cfg(feature = "metrics")]
        crate::metrics::changed(action);
        let mut info = KeyInfo::from_state(next, self.base_url.clone());
        info.unconfirmed = unconfirmed;
        Ok(info)
    }
}

/// The key operations of one org, on behalf of one admin session with the `key-admin` scope
/// (from [`KeyAdmin::for_session`]). Each change records that admin as "last modified by",
/// and succeeds only from the generation the session was checked under (otherwise
/// [`KeyError::Conflict`]): one handle, one change.
#[derive(Debug, Clone)]
pub struct SessionKeyAdmin {
    admin: KeyAdmin,
    org: OrgId,
    actor: Actor,
}

impl SessionKeyAdmin {
    /// The org these operations act on.
    pub fn org(&self) -> &OrgId {
        &self.org
    }

    /// The admin acting.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// [`KeyAdmin::view`] for this org.
    ///
    /// # Errors
    ///
    /// As [`KeyAdmin::view`].
    pub fn view(&self) -> Result<KeyInfo, KeyError> {
        self.admin.view(&self.org)
    }

    /// [`KeyAdmin::add`] for this org, by this admin.
    ///
    /// # Errors
    ///
    /// As [`KeyAdmin::add`].
    pub async fn add(&self) -> Result<KeyInfo, KeyError> {
        self.admin.add(&self.org, &self.actor).await
    }

    /// [`KeyAdmin::edit`] for this org, by this admin.
    ///
    /// # Errors
    ///
    /// As [`KeyAdmin::edit`].
    pub async fn edit(&self, key: ApiKey) -> Result<KeyInfo, KeyError> {
        self.admin.edit(&self.org, key, &self.actor).await
    }

    /// [`KeyAdmin::regenerate`] for this org, by this admin.
    ///
    /// # Errors
    ///
    /// As [`KeyAdmin::regenerate`].
    pub async fn regenerate(&self) -> Result<KeyInfo, KeyError> {
        self.admin.regenerate(&self.org, &self.actor).await
    }

    /// [`KeyAdmin::delete`] for this org, by this admin.
    ///
    /// # Errors
    ///
    /// As [`KeyAdmin::delete`].
    pub async fn delete(&self) -> Result<KeyInfo, KeyError> {
        self.admin.delete(&self.org, &self.actor).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use subtle::ConstantTimeEq;

    use super::*;
    use crate::identity::Username;
    use crate::store::{
        AdminRecord, AuditRecord, MemoryStore, SessionRecord, StoreFuture, ThrottleKeys,
        ThrottlePolicy, ThrottleVerdict,
    };

    /// A store whose change feed always wins the race: right after each commit, before the
    /// writer sees the commit return, it installs the committed state in the table, exactly
    /// as the PostgreSQL feed of the writer's own process does when its notification arrives
    /// first (issue 9, item 3). Deterministic: no timing involved.
    struct FeedFirst {
        inner: MemoryStore,
        table: OrgTable,
        /// When set, the "feed" also delivers a later change by another replica (this key,
        /// one generation on) before the writer's commit returns.
        later: Arc<Mutex<Option<ApiKey>>>,
    }

    impl FeedFirst {
        fn feed(&self, record: &OrgRecord) {
            self.table.install_if_newer(
                record.org.clone(),
                Arc::new(OrgState::from_record(
                    record.subscribed,
                    record.key.clone(),
                    record.generation,
                    record.last_modified_by.clone(),
                    record.last_modified_on,
                )),
            );
        }
    }

    impl Store for FeedFirst {
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
            Box::pin(async move {
                self.inner.commit(expected, next, audit).await?;
                self.feed(next);
                let later = self.later.lock().unwrap().take();
                if let Some(key) = later {
                    let mut newer = next.clone();
                    newer.key = Some(key);
                    newer.generation = next.generation.next();
                    newer.last_modified_by = Some(Actor::new("other-replica").unwrap());
                    let mut event = audit.clone();
                    event.generation = newer.generation;
                    self.inner.commit(next.generation, &newer, &event).await?;
                    self.feed(&newer);
                }
                Ok(())
            })
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
        fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
            self.inner.load_sessions()
        }
        fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
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

    #[derive(Clone, Default)]
    struct CountingSink(Arc<AtomicUsize>);

    impl AuditSink for CountingSink {
        fn record(&self, _: &AuditEvent) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Setup {
        admin: KeyAdmin,
        audits: CountingSink,
        later: Arc<Mutex<Option<ApiKey>>>,
        org: OrgId,
        actor: Actor,
    }

    async fn setup() -> Setup {
        let table = OrgTable::default();
        let later = Arc::new(Mutex::new(None));
        let store = FeedFirst {
            inner: MemoryStore::new(),
            table: table.clone(),
            later: Arc::clone(&later),
        };
        let audits = CountingSink::default();
        let admin = KeyAdmin::open(table, store)
            .await
            .unwrap()
            .with_audit_sink(audits.clone());
        let org = OrgId::new("acme").unwrap();
        let actor = Actor::new("ops@acme.example").unwrap();
        admin.create_org(&org).await.unwrap();
        admin.subscribe(&org, &actor).await.unwrap();
        Setup {
            admin,
            audits,
            later,
            org,
            actor,
        }
    }

    #[tokio::test]
    async fn a_change_the_feed_installed_first_is_reported_as_done_once() {
        let s = setup().await;
        let before = s.admin.view(&s.org).unwrap();
        let audits_before = s.audits.0.load(Ordering::SeqCst);
        for action in ["regenerate", "edit", "delete", "add"] {
            let info = match action {
                "regenerate" => s.admin.regenerate(&s.org, &s.actor).await,
                "edit" => {
                    let key = ApiKey::parse("Zx9Qw8Er7Ty6").unwrap();
                    s.admin.edit(&s.org, key, &s.actor).await
                }
                "delete" => s.admin.delete(&s.org, &s.actor).await,
                _ => s.admin.add(&s.org, &s.actor).await,
            }
            .unwrap_or_else(|e| panic!("{action}: a committed change answered {e}"));
            let now = s.admin.view(&s.org).unwrap();
            assert_eq!(info.generation(), now.generation(), "{action}");
            match (info.key(), now.key()) {
                (Some(a), Some(b)) => assert!(bool::from(a.ct_eq(b)), "{action}"),
                (None, None) => {}
                _ => panic!("{action}: the answer and the table disagree"),
            }
        }
        assert_eq!(
            s.admin.view(&s.org).unwrap().generation().get(),
            before.generation().get() + 4
        );
        // One audit record per committed change, not zero, not two.
        assert_eq!(s.audits.0.load(Ordering::SeqCst), audits_before + 4);
    }

    #[tokio::test]
    async fn a_later_change_arriving_first_never_moves_the_table_back() {
        let s = setup().await;
        let theirs = ApiKey::parse("Other0Key123").unwrap();
        *s.later.lock().unwrap() = Some(theirs.clone());
        let ours = s.admin.regenerate(&s.org, &s.actor).await.unwrap();
        let now = s.admin.view(&s.org).unwrap();
        // Our change committed and is reported; the later one is what is in force.
        assert_eq!(now.generation().get(), ours.generation().get() + 1);
        assert!(bool::from(now.key().unwrap().ct_eq(&theirs)));
        assert!(!bool::from(ours.key().unwrap().ct_eq(&theirs)));
    }
}
