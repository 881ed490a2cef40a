//! What a reverse proxy behind orgkey does to headers before it forwards (G1).
//!
//! [`ProxyHeaders`] turns an authenticated request into the request an upstream may see, and
//! an upstream's response into the response a client may see. It is plain `http`: use it with
//! any client (the gateway uses hyper-util's, in [`Upstream`](crate::gateway::Upstream)).
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
//!    (`api_key` or `session`) and, for sessions, `x-orgkey-admin`
//!    ([`insert_identity`], which forward-auth answers with too).
//! 5. **Where the request came from** (`X-Forwarded-For`, `-Proto`, `-Host`), trusted from a
//!    client only when it is a configured trusted proxy
//!    ([`ProxyHeaders::trust_forwarded_from`]):
//!    - from any other client, the client's own `X-Forwarded-For`, `X-Forwarded-Proto`,
//!      `X-Forwarded-Host` and `Forwarded` are dropped, and the gateway writes
//!      `X-Forwarded-For: <peer>`, `X-Forwarded-Proto: <scheme>` and
//!      `X-Forwarded-Host: <Host>` itself;
//!    - from a trusted proxy, the peer's address is appended to its `X-Forwarded-For`
//!      (`<its list>, <peer>`), and its `X-Forwarded-Proto`, `X-Forwarded-Host` and
//!      `Forwarded` are kept (the gateway writes its own only where the proxy sent none).
//!
//!    The peer is the address the connection came from: a `SocketAddr` in the request's
//!    extensions (the gateway's server sets one), else a [`ClientAddr`]; without either,
//!    no `X-Forwarded-For` is written (and an untrusted client's is still dropped). The
//!    scheme is the request URI's (HTTP/2 carries it), else the one set with
//!    [`ProxyHeaders::client_scheme`] (default `http`). The host is the request's `Host`
//!    header, else its URI's authority.
//!
//! # Rules, toward the client ([`ProxyHeaders::for_client`])
//!
//! - Rule 3 applies to the upstream's response.
//! - **The gateway's session cookie stays the gateway's.** An upstream's own
//!   `Set-Cookie: JSESSIONID=...` would replace the admin's gateway session in the browser
//!   (same name, and a `Path=/` cookie overwrites it), logging the admin out of the gateway
//!   and handing the upstream's id to the gateway as if it were a session. Such a
//!   `Set-Cookie` is **dropped** (other cookies pass) and counted in [`FromUpstream`], so the
//!   caller can log it; an upstream that needs a session cookie of its own must give it
//!   another name (Tomcat: `sessionCookieName` on the context; Spring Boot:
//!   `server.servlet.session.cookie.name`; Jetty: `org.eclipse.jetty.servlet.SessionCookie`).
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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CONNECTION, COOKIE, FORWARDED, HOST, SET_COOKIE};
use http::uri::Scheme;
use http::{Extensions, HeaderMap, Request, Response, Uri};

use crate::auth::{query_without_keys, Authenticated, DEFAULT_KEY_HEADER};
use crate::http::ClientAddr;
use crate::session::{strip_session_cookie, SESSION_COOKIE};

/// The org of the request, set by the gateway for the upstream.
pub const ORG_HEADER: &str = "x-orgkey-org";
/// The admin of a session (absent for direct-key requests).
pub const ADMIN_HEADER: &str = "x-orgkey-admin";
/// How the request was authenticated: `api_key` or `session`.
pub const METHOD_HEADER: &str = "x-orgkey-auth";
/// The prefix every identity header has; client headers that read as it are dropped.
pub const IDENTITY_PREFIX: &str = "x-orgkey-";
/// The addresses a request passed through, client first (rule 5).
pub const FORWARDED_FOR: &str = "x-forwarded-for";
/// The scheme the client used to reach the first proxy (rule 5).
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";
/// The `Host` the client asked the first proxy for (rule 5).
pub const FORWARDED_HOST: &str = "x-forwarded-host";

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

/// Whether a peer address is a trusted proxy (rule 5).
type TrustFn = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Prepares requests for an upstream and responses for the client (G1); see the
/// [module docs](self) for the rules.
#[derive(Clone)]
#[must_use]
pub struct ProxyHeaders {
    key_header: HeaderName,
    scheme: Scheme,
    trusted: Option<TrustFn>,
}

