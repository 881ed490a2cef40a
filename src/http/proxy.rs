//! What a reverse proxy behind orgkey does to headers before it forwards (G1).
//!
//! [`ProxyHeaders`] turns an authenticated request into the request an upstream may see, and
//! an upstream's response into the response a client may see. It is plain `http`: use it with
//! any client (the gateway example uses hyper-util's).
//!
//! # Rules, toward the upstream ([`ProxyHeaders::for_upstream`])
//!
//! 1. **No credentials.** The key header (every value), every `JSESSIONID` cookie (other
//!    cookies stay), and every key-like query parameter (`apikey`, `api_key`, `api-key`,
//!    `key`, or the key header's name, in any case, percent-encoded or not) are removed,
//!    whichever credential authenticated the request: a key that a client also put in the
//!    URL must not reach upstream access logs, and an admin's live session id must never let
//!    an upstream act as that admin. Query parameters are **stripped, not refused**, so that a
//!    careless client keeps working; the gateway logs that it stripped one (never its value).
//! 2. **No forged identity.** Every client header that a server could read as an identity
//!    header is dropped: any header whose name, in any case and with `_` read as `-`, starts
//!    with `x-orgkey-`. CGI and WSGI servers (and many frameworks) map `X_Orgkey_Org` and
//!    `X-Orgkey-Org` to the same variable, so both spellings must go.
//! 3. **No hop-by-hop headers** (RFC 9110 7.6.1): `Connection` and every header it names,
//!    `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//!    `Proxy-Authorization` and `Proxy-Authenticate`. Rule 3 runs before the identity headers
//!    are set, so `Connection: x-orgkey-org` cannot make a later hop strip them.
//! 4. **The identity, set by the gateway only:** `x-orgkey-org` (the org), `x-orgkey-auth`
//!    (`api_key` or `session`) and, for sessions, `x-orgkey-admin`.
//!
//! Toward the client ([`ProxyHeaders::for_client`]), rule 3 applies to the upstream's response.
//!
//! # Example
//!
//! ```
//! use http::Request;
//! use orgkey::http::proxy::{ProxyHeaders, ORG_HEADER};
//! # use orgkey::{Actor, KeyAdmin, OrgId, OrgKeyLayer, OrgTable, Authenticated};
//! # use tower::{ServiceBuilder, ServiceExt};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # let admin = KeyAdmin::new(OrgTable::default());
//! # let acme = OrgId::new("acme").unwrap();
//! # admin.create_org(&acme).await.unwrap();
//! # let info = admin.subscribe(&acme, &Actor::new("ops@acme.example").unwrap()).await.unwrap();
//! # let key = info.key().unwrap().expose_secret().to_owned();
//! // Behind OrgKeyLayer, the request carries `Authenticated`; a proxy prepares it, then
//! // sends it upstream (here: hands it to the test through a channel).
//! let (upstream_tx, upstream_rx) = std::sync::mpsc::channel();
//! let forward = ServiceBuilder::new()
//!     .layer(OrgKeyLayer::new(admin.table().clone()))
//!     .service_fn(move |mut request: Request<()>| {
//!         let auth = request.extensions().get::<Authenticated>().cloned().unwrap();
//!         ProxyHeaders::new().for_upstream(&mut request, &auth);
//!         upstream_tx.send(request).unwrap();
//!         async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
//!     });
//! let request = Request::get("/r?apiKey=leaked&page=2")
//!     .header("x-org-id", "acme")
//!     .header("x-api-key", &key)
//!     .header("x_orgkey_org", "globex")
//!     .header("connection", "x-custom")
//!     .header("x-custom", "hop")
//!     .body(())
//!     .unwrap();
//! forward.oneshot(request).await.unwrap();
//! let upstream = upstream_rx.recv().unwrap();
//! assert_eq!(upstream.uri(), "/r?page=2");
//! assert_eq!(upstream.headers()[ORG_HEADER], "acme");
//! assert!(upstream.headers().get("x_orgkey_org").is_none());
//! assert!(upstream.headers().get("x-api-key").is_none());
//! assert!(upstream.headers().get("x-custom").is_none());
//! # }
//! ```

use http::header::{HeaderName, HeaderValue, CONNECTION, COOKIE};
use http::{HeaderMap, Request, Response, Uri};

use crate::auth::{query_without_keys, Authenticated, DEFAULT_KEY_HEADER};
use crate::session::strip_session_cookie;

/// The org of the request, set by the gateway for the upstream.
pub const ORG_HEADER: &str = "x-orgkey-org";
/// The admin of a session (absent for direct-key requests).
pub const ADMIN_HEADER: &str = "x-orgkey-admin";
/// How the request was authenticated: `api_key` or `session`.
pub const METHOD_HEADER: &str = "x-orgkey-auth";
/// The prefix every identity header has; client headers that read as it are dropped.
pub const IDENTITY_PREFIX: &str = "x-orgkey-";

/// Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`
/// and the proxy credentials, which are meant for this hop only).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Prepares requests for an upstream and responses for the client (G1); see the
/// [module docs](self) for the rules.
#[derive(Debug, Clone)]
#[must_use]
pub struct ProxyHeaders {
    key_header: HeaderName,
}

impl Default for ProxyHeaders {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`ProxyHeaders::for_upstream`] removed, for logging (names and counts, never values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stripped {
    /// Key-like query parameters removed from the target.
    pub query_keys: usize,
    /// Client headers that read as identity headers.
    pub forged_identity: usize,
}

impl ProxyHeaders {
    /// With the default key header (`X-API-Key`).
    pub fn new() -> Self {
        Self {
            key_header: HeaderName::from_static(DEFAULT_KEY_HEADER),
        }
    }

    /// The key header the layer reads, if not `X-API-Key`.
    pub fn key_header(mut self, header: HeaderName) -> Self {
        self.key_header = header;
        self
    }

    /// Applies rules 1-4 to `request`, authenticated as `auth`. The URI's path and query stay
    /// as they are but for stripped key-like parameters; scheme and authority are the
    /// caller's to set.
    pub fn for_upstream<B>(&self, request: &mut Request<B>, auth: &Authenticated) -> Stripped {
        let mut stripped = Stripped::default();
        // Rule 1, the query.
        if let Some(query) = request.uri().query() {
            let (kept, removed) = query_without_keys(query, &self.key_header);
            if removed > 0 {
                stripped.query_keys = removed;
                if let Some(uri) = with_query(request.uri(), kept.as_deref()) {
                    *request.uri_mut() = uri;
                }
            }
        }
        let headers = request.headers_mut();
        // Rule 3 first: a client must not be able to name, in `Connection`, the headers the
        // gateway sets below.
        remove_hop_by_hop(headers);
        // Rule 1, the headers.
        headers.remove(&self.key_header);
        if headers.contains_key(COOKIE) {
            strip_session_cookie(headers);
        }
        // Rule 2.
        let forged: Vec<HeaderName> = headers
            .keys()
            .filter(|name| reads_as_identity(name.as_str()))
            .cloned()
            .collect();
        stripped.forged_identity = forged.len();
        for name in forged {
            headers.remove(name);
        }
        // Rule 4.
        if let Ok(org) = HeaderValue::from_str(auth.org()) {
            headers.insert(ORG_HEADER, org);
        }
        let method = match auth.admin() {
            Some(admin) => {
                if let Ok(admin) = HeaderValue::from_str(admin.as_str()) {
                    headers.insert(ADMIN_HEADER, admin);
                }
                "session"
            }
            None => "api_key",
        };
        headers.insert(METHOD_HEADER, HeaderValue::from_static(method));
        stripped
    }

    /// Applies rule 3 to an upstream's response.
    pub fn for_client<B>(&self, response: &mut Response<B>) {
        remove_hop_by_hop(response.headers_mut());
    }
}

/// Whether a header named `name` could be read by a server as an identity header: in any
/// case, with `_` read as `-`.
fn reads_as_identity(name: &str) -> bool {
    let prefix = IDENTITY_PREFIX.as_bytes();
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()]
            .iter()
            .zip(prefix)
            .all(|(&a, &b)| {
                let a = if a == b'_' { b'-' } else { a };
                a.eq_ignore_ascii_case(&b)
            })
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop headers.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `uri` with its query replaced by `query` (`None`: no query).
fn with_query(uri: &Uri, query: Option<&str>) -> Option<Uri> {
    let path_and_query = match query {
        Some(query) => format!("{}?{query}", uri.path()),
        None => uri.path().to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use crate::org::{Generation, InlineOrgId};
    use crate::{Scopes, Username};

    fn key_auth() -> Authenticated {
        Authenticated::new(
            InlineOrgId::copy("acme").unwrap(),
            Generation::new(1),
            AuthMethod::ApiKey,
        )
    }

    fn session_auth() -> Authenticated {
        Authenticated::new(
            InlineOrgId::copy("acme").unwrap(),
            Generation::new(1),
            AuthMethod::Session {
                admin: Username::new("alice@acme.example").unwrap(),
                scopes: Scopes::ALL,
            },
        )
    }

    fn forwarded(request: Request<()>, auth: &Authenticated) -> (Request<()>, Stripped) {
        let mut request = request;
        let stripped = ProxyHeaders::new().for_upstream(&mut request, auth);
        (request, stripped)
    }

    #[test]
    fn no_session_cookie_reaches_the_upstream_whichever_credential_authenticated() {
        for auth in [key_auth(), session_auth()] {
            let request = Request::get("/both")
                .header("x-api-key", "AbCdEf123456")
                .header("cookie", "JSESSIONID=abc; a=1")
                .header("cookie", "JSESSIONID=def")
                .body(())
                .unwrap();
            let (request, _) = forwarded(request, &auth);
            let cookies: Vec<_> = request.headers().get_all(COOKIE).iter().collect();
            assert_eq!(cookies, ["a=1"]);
            assert!(request.headers().get("x-api-key").is_none());
        }
    }

    #[test]
    fn identity_lookalikes_in_any_case_and_with_underscores_are_dropped() {
        let request = Request::get("/")
            .header("x_orgkey_org", "globex")
            .header("X_Orgkey_Admin", "root@acme.example")
            .header("x-orgkey_auth", "session")
            .header("x-orgkey-org", "globex")
            .header("x-orgkey-anything", "1")
            .header("x-orgkeyorg", "kept: not the prefix")
            .header("x_org_id", "kept")
            .body(())
            .unwrap();
        let (request, stripped) = forwarded(request, &key_auth());
        let names: Vec<_> = request.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(stripped.forged_identity, 5);
        for name in &names {
            if name.replace('_', "-").starts_with("x-orgkey-") {
                assert!(
                    [ORG_HEADER, METHOD_HEADER].contains(name),
                    "{name} survived"
                );
            }
        }
        assert_eq!(request.headers()[ORG_HEADER], "acme");
        assert_eq!(request.headers().get_all(ORG_HEADER).iter().count(), 1);
        assert_eq!(request.headers()[METHOD_HEADER], "api_key");
        assert!(request.headers().get(ADMIN_HEADER).is_none());
        assert_eq!(request.headers()["x-orgkeyorg"], "kept: not the prefix");
        assert_eq!(request.headers()["x_org_id"], "kept");
    }

    #[test]
    fn hop_by_hop_headers_and_the_headers_connection_names_are_removed() {
        let request = Request::post("/")
            .header("connection", "keep-alive, X-Custom, x-orgkey-org")
            .header("connection", "x-other")
            .header("x-custom", "1")
            .header("x-other", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("trailer", "x-sum")
            .header("upgrade", "websocket")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let (request, _) = forwarded(request, &session_auth());
        let mut names: Vec<_> = request.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-kept", ADMIN_HEADER, METHOD_HEADER, ORG_HEADER]);
        // `Connection: x-orgkey-org` did not remove the identity set after rule 3.
        assert_eq!(request.headers()[ORG_HEADER], "acme");
        assert_eq!(request.headers()[ADMIN_HEADER], "alice@acme.example");
        assert_eq!(request.headers()[METHOD_HEADER], "session");

        let mut response = Response::builder()
            .header("connection", "close, x-secret-hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("content-type", "text/plain")
            .body(())
            .unwrap();
        ProxyHeaders::new().for_client(&mut response);
        let names: Vec<_> = response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn key_like_query_parameters_are_stripped_and_the_rest_kept_verbatim() {
        for (target, expected) in [
            ("/q?apiKey=AbCdEf123456", "/q"),
            ("/q?a=1&api_key=x&b=%20two", "/q?a=1&b=%20two"),
            ("/q?API-KEY=x&X-Api-Key=y&key=z&monkey=1", "/q?monkey=1"),
            ("/q?api%5Fkey=x&keys=2", "/q?keys=2"),
            ("/q?a=1", "/q?a=1"),
            ("/q?apikey", "/q"),
            ("/q?&&a=1", "/q?&&a=1"),
        ] {
            let request = Request::get(target).body(()).unwrap();
            let (request, stripped) = forwarded(request, &key_auth());
            assert_eq!(request.uri(), expected, "{target}");
            assert_eq!(stripped.query_keys > 0, target != expected, "{target}");
        }
        // An absolute target keeps its scheme and authority.
        let request = Request::get("http://gw.example/q?key=1&x=2")
            .body(())
            .unwrap();
        let (request, _) = forwarded(request, &key_auth());
        assert_eq!(request.uri(), "http://gw.example/q?x=2");
    }

    #[test]
    fn a_custom_key_header_is_removed_too() {
        let mut request = Request::get("/q?x-key=1")
            .header("x-key", "AbCdEf123456")
            .body(())
            .unwrap();
        ProxyHeaders::new()
            .key_header(HeaderName::from_static("x-key"))
            .for_upstream(&mut request, &key_auth());
        assert!(request.headers().get("x-key").is_none());
        assert_eq!(request.uri(), "/q");
    }
}
