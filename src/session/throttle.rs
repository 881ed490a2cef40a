//! Failed-login throttling (A3), fleet-wide when the sessions have a store (F2).
//!
//! Two token buckets, both charged *before* the password is checked (so a throttled attempt
//! never reaches argon2) and refunded when the login succeeds:
//!
//! - **per source address** (IPv4 address, or IPv6 /64): `address_burst` attempts, then one
//!   more every `address_refill`. Defaults: 10, then one every 6 s (10 a minute).
//! - **per username**: `username_burst` attempts, then one every `username_refill`. Defaults:
//!   5, then one a minute. This bucket does **not** apply to an address from which that
//!   admin logged in successfully within `known_address_ttl` (default 30 days; the 8 most
//!   recent addresses per admin): an attacker spraying one username from many addresses
//!   slows down only the attempts from new places, never the admin at a known one.
//!
//! A throttled attempt gets `429` with an integer `Retry-After` (seconds until a token is
//! back, at least 1).
//!
//! # Where the buckets live
//!
//! - [`Sessions::open`](super::Sessions::open) (and so [`OrgKey`](crate::OrgKey) and the
//!   gateway): in the [`Store`], through [`Store::throttle_take`] before the password check
//!   and [`Store::throttle_succeeded`] after a success (one call each; on PostgreSQL one
//!   round trip each, atomic across replicas). Every replica sharing the store draws from
//!   the same buckets: N replicas allow no more attempts than one, a restart refills
//!   nothing (SQLite, PostgreSQL), and an address known for an admin is known on every
//!   replica. If the store cannot be asked, the login fails (`500`) and is logged: it is
//!   never let through unthrottled. At most once a minute each `Sessions` asks the store, in
//!   the background, to delete what no longer matters ([`Store::throttle_collect`]: buckets
//!   that are full again, known addresses past their time), so the tables stay bounded by
//!   the attempt rate times the longest refill window (5 minutes for usernames by default).
//! - [`Sessions::with_config`](super::Sessions::with_config) and
//!   [`Sessions::new`](super::Sessions::new) (no store): in this process's memory, as in a
//!   [`MemoryStore`](crate::store::MemoryStore): a restart refills them.
//!
//! Edge cases: attempts whose client address is unknown (the endpoint found none: configure
//! [`SessionEndpoint::client_addr`](crate::SessionEndpoint::client_addr)) share one address
//! bucket; attempts for strings that are not usernames share one username bucket. Either way
//! nothing reaches argon2 unthrottled.
//!
//! In memory, tables are bounded (`max_entries` per table): when full, entries whose buckets
//! are full again are dropped (at most one sweep a second); if that frees nothing, a new
//! address or username is not tracked (the other bucket still applies), so memory stays
//! bounded under a flood.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::identity::Username;
use crate::store::{MemoryThrottle, Store, StoreError, ThrottleKeys, ThrottleVerdict};

pub use crate::store::ThrottlePolicy;

/// How often a `Sessions` with a store asks it to collect expired throttle state.
const COLLECT_EVERY_MS: u64 = 60_000;

/// What `begin` took, to be refunded on success.
#[derive(Debug)]
pub(crate) struct Reservation {
    keys: ThrottleKeys,
    username_charged: bool,
}

/// Why `begin` refused an attempt.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Throttled: wait this many seconds.
    Wait(u64),
    /// The store could not be asked: fail closed.
    Store(StoreError),
}

/// Where the buckets are.
enum State {
    Local(MemoryThrottle),
    Shared(Arc<dyn Store>),
}

