//! What the inner service learns about an authenticated request (L2).

use crate::identity::{Scope, Scopes, Username};
use crate::org::{Generation, InlineOrgId, OrgId};
use crate::session::SessionDigest;

/// Request extension set by the layer on every request it lets through (L2).
///
/// ```
/// # use orgkey::Authenticated;
/// fn handler(request: http::Request<()>) -> String {
///     match request.extensions().get::<Authenticated>() {
///         Some(auth) => format!("hello, {}", auth.org()),
///         None => unreachable!("the layer rejects unauthenticated requests"),
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Authenticated {
    org: InlineOrgId,
    generation: Generation,
    method: AuthMethod,
    /// The session that authenticated the request, if any (for `Sessions::carry_over`).
    /// Boxed: direct-key requests, the hot path, carry only a null pointer.
    session: Option<Box<SessionDigest>>,
}

/// How a request was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthMethod {
    /// Direct key mode: the request carried the org and its API key (L1).
    ApiKey,
    /// A session cookie of an admin (L1, S2).
    Session {
        /// The admin.
        admin: Username,
        /// The admin's scopes, as checked for this request.
        scopes: Scopes,
    },
}

impl Authenticated {
    pub(crate) fn new(org: InlineOrgId, generation: Generation, method: AuthMethod) -> Self {
        Self {
            org,
            generation,
            method,
            session: None,
        }
    }

    pub(crate) fn with_session(mut self, digest: SessionDigest) -> Self {
        self.session = Some(Box::new(digest));
        self
    }

    pub(crate) fn session_digest(&self) -> Option<SessionDigest> {
        self.session.as_deref().copied()
    }

    /// The id of the org the request is for.
    pub fn org(&self) -> &str {
        self.org.as_str()
    }

    /// The org as an [`OrgId`], for admin calls (allocates).
    pub fn org_id(&self) -> OrgId {
        OrgId::from(&self.org)
    }

    /// The org's generation when the request was authenticated (K6).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// How the request was authenticated.
    pub fn method(&self) -> &AuthMethod {
        &self.method
    }

    /// The admin, for a session; `None` in direct key mode.
    pub fn admin(&self) -> Option<&Username> {
        match &self.method {
            AuthMethod::Session { admin, .. } => Some(admin),
            AuthMethod::ApiKey => None,
        }
    }

    /// Whether the request comes from an admin session holding `scope`. Direct key requests
    /// hold no admin scope.
    pub fn has_scope(&self, scope: Scope) -> bool {
        match &self.method {
            AuthMethod::Session { scopes, .. } => scopes.contains(scope),
            AuthMethod::ApiKey => false,
        }
    }
}

#[cfg(feature = "axum")]
mod axum_impl {
    use super::Authenticated;
    use axum_core::extract::FromRequestParts;
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::{header, HeaderValue, StatusCode};

    /// The [`Authenticated`] extension is missing: the handler is not behind
    /// [`OrgKeyLayer`](crate::OrgKeyLayer). A server misconfiguration, answered with 500.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingAuthentication;

    impl std::fmt::Display for MissingAuthentication {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("route is not protected by OrgKeyLayer")
        }
    }

    impl std::error::Error for MissingAuthentication {}

    impl IntoResponse for MissingAuthentication {
        fn into_response(self) -> Response {
            tracing::error!(target: "orgkey::auth", "Authenticated extractor used on a route without OrgKeyLayer");
            let mut response = (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"code":"INTERNAL_ERROR","message":"authentication is not configured for this route"}"#,
            )
                .into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
        type Rejection = MissingAuthentication;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Authenticated>()
                .cloned()
                .ok_or(MissingAuthentication)
        }
    }
}

#[cfg(feature = "axum")]
pub use axum_impl::MissingAuthentication;
