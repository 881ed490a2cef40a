//! [`Sessions`]: the ZIA login (A2), the session table (S1-S3), and throttling (A3).

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;

mod carry;
// Only a shared store (PostgreSQL) has a change feed that applies to sessions.
#[cfg(feature = "postgres")]
mod fleet;

pub(crate) use carry::KeyChange;

use super::cookie::{digest_of_presented, SessionToken};
use super::obfuscate;
use super::throttle::{Refusal, Throttle, ThrottlePolicy};
use crate::clock::{Clock, SharedClock};
use crate::directory::{AdminDirectory, PasswordRejection};
use crate::identity::{Scope, Scopes, Username};
use crate::org::{Generation, OrgId};
use crate::password::{Password, MAX_PASSWORD_BYTES};
use crate::store::{Store, StoreError};
use crate::table::OrgTable;

/// Session and login settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session unused this long is dead (S2). Default: 5 minutes, Zscaler's default.
    pub idle_timeout: Duration,
    /// A session this old is dead however busy (S2). Default: 8 hours.
    pub absolute_lifetime: Duration,
    /// A login timestamp further than this from server time fails like a wrong key.
    /// Default: 5 minutes.
    pub timestamp_window: Duration,
    /// Whether the session cookie carries `Secure`. Default: `true`; use
    /// [`SessionConfig::for_base_url`] to follow the deployment's scheme (plain-http clients
    /// never send a `Secure` cookie back).
    pub secure_cookie: bool,
    /// Failed-login throttling (A3).
    pub throttle: ThrottlePolicy,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(5 * 60),
            absolute_lifetime: Duration::from_secs(8 * 3600),
            timestamp_window: Duration::from_secs(5 * 60),
            secure_cookie: true,
            throttle: ThrottlePolicy::default(),
        }
    }
}

impl SessionConfig {
    /// Defaults, with `Secure` cookies exactly when `base_url` is `https://`.
    pub fn for_base_url(base_url: &str) -> Self {
        Self {
            secure_cookie: base_url
                .get(..8)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://")),
            ..Self::default()
        }
    }
}

/// What a client sends to log in (the body of `POST /authenticatedSession`).
pub struct LoginRequest {
    /// The obfuscated key (PROTOCOL.md), not the key itself.
    pub api_key: Password,
    /// The admin's username.
    pub username: String,
    /// The admin's password.
    pub password: Password,
    /// Milliseconds since the Unix epoch, as the client claims.
    pub timestamp_ms: u64,
    /// The client's address, for throttling; `None` if unknown (then the attempt draws from
    /// the one address bucket all unknown addresses share).
    pub source: Option<IpAddr>,
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A session just created by a login.
#[derive(Debug)]
pub struct NewSession {
    /// The id to hand to the client (`JSESSIONID`). orgkey keeps only its digest.
    pub token: SessionToken,
    /// The admin's org.
    pub org: OrgId,
    /// The admin.
    pub admin: Username,
    /// The admin's scopes at login.
    pub scopes: Scopes,
}

/// Why a login failed: for tracing and metrics. Clients see one 401 for all but
/// [`LoginFailure::MissingApiScope`] (403) and [`LoginFailure::Throttled`] (429) (A2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoginFailure {
    /// No admin has this username (or it is not `name@domain`).
    UnknownUser,
    /// The password is wrong.
    WrongPassword,
    /// The admin is disabled.
    AdminDisabled,
    /// The timestamp is outside the window.
    StaleTimestamp,
    /// The admin's org has no API subscription.
    NoSubscription,
    /// The admin's org has no key.
    NoKey,
    /// The obfuscated key does not match.
    WrongKey,
    /// Everything is right but the admin lacks the `api` scope (403).
    MissingApiScope,
    /// Too many failed attempts (429).
    Throttled {
        /// Seconds to wait.
        retry_after_secs: u64,
    },
    /// The server could not complete the login (randomness, a panicked blocking task).
    Internal,
}