impl std::fmt::Debug for ProxyHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHeaders")
            .field("key_header", &self.key_header)
            .field("scheme", &self.scheme)
            .field("trusts_a_proxy", &self.trusted.is_some())
            .finish()
    }
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

/// What [`ProxyHeaders::for_client`] removed from an upstream's response, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FromUpstream {
    /// The upstream's own `Set-Cookie: JSESSIONID=...` headers, dropped so that they cannot
    /// replace the gateway's session cookie in the browser.
    pub session_cookies: usize,
}

impl ProxyHeaders {
    /// With the default key header (`X-API-Key`).
    pub fn new() -> Self {
        Self {
            key_header: HeaderName::from_static(DEFAULT_KEY_HEADER),
            scheme: Scheme::HTTP,
            trusted: None,
        }
    }

    /// The key header the layer reads, if not `X-API-Key`.
    pub fn key_header(mut self, header: HeaderName) -> Self {
        self.key_header = header;
        self
    }

    /// The scheme clients use to reach this proxy, for `X-Forwarded-Proto` when the request
    /// URI has none (HTTP/1.1 requests never do): `https` behind TLS. Default `http`.
    pub fn client_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Trusts the `X-Forwarded-*` and `Forwarded` headers of peers for which `is_trusted`
    /// answers `true` (a load balancer in front of this proxy): their `X-Forwarded-For` is
    /// appended to, their `X-Forwarded-Proto` and `X-Forwarded-Host` are kept. Every other
    /// peer's are replaced (rule 5). Default: no peer is trusted.
    pub fn trust_forwarded_from(
        mut self,
        is_trusted: impl Fn(IpAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.trusted = Some(Arc::new(is_trusted));
        self
    }

    /// Applies rules 1-5 to `request`, authenticated as `auth`. The URI's path and query stay
    /// as they are but for stripped key-like parameters; scheme and authority are the
    /// caller's to set (the `Host` header too: `X-Forwarded-Host` keeps the client's).
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
        // Rule 5's inputs, before anything changes.
        let peer = peer_addr(request.extensions());
        let scheme = request
            .uri()
            .scheme()
            .cloned()
            .unwrap_or_else(|| self.scheme.clone());
        let host = request.headers().get(HOST).cloned().or_else(|| {
            request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
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
        insert_identity(headers, auth);
        // Rule 5.
        let trusted = match (&self.trusted, peer) {
            (Some(is_trusted), Some(peer)) => is_trusted(peer),
            _ => false,
        };
        set_forwarded(headers, trusted, peer, &scheme, host);
        stripped
    }

    /// Applies the rules toward the client to an upstream's response: no hop-by-hop headers,
    /// no `Set-Cookie` of the gateway's session cookie.
    pub fn for_client<B>(&self, response: &mut Response<B>) -> FromUpstream {
        let headers = response.headers_mut();
        remove_hop_by_hop(headers);
        FromUpstream {
            session_cookies: drop_session_set_cookies(headers),
        }
    }
}

/// Sets rule 4's identity headers for `auth`, replacing any of the same names: `x-orgkey-org`,
/// `x-orgkey-auth` (`api_key` or `session`) and, for a session, `x-orgkey-admin` (removed
/// otherwise). What the reverse proxy sends upstream and what forward-auth answers with.
pub fn insert_identity(headers: &mut HeaderMap, auth: &Authenticated) {
    // Org ids and admin names are checked ASCII when they are created: these never fail.
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
        None => {
            headers.remove(ADMIN_HEADER);
            "api_key"
        }
    };
    headers.insert(METHOD_HEADER, HeaderValue::from_static(method));
}

/// The address the request's connection came from (rule 5).
fn peer_addr(extensions: &Extensions) -> Option<IpAddr> {
    extensions
        .get::<SocketAddr>()
        .map(SocketAddr::ip)
        .or_else(|| extensions.get::<ClientAddr>().map(|a| a.0))
}

/// Rule 5: the `X-Forwarded-*` headers for the upstream.
fn set_forwarded(
    headers: &mut HeaderMap,
    trusted: bool,
    peer: Option<IpAddr>,
    scheme: &Scheme,
    host: Option<HeaderValue>,
) {
    // Look-alikes with `_` (`X_Forwarded_For`) never pass, from anyone: servers that map `_`
    // to `-` (WSGI, CGI) would read them as the real headers.
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.contains('_') && {
                let dashed = name.replace('_', "-");
                dashed.starts_with("x-forwarded-") || dashed == "forwarded"
            }
        })
        .cloned()
        .collect();
    for name in lookalikes {
        headers.remove(name);
    }
    let earlier: Vec<String> = if trusted {
        headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|hop| !hop.is_empty())
            .map(str::to_owned)
            .collect()
    } else {
        // Whatever an untrusted client says about where it came from, it is not the gateway's
        // to pass on.
        headers.remove(FORWARDED);
        Vec::new()
    };
    headers.remove(FORWARDED_FOR);
    if let Some(peer) = peer {
        let mut hops = earlier;
        hops.push(peer.to_string());
        if let Ok(value) = HeaderValue::from_str(&hops.join(", ")) {
            headers.insert(FORWARDED_FOR, value);
        }
    }
    if !trusted || !headers.contains_key(FORWARDED_PROTO) {
        if let Ok(value) = HeaderValue::from_str(scheme.as_str()) {
            headers.insert(FORWARDED_PROTO, value);
        }
    }
    if !trusted || !headers.contains_key(FORWARDED_HOST) {
        match host {
            Some(host) => {
                headers.insert(FORWARDED_HOST, host);
            }
            None => {
                headers.remove(FORWARDED_HOST);
            }
        }
    }
}

