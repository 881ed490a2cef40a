//! [`SessionEndpoint`]: `POST`, `GET` and `DELETE /api/v1/authenticatedSession` exactly as
//! PROTOCOL.md describes them.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, RETRY_AFTER, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use serde::Deserialize;
use tower_service::Service;

use crate::auth::RequestView;
use crate::password::Password;
use crate::session::{
    session_cookies, set_cookie_value, LoginFailure, LoginRequest, SessionCheck, Sessions,
};
use zeroize::Zeroizing;

use crate::response::{self, JsonBody, AUTHENTICATION_FAILED, SESSION_NOT_VALID};

/// Largest login body accepted, in bytes (PROTOCOL.md).
pub const MAX_LOGIN_BODY: usize = 4096;

/// The SessionInfo body of a successful login or probe.
const SESSION_INFO: &str = r#"{"authType":"ADMIN_LOGIN","obfuscateApiKey":false,"passwordExpiryTime":0,"passwordExpiryDays":0}"#;
/// How the login body is read (PROTOCOL.md's limit, and its messages).
const LOGIN_BODY: JsonBody = JsonBody {
    limit: MAX_LOGIN_BODY,
    too_large: r#"{"code":"PAYLOAD_TOO_LARGE","message":"login body larger than 4096 bytes"}"#,
    not_object: "login body must be a JSON object",
    invalid: "login body must be JSON with apiKey, username, password and timestamp",
};

/// A login with the right credentials by an admin without the `api` scope (A2's 403).
const NOT_AUTHORIZED: &str =
    r#"{"code":"NOT_AUTHORIZED","message":"The admin lacks the API functional scope"}"#;
const LOGGED_OUT: &str = r#"{"status":"ACTIVE"}"#;

/// The client address for throttling: a function of the request (default:
/// [`default_client_addr`]).
pub type ClientAddrFn = Arc<dyn Fn(&RequestView<'_>) -> Option<IpAddr> + Send + Sync>;

/// A client address a server (or a trusted proxy layer) put in the request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The default client address: a [`ClientAddr`] or a [`SocketAddr`] in the request
/// extensions. Behind a proxy, configure [`SessionEndpoint::client_addr`] to read the
/// proxy's header instead (and only trust it from the proxy).
pub fn default_client_addr(request: &RequestView<'_>) -> Option<IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<ClientAddr>()
        .map(|a| a.0)
        .or_else(|| extensions.get::<SocketAddr>().map(SocketAddr::ip))
}

/// The ZIA session endpoint, a tower service. Mount it at `/api/v1/authenticatedSession`:
///
/// ```
/// # use orgkey::{OrgTable, directory::Admins, http::SessionEndpoint, session::Sessions};
/// let orgs = OrgTable::default();
/// let sessions = Sessions::new(orgs.clone(), Admins::new(orgs));
/// let app: axum::Router = axum::Router::new()
///     .route_service("/api/v1/authenticatedSession", SessionEndpoint::new(sessions));
/// ```
///
/// - `POST`: log in. `Content-Type: application/json` (else 415), body at most 4 KiB (else
///   413), `{"apiKey","username","password","timestamp"}` with the timestamp as a number or
///   a string of digits, unknown fields ignored (malformed: 400). 200 with SessionInfo and
///   `Set-Cookie: JSESSIONID=<id>; Path=/; HttpOnly; SameSite=Strict` (`; Secure` per
///   [`SessionConfig::secure_cookie`](crate::SessionConfig::secure_cookie)); 401
///   `AUTHENTICATION_FAILED` for every failure but a missing `api` scope (403) and
///   throttling (429 with an integer `Retry-After`).
/// - `GET`: 200 with SessionInfo for a live session, else 401 `SESSION_NOT_VALID`.
/// - `DELETE`: ends the session; 200 `{"status":"ACTIVE"}` whether or not it was live; any
///   body is ignored.
#[derive(Clone)]
pub struct SessionEndpoint {
    sessions: Sessions,
    client_addr: ClientAddrFn,
}

impl fmt::Debug for SessionEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionEndpoint")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl SessionEndpoint {
    /// The endpoint for `sessions`.
    pub fn new(sessions: Sessions) -> Self {
        Self {
            sessions,
            client_addr: Arc::new(default_client_addr),
        }
    }

    /// Uses `f` (shared) to find the client's address for throttling.
    pub(crate) fn client_addr_fn(mut self, f: ClientAddrFn) -> Self {
        self.client_addr = f;
        self
    }

    /// Uses `f` to find the client's address for throttling.
    pub fn client_addr(
        mut self,
        f: impl Fn(&RequestView<'_>) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> Self {
        self.client_addr = Arc::new(f);
        self
    }
}

/// The login body. Unknown fields are ignored.
#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "apiKey")]
    api_key: String,
    username: String,
    password: String,
    timestamp: Timestamp,
}

/// Python clients send a number, the Go SDK a string of digits.
#[derive(Deserialize)]
#[serde(untagged)]
enum Timestamp {
    Number(u64),
    Text(String),
}

impl Timestamp {
    fn millis(&self) -> Option<u64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(s)
                if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.parse().ok()
            }
            Self::Text(_) => None,
        }
    }
}

