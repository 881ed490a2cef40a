//! The admin directory (A1): accounts, their passwords and status, which logins and sessions
//! consult. The names and scopes of admins are [`crate::identity`]'s.
//!
//! [`Admins`] is the built-in directory: accounts in memory, passwords as argon2id PHC strings
//! (see [`crate::password`]). Any identity store can take its place by implementing
//! [`AdminDirectory`].
//!
//! Every change that must end an admin's sessions (disable, delete, password change, losing
//! the `api` scope) gives the account a new *credential version*; a session remembers the
//! version it was created under and dies when it differs (S2).

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;

use crate::identity::{Scope, Scopes, Username};
use crate::org::OrgId;
use crate::password::{
    dummy_verify, hash_password, verify_password, HashError, Password, PasswordPolicyError,
};
use crate::store::{AdminRecord, Store, StoreError};
use crate::table::OrgTable;

/// What a session check needs to know about an admin, right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminStatus {
    /// The admin's org.
    pub org: OrgId,
    /// Whether the account is enabled.
    pub enabled: bool,
    /// The admin's scopes.
    pub scopes: Scopes,
    /// Changes whenever the account changes in a way that must end its sessions.
    pub credential_version: u64,
}

/// Why [`AdminDirectory::verify_password`] refused a password.
///
/// The two reasons go to tracing and metrics only, so that operators can tell a typo from
/// user enumeration; a client gets the same answer, after the same time, for both (A1, A2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordRejection {
    /// No admin has this username (a dummy verification ran instead, for equal cost).
    UnknownUser,
    /// The admin exists and the password is not theirs.
    WrongPassword,
}

/// Where admins are looked up: the built-in [`Admins`], or a user's own identity store.
///
/// Implementations must keep two promises: [`AdminDirectory::status`] is cheap and never
/// blocks (it runs on every request made with a session), and
/// [`AdminDirectory::verify_password`] costs the same time whether the user exists or not.
pub trait AdminDirectory: Send + Sync + 'static {
    /// The admin's current status, or `None` if there is no such admin.
    fn status(&self, username: &Username) -> Option<AdminStatus>;

    /// Checks a password and returns the status of the account it was checked against.
    ///
    /// # Errors
    ///
    /// [`PasswordRejection::UnknownUser`] or [`PasswordRejection::WrongPassword`]; both must
    /// cost the same time (run a dummy verification for unknown users, A1).
    ///
    /// Blocking (argon2): orgkey calls it on a blocking thread.
    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection>;
}

/// One account of the built-in directory.
#[derive(Clone)]
struct Account {
    status: AdminStatus,
    password_hash: Arc<str>,
}

/// Why an account change failed. Nothing was changed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AccountError {
    /// No admin has this username.
    UnknownAdmin,
    /// An admin with this username exists.
    AdminExists,
    /// The org does not exist.
    UnknownOrg,
    /// The new password breaks the policy.
    WeakPassword(PasswordPolicyError),
    /// Hashing failed.
    Hash(HashError),
    /// The store failed; nothing was changed.
    Store(StoreError),
}

impl fmt::Display for AccountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownAdmin => f.write_str("unknown admin"),
            Self::AdminExists => f.write_str("an admin with this username already exists"),
            Self::UnknownOrg => f.write_str("unknown organization"),
            Self::WeakPassword(e) => write!(f, "password refused: {e}"),
            Self::Hash(_) => f.write_str("password hashing failed"),
            Self::Store(_) => f.write_str("the account could not be stored; nothing was changed"),
        }
    }
}

impl std::error::Error for AccountError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::WeakPassword(e) => Some(e),
            Self::Hash(e) => Some(e),
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// The built-in admin directory: accounts in memory, and in a [`Store`] if opened with one.
/// Cheap to clone (shared).
///
/// Every change is written to the store first and then made visible (P1); a failed write
/// changes nothing. Creating an account and changing a password hash the password (about
/// 20 ms of CPU, on tokio's blocking pool when a runtime is present). Two changes to the same
/// account at the same time: the last one written wins.
#[derive(Clone)]
pub struct Admins {
    inner: Arc<AdminsInner>,
}

struct AdminsInner {
    orgs: OrgTable,
    accounts: DashMap<Username, Account>,
    store: Option<Arc<dyn Store>>,
    /// Set when a change feed keeps the accounts in step (a fleet, F2): the feed then
    /// applies every change, this process's own included, in the store's order.
    followed: std::sync::atomic::AtomicBool,
}

impl Account {
    fn from_record(record: AdminRecord) -> (Username, Self) {
        (
            record.username,
            Self {
                status: AdminStatus {
                    org: record.org,
                    enabled: record.enabled,
                    scopes: record.scopes,
                    credential_version: record.credential_version,
                },
                password_hash: Arc::from(record.password_hash),
            },
        )
    }
}

impl fmt::Debug for Admins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admins")
            .field("accounts", &self.inner.accounts.len())
            .finish_non_exhaustive()
    }
}

