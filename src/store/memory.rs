//! [`MemoryStore`]: the contract in memory, for tests and single-process deployments that
//! accept losing state on restart.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{
    millis, AdminRecord, AuditRecord, BackendError, MemoryThrottle, OrgRecord, SessionRecord,
    Store, StoreError, StoreFuture, ThrottleKeys, ThrottlePolicy, ThrottleVerdict,
};
use crate::audit::AuditEvent;
use crate::identity::Username;
use crate::org::{Generation, OrgId};

/// A [`Store`] in memory. Nothing survives the process. The failed-login throttle is kept
/// as `Sessions` without a store keeps it (bounded by
/// [`ThrottlePolicy::max_entries`]), shared by everything that shares this store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    throttle: MemoryThrottle,
}

#[derive(Debug, Default)]
struct State {
    orgs: BTreeMap<OrgId, OrgRecord>,
    audit: Vec<AuditRecord>,
    admins: BTreeMap<Username, AdminRecord>,
    sessions: BTreeMap<[u8; 32], SessionRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| StoreError::Backend(BackendError::msg("memory store lock poisoned")))?;
        f(&mut state)
    }
}

impl Store for MemoryStore {
    fn load_orgs(&self) -> StoreFuture<'_, Vec<OrgRecord>> {
        let result = self.with_state(|s| Ok(s.orgs.values().cloned().collect()));
        Box::pin(std::future::ready(result))
    }

    fn create_org<'a>(&'a self, org: &'a OrgId) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            if s.orgs.contains_key(org) {
                return Err(StoreError::Exists);
            }
            s.orgs.insert(
                org.clone(),
                OrgRecord {
                    org: org.clone(),
                    subscribed: false,
                    key: None,
                    generation: Generation::default(),
                    last_modified_by: None,
                    last_modified_on: None,
                },
            );
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn commit<'a>(
        &'a self,
        expected: Generation,
        next: &'a OrgRecord,
        audit: &'a AuditEvent,
    ) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            let current = s.orgs.get_mut(&next.org).ok_or(StoreError::NotFound)?;
            if current.generation != expected {
                return Err(StoreError::Conflict);
            }
            let mut stored = next.clone();
            // Stored times have millisecond precision, as in the durable backends.
            stored.last_modified_on = next.last_modified_on.map(|t| super::from_millis(millis(t)));
            *current = stored;
            let seq = s.audit.last().map_or(1, |r| r.seq + 1);
            let mut event = audit.clone();
            event.at = super::from_millis(millis(audit.at));
            s.audit.push(AuditRecord { seq, event });
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn audit_page<'a>(
        &'a self,
        org: &'a OrgId,
        before: Option<u64>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<AuditRecord>> {
        let result = self.with_state(|s| {
            Ok(s.audit
                .iter()
                .rev()
                .filter(|r| &r.event.org == org && before.is_none_or(|b| r.seq < b))
                .take(limit as usize)
                .cloned()
                .collect())
        });
        Box::pin(std::future::ready(result))
    }

    fn load_admins(&self) -> StoreFuture<'_, Vec<AdminRecord>> {
        let result = self.with_state(|s| Ok(s.admins.values().cloned().collect()));
        Box::pin(std::future::ready(result))
    }

    fn put_admin<'a>(&'a self, admin: &'a AdminRecord) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            s.admins.insert(admin.username.clone(), admin.clone());
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn delete_admin<'a>(&'a self, username: &'a Username) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            s.admins
                .remove(username)
                .map(drop)
                .ok_or(StoreError::NotFound)
        });
        Box::pin(std::future::ready(result))
    }

    fn load_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>> {
        let result = self.with_state(|s| Ok(s.sessions.values().cloned().collect()));
        Box::pin(std::future::ready(result))
    }

    fn put_session<'a>(&'a self, session: &'a SessionRecord) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            let mut stored = session.clone();
            stored.created = super::from_millis(millis(session.created));
            s.sessions.insert(session.digest, stored);
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn delete_session<'a>(&'a self, digest: &'a [u8; 32]) -> StoreFuture<'a, ()> {
        let result = self.with_state(|s| {
            s.sessions.remove(digest);
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn throttle_take<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ThrottleVerdict> {
        Box::pin(std::future::ready(self.throttle.take(keys, policy, now_ms)))
    }

    fn throttle_succeeded<'a>(
        &'a self,
        keys: &'a ThrottleKeys,
        username_charged: bool,
        policy: &'a ThrottlePolicy,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.throttle.succeeded(
            keys,
            username_charged,
            policy,
            now_ms,
        )))
    }

    fn throttle_collect(&self, now_ms: u64) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(self.throttle.collect(now_ms)))
    }
}