fn too_many_requests(retry_after_secs: u64) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "message": "Rate Limit (1/SECOND) exceeded",
        "Retry-After": format!("{retry_after_secs} seconds"),
    })
    .to_string();
    let mut response = response::json(StatusCode::TOO_MANY_REQUESTS, body);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// The most `JSESSIONID` cookies one logout ends; a request naming more is refused (400)
/// and ends none, so one request cannot cost thousands of store writes.
const MAX_LOGOUT_IDS: usize = 16;

impl<B> Service<Request<B>> for SessionEndpoint
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let sessions = self.sessions.clone();
        // F3: a login or a session probe is a decision about who gets in; while the orgs
        // cannot be vouched for, it fails closed like every authenticating route. (A logout
        // only ends sessions, and goes ahead.)
        if !sessions.can_vouch() && matches!(*request.method(), Method::GET | Method::POST) {
            return Box::pin(std::future::ready(Ok(response::unavailable())));
        }
        match *request.method() {
            Method::GET => {
                let mut request = request;
                let live = match sessions.check_request(&mut request) {
                    // K5: a session of an org without a key (carried over a delete, W2)
                    // is alive only for key management, not for the API's clients.
                    SessionCheck::Live(live) => live.identity.has_key,
                    _ => false,
                };
                let response = if live {
                    response::fixed(StatusCode::OK, SESSION_INFO)
                } else {
                    response::fixed(StatusCode::UNAUTHORIZED, SESSION_NOT_VALID)
                };
                Box::pin(std::future::ready(Ok(response)))
            }
            Method::DELETE => {
                // Every session the request names ends: holding an id is proof enough to end
                // it, and success is never reported while one of them lives on (S3).
                let ids: Vec<Zeroizing<Vec<u8>>> = session_cookies(request.headers())
                    .map(|id| Zeroizing::new(id.to_vec()))
                    .collect();
                if ids.len() > MAX_LOGOUT_IDS {
                    return Box::pin(std::future::ready(Ok(response::fixed(
                        StatusCode::BAD_REQUEST,
                        r#"{"code":"INVALID_INPUT_ARGUMENT","message":"too many JSESSIONID cookies; nothing was ended"}"#,
                    ))));
                }
                // A body, with or without a content type, is ignored (never read).
                Box::pin(async move {
                    for id in &ids {
                        if let Err(error) = sessions.logout(id).await {
                            tracing::warn!(target: "orgkey::session", %error, "logout could not be stored");
                            return Ok(response::fixed(
                                StatusCode::SERVICE_UNAVAILABLE,
                                r#"{"code":"SERVICE_UNAVAILABLE","message":"logout could not be completed; retry"}"#,
                            ));
                        }
                    }
                    Ok(response::fixed(StatusCode::OK, LOGGED_OUT))
                })
            }
            Method::POST => {
                let source = {
                    let view = RequestView::new(
                        request.method(),
                        request.uri(),
                        request.headers(),
                        request.extensions(),
                    );
                    (self.client_addr)(&view)
                };
                let secure = sessions.config().secure_cookie;
                Box::pin(async move { Ok(login(sessions, request, source, secure).await) })
            }
            _ => Box::pin(std::future::ready(Ok(response::method_not_allowed(
                "POST, GET, DELETE",
                r#"{"code":"METHOD_NOT_ALLOWED","message":"use POST, GET or DELETE"}"#,
            )))),
        }
    }
}

async fn login<B>(
    sessions: Sessions,
    request: Request<B>,
    source: Option<IpAddr>,
    secure: bool,
) -> Response<Full<Bytes>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (raw, _) = match LOGIN_BODY.read(request).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    // The typed parse runs over the validated bytes (not from the `Value`, which would keep
    // only the last of two `password` fields instead of refusing the body).
    let parsed: LoginBody = match serde_json::from_slice(&raw) {
        Ok(parsed) => parsed,
        // Only the class of the error: serde's message could quote a value.
        Err(e) => return LOGIN_BODY.invalid(&e),
    };
    let Some(timestamp_ms) = parsed.timestamp.millis() else {
        return response::bad_request("timestamp must be milliseconds since the Unix epoch");
    };
    let attempt = LoginRequest {
        api_key: Password::new(parsed.api_key),
        username: parsed.username,
        password: Password::new(parsed.password),
        timestamp_ms,
        source,
    };
    match sessions.login(attempt).await {
        Ok(session) => {
            let mut response = response::fixed(StatusCode::OK, SESSION_INFO);
            match set_cookie_value(&session.token, secure) {
                Some(value) => {
                    response.headers_mut().insert(SET_COOKIE, value);
                    response
                }
                None => response::fixed(StatusCode::INTERNAL_SERVER_ERROR, AUTHENTICATION_FAILED),
            }
        }
        Err(LoginFailure::Throttled { retry_after_secs }) => too_many_requests(retry_after_secs),
        Err(LoginFailure::MissingApiScope) => {
            response::fixed(StatusCode::FORBIDDEN, NOT_AUTHORIZED)
        }
        Err(LoginFailure::Internal) => response::fixed(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":"INTERNAL_ERROR","message":"login could not be completed"}"#,
        ),
        Err(_) => response::fixed(StatusCode::UNAUTHORIZED, AUTHENTICATION_FAILED),
    }
}
