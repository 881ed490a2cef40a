//! The failed-login throttle's state (A3), kept by the store so that every replica sharing it
//! sees one set of buckets (F2): the policy, the keys an attempt draws from
//! ([`ThrottleKeys`]: text, never a password or a key), one bucket's arithmetic
//! ([`ThrottleBucket`], the same in every backend: the PostgreSQL store does it in SQL with
//! the numbers this computes, so all agree to the millisecond), and the in-memory tables
//! that `Sessions` without a store and the [`MemoryStore`](super::MemoryStore) use.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use super::{BackendError, StoreError};
use crate::identity::Username;

/// The throttling policy (A3). See [`crate::session::throttle`] for what each number does.
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
    /// Most entries per table (addresses, usernames) a throttle kept in memory tracks
    /// (`Sessions` without a store, [`MemoryStore`](super::MemoryStore)). The SQL stores
    /// bound their tables by time instead: their rows expire (see
    /// [`Store::throttle_collect`](super::Store::throttle_collect)).
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

impl ThrottlePolicy {
    /// The address bucket's numbers.
    pub fn address_bucket(&self) -> ThrottleBucket {
        ThrottleBucket::new(self.address_burst, self.address_refill)
    }

    /// The username bucket's numbers.
    pub fn username_bucket(&self) -> ThrottleBucket {
        ThrottleBucket::new(self.username_burst, self.username_refill)
    }

    /// How long a known address stays known, in milliseconds (bounded like the buckets).
    pub fn known_address_ttl_ms(&self) -> u64 {
        self.known_address_ttl
            .as_millis()
            .min(u128::from(MAX_CAPACITY_MS)) as u64
    }
}

/// How many known addresses are kept per admin (the most recent).
pub const KNOWN_ADDRESSES_PER_ADMIN: usize = 8;

/// The username key shared by every string that is not a username (it has a space, so no
/// username can be it).
pub(crate) const NOT_A_USERNAME: &str = " not a username";

/// The address key of attempts whose client address is unknown (no address key can be it:
/// addresses have no letters past `f`).
pub(crate) const UNKNOWN_ADDRESS: &str = "unknown";

/// The two buckets one login attempt draws from (A3): its source address and its username,
/// as text. Never a password or a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThrottleKeys {
    address: String,
    username: String,
}

impl ThrottleKeys {
    /// The keys of an attempt from `source` (IPv4 whole, IPv6 by /64, an IPv4-mapped IPv6
    /// address as IPv4; `None`: `unknown`) for `username` (`None`, for a string that is not
    /// a username: `" not a username"`, shared by all of them).
    pub fn new(source: Option<IpAddr>, username: Option<&Username>) -> Self {
        let address = match source {
            None => UNKNOWN_ADDRESS.to_owned(),
            Some(IpAddr::V4(v4)) => v4.to_string(),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let prefix = u128::from(v6) >> 64 << 64;
                    format!("{}/64", Ipv6Addr::from(prefix))
                }
            },
        };
        Self {
            address,
            username: username.map_or(NOT_A_USERNAME, Username::as_str).to_owned(),
        }
    }

    /// The address bucket's key.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The username bucket's key.
    pub fn username(&self) -> &str {
        &self.username
    }
}

/// What [`Store::throttle_take`](super::Store::throttle_take) decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleVerdict {
    /// One attempt was charged: it may go on to the password check.
    Charged {
        /// Whether the username bucket was charged too (not when the address is known for
        /// the username, or an in-memory table had no room); pass it on to
        /// [`Store::throttle_succeeded`](super::Store::throttle_succeeded).
        username_charged: bool,
    },
    /// Throttled, nothing charged: a token is back in this many milliseconds (> 0).
    Wait {
        /// Milliseconds until the attempt would be allowed.
        ms: u64,
    },
}

impl ThrottleVerdict {
    /// For [`ThrottleVerdict::Wait`], the integer seconds for `Retry-After` (rounded up, at
    /// least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Charged { .. } => None,
            Self::Wait { ms } => Some(ms.div_ceil(1000).max(1)),
        }
    }
}

