//! orgkey's HTTP surfaces: what clients and browsers call, beside the layer that protects an
//! application.
//!
//! - [`login`]: the ZIA login protocol (`/api/v1/authenticatedSession`, A1-A3, S1-S3).
//! - [`keys`]: key management (`/api/v1/apiKeys`, K2-K9, W2).
//! - [`audit`]: the audit log (`/api/v1/auditLog`, K7).
//! - [`page`]: the Cloud Service API Key page (`/admin`, W1), feature `admin-page`.
//! - [`csrf`]: the guard for browser-originated writes (W1).
//! - [`proxy`]: what a reverse proxy behind orgkey does to headers (G1).
//! - [`verify`]: forward-auth for nginx, Traefik and Envoy (`/api/v1/verify`, G4).

pub mod audit;
pub mod csrf;
pub mod keys;
pub mod login;
#[cfg(feature = "admin-page")]
pub mod page;
pub mod proxy;
pub mod verify;

pub use login::{default_client_addr, ClientAddr, ClientAddrFn, SessionEndpoint, MAX_LOGIN_BODY};
