//! F2's half in the session table: what a replica applies from the fleet's change feed
//! (logins and logouts made on other replicas), and sharing session use so that idle time
//! counts the last use on any replica.
//!
//! The PostgreSQL store's follower calls these (see `PostgresStore::follow`); the hot path
//! never waits for the database: it reads the table these keep in step.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{SessionEntry, Sessions};
use std::future::Future;
use std::pin::Pin;

use crate::store::{FollowSessions, SessionRecord, Store};

/// How often session use is shared, for an idle timeout of `idle`: a tenth of it, between
/// 50 ms and 5 s.
pub(super) fn share_interval(idle: Duration) -> Duration {
    (idle / 10).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// How often a replica deletes dead sessions from the store.
const COLLECT_EVERY: Duration = Duration::from_secs(60);

impl FollowSessions for Sessions {
    /// A session another replica created (a login or a carry-over): known here from now on.
    fn stored(&self, record: SessionRecord) {
        let (entry, digest) = SessionEntry::from_record(record);
        let last_used = entry.last_seen_ms.load(Ordering::Relaxed);
        self.inner
            .sessions
            .entry(digest)
            .and_modify(|known| {
                known.last_seen_ms.fetch_max(last_used, Ordering::Relaxed);
            })
            .or_insert_with(|| Arc::new(entry));
    }

    /// A session ended on another replica (logout, expiry, revocation): dead here too. Ended
    /// as a logout here would end it, so that a carry-over racing it discards its successor.
    fn deleted(&self, digest: &[u8; 32]) {
        if let Some(record) = self
            .inner
            .sessions
            .get(digest)
            .map(|r| Arc::clone(r.value()))
        {
            record.end_by_feed();
            self.inner.sessions.remove(digest);
        }
    }

    /// Every stored session, after the feed reconnected: those gone from the store end here,
    /// the new ones start, the others keep their entries (and the later of the two uses).
    fn reload(&self, records: Vec<SessionRecord>) {
        let stored: HashSet<[u8; 32]> = records.iter().map(|r| r.digest).collect();
        self.inner.sessions.retain(|digest, record| {
            let keep = stored.contains(digest);
            if !keep {
                record.end_by_feed();
            }
            keep
        });
        for record in records {
            self.stored(record);
        }
    }

    fn share_use(&self, store: Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.clone().share_use_loop(store))
    }
}

impl Sessions {
    /// Shares session use with the fleet until the follower stops (F2): every
    /// [`share_interval`], reports the sessions used here since the last round and takes the
    /// uses other replicas reported; once a minute deletes dead sessions from the store.
    ///
    /// Idle time then counts the last use on any replica, with a precision of two intervals
    /// (10 s at the default idle timeout of 5 minutes): a session expires between
    /// `idle_timeout` and `idle_timeout` + two intervals after its last use anywhere, never
    /// earlier.
    async fn share_use_loop(self, store: Arc<dyn Store>) {
        let every = share_interval(self.inner.config.idle_timeout);
        let every_ms = every.as_millis() as u64;
        self.inner
            .idle_grace_ms
            .store(2 * every_ms, Ordering::Relaxed);
        let mut reported_up_to = 0u64;
        let mut since = 0u64;
        let mut last_collect = 0u64;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = self.now_ms();
            let used: Vec<([u8; 32], u64)> = self
                .inner
                .sessions
                .iter()
                .filter_map(|entry| {
                    let last = entry.value().last_seen_ms.load(Ordering::Relaxed);
                    (last >= reported_up_to).then(|| (*entry.key(), last))
                })
                .collect();
            match store.sync_session_use(&used, since).await {
                Ok(seen) => {
                    for (digest, last) in seen {
                        if let Some(entry) = self.inner.sessions.get(&digest) {
                            entry.last_seen_ms.fetch_max(last, Ordering::Relaxed);
                        }
                    }
                    reported_up_to = now;
                    // Others report uses up to one interval after they happened; keep a
                    // second interval for clocks that differ a little.
                    since = now.saturating_sub(2 * every_ms);
                }
                Err(error) => {
                    tracing::warn!(target: "orgkey::session", %error, "could not share session use with the fleet");
                }
            }
            if now.saturating_sub(last_collect) >= COLLECT_EVERY.as_millis() as u64 {
                last_collect = now;
                let config = &self.inner.config;
                // Two grace periods: a use not yet reported anywhere is at most one old.
                let idle = config.idle_timeout.as_millis() as u64 + 4 * every_ms;
                let lifetime = config.absolute_lifetime.as_millis() as u64;
                match store.collect_sessions(now, idle, lifetime).await {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::debug!(target: "orgkey::session", deleted, "dead sessions deleted from the store");
                    }
                    Err(error) => {
                        tracing::warn!(target: "orgkey::session", %error, "could not delete dead sessions from the store");
                    }
                }
            }
        }
    }
}