/// Bounds that keep every sum below `i64::MAX` (the SQL stores' `BIGINT`): refills up to
/// about 35 years, a bucket's capacity up to 2^62 ms.
const MAX_REFILL_MS: u64 = 1 << 40;
const MAX_CAPACITY_MS: u64 = 1 << 62;

/// One token bucket's numbers, in milliseconds, and the arithmetic every store does with
/// them.
///
/// A bucket of `burst` tokens that earns one back every `refill` is kept as one time:
/// `full_at_ms`, when it will be full again (GCRA's "theoretical arrival time"). At `now` it
/// holds `burst - (full_at - now) / refill` tokens; a bucket whose `full_at` has passed is
/// full, exactly like one never written, so such a row means nothing and can be deleted
/// ([`Store::throttle_collect`](super::Store::throttle_collect)).
///
/// - [`take`](Self::take): `next = max(full_at, now) + refill`; allowed while `next - now <=
///   burst × refill` (then `full_at = next`), otherwise wait `next - now - burst × refill`
///   milliseconds.
/// - [`refund`](Self::refund): `full_at = max(full_at - refill, now)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleBucket {
    /// Time to earn back one token (at least 1 ms).
    pub refill_ms: u64,
    /// `burst × refill`: how far ahead of now `full_at` may be after a take.
    pub capacity_ms: u64,
}

impl ThrottleBucket {
    fn new(burst: u32, refill: Duration) -> Self {
        let refill_ms = (refill.as_millis().min(u128::from(MAX_REFILL_MS)) as u64).max(1);
        Self {
            refill_ms,
            capacity_ms: u64::from(burst)
                .saturating_mul(refill_ms)
                .min(MAX_CAPACITY_MS),
        }
    }

    /// Takes one token from a bucket full at `full_at` (`None`: never written, full):
    /// `Ok(new full_at)`, or `Err(milliseconds to wait)`.
    pub fn take(&self, full_at: Option<u64>, now_ms: u64) -> Result<u64, u64> {
        let next = full_at
            .unwrap_or(now_ms)
            .max(now_ms)
            .saturating_add(self.refill_ms);
        let ahead = next - now_ms;
        if ahead <= self.capacity_ms {
            Ok(next)
        } else {
            Err(ahead - self.capacity_ms)
        }
    }

    /// Gives one token back to a bucket full at `full_at`: its new `full_at`.
    pub fn refund(&self, full_at: u64, now_ms: u64) -> u64 {
        full_at.saturating_sub(self.refill_ms).max(now_ms)
    }
}

/// One username's entry in memory: its bucket and its known addresses, oldest first, with
/// the time each stops being known.
#[derive(Debug)]
struct UserEntry {
    full_at_ms: u64,
    known: VecDeque<(String, u64)>,
}

impl UserEntry {
    fn knows(&self, address: &str, now_ms: u64) -> bool {
        self.known
            .iter()
            .any(|(known, until)| known == address && *until > now_ms)
    }
}

#[derive(Debug, Default)]
struct Tables {
    /// Address key → `full_at_ms`.
    addresses: HashMap<String, u64>,
    usernames: HashMap<String, UserEntry>,
    last_sweep_ms: u64,
}

impl Tables {
    /// Drops what no longer changes a decision at `now_ms`; returns how many entries (and
    /// known addresses) went.
    fn collect(&mut self, now_ms: u64) -> u64 {
        let mut dropped = 0u64;
        self.addresses.retain(|_, full_at| {
            let keep = *full_at > now_ms;
            dropped += u64::from(!keep);
            keep
        });
        self.usernames.retain(|_, entry| {
            let before = entry.known.len();
            entry.known.retain(|(_, until)| *until > now_ms);
            dropped += (before - entry.known.len()) as u64;
            let keep = entry.full_at_ms > now_ms || !entry.known.is_empty();
            dropped += u64::from(!keep);
            keep
        });
        dropped
    }

