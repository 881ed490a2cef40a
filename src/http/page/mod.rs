//! [`AdminPage`]: the Cloud Service API Key page (W1), a tower service with its assets
//! embedded in the binary (feature `admin-page`).
//!
//! The page is what the seed product page describes: sign in with username, password and
//! API key; see the base URL and the key (masked, with reveal and copy), who last modified
//! it and when; edit, regenerate, delete and add it, each behind a confirmation that says the
//! old key stops working at once; choose the table's columns (remembered in the browser);
//! read the org's audit log. It works offline: one HTML file, one script, one style sheet,
//! no CDN, no web fonts.
//!
//! It holds no key logic of its own. The script signs in through the same
//! `POST /api/v1/authenticatedSession` as every Zscaler client (it computes the obfuscated
//! key itself, PROTOCOL.md) and manages the key through the same
//! [`KeyManagementEndpoint`](crate::KeyManagementEndpoint) and
//! [`AuditLogEndpoint`](crate::http::audit::AuditLogEndpoint) (W1). The service adds one JSON
//! resource the script needs: `GET <prefix>/session`, which tells whether the browser's
//! session is alive, who it is, whether it may manage the key (`key-admin`), the base URL,
//! the key length, and the session's CSRF token ([`csrf`](crate::http::csrf)).
//!
//! # Routes
//!
//! With the default prefix `/admin` (mount the service where it sees the full path, for
//! example with axum's `route_service` for `/admin` and `/admin/{*rest}`):
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /admin`, `GET /admin/` | the page (HTML) |
//! | `GET /admin/app.js`, `/admin/app.css`, `/admin/icon.svg` | the assets |
//! | `GET /admin/session` | `200` `{"username","orgId","scopes","canManageKeys","hasKey","baseUrl","keyLength","idleTimeoutMs","csrfToken"}` for a live session, else `401 SESSION_NOT_VALID` |
//! | another method on those paths | `405` with `Allow: GET, HEAD` |
//! | any other path | `404` |
//!
//! # Security
//!
//! - Every response carries a `Content-Security-Policy` that allows only the page's own
//!   script, style and image, connections to its own origin, no inline script or style, no
//!   framing and no form submission; plus `X-Content-Type-Options: nosniff`,
//!   `Referrer-Policy: no-referrer`, `X-Frame-Options: DENY` and
//!   `Cross-Origin-Opener-Policy: same-origin`. The HTML and the session resource are
//!   `Cache-Control: no-store`.
//! - No key, password or session id is ever put in a URL: the sign-in form is sent by
//!   script as a JSON body (and, were the script not to run, the CSP forbids submitting it).
//! - State changes carry the CSRF token; put [`CsrfLayer`](crate::http::csrf::CsrfLayer) in front
//!   of the login and key endpoints.
//! - An admin without `key-admin` sees the page read-only: the audit log, and a notice that
//!   viewing and managing the key needs `key-admin` (the endpoints refuse them with `403`).

use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use tower_service::Service;

use crate::identity::Scope;
use crate::keys::KeyAdmin;
use crate::response::{self, SESSION_NOT_VALID};
use crate::session::{SessionCheck, Sessions};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// The page's Content-Security-Policy: nothing inline, nothing from elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const NOT_FOUND: &str = r#"{"code":"RESOURCE_NOT_FOUND","message":"no such page"}"#;

/// The admin page service. Cheap to clone.
///
/// ```
/// use orgkey::http::page::AdminPage;
/// use orgkey::{Admins, KeyAdmin, OrgTable, Sessions};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let keys = KeyAdmin::new(OrgTable::default()).with_base_url("https://gw.example/api/v1");
/// let sessions = Sessions::new(keys.table().clone(), Admins::new(keys.table().clone()));
/// let page = AdminPage::new(keys, sessions);
///
/// let request = http::Request::get("/admin").body(()).unwrap();
/// let response = page.clone().oneshot(request).await.unwrap();
/// assert_eq!(response.status(), 200);
/// assert!(response.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
///
/// // Not signed in: the page shows the sign-in form.
/// let request = http::Request::get("/admin/session").body(()).unwrap();
/// assert_eq!(page.oneshot(request).await.unwrap().status(), 401);
/// # }
/// ```
#[derive(Clone)]
pub struct AdminPage {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeyAdmin,
    sessions: Sessions,
    prefix: String,
    index: Bytes,
}

