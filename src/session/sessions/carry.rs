//! W2's one home: a key change made through a session carries that session over.
//!
//! [`KeyManagementEndpoint`](crate::KeyManagementEndpoint) calls
//! [`Sessions::carry_over_onto`] with the response of a change it made through a session; that
//! ends the acting session, creates its successor under the new generation, and sets the
//! successor's cookie on the response. Everything W2 decides is here: who may be carried
//! over, when not, and how a logout racing the carry-over wins. (The layer's
//! `allow_keyless_sessions`, which lets the successor of a delete reach key management only,
//! is the other half of W2, with K5.)

use std::sync::Arc;

use http::header::SET_COOKIE;
use http::Response;

use super::{SessionDigest, SessionEntry, Sessions};
use crate::org::{Actor, Generation};
use crate::session::cookie::{set_cookie_value, SessionToken};
use crate::store::StoreError;

/// A key change made through a session, as the carry-over needs to know it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyChange<'a> {
    /// The session that made it.
    pub(crate) session: SessionDigest,
    /// The org's generation the request was authenticated under.
    pub(crate) checked_at: Generation,
    /// The generation the change moved the org to.
    pub(crate) changed_to: Generation,
    /// Who the change records as "last modified by".
    pub(crate) by: Option<&'a Actor>,
}

impl Sessions {
    /// Carries the session that made a key change over the change (W2): the session that
    /// named by `change` is ended, and a successor for the same admin, stamped with the
    /// org's generation `changed_to`, is created and returned (its id is for the client's
    /// cookie). The successor keeps the predecessor's login time, so the absolute lifetime
    /// (S2) still counts from the login; every other session of the org stays dead (K6).
    ///
    /// Only [`KeyManagementEndpoint`](crate::KeyManagementEndpoint) calls this, right after
    /// a change that [`SessionKeyAdmin`](crate::SessionKeyAdmin) made from exactly the
    /// generation the request was checked under: that is what proves the change was this
    /// session's. Returns `Ok(None)`, and leaves no successor, unless all of these hold:
    /// the session is one of this table that still exists and was not logged out
    /// meanwhile; the change was made by that session's admin and moved the org to the
    /// generation right after the one the request was authenticated under; the org is still
    /// at that generation (no later change); and the admin is still enabled, with the same
    /// password and the `api` scope.
    ///
    /// # Errors
    ///
    /// [`StoreError`] if the successor cannot be stored; nothing is created then (the
    /// predecessor is dead anyway, by its generation).
    pub(crate) async fn carry_over(
        &self,
        change: &KeyChange<'_>,
    ) -> Result<Option<SessionToken>, StoreError> {
        let changed_to = change.changed_to;
        let SessionDigest(old_digest) = change.session;
        let Some(old) = self
            .inner
            .sessions
            .get(&old_digest)
            .map(|r| Arc::clone(r.value()))
        else {
            return Ok(None);
        };
        let current = self
            .inner
            .orgs
            .state(old.org.as_str())
            .map(|state| state.generation());
        let admin_ok = self.admin_scopes(&old).is_some();
        let made_by_this_admin = change
            .by
            .is_some_and(|actor| actor.as_str() == old.admin.as_str());
        if old.generation != change.checked_at
            || changed_to != change.checked_at.next()
            || !made_by_this_admin
            || current != Some(changed_to)
            || !admin_ok
            || old.has_ended()
        {
            return Ok(None);
        }
        let (token, digest) = match SessionToken::generate() {
            Ok(generated) => generated,
            Err(error) => {
                tracing::warn!(target: "orgkey::session", %error, "no session id for a carry-over");
                return Ok(None);
            }
        };
        let successor = SessionEntry::new(
            old.org.clone(),
            old.admin.clone(),
            changed_to,
            old.credential_version,
            old.created_ms,
            self.now_ms(),
        );
        if let Some(store) = &self.inner.store {
            match store.put_session(&successor.stored(digest)).await {
                Ok(()) => {}
                Err(StoreError::Unconfirmed(unconfirmed)) => {
                    tracing::warn!(target: "orgkey::session", %unconfirmed, "session carried over");
                }
                Err(error) => return Err(error),
            }
        }
        self.inner.sessions.insert(digest, Arc::new(successor));
        // One decision against a logout racing this carry-over (here or on another
        // replica): whichever ends the predecessor first wins. A logout that won means the
        // admin asked to be signed out: the successor goes too. A logout that comes later
        // reports that it ended nothing. Decided before the predecessor's deletion is
        // announced, so that announcement is never taken for a logout.
        //
        // Between replicas the store decides: the predecessor's row goes now, and only the
        // call that deleted it may carry it over (a logout elsewhere that deleted it first
        // wins). A store one process owns answers yes, and the compare-and-swap decides.
        let took = match &self.inner.store {
            Some(store) => match store.take_session(&old_digest).await {
                Ok(took) => took,
                Err(StoreError::Unconfirmed(_)) => true,
                Err(error) => {
                    self.inner.sessions.remove(&digest);
                    self.forget(vec![digest]);
                    return Err(error);
                }
            },
            None => true,
        };
        let carried = took && old.end_by_carry_over();
        self.inner.sessions.remove(&old_digest);
        if !carried {
            self.inner.sessions.remove(&digest);
            self.forget(vec![digest]);
            return Ok(None);
        }
        tracing::info!(
            target: "orgkey::session",
            org = %old.org,
            admin = %old.admin,
            "session carried over a key change"
        );
        Ok(Some(token))
    }

    /// [`Sessions::carry_over`], and the successor's cookie set on `response`; a failure to
    /// store the successor is logged (the change itself was made: the admin logs in again).
    pub(crate) async fn carry_over_onto<B>(
        &self,
        change: &KeyChange<'_>,
        response: &mut Response<B>,
    ) {
        match self.carry_over(change).await {
            Ok(Some(token)) => {
                if let Some(cookie) = set_cookie_value(&token, self.config().secure_cookie) {
                    response.headers_mut().insert(SET_COOKIE, cookie);
                }
            }
            // A later change already came, or the session is gone: the admin logs in again.
            Ok(None) => {}
            Err(error) => tracing::warn!(
                target: "orgkey::session",
                %error,
                "the change was made, but the session could not be carried over"
            ),
        }
    }
}