    /// Whether a table at `len` entries may take one more: below `max`, or after a sweep
    /// (at most one a second, so a flood of new keys cannot make every attempt scan).
    fn room(&mut self, address_table: bool, max: usize, now_ms: u64) -> bool {
        let len = |t: &Self| {
            if address_table {
                t.addresses.len()
            } else {
                t.usernames.len()
            }
        };
        if len(self) < max {
            return true;
        }
        if now_ms.saturating_sub(self.last_sweep_ms) < 1000 {
            return false;
        }
        self.last_sweep_ms = now_ms;
        self.collect(now_ms);
        len(self) < max
    }
}

/// The throttle state in memory, bounded by [`ThrottlePolicy::max_entries`] per table: when a
/// table is full, entries that no longer matter are dropped (at most one sweep a second); if
/// that frees nothing, a new address or username is not tracked (the other bucket still
/// applies). One lock around both tables, so a take is atomic.
#[derive(Debug, Default)]
pub(crate) struct MemoryThrottle {
    tables: Mutex<Tables>,
}

impl MemoryThrottle {
    fn tables(&self) -> Result<std::sync::MutexGuard<'_, Tables>, StoreError> {
        self.tables
            .lock()
            .map_err(|_| StoreError::Backend(BackendError::msg("throttle lock poisoned")))
    }

    /// [`Store::throttle_take`](super::Store::throttle_take) in memory.
    pub(crate) fn take(
        &self,
        keys: &ThrottleKeys,
        policy: &ThrottlePolicy,
        now_ms: u64,
    ) -> Result<ThrottleVerdict, StoreError> {
        let mut t = self.tables()?;
        // Check both buckets before charging either.
        let address_next = match policy
            .address_bucket()
            .take(t.addresses.get(keys.address()).copied(), now_ms)
        {
            Ok(next) => next,
            Err(ms) => return Ok(ThrottleVerdict::Wait { ms }),
        };
        let user = t.usernames.get(keys.username());
        let known = user.is_some_and(|u| u.knows(keys.address(), now_ms));
        let username_next = if known {
            None
        } else {
            match policy
                .username_bucket()
                .take(user.map(|u| u.full_at_ms), now_ms)
            {
                Ok(next) => Some(next),
                Err(ms) => return Ok(ThrottleVerdict::Wait { ms }),
            }
        };
        if t.addresses.contains_key(keys.address()) || t.room(true, policy.max_entries, now_ms) {
            t.addresses.insert(keys.address().to_owned(), address_next);
        }
        let mut username_charged = false;
        if let Some(next) = username_next {
            if t.usernames.contains_key(keys.username())
                || t.room(false, policy.max_entries, now_ms)
            {
                t.usernames
                    .entry(keys.username().to_owned())
                    .or_insert_with(|| UserEntry {
                        full_at_ms: now_ms,
                        known: VecDeque::new(),
                    })
                    .full_at_ms = next;
                username_charged = true;
            }
        }
        Ok(ThrottleVerdict::Charged { username_charged })
    }

    /// [`Store::throttle_succeeded`](super::Store::throttle_succeeded) in memory.
    pub(crate) fn succeeded(
        &self,
        keys: &ThrottleKeys,
        username_charged: bool,
        policy: &ThrottlePolicy,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut t = self.tables()?;
        if let Some(full_at) = t.addresses.get_mut(keys.address()) {
            *full_at = policy.address_bucket().refund(*full_at, now_ms);
        }
        if !t.usernames.contains_key(keys.username()) && !t.room(false, policy.max_entries, now_ms)
        {
            return Ok(());
        }
        let entry = t
            .usernames
            .entry(keys.username().to_owned())
            .or_insert_with(|| UserEntry {
                full_at_ms: now_ms,
                known: VecDeque::new(),
            });
        if username_charged {
            entry.full_at_ms = policy.username_bucket().refund(entry.full_at_ms, now_ms);
        }
        entry.known.retain(|(known, _)| known != keys.address());
        let until = now_ms.saturating_add(policy.known_address_ttl_ms());
        entry.known.push_back((keys.address().to_owned(), until));
        while entry.known.len() > KNOWN_ADDRESSES_PER_ADMIN {
            entry.known.pop_front();
        }
        Ok(())
    }

    /// [`Store::throttle_collect`](super::Store::throttle_collect) in memory.
    pub(crate) fn collect(&self, now_ms: u64) -> Result<u64, StoreError> {
        Ok(self.tables()?.collect(now_ms))
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let t = self.tables().unwrap_or_else(|_| unreachable!());
        (t.addresses.len(), t.usernames.len())
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
    fn keys_name_ipv4_whole_ipv6_by_64_and_the_unknowns() {
        let alice = Username::new("Alice@Acme.example").unwrap();
        let keys = ThrottleKeys::new(ip(1), Some(&alice));
        assert_eq!(keys.address(), "192.0.2.1");
        assert_eq!(keys.username(), "alice@acme.example");
        let a = ThrottleKeys::new(Some("2001:db8:1:2::1".parse().unwrap()), None);
        let b = ThrottleKeys::new(Some("2001:db8:1:2:ffff::9".parse().unwrap()), None);
        let c = ThrottleKeys::new(Some("2001:db8:1:3::1".parse().unwrap()), None);
        assert_eq!(a.address(), "2001:db8:1:2::/64");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.username(), NOT_A_USERNAME);
        let mapped = ThrottleKeys::new(Some("::ffff:192.0.2.1".parse().unwrap()), None);
        assert_eq!(mapped.address(), "192.0.2.1");
        assert_eq!(ThrottleKeys::new(None, None).address(), UNKNOWN_ADDRESS);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_refill() {
        let bucket = ThrottlePolicy::default().address_bucket();
        let mut full_at = None;
        for _ in 0..10 {
            full_at = Some(bucket.take(full_at, 0).unwrap());
        }
        assert_eq!(bucket.take(full_at, 0), Err(6_000));
        assert_eq!(bucket.take(full_at, 3_000), Err(3_000));
        let after = bucket.take(full_at, 6_000).unwrap();
        assert_eq!(bucket.take(Some(after), 6_000), Err(6_000));
        // A refund gives one back, never more than a full bucket.
        assert!(bucket
            .take(Some(bucket.refund(after, 6_000)), 6_000)
            .is_ok());
        assert_eq!(bucket.refund(5, 100), 100);
        // Extreme policies stay in range.
        let huge = ThrottleBucket::new(u32::MAX, Duration::MAX);
        let next = huge.take(None, 1 << 41);
        assert!(next.is_ok_and(|n| n < i64::MAX as u64));
        assert_eq!(ThrottleBucket::new(0, Duration::ZERO).take(None, 7), Err(1));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(ThrottleVerdict::Wait { ms: 1 }.retry_after_secs(), Some(1));
        assert_eq!(
            ThrottleVerdict::Wait { ms: 6_000 }.retry_after_secs(),
            Some(6)
        );
        assert_eq!(
            ThrottleVerdict::Wait { ms: 6_001 }.retry_after_secs(),
            Some(7)
        );
        let charged = ThrottleVerdict::Charged {
            username_charged: true,
        };
        assert_eq!(charged.retry_after_secs(), None);
    }

    #[test]
    fn memory_tables_stay_bounded() {
        let t = MemoryThrottle::default();
        let policy = ThrottlePolicy {
            max_entries: 4,
            ..ThrottlePolicy::default()
        };
        for i in 0..100u8 {
            let user = Username::new(&format!("user{i}@acme.example")).unwrap();
            let _ = t.take(&ThrottleKeys::new(ip(i), Some(&user)), &policy, 0);
        }
        let (addresses, usernames) = t.len();
        assert!(addresses <= 4 && usernames <= 4, "{addresses} {usernames}");
        // Once the buckets are full again, a sweep makes room.
        let later = ThrottleKeys::new(ip(200), None);
        let verdict = t.take(&later, &policy, 3_600_000).unwrap();
        assert_eq!(
            verdict,
            ThrottleVerdict::Charged {
                username_charged: true
            }
        );
        assert_eq!(t.len(), (1, 1));
    }
}