/// The throttle of one `Sessions`.
pub(crate) struct Throttle {
    policy: ThrottlePolicy,
    state: State,
    last_collect_ms: AtomicU64,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("policy", &self.policy)
            .field("shared", &matches!(self.state, State::Shared(_)))
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// Buckets in this process's memory.
    pub(crate) fn local(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            state: State::Local(MemoryThrottle::default()),
            last_collect_ms: AtomicU64::new(0),
        }
    }

    /// Buckets in `store`, shared with every process that shares it.
    pub(crate) fn shared(policy: ThrottlePolicy, store: Arc<dyn Store>) -> Self {
        Self {
            policy,
            state: State::Shared(store),
            last_collect_ms: AtomicU64::new(0),
        }
    }

    /// Charges one attempt, or says how long to wait (or that the store failed).
    pub(crate) async fn begin(
        &self,
        source: Option<IpAddr>,
        username: Option<&Username>,
        now_ms: u64,
    ) -> Result<Reservation, Refusal> {
        let keys = ThrottleKeys::new(source, username);
        let verdict = match &self.state {
            State::Local(memory) => memory.take(&keys, &self.policy, now_ms),
            State::Shared(store) => {
                let verdict = store.throttle_take(&keys, &self.policy, now_ms).await;
                self.collect_now_and_then(store, now_ms);
                verdict
            }
        }
        .map_err(Refusal::Store)?;
        match verdict {
            ThrottleVerdict::Charged { username_charged } => Ok(Reservation {
                keys,
                username_charged,
            }),
            ThrottleVerdict::Wait { .. } => {
                Err(Refusal::Wait(verdict.retry_after_secs().unwrap_or(1)))
            }
        }
    }

    /// The login succeeded: refund its tokens and remember the address for the admin.
    ///
    /// # Errors
    ///
    /// The store's, if it could not be told (the caller logs it; the login stands).
    pub(crate) async fn succeeded(
        &self,
        reservation: &Reservation,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let Reservation {
            keys,
            username_charged,
        } = reservation;
        match &self.state {
            State::Local(memory) => memory.succeeded(keys, *username_charged, &self.policy, now_ms),
            State::Shared(store) => {
                store
                    .throttle_succeeded(keys, *username_charged, &self.policy, now_ms)
                    .await
            }
        }
    }

    /// At most once every [`COLLECT_EVERY_MS`], deletes the store's expired throttle state in
    /// the background (never in the login's way).
    fn collect_now_and_then(&self, store: &Arc<dyn Store>, now_ms: u64) {
        let last = self.last_collect_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < COLLECT_EVERY_MS {
            return;
        }
        if self
            .last_collect_ms
            .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(store);
        runtime.spawn(async move {
            match store.throttle_collect(now_ms).await {
                Ok(deleted) => {
                    tracing::debug!(target: "orgkey::session", deleted, "expired throttle state collected");
                }
                Err(error) => {
                    tracing::warn!(target: "orgkey::session", %error, "could not collect expired throttle state");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    fn wait(result: Result<Reservation, Refusal>) -> u64 {
        match result {
            Err(Refusal::Wait(secs)) => secs,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    /// Each test runs on the local throttle and on one shared through a `MemoryStore`.
    fn both() -> [Throttle; 2] {
        [
            Throttle::local(ThrottlePolicy::default()),
            Throttle::shared(
                ThrottlePolicy::default(),
                Arc::new(crate::store::MemoryStore::new()),
            ),
        ]
    }

    #[tokio::test]
    async fn address_bucket_allows_a_burst_then_one_per_refill() {
        for t in both() {
            // Distinct usernames, so only the address bucket is shared.
            let user = |i: u32| Username::new(&format!("user{i}@acme.example")).unwrap();
            for i in 0..10 {
                t.begin(ip(1), Some(&user(i)), 0).await.unwrap();
            }
            assert_eq!(wait(t.begin(ip(1), Some(&user(10)), 0).await), 6);
            assert_eq!(wait(t.begin(ip(1), Some(&user(11)), 3_000).await), 3);
            t.begin(ip(1), Some(&user(12)), 6_000).await.unwrap();
            assert!(t.begin(ip(1), Some(&user(13)), 6_000).await.is_err());
            // Another address is not affected.
            t.begin(ip(2), Some(&user(14)), 6_000).await.unwrap();
        }
    }

    #[tokio::test]
    async fn successes_are_refunded() {
        for t in both() {
            let alice = Username::new("alice@acme.example").unwrap();
            for _ in 0..50 {
                let r = t.begin(ip(1), Some(&alice), 0).await.unwrap();
                t.succeeded(&r, 0).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn username_bucket_spares_known_addresses() {
        for t in both() {
            let alice = Username::new("alice@acme.example").unwrap();
            let r = t.begin(ip(1), Some(&alice), 0).await.unwrap();
            t.succeeded(&r, 0).await.unwrap(); // ip 1 is now known for alice
                                               // An attacker on 5 other addresses exhausts alice's username bucket.
            for i in 10..15 {
                t.begin(ip(i), Some(&alice), 1_000).await.unwrap();
            }
            assert_eq!(wait(t.begin(ip(20), Some(&alice), 1_000).await), 60);
            // Alice at her known address is not locked out.
            let r = t.begin(ip(1), Some(&alice), 1_000).await.unwrap();
            t.succeeded(&r, 1_000).await.unwrap();
        }
    }

    #[tokio::test]
    async fn unknown_addresses_and_non_usernames_are_throttled_too() {
        for t in both() {
            for _ in 0..5 {
                t.begin(None, None, 0).await.unwrap();
            }
            // The shared pseudo-username bucket (5) runs out first.
            assert_eq!(wait(t.begin(None, None, 0).await), 60);
            let alice = Username::new("alice@acme.example").unwrap();
            for _ in 0..5 {
                t.begin(None, Some(&alice), 0).await.unwrap();
            }
            // Ten attempts from unknown addresses: the shared address bucket is empty.
            assert_eq!(wait(t.begin(None, Some(&alice), 0).await), 6);
        }
    }
}
