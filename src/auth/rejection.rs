//! Rejections: the 401 response of L3 and the precise reason kept for the server.

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::response::{self, SESSION_NOT_VALID};
use crate::session::SessionRejection;
use crate::table::VerifyError;

/// The precise reason a request was rejected: for tracing, metrics and the server's own
/// logic, never for the client (L3).
///
/// Found in the rejection response's extensions as a [`Rejection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionReason {
    /// The resolver found no org in the request.
    MissingOrg,
    /// The request carries no key header (exactly once).
    MissingKey,
    /// No key header, but the query string seems to carry a key: keys in URLs are never
    /// accepted (L1).
    KeyInQuery,
    /// The key header is not a valid key for this deployment (K1).
    MalformedKey,
    /// The claimed org does not exist or its id is not valid.
    UnknownOrg,
    /// The org has no API subscription (K8).
    NoSubscription,
    /// The org has no key (K5).
    NoKey,
    /// The key does not match the org's key.
    WrongKey,
    /// The session cookie names no live session (unknown, logged out, not an id).
    SessionNotFound,
    /// The session was idle for the idle timeout (S2).
    SessionIdleExpired,
    /// The session reached its absolute lifetime (S2).
    SessionLifetimeExpired,
    /// The org's key or subscription changed since login (K6).
    SessionKeyChanged,
    /// The admin was deleted, disabled, changed password or lost the `api` scope (S2).
    SessionAdminChanged,
    /// More than one session cookie, or a session of another org than the request names.
    SessionAmbiguous,
    /// Sessions are accepted and the request has neither a session cookie nor a key (nor an
    /// org): what a ZIA client lacks is a session.
    SessionMissing,
    /// The org table cannot be trusted right now (its change feed is reconnecting, F1): the
    /// request fails closed with 503.
    Unavailable,
}

impl RejectionReason {
    /// A stable lowercase name, for logs and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MissingOrg => "missing_org",
            Self::MissingKey => "missing_key",
            Self::KeyInQuery => "key_in_query",
            Self::MalformedKey => "malformed_key",
            Self::UnknownOrg => "unknown_org",
            Self::NoSubscription => "no_subscription",
            Self::NoKey => "no_key",
            Self::WrongKey => "wrong_key",
            Self::SessionNotFound => "session_not_found",
            Self::SessionIdleExpired => "session_idle_expired",
            Self::SessionLifetimeExpired => "session_lifetime_expired",
            Self::SessionKeyChanged => "session_key_changed",
            Self::SessionAdminChanged => "session_admin_changed",
            Self::SessionAmbiguous => "session_ambiguous",
            Self::SessionMissing => "session_missing",
            Self::Unavailable => "unavailable",
        }
    }

    /// Every reason, for exhaustive tests and metrics registration.
    pub const ALL: [RejectionReason; 16] = [
        Self::MissingOrg,
        Self::MissingKey,
        Self::KeyInQuery,
        Self::MalformedKey,
        Self::UnknownOrg,
        Self::NoSubscription,
        Self::NoKey,
        Self::WrongKey,
        Self::SessionNotFound,
        Self::SessionIdleExpired,
        Self::SessionLifetimeExpired,
        Self::SessionKeyChanged,
        Self::SessionAdminChanged,
        Self::SessionAmbiguous,
        Self::SessionMissing,
        Self::Unavailable,
    ];

    /// The JSON body the client sees. Unknown org, no subscription, no key and wrong key share
    /// one body so that a client cannot tell them apart (L3).
    fn body(self) -> &'static str {
        match self {
            Self::MissingOrg => {
                r#"{"code":"AUTHENTICATION_FAILED","message":"organization not specified"}"#
            }
            Self::MissingKey | Self::KeyInQuery => {
                r#"{"code":"AUTHENTICATION_FAILED","message":"API key required in the request header"}"#
            }
            Self::MalformedKey => {
                r#"{"code":"AUTHENTICATION_FAILED","message":"API key malformed"}"#
            }
            Self::UnknownOrg | Self::NoSubscription | Self::NoKey | Self::WrongKey => {
                r#"{"code":"AUTHENTICATION_FAILED","message":"invalid credentials"}"#
            }
            // One body for every session failure: the Go SDK logs in again when it sees it.
            Self::SessionNotFound
            | Self::SessionIdleExpired
            | Self::SessionLifetimeExpired
            | Self::SessionKeyChanged
            | Self::SessionAdminChanged
            | Self::SessionAmbiguous
            | Self::SessionMissing => SESSION_NOT_VALID,
            Self::Unavailable => response::UNAVAILABLE,
        }
    }
}

impl fmt::Display for RejectionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SessionRejection> for RejectionReason {
    fn from(e: SessionRejection) -> Self {
        match e {
            SessionRejection::NotFound => Self::SessionNotFound,
            SessionRejection::IdleExpired => Self::SessionIdleExpired,
            SessionRejection::LifetimeExpired => Self::SessionLifetimeExpired,
            SessionRejection::KeyChanged => Self::SessionKeyChanged,
            SessionRejection::AdminChanged => Self::SessionAdminChanged,
        }
    }
}

impl From<VerifyError> for RejectionReason {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::MalformedKey => Self::MalformedKey,
            VerifyError::UnknownOrg => Self::UnknownOrg,
            VerifyError::NoSubscription => Self::NoSubscription,
            VerifyError::NoKey => Self::NoKey,
            VerifyError::WrongKey => Self::WrongKey,
        }
    }
}

/// Placed in the extensions of every rejection response the layer produces, so that outer
/// layers (logging, metrics) can see why without parsing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    reason: RejectionReason,
}

impl Rejection {
    pub(crate) fn new(reason: RejectionReason) -> Self {
        Self { reason }
    }

    /// Why the request was rejected.
    pub fn reason(&self) -> RejectionReason {
        self.reason
    }

    /// The HTTP status of the rejection: 401, or 503 while the table cannot be trusted.
    pub fn status(&self) -> StatusCode {
        match self.reason {
            RejectionReason::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub(crate) fn into_response(self, challenge: &HeaderValue) -> Response<Bytes> {
        let mut response = response::fixed(self.status(), self.reason.body());
        let headers = response.headers_mut();
        headers.insert(WWW_AUTHENTICATE, challenge.clone());
        if self.reason == RejectionReason::Unavailable {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(self);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indistinguishable_reasons_share_one_body() {
        let generic = RejectionReason::WrongKey.body();
        for r in [
            RejectionReason::UnknownOrg,
            RejectionReason::NoSubscription,
            RejectionReason::NoKey,
        ] {
            assert_eq!(r.body(), generic);
        }
    }

    #[test]
    fn every_body_is_the_protocol_json_shape() {
        for r in RejectionReason::ALL {
            let body = r.body();
            let code = if r.as_str().starts_with("session_") {
                "SESSION_NOT_VALID"
            } else if r == RejectionReason::Unavailable {
                "SERVICE_UNAVAILABLE"
            } else {
                "AUTHENTICATION_FAILED"
            };
            let prefix = format!(r#"{{"code":"{code}","message":""#);
            assert!(body.starts_with(&prefix), "{body}");
            assert!(body.ends_with(r#""}"#));
        }
    }
}
