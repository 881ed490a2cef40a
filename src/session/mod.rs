//! Admin logins and sessions in the ZIA legacy protocol (A1-A3, S1-S3, PROTOCOL.md).
//!
//! - [`Sessions`]: log in (`Sessions::login`), check a session (`Sessions::validate`), log
//!   out; failed-login throttling; the session table (digests only).
//! - [`SessionEndpoint`](crate::http::SessionEndpoint): the `/api/v1/authenticatedSession` tower service existing Zscaler
//!   clients talk to.
//! - [`OrgKeyLayer::with_sessions`](crate::OrgKeyLayer::with_sessions): accept the
//!   `JSESSIONID` cookie on protected routes.
//!
//! # Login (A2)
//!
//! A login succeeds when all of these hold: the request is not throttled (A3); the username
//! names a known, enabled admin; the password is right (argon2id; an unknown user costs the
//! same as a wrong password); the timestamp is within 5 minutes of server time; the admin's
//! org has a subscription and a key; the `apiKey` field is that key's obfuscation for the
//! timestamp ([`obfuscate`](obfuscate::obfuscate)), compared in constant time; and the admin
//! has the `api` scope. Every failure but the last gets the same `401`; the last gets `403`.
//!
//! # Session validity (S2)
//!
//! A session is valid while it has not been logged out, has been used within the idle timeout
//! (default 5 minutes), is younger than the absolute lifetime (default 8 hours), its org's
//! generation is the one it was created under (any key or subscription change ends it, K6),
//! and its admin still exists, is enabled, has the `api` scope and the same password.
//! Expiry is exclusive: a session idle for exactly the timeout is dead.
//!
//! One exception to "any change ends it" (W2): the session that made a key change through
//! [`KeyManagementEndpoint::with_sessions`](crate::KeyManagementEndpoint::with_sessions) is
//! carried over, that is ended and replaced in the same response by a new session of the
//! same admin under the new generation, with the original login time.
//!
//! # Throttling (A3)
//!
//! See [`throttle`]: per address 10 failures then one per 6 s; per username 5 failures then
//! one per minute, not applied at addresses where that admin logged in before. With a store
//! ([`Sessions::open`]) the buckets are the store's, shared by every replica (F2).

mod check;
mod cookie;
pub mod obfuscate;
mod sessions;
pub mod throttle;

pub(crate) use check::SessionCheck;
pub use check::{token_for_session, CsrfToken};
#[cfg(test)]
pub(crate) use cookie::digest_of_presented;
pub(crate) use cookie::{session_cookies, set_cookie_value, strip_session_cookie};
pub use cookie::{SessionToken, SESSION_COOKIE};
pub(crate) use sessions::{KeyChange, SessionDigest};
pub use sessions::{
    LoginFailure, LoginRequest, NewSession, SessionConfig, SessionIdentity, SessionRejection,
    Sessions,
};
pub use throttle::ThrottlePolicy;
