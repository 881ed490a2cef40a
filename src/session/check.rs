//! The session cookie of a request, read and checked once (S2), for everything that needs it.
//!
//! The CSRF guard (W1), the layer (L1), the key-management endpoint (W2), the session probe
//! and the admin page's session resource all ask the same question of a request: which
//! session, if any, does its `JSESSIONID` name, and is it alive? [`Sessions::check_request`]
//! answers it once: it parses the `Cookie` headers once, validates the session once (one S2
//! check, one `last_seen` update), derives the session's CSRF token, and keeps the answer in
//! the request's extensions, where the next component finds it. The answer is crate-private:
//! an application behind the layer cannot read it (and the layer removes the cookie).

use std::fmt;
use std::sync::Arc;

use http::Request;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::cookie::{find_session_cookie, raw_of_presented, secret_hex, CookieLookup};
use super::sessions::{SessionIdentity, SessionRejection, Sessions};

/// Domain separation: the token is not the digest the store keeps (S1).
const TOKEN_LABEL: &[u8] = b"orgkey csrf token v1\0";

/// A session's CSRF token: 64 hex characters.
///
/// Secret (it authorizes state changes together with the cookie): redacted `Debug`, no
/// `Display`, no `PartialEq`, zeroized on drop.
pub struct CsrfToken(Zeroizing<String>);

impl CsrfToken {
    /// The token, for the page that must send it back. Grep for this when auditing.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CsrfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsrfToken").finish_non_exhaustive()
    }
}

/// The CSRF token of the session whose id (the `JSESSIONID` value) is `session_id`, or
/// `None` if that is not a well-formed session id. The token does not say whether the
/// session is alive: check that with [`Sessions::validate`](crate::Sessions::validate).
pub fn token_for_session(session_id: &[u8]) -> Option<CsrfToken> {
    let raw = raw_of_presented(session_id)?;
    let mut hasher = Sha256::new();
    hasher.update(TOKEN_LABEL);
    hasher.update(raw.as_ref());
    let digest = Zeroizing::new(<[u8; 32]>::from(hasher.finalize()));
    Some(CsrfToken(secret_hex(digest.as_ref())))
}

/// What a request's session cookie says, as checked by [`Sessions::check_request`].
#[derive(Clone)]
pub(crate) enum SessionCheck {
    /// No `JSESSIONID` cookie.
    Absent,
    /// Two or more `JSESSIONID` cookies: ambiguous, none is used.
    Several,
    /// One cookie, naming no live session.
    Dead(SessionRejection),
    /// One cookie, naming a live session.
    Live(Arc<LiveSession>),
}

/// A live session, as checked for this request.
pub(crate) struct LiveSession {
    /// Who it is (S2, checked now).
    pub(crate) identity: SessionIdentity,
    /// Its CSRF token (W1).
    pub(crate) csrf_token: CsrfToken,
}

impl fmt::Debug for SessionCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Absent => f.write_str("Absent"),
            Self::Several => f.write_str("Several"),
            Self::Dead(reason) => f.debug_tuple("Dead").field(reason).finish(),
            Self::Live(live) => f.debug_tuple("Live").field(&live.identity).finish(),
        }
    }
}

/// The cached answer, tagged with the [`Sessions`] that gave it (a request may pass two
/// stacks with different session tables; each gets its own answer).
#[derive(Clone)]
struct Checked {
    by: usize,
    check: SessionCheck,
}

impl Sessions {
    /// Which session the request's cookie names, and whether it is alive: checked on the
    /// first call for a request, then read back from its extensions.
    pub(crate) fn check_request<B>(&self, request: &mut Request<B>) -> SessionCheck {
        let by = self.identity_tag();
        if let Some(checked) = request.extensions().get::<Checked>() {
            if checked.by == by {
                return checked.check.clone();
            }
        }
        let check = match find_session_cookie(request.headers()) {
            CookieLookup::Absent => SessionCheck::Absent,
            CookieLookup::Several => SessionCheck::Several,
            CookieLookup::One(id) => match (self.validate(id), token_for_session(id)) {
                (Ok(identity), Some(csrf_token)) => SessionCheck::Live(Arc::new(LiveSession {
                    identity,
                    csrf_token,
                })),
                (Err(reason), _) => SessionCheck::Dead(reason),
                (Ok(_), None) => SessionCheck::Dead(SessionRejection::NotFound),
            },
        };
        request.extensions_mut().insert(Checked {
            by,
            check: check.clone(),
        });
        check
    }
}