impl LoginFailure {
    /// A stable lowercase name, for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown_user",
            Self::WrongPassword => "wrong_password",
            Self::AdminDisabled => "admin_disabled",
            Self::StaleTimestamp => "stale_timestamp",
            Self::NoSubscription => "no_subscription",
            Self::NoKey => "no_key",
            Self::WrongKey => "wrong_key",
            Self::MissingApiScope => "missing_api_scope",
            Self::Throttled { .. } => "throttled",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for LoginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for LoginFailure {}

/// Why a presented session id was not accepted (S2): for tracing and metrics; clients see
/// one `SESSION_NOT_VALID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionRejection {
    /// Not a session id, unknown, logged out, or already removed.
    NotFound,
    /// Unused for the idle timeout.
    IdleExpired,
    /// Older than the absolute lifetime.
    LifetimeExpired,
    /// The org's key or subscription changed since login (K6).
    KeyChanged,
    /// The admin was deleted, disabled, changed password, or lost the `api` scope.
    AdminChanged,
}

impl SessionRejection {
    /// A stable lowercase name, for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "session_not_found",
            Self::IdleExpired => "session_idle_expired",
            Self::LifetimeExpired => "session_lifetime_expired",
            Self::KeyChanged => "session_key_changed",
            Self::AdminChanged => "session_admin_changed",
        }
    }
}

/// A live session's identity, as checked for one request.
#[derive(Debug, Clone)]
pub struct SessionIdentity {
    /// The admin's org.
    pub org: OrgId,
    /// The org's generation the session belongs to (the current one).
    pub generation: Generation,
    /// The admin.
    pub admin: Username,
    /// The admin's scopes now.
    pub scopes: Scopes,
    /// Whether the org has a key now. `false` only for a session carried over a delete
    /// (W2, by [`KeyManagementEndpoint`](crate::KeyManagementEndpoint)): the layer refuses
    /// such a session unless it guards key
    /// management ([`OrgKeyLayer::allow_keyless_sessions`](crate::OrgKeyLayer::allow_keyless_sessions)).
    pub has_key: bool,
    /// Which session this is, for [`Sessions::carry_over`].
    pub(crate) digest: SessionDigest,
}

/// The SHA-256 digest of a session id: names a session without being one (S1).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionDigest(pub(crate) [u8; 32]);

impl fmt::Debug for SessionDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionDigest(..)")
    }
}

/// One entry of the session table (the stored form is [`crate::store::SessionRecord`]).
struct SessionEntry {
    org: OrgId,
    admin: Username,
    generation: Generation,
    credential_version: u64,
    created_ms: u64,
    last_seen_ms: AtomicU64,
    /// How the session ended, if it did: [`ALIVE`], [`LOGGED_OUT`] or [`CARRIED`]. Set once,
    /// by a compare-and-swap, so a logout and a carry-over racing on one session have exactly
    /// one winner (W2): the carry-over keeps its successor only if it won.
    ended: AtomicU8,
}

const ALIVE: u8 = 0;
const LOGGED_OUT: u8 = 1;
const CARRIED: u8 = 2;
/// Its row left the store, as the fleet's feed said (the deleting replica decided how it
/// ended: a store shared by replicas lets exactly one caller delete a row).
const REMOVED: u8 = 3;

impl SessionEntry {
    /// A live record, last used at `last_seen_ms`.
    fn new(
        org: OrgId,
        admin: Username,
        generation: Generation,
        credential_version: u64,
        created_ms: u64,
        last_seen_ms: u64,
    ) -> Self {
        Self {
            org,
            admin,
            generation,
            credential_version,
            created_ms,
            last_seen_ms: AtomicU64::new(last_seen_ms),
            ended: AtomicU8::new(ALIVE),
        }
    }

    /// Ends it by a logout (here or on another replica); false if a carry-over ended it
    /// first.
    fn end_by_logout(&self) -> bool {
        self.claim(LOGGED_OUT) || self.ended.load(Ordering::SeqCst) == LOGGED_OUT
    }

    /// Ends it by carrying it over a key change; false if a logout ended it first.
    fn end_by_carry_over(&self) -> bool {
        self.claim(CARRIED)
    }