impl fmt::Debug for AdminPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminPage")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl AdminPage {
    /// The page at `/admin`, calling the API at `/api/v1`, showing `keys`' org keys and base
    /// URL, for the sessions of `sessions` (the ones the layer and the login endpoint use).
    pub fn new(keys: KeyAdmin, sessions: Sessions) -> Self {
        Self::build(keys, sessions, "/admin", "/api/v1")
    }

    /// The page at `prefix` (for example `/console/key`), calling the API at `api_base` (the
    /// path where `authenticatedSession`, `apiKeys` and `auditLog` are mounted, for example
    /// `/api/v1`). Trailing slashes are ignored.
    ///
    /// # Panics
    ///
    /// If either is not an absolute path of URL-safe characters (`A-Z a-z 0-9 - . _ ~ /`).
    pub fn at(keys: KeyAdmin, sessions: Sessions, prefix: &str, api_base: &str) -> Self {
        Self::build(keys, sessions, prefix, api_base)
    }

    fn build(keys: KeyAdmin, sessions: Sessions, prefix: &str, api_base: &str) -> Self {
        let clean = |path: &str| -> String {
            assert!(
                path.starts_with('/')
                    && path
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b)),
                "admin page paths must be absolute and URL-safe: {path:?}"
            );
            path.trim_end_matches('/').to_owned()
        };
        let prefix = clean(prefix);
        let api_base = clean(api_base);
        // The paths are URL-safe (checked above), so they need no escaping in attributes.
        let index = INDEX_HTML
            .replace("{{PREFIX}}", &prefix)
            .replace("{{API_BASE}}", &api_base);
        Self {
            inner: Arc::new(Inner {
                keys,
                sessions,
                prefix,
                index: Bytes::from(index),
            }),
        }
    }
}

/// What `GET <prefix>/session` answers for a live session.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView<'a> {
    username: &'a str,
    org_id: &'a str,
    scopes: Vec<&'static str>,
    can_manage_keys: bool,
    has_key: bool,
    base_url: Option<&'a str>,
    key_length: usize,
    idle_timeout_ms: u64,
    csrf_token: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asset {
    Index,
    Script,
    Style,
    Icon,
    Session,
}

impl Inner {
    fn asset(&self, path: &str) -> Option<Asset> {
        let tail = path.strip_prefix(self.prefix.as_str())?;
        Some(match tail {
            "" | "/" | "/index.html" => Asset::Index,
            "/app.js" => Asset::Script,
            "/app.css" => Asset::Style,
            "/icon.svg" => Asset::Icon,
            "/session" => Asset::Session,
            _ => return None,
        })
    }

