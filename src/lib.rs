//! # orgkey
//!
//! Per-organization API-key authentication for HTTP services built on
//! [tower](https://docs.rs/tower): hyper servers, axum apps, API gateways and reverse proxies.
//! Modelled on Zscaler's Cloud Service API Key: every organization has exactly one
//! 12-character key, admins add, edit, regenerate and delete it, and every change kills the old
//! key at once.
//!
//! - [`ApiKey`]: the secret (K1, K3): redacted `Debug`, constant-time comparison, zeroized.
//! - [`OrgTable`]: every org's current state, one lock-free snapshot per org.
//! - [`KeyAdmin`]: subscriptions and the key life cycle (K2-K9), audited.
//! - [`OrgKeyLayer`]: the tower layer (L1-L4); see [`auth`] for the acceptance rules.
//! - [`Admins`], [`Sessions`], [`SessionEndpoint`]: admin accounts and the ZIA login protocol
//!   (A1-A3, S1-S3); see [`session`].
//! - [`KeyManagementEndpoint`], [`http::audit::AuditLogEndpoint`]: the key and audit
//!   resources over HTTP; [`http::csrf::CsrfLayer`] guards them against cross-site requests (W1).
//!
//! Rule ids (K1, L3, ...) refer to the design contract reproduced in the README.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod audit;
pub mod auth;
pub mod clock;
pub mod directory;
#[cfg(feature = "gateway")]
pub mod gateway;
pub mod http;
pub mod identity;
pub mod key;
pub mod keys;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod org;
pub mod password;
mod response;
pub mod seal;
pub mod session;
pub mod stack;
pub mod store;
pub mod table;

pub use audit::{AuditEvent, AuditSink, KeyAction, TracingAuditSink};
pub use auth::{Authenticated, OrgKeyLayer, Rejection, RejectionReason};
pub use directory::{AccountError, AdminDirectory, Admins, PasswordRejection};
pub use http::keys::KeyManagementEndpoint;
pub use http::login::SessionEndpoint;
pub use identity::{Scope, Scopes, Username};
pub use key::{ApiKey, KeyFormat, KeyFormatError};
pub use keys::{KeyAdmin, KeyError, KeyInfo, SessionKeyAdmin};
pub use org::{Actor, Generation, OrgId};
pub use password::Password;
pub use seal::{MasterKeyError, MasterKeyId, MasterKeys, SealError};
pub use session::{SessionConfig, Sessions};
pub use stack::OrgKey;
pub use table::OrgTable;

/// The README's Rust examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
