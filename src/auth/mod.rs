//! The tower layer: authenticate every request with its org's API key (L1-L4).
//!
//! [`OrgKeyLayer`] wraps a service so that a request reaches it only with valid credentials.
//!
//! # Acceptance rules
//!
//! A request is accepted when all of these hold:
//!
//! 1. the org resolver names an org (default: the `X-Org-Id` header, exactly once);
//! 2. the key header (default `X-API-Key`) is present exactly once. A key in the query string
//!    is never accepted (L1);
//! 3. its value has the deployment's key format (K1): a value of the wrong length is rejected
//!    before any comparison;
//! 4. the org exists, has an API subscription (K8) and a key (K5);
//! 5. the value equals the org's key, compared in constant time against one snapshot of the
//!    org (L4).
//!
//! On success the inner service gets the request with an [`Authenticated`] extension and
//! without the key header (L2); a layer that also accepts sessions removes the `JSESSIONID`
//! cookie too, whichever credential authenticated the request, so an inner service or an
//! upstream never holds an admin's live session id. On failure the inner service is not called; the response is
//! `401 Unauthorized` with `WWW-Authenticate`, `Cache-Control: no-store` and a
//! `{"code","message"}` JSON body (L3). An unknown org, an org without subscription, an org
//! without key and a wrong key get the *same* response; the precise [`RejectionReason`] goes to
//! `tracing` (target `orgkey::auth`) and into the response's extensions as a [`Rejection`].
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use orgkey::{Actor, Authenticated, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let admin = KeyAdmin::new(OrgTable::default());
//! let acme = OrgId::new("acme").unwrap();
//! admin.create_org(&acme).await.unwrap();
//! let info = admin.subscribe(&acme, &Actor::new("ops@acme.example").unwrap()).await.unwrap();
//! let key = info.key().unwrap().expose_secret().to_owned();
//!
//! let service = ServiceBuilder::new()
//!     .layer(OrgKeyLayer::new(admin.table().clone()))
//!     .service_fn(|request: Request<Full<Bytes>>| async move {
//!         let org = request.extensions().get::<Authenticated>().unwrap().org().to_owned();
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("hello {org}")))))
//!     });
//!
//! let ok = Request::get("/").header("x-org-id", "acme").header("x-api-key", &key)
//!     .body(Full::default()).unwrap();
//! assert_eq!(service.clone().oneshot(ok).await.unwrap().status(), StatusCode::OK);
//!
//! let bad = Request::get("/").header("x-org-id", "acme").header("x-api-key", "AAAAAAAAAAAA")
//!     .body(Full::default()).unwrap();
//! assert_eq!(service.oneshot(bad).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # }
//! ```
//!
//! # Deployment caveats
//!
//! - The key travels in a header on every request: serve the API over TLS only.
//! - Response *content* does not tell an unknown org from a wrong key, but response *timing*
//!   may differ by the cost of a table lookup miss versus a hit (nanoseconds). The key
//!   comparison itself is constant-time; org ids are not treated as secrets.
//! - Header names are case-insensitive in HTTP; the key header's value is case-sensitive.

mod body;
mod extension;
mod future;
mod layer;
mod query;
mod rejection;
mod resolver;
mod service;

pub use body::ResponseBody;
#[cfg(feature = "axum")]
pub use extension::MissingAuthentication;
pub use extension::{AuthMethod, Authenticated};
pub use future::ResponseFuture;
pub use layer::OrgKeyLayer;
pub use rejection::{Rejection, RejectionReason};
pub use resolver::{FnOrgResolver, HeaderOrgResolver, HostOrgResolver, OrgResolver, RequestView};
pub use service::OrgKeyAuth;

pub(crate) use query::query_without_keys;

/// The default header carrying the org id (L1).
pub const DEFAULT_ORG_HEADER: &str = "x-org-id";
/// The default header carrying the API key (L1).
pub const DEFAULT_KEY_HEADER: &str = "x-api-key";