    fn session<B>(&self, request: &mut Request<B>) -> Response<Full<Bytes>> {
        if !self.sessions.can_vouch() {
            // F3: fail closed, like the layer and the login.
            return with_security_headers(response::unavailable());
        }
        let SessionCheck::Live(live) = self.sessions.check_request(request) else {
            return json(
                StatusCode::UNAUTHORIZED,
                Bytes::from_static(SESSION_NOT_VALID.as_bytes()),
            );
        };
        let (identity, token) = (&live.identity, &live.csrf_token);
        let scopes = [Scope::Api, Scope::KeyAdmin]
            .into_iter()
            .filter(|scope| identity.scopes.contains(*scope))
            .map(Scope::as_str)
            .collect();
        let view = SessionView {
            username: identity.admin.as_str(),
            org_id: identity.org.as_str(),
            scopes,
            can_manage_keys: identity.scopes.contains(Scope::KeyAdmin),
            has_key: identity.has_key,
            base_url: self.keys.base_url(),
            key_length: self.keys.table().format().len(),
            idle_timeout_ms: u64::try_from(self.sessions.config().idle_timeout.as_millis())
                .unwrap_or(u64::MAX),
            csrf_token: token.expose_secret(),
        };
        match serde_json::to_vec(&view) {
            // The body holds the token: it is wiped when the response body is dropped only
            // as far as `Bytes` allows (best-effort), like every response body.
            Ok(body) => json(StatusCode::OK, Bytes::from(body)),
            Err(_) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(
                    br#"{"code":"INTERNAL_ERROR","message":"the request could not be completed"}"#,
                ),
            ),
        }
    }

    fn respond<B>(&self, request: &mut Request<B>) -> Response<Full<Bytes>> {
        let Some(asset) = self.asset(request.uri().path()) else {
            return json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(NOT_FOUND.as_bytes()),
            );
        };
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = json(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(br#"{"code":"METHOD_NOT_ALLOWED","message":"use GET, HEAD"}"#),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let (body, content_type, cache) = match asset {
            Asset::Session => return self.session(request),
            Asset::Index => (self.index.clone(), "text/html; charset=utf-8", "no-store"),
            Asset::Script => (
                Bytes::from_static(APP_JS.as_bytes()),
                "text/javascript; charset=utf-8",
                "no-cache",
            ),
            Asset::Style => (
                Bytes::from_static(APP_CSS.as_bytes()),
                "text/css; charset=utf-8",
                "no-cache",
            ),
            Asset::Icon => (
                Bytes::from_static(ICON_SVG.as_bytes()),
                "image/svg+xml",
                "no-cache",
            ),
        };
        let mut response = with_security_headers(Response::new(Full::new(body)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
        response
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    with_security_headers(response::json(status, body))
}

fn with_security_headers(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

impl<B> Service<Request<B>> for AdminPage {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let mut response = self.inner.respond(&mut request);
        if request.method() == Method::HEAD {
            *response.body_mut() = Full::default();
        }
        ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Admins, OrgTable};

    fn page(prefix: &str) -> AdminPage {
        let keys = KeyAdmin::new(OrgTable::default());
        let sessions = Sessions::new(keys.table().clone(), Admins::new(keys.table().clone()));
        AdminPage::at(keys, sessions, prefix, "/api/v1/")
    }

    #[test]
    fn assets_are_found_below_the_prefix_only() {
        let page = page("/console/");
        let inner = &page.inner;
        assert_eq!(inner.asset("/console"), Some(Asset::Index));
        assert_eq!(inner.asset("/console/"), Some(Asset::Index));
        assert_eq!(inner.asset("/console/app.js"), Some(Asset::Script));
        assert_eq!(inner.asset("/console/session"), Some(Asset::Session));
        assert_eq!(inner.asset("/consoleX"), None);
        assert_eq!(inner.asset("/console/../etc/passwd"), None);
        assert_eq!(inner.asset("/admin/app.js"), None);
    }

    #[test]
    fn the_html_names_its_prefix_and_api_and_has_no_inline_script() {
        let page = page("/console");
        let html = std::str::from_utf8(&page.inner.index).unwrap();
        assert!(html.contains(r#"src="/console/app.js""#));
        assert!(html.contains(r#"data-api-base="/api/v1""#));
        assert!(!html.contains("{{"));
        // Every <script> has a src and no body: the CSP forbids inline script anyway.
        for script in html.split("<script").skip(1) {
            let tag_end = script.find('>').unwrap();
            assert!(
                script[..tag_end].contains("src="),
                "inline script: {script}"
            );
            assert!(script[tag_end + 1..].starts_with("</script>"));
        }
        assert!(!html.contains(" style="), "inline style");
        // No inline event handler attributes (` onclick=`, ` onload=`, ...).
        for (at, _) in html.match_indices(" on") {
            let name: String = html[at + 3..]
                .chars()
                .take_while(char::is_ascii_lowercase)
                .collect();
            assert!(
                !html[at + 3 + name.len()..].starts_with('='),
                "inline handler on{name}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "URL-safe")]
    fn a_prefix_that_needs_escaping_is_refused() {
        let _ = page("/admin\"><script>");
    }
}
