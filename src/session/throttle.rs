//! Failed-login throttling (A3).
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
//! Edge cases: attempts whose client address is unknown (the endpoint found none: configure
//! [`SessionEndpoint::client_addr`](super::SessionEndpoint::client_addr)) share one address
//! bucket; attempts for strings that are not usernames share one username bucket. Either way
//! nothing reaches argon2 unthrottled.
//!
//! Tables are bounded (`max_entries` per table): when full, entries whose buckets are full
//! again are dropped (at most one sweep a second); if that frees nothing, a new address or
//! username is not tracked (the other bucket still applies), so memory stays bounded under a
//! flood.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::identity::Username;

/// The throttling policy. See the [module docs](self) for what each number does.
#[derive(Debug, Clone)]
pub struct ThrottlePolicy {
    /// Failed attempts an address may make at once.
    pub address_burst: u32,
    /// Time for an address to earn back one attempt.
    pub address_refill: Duration,
    /// Failed attempts a username may receive at once from unknown addresses.
    pub username_burst: u32,
    /// Time for a username to earn back one attempt.
    pub username_refill: Duration,
    /// How long a successful login makes its address "known" for that admin.
    pub known_address_ttl: Duration,
    /// Most entries per table (addresses, usernames).
    pub max_entries: usize,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        Self {
            address_burst: 10,
            address_refill: Duration::from_secs(6),
            username_burst: 5,
            username_refill: Duration::from_secs(60),
            known_address_ttl: Duration::from_secs(30 * 24 * 3600),
            max_entries: 100_000,
        }
    }
}

const KNOWN_ADDRESSES_PER_ADMIN: usize = 8;

/// An address as throttled: IPv4 whole, IPv6 by /64 (one subscriber's usual allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    V6(u64),
    /// The endpoint could not tell the client's address.
    Unknown,
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

impl Bucket {
    fn full(burst: u32, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(burst),
            updated_ms: now_ms,
        }
    }

    fn refill(&mut self, burst: u32, refill: Duration, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        let per_ms = 1.0 / (refill.as_millis().max(1) as f64);
        self.tokens = (self.tokens + elapsed * per_ms).min(f64::from(burst));
        self.updated_ms = now_ms;
    }

    /// Seconds until one token is available (0 if one is).
    fn wait_secs(&self, refill: Duration) -> u64 {
        if self.tokens >= 1.0 {
            return 0;
        }
        let missing = 1.0 - self.tokens;
        (missing * refill.as_secs_f64()).ceil().max(1.0) as u64
    }

    fn is_full(&self, burst: u32) -> bool {
        self.tokens >= f64::from(burst)
    }
}

#[derive(Debug, Clone)]
struct UserState {
    bucket: Bucket,
    /// Addresses of recent successful logins, newest last, with their time.
    known: VecDeque<(AddressKey, u64)>,
}

/// What `begin` took, to be refunded on success.
#[derive(Debug)]
pub(crate) struct Reservation {
    address: Option<AddressKey>,
    username: Option<Username>,
    charged_username: bool,
}