fn new_credential_version() -> u64 {
    let mut bytes = [0u8; 8];
    // A repeated version could revive a session only if it matched the old one exactly; on
    // an RNG failure fall back to the clock, which still changes.
    if getrandom::fill(&mut bytes).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(bytes)
}

/// Hashes on tokio's blocking pool when a runtime is present.
async fn hash_off_thread(password: &Password) -> Result<String, AccountError> {
    let password = password.clone();
    let job = move || hash_password(&password);
    let hashed = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(job)
            .await
            .map_err(|_| AccountError::Hash(HashError::panicked()))?,
        Err(_) => job(),
    };
    hashed.map_err(AccountError::Hash)
}

impl Admins {
    /// An empty directory for the orgs of `orgs`, in memory only.
    pub fn new(orgs: OrgTable) -> Self {
        Self {
            inner: Arc::new(AdminsInner {
                orgs,
                accounts: DashMap::new(),
                store: None,
                followed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// A directory backed by `store`: loads every account, and writes every change to the
    /// store before it takes effect.
    ///
    /// # Errors
    ///
    /// [`AccountError::Store`] if the accounts cannot be read.
    pub async fn open(orgs: OrgTable, store: impl Store) -> Result<Self, AccountError> {
        let store: Arc<dyn Store> = Arc::new(store);
        let accounts = DashMap::new();
        for record in store.load_admins().await.map_err(AccountError::Store)? {
            let (username, account) = Account::from_record(record);
            accounts.insert(username, account);
        }
        Ok(Self {
            inner: Arc::new(AdminsInner {
                orgs,
                accounts,
                store: Some(store),
                followed: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The number of accounts.
    pub fn len(&self) -> usize {
        self.inner.accounts.len()
    }

    /// Whether there is no account.
    pub fn is_empty(&self) -> bool {
        self.inner.accounts.is_empty()
    }

    /// Writes `account` to the store (if any), then makes it visible.
    async fn save(&self, username: &Username, account: Account) -> Result<(), AccountError> {
        self.write(username, account, false).await
    }

    /// Writes `account` to the store (if any), then makes it visible; with `create`, only if
    /// no process created the account first ([`AccountError::AdminExists`], nothing written).
    async fn write(
        &self,
        username: &Username,
        account: Account,
        create: bool,
    ) -> Result<(), AccountError> {
        if let Some(store) = &self.inner.store {
            let record = AdminRecord {
                username: username.clone(),
                org: account.status.org.clone(),
                enabled: account.status.enabled,
                scopes: account.status.scopes,
                password_hash: account.password_hash.to_string(),
                credential_version: account.status.credential_version,
            };
            let written = if create {
                store.create_admin(&record).await
            } else {
                store.put_admin(&record).await
            };
            match written {
                Ok(()) => {}
                Err(StoreError::Unconfirmed(unconfirmed)) => {
                    tracing::warn!(target: "orgkey::directory", admin = %username, %unconfirmed, "admin changed");
                }
                Err(StoreError::Exists) => return Err(AccountError::AdminExists),
                Err(error) => return Err(AccountError::Store(error)),
            }
            if self.is_followed() {
                // The feed applied it (and any later change) in the store's order.
                return Ok(());
            }
        }
        self.inner.accounts.insert(username.clone(), account);
        Ok(())
    }

    fn is_followed(&self) -> bool {
        self.inner
            .followed
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// F2's half in the directory: what a replica applies from the fleet's change feed.
impl crate::store::FollowAdmins for Admins {
    fn followed(&self) {
        self.inner
            .followed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn stored(&self, record: AdminRecord) {
        let (username, account) = Account::from_record(record);
        self.inner.accounts.insert(username, account);
    }

    fn deleted(&self, username: &Username) {
        self.inner.accounts.remove(username);
    }

    fn reload(&self, records: Vec<AdminRecord>) {
        let stored: std::collections::HashSet<Username> =
            records.iter().map(|r| r.username.clone()).collect();
        self.inner
            .accounts
            .retain(|username, _| stored.contains(username));
        for record in records {
            let (username, account) = Account::from_record(record);
            self.inner.accounts.insert(username, account);
        }
    }
}

impl Admins {
    /// Creates an enabled admin of `org` with `scopes`.
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownOrg`], [`AccountError::AdminExists`],
    /// [`AccountError::WeakPassword`], [`AccountError::Hash`], [`AccountError::Store`].
    pub async fn create(
        &self,
        username: &Username,
        org: &OrgId,
        password: &Password,
        scopes: Scopes,
    ) -> Result<(), AccountError> {
        if self.inner.orgs.state(org.as_str()).is_none() {
            return Err(AccountError::UnknownOrg);
        }
        password
            .check_policy()
            .map_err(AccountError::WeakPassword)?;
        if self.inner.accounts.contains_key(username) {
            return Err(AccountError::AdminExists);
        }
        let password_hash: Arc<str> = Arc::from(hash_off_thread(password).await?);
        let account = Account {
            status: AdminStatus {
                org: org.clone(),
                enabled: true,
                scopes,
                credential_version: new_credential_version(),
            },
            password_hash,
        };
        self.write(username, account, true).await?;
        tracing::info!(target: "orgkey::directory", admin = %username, org = %org, scopes = ?scopes, "admin created");
        Ok(())
    }

    /// Disables an admin: logins fail and its sessions die (S2).
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::Store`].
    pub async fn disable(&self, username: &Username) -> Result<(), AccountError> {
        self.update(username, "disabled", |account| {
            account.status.enabled = false;
            true
        })
        .await
    }

    /// Enables a disabled admin (its old sessions stay dead).
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::Store`].
    pub async fn enable(&self, username: &Username) -> Result<(), AccountError> {
        self.update(username, "enabled", |account| {
            account.status.enabled = true;
            false
        })
        .await
    }

    /// Deletes an admin; its sessions die.
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::Store`].
    pub async fn delete(&self, username: &Username) -> Result<(), AccountError> {
        if !self.inner.accounts.contains_key(username) {
            return Err(AccountError::UnknownAdmin);
        }
        if let Some(store) = &self.inner.store {
            match store.delete_admin(username).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(StoreError::Unconfirmed(unconfirmed)) => {
                    tracing::warn!(target: "orgkey::directory", admin = %username, %unconfirmed, "admin deleted");
                }
                Err(e) => return Err(AccountError::Store(e)),
            }
            if self.is_followed() {
                self.inner.accounts.remove(username);
                tracing::info!(target: "orgkey::directory", admin = %username, "admin deleted");
                return Ok(());
            }
        }
        match self.inner.accounts.remove(username) {
            Some(_) => {
                tracing::info!(target: "orgkey::directory", admin = %username, "admin deleted");
                Ok(())
            }
            None => Err(AccountError::UnknownAdmin),
        }
    }

    /// Sets a new password; the admin's sessions die.
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::WeakPassword`], [`AccountError::Hash`],
    /// [`AccountError::Store`].
    pub async fn change_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<(), AccountError> {
        if !self.inner.accounts.contains_key(username) {
            return Err(AccountError::UnknownAdmin);
        }
        password
            .check_policy()
            .map_err(AccountError::WeakPassword)?;
        let hash: Arc<str> = Arc::from(hash_off_thread(password).await?);
        self.update(username, "password changed", |account| {
            account.password_hash = Arc::clone(&hash);
            true
        })
        .await
    }

    /// Grants a scope.
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::Store`].
    pub async fn grant(&self, username: &Username, scope: Scope) -> Result<(), AccountError> {
        self.update(username, "scope granted", |account| {
            account.status.scopes = account.status.scopes.with(scope);
            false
        })
        .await
    }

    /// Revokes a scope. Revoking `api` ends the admin's sessions; revoking `key-admin` takes
    /// effect on the next request of its sessions.
    ///
    /// # Errors
    ///
    /// [`AccountError::UnknownAdmin`], [`AccountError::Store`].
    pub async fn revoke(&self, username: &Username, scope: Scope) -> Result<(), AccountError> {
        self.update(username, "scope revoked", |account| {
            account.status.scopes = account.status.scopes.without(scope);
            scope == Scope::Api
        })
        .await
    }

    /// The admin's current status.
    pub fn get(&self, username: &Username) -> Option<AdminStatus> {
        self.status(username)
    }

    /// Applies `change` to a copy; if it returns true, the account gets a new credential
    /// version; then saves it (store first).
    async fn update(
        &self,
        username: &Username,
        what: &'static str,
        change: impl FnOnce(&mut Account) -> bool,
    ) -> Result<(), AccountError> {
        let mut account = self
            .inner
            .accounts
            .get(username)
            .map(|a| a.clone())
            .ok_or(AccountError::UnknownAdmin)?;
        if change(&mut account) {
            account.status.credential_version = new_credential_version();
        }
        self.save(username, account).await?;
        tracing::info!(target: "orgkey::directory", admin = %username, change = what, "admin changed");
        Ok(())
    }
}

impl AdminDirectory for Admins {
    fn status(&self, username: &Username) -> Option<AdminStatus> {
        self.inner
            .accounts
            .get(username)
            .map(|account| account.status.clone())
    }

    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        // Copy out what is needed and release the map's lock before the slow hash.
        let account = self.inner.accounts.get(username).map(|a| a.clone());
        match account {
            Some(account) => {
                if verify_password(password, &account.password_hash) {
                    Ok(account.status)
                } else {
                    Err(PasswordRejection::WrongPassword)
                }
            }
            None => {
                dummy_verify(password);
                Err(PasswordRejection::UnknownUser)
            }
        }
    }
}

impl<D: AdminDirectory + ?Sized> AdminDirectory for Arc<D> {
    fn status(&self, username: &Username) -> Option<AdminStatus> {
        (**self).status(username)
    }

    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        (**self).verify_password(username, password)
    }
}