    /// Marks it as removed through the fleet's feed (unless it ended otherwise already).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn end_by_feed(&self) {
        let _ = self
            .ended
            .compare_exchange(ALIVE, REMOVED, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Sets how it ended, if it had not ended, or had only been removed through the feed:
    /// a caller that deleted the row itself (the store's answer) owns that removal.
    fn claim(&self, how: u8) -> bool {
        [ALIVE, REMOVED].into_iter().any(|from| {
            self.ended
                .compare_exchange(from, how, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst) != ALIVE
    }

    /// What the store keeps of it, under `digest`.
    fn stored(&self, digest: [u8; 32]) -> crate::store::SessionRecord {
        crate::store::SessionRecord {
            digest,
            org: self.org.clone(),
            admin: self.admin.clone(),
            generation: self.generation,
            credential_version: self.credential_version,
            created: crate::store::from_millis(self.created_ms as i64),
            last_used: crate::store::from_millis(self.last_seen_ms.load(Ordering::Relaxed) as i64),
        }
    }
}

impl SessionEntry {
    /// The entry of a stored session, and its digest.
    fn from_record(record: crate::store::SessionRecord) -> (Self, [u8; 32]) {
        let created = millis_u64(record.created);
        let last_used = millis_u64(record.last_used).max(created);
        (
            Self::new(
                record.org,
                record.admin,
                record.generation,
                record.credential_version,
                created,
                last_used,
            ),
            record.digest,
        )
    }
}

/// Logins, the session table and throttling. Cheap to clone (shared).
///
/// Sessions are server-side: the table holds only SHA-256 digests of session ids (S1), and
/// a session is checked in full on every use (S2), so logout, expiry and revocation take
/// effect at once (S3; across replicas once a shared store backs the table).
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    orgs: OrgTable,
    directory: Arc<dyn AdminDirectory>,
    store: Option<Arc<dyn Store>>,
    sessions: DashMap<[u8; 32], Arc<SessionEntry>>,
    clock: SharedClock,
    config: SessionConfig,
    throttle: Throttle,
    created: AtomicU64,
    /// Extra idle time allowed in a fleet, where other replicas' uses arrive late (see
    /// `fleet::share_use`); 0 for a single process.
    idle_grace_ms: AtomicU64,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("live", &self.inner.sessions.len())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn millis_u64(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Sessions {
    /// Sessions for the orgs of `orgs` and the admins of `directory`, with default settings.
    pub fn new(orgs: OrgTable, directory: impl AdminDirectory) -> Self {
        Self::with_config(
            orgs,
            directory,
            SessionConfig::default(),
            SharedClock::default(),
        )
    }

    /// Sessions with explicit settings and clock (tests inject a clock to expire sessions).
    pub fn with_config(
        orgs: OrgTable,
        directory: impl AdminDirectory,
        config: SessionConfig,
        clock: impl Clock,
    ) -> Self {
        Self::build(orgs, Arc::new(directory), config, SharedClock::new(clock))
    }

    /// Sessions kept in `store` too (S3, P2): the stored sessions are loaded (each is checked
    /// in full at its next use, as always), a login is stored before its cookie is handed
    /// out, and a logout deletes it from the store before it answers. A store of one process
    /// does not keep uses: after a restart the idle timer of a loaded session counts from its
    /// login. In a fleet (a change feed follows these sessions, F2) logins and logouts on
    /// any replica reach every replica before they return (strict mode), and uses are shared
    /// so that idle time counts the last use on any replica (within two share intervals,
    /// 10 s by default; see [`Store::sync_session_use`]).
    ///
    /// The failed-login throttle (A3) is kept in `store` as well, shared with every process
    /// that shares it (F2, see [`throttle`](super::throttle)): a login asks the store once
    /// before the password check and, if it succeeds, once after; if the store cannot be
    /// asked, the login fails closed.
    ///
    /// # Errors
    ///
    /// [`StoreError`] if the sessions cannot be read.
    pub async fn open(
        orgs: OrgTable,
        directory: impl AdminDirectory,
        config: SessionConfig,
        clock: impl Clock,
        store: impl Store,
    ) -> Result<Self, StoreError> {
        let store: Arc<dyn Store> = Arc::new(store);
        let mut sessions = Self::build(orgs, Arc::new(directory), config, SharedClock::new(clock));
        let loaded = store.load_sessions().await?;
        let inner = Arc::get_mut(&mut sessions.inner)
            .ok_or_else(|| StoreError::Backend(crate::store::BackendError::msg("shared early")))?;
        for record in loaded {
            let (entry, digest) = SessionEntry::from_record(record);
            inner.sessions.insert(digest, Arc::new(entry));
        }
        inner.throttle = Throttle::shared(inner.config.throttle.clone(), Arc::clone(&store));
        inner.store = Some(store);
        Ok(sessions)
    }

    /// Deletes dead sessions from the store in the background (when there is a store and a
    /// runtime); they are already gone from memory.
    fn forget(&self, digests: Vec<[u8; 32]>) {
        let (Some(store), Ok(runtime)) = (
            self.inner.store.clone(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        if digests.is_empty() {
            return;
        }
        runtime.spawn(async move {
            for digest in digests {
                if let Err(error) = store.delete_session(&digest).await {
                    tracing::warn!(target: "orgkey::session", %error, "could not delete a dead session from the store");
                }
            }
        });
    }

    fn build(
        orgs: OrgTable,
        directory: Arc<dyn AdminDirectory>,
        config: SessionConfig,
        clock: SharedClock,
    ) -> Self {
        // Prepare the dummy hash now, so the first unknown-user login costs what any other
        // failed login costs.
        crate::password::warm_up();
        Self {
            inner: Arc::new(Inner {
                orgs,
                directory,
                store: None,
                sessions: DashMap::new(),
                throttle: Throttle::local(config.throttle.clone()),
                clock,
                config,
                created: AtomicU64::new(0),
                idle_grace_ms: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The number of sessions in the table (live or not yet purged).
    pub fn len(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.sessions.is_empty()
    }

    /// Unused this long, a session is dead: the idle timeout, plus the fleet's grace.
    fn idle_limit_ms(&self) -> u64 {
        self.inner.config.idle_timeout.as_millis() as u64
            + self.inner.idle_grace_ms.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        millis_u64(self.inner.clock.now())
    }

    /// Logs an admin in (A2): throttle, password (argon2id, on a blocking thread when a tokio
    /// runtime is present), then the obfuscated key against one snapshot of the admin's org.
    /// The session is stamped with that snapshot's generation, so a login racing a key change
    /// can never create a session that outlives the change (K6).
    ///
    /// # Errors
    ///
    /// A [`LoginFailure`]; every one is logged (target `orgkey::session`) with its reason.
    pub async fn login(&self, request: LoginRequest) -> Result<NewSession, LoginFailure> {
        let username = Username::new(&request.username).ok();
        let result = self.try_login(request, username.clone()).await;
        #[cfg(feature = "metrics")]
        crate::metrics::login(result.as_ref().map(|_| ()));
        match &result {
            Ok(session) => tracing::info!(
                target: "orgkey::session",
                org = %session.org,
                admin = %session.admin,
                outcome = "accepted",
                "login"
            ),
            Err(failure) => tracing::info!(
                target: "orgkey::session",
                admin = username.as_ref().map_or("-", |u| u.as_str()),
                outcome = "rejected",
                reason = failure.as_str(),
                "login failed"
            ),
        }
        result
    }

    async fn try_login(
        &self,
        request: LoginRequest,
        username: Option<Username>,
    ) -> Result<NewSession, LoginFailure> {
        let reservation = self
            .inner
            .throttle
            .begin(request.source, username.as_ref(), self.now_ms())
            .await
            .map_err(|refusal| match refusal {
                Refusal::Wait(retry_after_secs) => LoginFailure::Throttled { retry_after_secs },
                Refusal::Store(error) => {
                    // Fail closed: never a password check the throttle did not charge.
                    tracing::warn!(target: "orgkey::session", %error, "the login throttle's store failed; login refused");
                    LoginFailure::Internal
                }
            })?;

        // The password check always runs (a dummy one for unknown users), so every failure
        // below costs one argon2 verification (A1).
        let directory = Arc::clone(&self.inner.directory);
        let password = request.password;
        let user = username.clone();
        let check = move || match &user {
            Some(user) if password.expose_secret().len() <= MAX_PASSWORD_BYTES => {
                directory.verify_password(user, &password)
            }
            Some(user) => {
                // Too long to hash as given: same cost, and never a match.
                crate::password::dummy_verify(&password);
                Err(match directory.status(user) {
                    Some(_) => PasswordRejection::WrongPassword,
                    None => PasswordRejection::UnknownUser,
                })
            }
            None => {
                crate::password::dummy_verify(&password);
                Err(PasswordRejection::UnknownUser)
            }
        };
        let checked = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn_blocking(check)
                .await
                .map_err(|_| LoginFailure::Internal)?,
            Err(_) => check(),
        };

        let now_ms = self.now_ms();
        let (admin, username) = match (checked, username) {
            (Ok(admin), Some(username)) => (admin, username),
            (Err(PasswordRejection::WrongPassword), Some(_)) => {
                return Err(LoginFailure::WrongPassword)
            }
            _ => return Err(LoginFailure::UnknownUser),
        };
        if !admin.enabled {
            return Err(LoginFailure::AdminDisabled);
        }
        let window = self.inner.config.timestamp_window.as_millis() as u64;
        if now_ms.abs_diff(request.timestamp_ms) > window {
            return Err(LoginFailure::StaleTimestamp);
        }
        // One snapshot: the key is checked and the generation stamped from the same load.
        let state = self
            .inner
            .orgs
            .state(admin.org.as_str())
            .ok_or(LoginFailure::NoSubscription)?;
        if !state.is_subscribed() {
            return Err(LoginFailure::NoSubscription);
        }
        let key = state.key().ok_or(LoginFailure::NoKey)?;
        if !obfuscate::matches(
            key.as_bytes(),
            request.timestamp_ms,
            request.api_key.expose_secret().as_bytes(),
        ) {
            return Err(LoginFailure::WrongKey);
        }
        // The credentials were right: not a guess, so not charged to the throttle. If the
        // store cannot be told, the login stands (the charge just stays).
        if let Err(error) = self.inner.throttle.succeeded(&reservation, now_ms).await {
            tracing::warn!(target: "orgkey::session", %error, "could not refund a successful login's throttle charge");
        }
        if !admin.scopes.contains(Scope::Api) {
            return Err(LoginFailure::MissingApiScope);
        }
        let (token, digest) = SessionToken::generate().map_err(|_| LoginFailure::Internal)?;
        let record = SessionEntry::new(
            admin.org.clone(),
            username.clone(),
            state.generation(),
            admin.credential_version,
            now_ms,
            now_ms,
        );
        if let Some(store) = &self.inner.store {
            match store.put_session(&record.stored(digest)).await {
                Ok(()) => {}
                // Stored; a replica behind may refuse it until it catches up.
                Err(StoreError::Unconfirmed(unconfirmed)) => {
                    tracing::warn!(target: "orgkey::session", %unconfirmed, "session stored");
                }
                Err(error) => {
                    tracing::warn!(target: "orgkey::session", %error, "could not store a session");
                    return Err(LoginFailure::Internal);
                }
            }
        }
        self.inner.sessions.insert(digest, Arc::new(record));
        if self.inner.created.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.purge_expired();
        }
        Ok(NewSession {
            token,
            org: admin.org,
            admin: username,
            scopes: admin.scopes,
        })
    }

    /// Whether the org table can be vouched for now: false while a change feed that keeps
    /// it in step with other replicas is reconnecting or stalled (F1, F3). Logins and session
    /// checks answer 503 meanwhile, like the layer.
    pub fn can_vouch(&self) -> bool {
        self.inner.orgs.is_trusted()
    }

    /// Names this table among others, for the per-request cache of
    /// [`Sessions::check_request`]: clones share it.
    pub(crate) fn identity_tag(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Checks a presented session id (the `JSESSIONID` value) in full (S2) and marks it used.
    /// A dead session is removed.
    ///
    /// # Errors
    ///
    /// A [`SessionRejection`] naming why.
    pub fn validate(&self, presented: &[u8]) -> Result<SessionIdentity, SessionRejection> {
        let digest = digest_of_presented(presented).ok_or(SessionRejection::NotFound)?;
        let record = self
            .inner
            .sessions
            .get(&digest)
            .map(|r| Arc::clone(r.value()))
            .ok_or(SessionRejection::NotFound)?;
        match self.check(&record, digest) {
            Ok(identity) => Ok(identity),
            Err(rejection) => {
                self.inner.sessions.remove(&digest);
                self.forget(vec![digest]);
                Err(rejection)
            }
        }
    }

    fn check(
        &self,
        record: &SessionEntry,
        digest: [u8; 32],
    ) -> Result<SessionIdentity, SessionRejection> {
        let now_ms = self.now_ms();
        let config = &self.inner.config;
        let idle = now_ms.saturating_sub(record.last_seen_ms.load(Ordering::Relaxed));
        if idle >= self.idle_limit_ms() {
            return Err(SessionRejection::IdleExpired);
        }
        if now_ms.saturating_sub(record.created_ms) >= config.absolute_lifetime.as_millis() as u64 {
            return Err(SessionRejection::LifetimeExpired);
        }
        // Every key or subscription change bumps the generation (K6), so comparing it
        // covers regenerate, edit, delete, add, unsubscribe.
        // One snapshot gives both the generation and whether there is a key.
        let (generation, has_key) = self
            .inner
            .orgs
            .state(record.org.as_str())
            .map(|state| (state.generation(), state.key().is_some()))
            .ok_or(SessionRejection::KeyChanged)?;
        if generation != record.generation {
            return Err(SessionRejection::KeyChanged);
        }
        let scopes = self
            .admin_scopes(record)
            .ok_or(SessionRejection::AdminChanged)?;
        record.last_seen_ms.fetch_max(now_ms, Ordering::Relaxed);
        Ok(SessionIdentity {
            org: record.org.clone(),
            generation,
            admin: record.admin.clone(),
            scopes,
            has_key,
            digest: SessionDigest(digest),
        })
    }

    /// The admin's scopes now, if the admin of `record` may still hold it (S2): still
    /// there, enabled, in the same org, with the same password and the `api` scope.
    fn admin_scopes(&self, record: &SessionEntry) -> Option<Scopes> {
        let admin = self.inner.directory.status(&record.admin)?;
        (admin.enabled
            && admin.credential_version == record.credential_version
            && admin.scopes.contains(Scope::Api)
            && admin.org == record.org)
            .then_some(admin.scopes)
    }

    /// Ends a session (logout, S3): deleted from the store first (if any), then from memory.
    /// Returns whether it existed.
    ///
    /// # Errors
    ///
    /// [`StoreError`] if the store cannot delete it; the session then stays valid (nothing
    /// changed), so the client may retry the logout.
    pub async fn logout(&self, presented: &[u8]) -> Result<bool, StoreError> {
        let Some(digest) = digest_of_presented(presented) else {
            return Ok(false);
        };
        // Looked up first: in a fleet, this replica's feed removes it while the delete waits
        // for every replica to apply it.
        let known = self
            .inner
            .sessions
            .get(&digest)
            .map(|r| Arc::clone(r.value()));
        if let Some(store) = &self.inner.store {
            match store.take_session(&digest).await {
                Ok(true) => {}
                // Gone from the store already: another replica's carry-over, logout or
                // expiry ended it first (the store decides between replicas, W2).
                Ok(false) => {
                    if let Some(record) = &known {
                        self.inner.sessions.remove(&digest);
                        record.end_by_feed();
                    }
                    return Ok(false);
                }
                // Deleted; a replica behind dies with its lease if it does not catch up.
                Err(StoreError::Unconfirmed(unconfirmed)) => {
                    tracing::warn!(target: "orgkey::session", %unconfirmed, "logout");
                }
                Err(error) => return Err(error),
            }
        }
        // One decision against a carry-over racing this logout: whichever ends the record
        // first wins. A carry-over that won keeps its successor, and this logout ended
        // nothing (the predecessor was already dead by its generation).
        let Some(record) = known else {
            return Ok(false);
        };
        let ended = record.end_by_logout();
        self.inner.sessions.remove(&digest);
        if ended {
            tracing::info!(target: "orgkey::session", org = %record.org, admin = %record.admin, "logout");
        }
        Ok(ended)
    }

    /// Removes sessions past their idle timeout or lifetime; returns how many. Runs by
    /// itself every 1,024 logins; call it from a timer to bound memory between logins.
    pub fn purge_expired(&self) -> usize {
        let now_ms = self.now_ms();
        let idle = self.idle_limit_ms();
        let lifetime = self.inner.config.absolute_lifetime.as_millis() as u64;
        let mut dead = Vec::new();
        self.inner.sessions.retain(|digest, record| {
            let alive = now_ms.saturating_sub(record.last_seen_ms.load(Ordering::Relaxed)) < idle
                && now_ms.saturating_sub(record.created_ms) < lifetime;
            if !alive {
                dead.push(*digest);
            }
            alive
        });
        let count = dead.len();
        self.forget(dead);
        count
    }

    /// The org table these sessions check against.
    pub fn orgs(&self) -> &OrgTable {
        &self.inner.orgs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use crate::org::InlineOrgId;
    use crate::{Actor, Admins, ApiKey, Authenticated, KeyAdmin};

    const KEY: &str = "AbCdEf123456";
    const PASSWORD: &str = "CorrectHorse12!";

    impl Sessions {
        /// The carry-over as the key-management endpoint asks for it.
        async fn carry_over_after(
            &self,
            auth: &Authenticated,
            info: &crate::KeyInfo,
        ) -> Result<Option<SessionToken>, StoreError> {
            let change = KeyChange {
                session: auth.session_digest().expect("a session's request"),
                checked_at: auth.generation(),
                changed_to: info.generation(),
                by: info.last_modified_by(),
            };
            self.carry_over(&change).await
        }
    }

    struct Fixture {
        keys: KeyAdmin,
        admins: Admins,
        sessions: Sessions,
        alice: Username,
    }

    async fn fixture(store: Option<Arc<dyn Store>>) -> Fixture {
        let table = OrgTable::default();
        let (keys, admins) = match &store {
            Some(store) => (
                KeyAdmin::open(table.clone(), Arc::clone(store))
                    .await
                    .unwrap(),
                Admins::open(table.clone(), Arc::clone(store))
                    .await
                    .unwrap(),
            ),
            None => (KeyAdmin::new(table.clone()), Admins::new(table.clone())),
        };
        let acme = OrgId::new("acme").unwrap();
        let ops = Actor::new("ops@example.com").unwrap();
        keys.create_org(&acme).await.unwrap();
        keys.subscribe(&acme, &ops).await.unwrap();
        keys.edit(&acme, ApiKey::parse(KEY).unwrap(), &ops)
            .await
            .unwrap();
        let alice = Username::new("alice@acme.example").unwrap();
        admins
            .create(&alice, &acme, &Password::new(PASSWORD), Scopes::ALL)
            .await
            .unwrap();
        let sessions = match store {
            Some(store) => Sessions::open(
                table,
                admins.clone(),
                SessionConfig::default(),
                crate::clock::SystemClock,
                store,
            )
            .await
            .unwrap(),
            None => Sessions::new(table, admins.clone()),
        };
        Fixture {
            keys,
            admins,
            sessions,
            alice,
        }
    }

    impl Fixture {
        /// Logs alice in; returns the session id and the `Authenticated` the layer would set.
        async fn login(&self) -> (SessionToken, Authenticated) {
            let now = millis_u64(SystemTime::now());
            let key = self.keys.view(&OrgId::new("acme").unwrap()).unwrap();
            let key = key.key().unwrap().expose_secret().to_owned();
            let obfuscated = obfuscate::obfuscate(key.as_bytes(), now).unwrap();
            let session = self
                .sessions
                .login(LoginRequest {
                    api_key: Password::new(String::from_utf8(obfuscated.to_vec()).unwrap()),
                    username: self.alice.as_str().to_owned(),
                    password: Password::new(PASSWORD),
                    timestamp_ms: now,
                    source: None,
                })
                .await
                .unwrap();
            let identity = self
                .sessions
                .validate(session.token.expose_secret().as_bytes())
                .unwrap();
            let auth = Authenticated::new(
                InlineOrgId::copy(identity.org.as_str()).unwrap(),
                identity.generation,
                AuthMethod::Session {
                    admin: identity.admin,
                    scopes: identity.scopes,
                },
            )
            .with_session(identity.digest);
            (session.token, auth)
        }

        /// A regenerate made through the session of `auth`, as the endpoint makes it.
        async fn regenerate_as(&self, auth: &Authenticated) -> crate::KeyInfo {
            self.keys
                .for_session(auth)
                .unwrap()
                .regenerate()
                .await
                .unwrap()
        }

        /// A regenerate by another admin, out of band.
        async fn regenerate_by_ops(&self) -> crate::KeyInfo {
            let ops = Actor::new("ops@example.com").unwrap();
            self.keys
                .regenerate(&OrgId::new("acme").unwrap(), &ops)
                .await
                .unwrap()
        }

        fn alive(&self, token: &SessionToken) -> bool {
            self.sessions
                .validate(token.expose_secret().as_bytes())
                .is_ok()
        }
    }

    #[tokio::test]
    async fn a_session_is_carried_over_its_own_change_only() {
        let f = fixture(None).await;
        let (old, auth) = f.login().await;
        let change = f.regenerate_as(&auth).await;
        let successor = f
            .sessions
            .carry_over_after(&auth, &change)
            .await
            .unwrap()
            .unwrap();
        assert!(f.alive(&successor));
        assert!(!f.alive(&old));
        // Once: the predecessor is gone, so a second carry-over makes nothing.
        assert!(f
            .sessions
            .carry_over_after(&auth, &change)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn carry_over_refuses_a_change_made_by_someone_else() {
        let f = fixture(None).await;
        let (_, auth) = f.login().await;
        // Another admin moves the org exactly one generation on: this session is dead and
        // must stay so, though the generation numbers would fit.
        let theirs = f.regenerate_by_ops().await;
        assert_eq!(theirs.generation(), auth.generation().next());
        let before = f.sessions.len();
        assert!(f
            .sessions
            .carry_over_after(&auth, &theirs)
            .await
            .unwrap()
            .is_none());
        assert_eq!(f.sessions.len(), before);
    }

    #[tokio::test]
    async fn carry_over_refuses_when_a_later_change_came() {
        let f = fixture(None).await;
        let (_, auth) = f.login().await;
        let mine = f.regenerate_as(&auth).await;
        f.regenerate_by_ops().await;
        assert!(f
            .sessions
            .carry_over_after(&auth, &mine)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn carry_over_refuses_when_the_admin_changed_password() {
        let f = fixture(None).await;
        let (_, auth) = f.login().await;
        let mine = f.regenerate_as(&auth).await;
        f.admins
            .change_password(&f.alice, &Password::new("another-long-password-1"))
            .await
            .unwrap();
        assert!(f
            .sessions
            .carry_over_after(&auth, &mine)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn carry_over_refuses_after_a_logout() {
        let f = fixture(None).await;
        let (old, auth) = f.login().await;
        let mine = f.regenerate_as(&auth).await;
        assert!(f
            .sessions
            .logout(old.expose_secret().as_bytes())
            .await
            .unwrap());
        assert!(f
            .sessions
            .carry_over_after(&auth, &mine)
            .await
            .unwrap()
            .is_none());
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_logout_racing_a_carry_over_never_leaves_a_live_successor() {
        // On SQLite, whose writes run off the async threads, so the carry-over really waits
        // between its checks and its insert; the two run as separate tasks.
        let path = std::env::temp_dir().join(format!(
            "orgkey-carry-race-{}-{}.db",
            std::process::id(),
            millis_u64(SystemTime::now())
        ));
        let store: Arc<dyn Store> = Arc::new(
            crate::store::SqliteStore::open(
                &path,
                crate::KeyFormat::default(),
                crate::MasterKeys::generate().unwrap(),
            )
            .unwrap(),
        );
        let f = Arc::new(fixture(Some(store)).await);
        let (mut carried, mut ended) = (0, 0);
        for _ in 0..40 {
            let (old, auth) = f.login().await;
            let mine = f.regenerate_as(&auth).await;
            let carry = tokio::spawn({
                let f = Arc::clone(&f);
                async move { f.sessions.carry_over_after(&auth, &mine).await }
            });
            let id = old.expose_secret().as_bytes().to_vec();
            let logout = tokio::spawn({
                let f = Arc::clone(&f);
                async move { f.sessions.logout(&id).await }
            });
            let successor = carry.await.unwrap().unwrap();
            let logged_out = logout.await.unwrap().unwrap();
            if let Some(successor) = &successor {
                carried += 1;
                assert!(
                    !(logged_out && f.alive(successor)),
                    "a logout that ended the session left its successor alive"
                );
            }
            ended += usize::from(logged_out);
            assert!(!f.alive(&old));
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
        // Every round, exactly one of the two took the predecessor.
        assert_eq!(carried + ended, 40, "carried {carried}, logged out {ended}");
    }
}