/// The throttle state.
#[derive(Debug)]
pub(crate) struct Throttle {
    policy: ThrottlePolicy,
    addresses: DashMap<AddressKey, Bucket>,
    usernames: DashMap<Username, UserState>,
    /// Stands for every string that is not a username (cannot collide: it has no `@`).
    not_a_username: Username,
    last_sweep_ms: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            addresses: DashMap::new(),
            usernames: DashMap::new(),
            not_a_username: Username::unchecked(" not a username"),
            last_sweep_ms: AtomicU64::new(0),
        }
    }

    /// Charges one attempt, or returns the seconds to wait.
    pub(crate) fn begin(
        &self,
        source: Option<IpAddr>,
        username: Option<&Username>,
        now_ms: u64,
    ) -> Result<Reservation, u64> {
        let p = &self.policy;
        let address = Some(source.map_or(AddressKey::Unknown, AddressKey::from));
        let username = Some(username.unwrap_or(&self.not_a_username));
        // Check both buckets before charging either.
        if let Some(address) = address {
            if let Some(mut bucket) = self.addresses.get_mut(&address) {
                bucket.refill(p.address_burst, p.address_refill, now_ms);
                let wait = bucket.wait_secs(p.address_refill);
                if wait > 0 {
                    return Err(wait);
                }
            }
        }
        let ttl_ms = p.known_address_ttl.as_millis() as u64;
        let mut charge_username = false;
        if let Some(username) = username {
            if let Some(mut state) = self.usernames.get_mut(username) {
                let known = address.is_some_and(|a| {
                    state
                        .known
                        .iter()
                        .any(|(k, at)| *k == a && now_ms.saturating_sub(*at) < ttl_ms)
                });
                if !known {
                    state
                        .bucket
                        .refill(p.username_burst, p.username_refill, now_ms);
                    let wait = state.bucket.wait_secs(p.username_refill);
                    if wait > 0 {
                        return Err(wait);
                    }
                    charge_username = true;
                }
            } else {
                charge_username = true;
            }
        }
        if let Some(address) = address {
            if self.room(&self.addresses, now_ms) || self.addresses.contains_key(&address) {
                let mut bucket = self
                    .addresses
                    .entry(address)
                    .or_insert_with(|| Bucket::full(p.address_burst, now_ms));
                bucket.refill(p.address_burst, p.address_refill, now_ms);
                bucket.tokens -= 1.0;
            }
        }
        let mut charged_username = false;
        if let (Some(username), true) = (username, charge_username) {
            if self.room_users(now_ms) || self.usernames.contains_key(username) {
                let mut state =
                    self.usernames
                        .entry(username.clone())
                        .or_insert_with(|| UserState {
                            bucket: Bucket::full(p.username_burst, now_ms),
                            known: VecDeque::new(),
                        });
                state
                    .bucket
                    .refill(p.username_burst, p.username_refill, now_ms);
                state.bucket.tokens -= 1.0;
                charged_username = true;
            }
        }
        Ok(Reservation {
            address,
            username: username.cloned(),
            charged_username,
        })
    }

    /// The login succeeded: refund its tokens and remember the address for the admin.
    pub(crate) fn succeeded(&self, reservation: Reservation, now_ms: u64) {
        let p = &self.policy;
        if let Some(address) = reservation.address {
            if let Some(mut bucket) = self.addresses.get_mut(&address) {
                bucket.tokens = (bucket.tokens + 1.0).min(f64::from(p.address_burst));
            }
        }
        let Some(username) = reservation.username else {
            return;
        };
        if !self.room_users(now_ms) && !self.usernames.contains_key(&username) {
            return;
        }
        let mut state = self.usernames.entry(username).or_insert_with(|| UserState {
            bucket: Bucket::full(p.username_burst, now_ms),
            known: VecDeque::new(),
        });
        if reservation.charged_username {
            state.bucket.tokens = (state.bucket.tokens + 1.0).min(f64::from(p.username_burst));
        }
        if let Some(address) = reservation.address {
            state.known.retain(|(k, _)| *k != address);
            state.known.push_back((address, now_ms));
            while state.known.len() > KNOWN_ADDRESSES_PER_ADMIN {
                state.known.pop_front();
            }
        }
    }

    /// Whether a sweep of a full table may run now: at most one a second, so a flood of new
    /// addresses cannot make every attempt scan the table.
    fn may_sweep(&self, now_ms: u64) -> bool {
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= 1000
            && self
                .last_sweep_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether the address table may take a new entry (after dropping refilled ones).
    fn room(&self, table: &DashMap<AddressKey, Bucket>, now_ms: u64) -> bool {
        if table.len() < self.policy.max_entries {
            return true;
        }
        if !self.may_sweep(now_ms) {
            return false;
        }
        let p = &self.policy;
        table.retain(|_, bucket| {
            bucket.refill(p.address_burst, p.address_refill, now_ms);
            !bucket.is_full(p.address_burst)
        });
        table.len() < self.policy.max_entries
    }

    fn room_users(&self, now_ms: u64) -> bool {
        if self.usernames.len() < self.policy.max_entries {
            return true;
        }
        if !self.may_sweep(now_ms) {
            return false;
        }
        let p = &self.policy;
        let ttl_ms = p.known_address_ttl.as_millis() as u64;
        self.usernames.retain(|_, state| {
            state
                .bucket
                .refill(p.username_burst, p.username_refill, now_ms);
            state
                .known
                .retain(|(_, at)| now_ms.saturating_sub(*at) < ttl_ms);
            !state.bucket.is_full(p.username_burst) || !state.known.is_empty()
        });
        self.usernames.len() < self.policy.max_entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[test]
    fn address_bucket_allows_a_burst_then_one_per_refill() {
        let t = Throttle::new(ThrottlePolicy::default());
        // Distinct usernames, so only the address bucket is shared.
        let user = |i: u32| Username::new(&format!("user{i}@acme.example")).unwrap();
        for i in 0..10 {
            t.begin(ip(1), Some(&user(i)), 0).unwrap();
        }
        assert_eq!(t.begin(ip(1), Some(&user(10)), 0).unwrap_err(), 6);
        assert_eq!(t.begin(ip(1), Some(&user(11)), 3_000).unwrap_err(), 3);
        t.begin(ip(1), Some(&user(12)), 6_000).unwrap();
        assert!(t.begin(ip(1), Some(&user(13)), 6_000).is_err());
        // Another address is not affected.
        t.begin(ip(2), Some(&user(14)), 6_000).unwrap();
    }

    #[test]
    fn successes_are_refunded() {
        let t = Throttle::new(ThrottlePolicy::default());
        let alice = Username::new("alice@acme.example").unwrap();
        for _ in 0..50 {
            let r = t.begin(ip(1), Some(&alice), 0).unwrap();
            t.succeeded(r, 0);
        }
    }

    #[test]
    fn username_bucket_spares_known_addresses() {
        let t = Throttle::new(ThrottlePolicy::default());
        let alice = Username::new("alice@acme.example").unwrap();
        let r = t.begin(ip(1), Some(&alice), 0).unwrap();
        t.succeeded(r, 0); // ip 1 is now known for alice
                           // An attacker on 5 other addresses exhausts alice's username bucket.
        for i in 10..15 {
            t.begin(ip(i), Some(&alice), 1_000).unwrap();
        }
        assert_eq!(t.begin(ip(20), Some(&alice), 1_000).unwrap_err(), 60);
        // Alice at her known address is not locked out.
        let r = t.begin(ip(1), Some(&alice), 1_000).unwrap();
        t.succeeded(r, 1_000);
    }

    #[test]
    fn ipv6_is_throttled_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddressKey::from(a), AddressKey::from(b));
        assert_ne!(AddressKey::from(a), AddressKey::from(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(AddressKey::from(mapped), AddressKey::from(ip(1).unwrap()));
    }

    #[test]
    fn unknown_addresses_and_non_usernames_are_throttled_too() {
        let t = Throttle::new(ThrottlePolicy::default());
        for _ in 0..5 {
            t.begin(None, None, 0).unwrap();
        }
        // The shared pseudo-username bucket (5) runs out first.
        assert_eq!(t.begin(None, None, 0).unwrap_err(), 60);
        let alice = Username::new("alice@acme.example").unwrap();
        for _ in 0..5 {
            t.begin(None, Some(&alice), 0).unwrap();
        }
        // Ten attempts from unknown addresses: the shared address bucket is empty.
        assert_eq!(t.begin(None, Some(&alice), 0).unwrap_err(), 6);
    }

    #[test]
    fn tables_stay_bounded() {
        let t = Throttle::new(ThrottlePolicy {
            max_entries: 4,
            ..ThrottlePolicy::default()
        });
        for i in 0..100u8 {
            let alice = Username::new("alice@acme.example").unwrap();
            let _ = t.begin(ip(i), Some(&alice), 0);
        }
        assert!(t.addresses.len() <= 4);
    }
}