/// Removes every `Set-Cookie` that sets the gateway's session cookie; returns how many.
fn drop_session_set_cookies(headers: &mut HeaderMap) -> usize {
    let is_session = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        let name = bytes.split(|&b| b == b'=').next().unwrap_or(bytes);
        // Cookie names are case-sensitive; browsers trim the blanks around them.
        name.trim_ascii() == SESSION_COOKIE.as_bytes() && bytes.contains(&b'=')
    };
    let count = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter(|v| is_session(v))
        .count();
    if count == 0 {
        return 0;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter(|v| !is_session(v))
        .cloned()
        .collect();
    headers.remove(SET_COOKIE);
    for value in kept {
        headers.append(SET_COOKIE, value);
    }
    count
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
        assert_eq!(
            names,
            [
                "x-forwarded-proto",
                "x-kept",
                ADMIN_HEADER,
                METHOD_HEADER,
                ORG_HEADER
            ]
        );
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

    fn from_peer(peer: &str, request: http::request::Builder) -> Request<()> {
        let mut request = request.body(()).unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(peer);
        request
    }

    fn values(request: &Request<()>, name: &str) -> Vec<String> {
        request
            .headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_untrusted_clients_forwarded_headers_are_replaced_by_the_gateways() {
        let request = from_peer(
            "203.0.113.7:41000",
            Request::get("/")
                .header("host", "api.example.com")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "evil.example")
                .header("forwarded", "for=10.0.0.1;proto=https"),
        );
        let (request, _) = forwarded(request, &key_auth());
        assert_eq!(values(&request, FORWARDED_FOR), ["203.0.113.7"]);
        assert_eq!(values(&request, FORWARDED_PROTO), ["http"]);
        assert_eq!(values(&request, FORWARDED_HOST), ["api.example.com"]);
        assert!(request.headers().get(FORWARDED).is_none());
        // Trusting some other address changes nothing for this peer.
        let request = from_peer(
            "[2001:db8::1]:41000",
            Request::get("/")
                .header("host", "api.example.com")
                .header("x-forwarded-for", "10.0.0.1"),
        );
        let mut request = request;
        ProxyHeaders::new()
            .client_scheme(Scheme::HTTPS)
            .trust_forwarded_from(|ip| ip == IpAddr::from([10, 9, 9, 9]))
            .for_upstream(&mut request, &key_auth());
        assert_eq!(values(&request, FORWARDED_FOR), ["2001:db8::1"]);
        assert_eq!(values(&request, FORWARDED_PROTO), ["https"]);
    }

    #[test]
    fn a_trusted_proxys_forwarded_for_is_appended_to_and_its_proto_and_host_kept() {
        let trusting = ProxyHeaders::new().trust_forwarded_from(|ip| ip.is_loopback());
        let mut request = from_peer(
            "127.0.0.1:5000",
            Request::get("/")
                .header("host", "gateway.internal")
                .header("x-forwarded-for", "198.51.100.1")
                .header("x-forwarded-for", "10.0.0.2,  10.0.0.3")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "api.example.com")
                .header("forwarded", "for=198.51.100.1;proto=https"),
        );
        trusting.for_upstream(&mut request, &key_auth());
        assert_eq!(
            values(&request, FORWARDED_FOR),
            ["198.51.100.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        );
        assert_eq!(values(&request, FORWARDED_PROTO), ["https"]);
        assert_eq!(values(&request, FORWARDED_HOST), ["api.example.com"]);
        assert_eq!(
            values(&request, "forwarded"),
            ["for=198.51.100.1;proto=https"]
        );
        // A trusted proxy that sent none gets the gateway's.
        let mut request = from_peer(
            "127.0.0.1:5000",
            Request::get("/").header("host", "gateway.internal"),
        );
        trusting.for_upstream(&mut request, &key_auth());
        assert_eq!(values(&request, FORWARDED_FOR), ["127.0.0.1"]);
        assert_eq!(values(&request, FORWARDED_PROTO), ["http"]);
        assert_eq!(values(&request, FORWARDED_HOST), ["gateway.internal"]);
    }

    #[test]
    fn without_a_known_peer_no_forwarded_for_is_written_and_a_clients_is_dropped() {
        let request = Request::get("https://api.example.com/x")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        let (request, _) = forwarded(request, &key_auth());
        assert!(request.headers().get(FORWARDED_FOR).is_none());
        // The URI's scheme and authority (HTTP/2) stand in for the defaults and `Host`.
        assert_eq!(values(&request, FORWARDED_PROTO), ["https"]);
        assert_eq!(values(&request, FORWARDED_HOST), ["api.example.com"]);
        // The gateway's server sets a `ClientAddr` too; it is used when no `SocketAddr` is.
        let mut request = Request::get("/").body(()).unwrap();
        request
            .extensions_mut()
            .insert(ClientAddr(IpAddr::from([192, 0, 2, 1])));
        let (request, _) = forwarded(request, &key_auth());
        assert_eq!(values(&request, FORWARDED_FOR), ["192.0.2.1"]);
    }

    #[test]
    fn an_upstreams_session_cookie_is_dropped_and_its_other_cookies_pass() {
        let mut response = Response::builder()
            .header("set-cookie", "theme=dark; Path=/")
            .header("set-cookie", "JSESSIONID=upstream-id; Path=/; HttpOnly")
            .header("set-cookie", " JSESSIONID =x; Path=/app")
            .header("set-cookie", "jsessionid=lower; Path=/")
            .header("set-cookie", "JSESSIONIDX=1")
            .body(())
            .unwrap();
        let removed = ProxyHeaders::new().for_client(&mut response);
        assert_eq!(removed.session_cookies, 2);
        let kept: Vec<_> = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            kept,
            [
                "theme=dark; Path=/",
                "jsessionid=lower; Path=/",
                "JSESSIONIDX=1"
            ]
        );
        let mut response = Response::builder()
            .header("set-cookie", "a=1")
            .body(())
            .unwrap();
        assert_eq!(
            ProxyHeaders::new()
                .for_client(&mut response)
                .session_cookies,
            0
        );
    }

    #[test]
    fn insert_identity_replaces_and_removes_an_admin_for_keys() {
        let mut headers = HeaderMap::new();
        headers.insert(ADMIN_HEADER, HeaderValue::from_static("stale"));
        insert_identity(&mut headers, &key_auth());
        assert!(headers.get(ADMIN_HEADER).is_none());
        assert_eq!(headers[METHOD_HEADER], "api_key");
        insert_identity(&mut headers, &session_auth());
        assert_eq!(headers[ADMIN_HEADER], "alice@acme.example");
        assert_eq!(headers[METHOD_HEADER], "session");
        assert_eq!(headers[ORG_HEADER], "acme");
    }

    #[test]
    fn forwarded_lookalikes_with_underscores_never_pass() {
        let mut headers = HeaderMap::new();
        for name in [
            "x_forwarded_for",
            "x-forwarded_proto",
            "X_FORWARDED_HOST",
            "forwarded",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).unwrap(),
                HeaderValue::from_static("evil"),
            );
        }
        headers.insert("x_custom", HeaderValue::from_static("kept"));
        set_forwarded(
            &mut headers,
            false,
            Some("192.0.2.7".parse().unwrap()),
            &Scheme::HTTPS,
            None,
        );
        for name in [
            "x_forwarded_for",
            "x-forwarded_proto",
            "x_forwarded_host",
            "forwarded",
        ] {
            assert!(!headers.contains_key(name), "{name} passed");
        }
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x_custom"], "kept");
    }
}
