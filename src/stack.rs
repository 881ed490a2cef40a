//! The composition root: one type that builds the whole stack in the right order and hands out
//! what a server mounts.
//!
//! [`OrgKey::builder`] takes the deployment's base URL; [`OrgKeyBuilder::open`] opens a
//! [`Store`] and builds, in this order: the org table, the key admin, the admin directory, the
//! sessions, and the store's change feed (F1, for stores other processes write). What it hands
//! out cannot be wired wrong:
//!
//! - [`OrgKey::wrap`]: the application behind orgkey. orgkey's own routes (below) go to the
//!   admin surface; every other request goes through the CSRF guard (cookie requests only) and
//!   the layer (keys and sessions) to the application. This is what the gateway serves.
//! - [`OrgKey::layer`]: the same protection as a [`Layer`], for an application that mounts the
//!   admin surface itself.
//! - [`OrgKey::admin_surface`]: one tower service for the login (`<api>/authenticatedSession`
//!   and the Go SDK's `/authenticatedSession`), key management (`<api>/apiKeys`), the audit
//!   log (`<api>/auditLog`), forward-auth (`<api>/verify` and below, G4: the layer's verdict
//!   on the request's headers, for nginx, Traefik and Envoy; see [`crate::http::verify`]) and,
//!   with the `admin-page` feature, the admin page (`/admin`), with the CSRF guard (W1), the
//!   keyless-session scope of key management (W2, K5), the session carry-over (W2) and the
//!   client address for the login throttle (A3) inside.
//!   `<api>` is the base URL's path (`/api/v1` for `https://gw.example/api/v1`).
//!
//! Every service handed out keeps the change feed alive: it follows as long as anything built
//! from the stack serves.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use orgkey::{Actor, OrgId, OrgKey};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orgkey = OrgKey::builder("https://gw.example/api/v1")?
//!     .open(orgkey::store::MemoryStore::new())
//!     .await?;
//! let app = service_fn(|_: Request<String>| async {
//!     Ok::<_, Infallible>(Response::new(String::from("hello")))
//! });
//! let service = orgkey.wrap(app);
//!
//! // Provision an org (operators do this; see the gateway's commands).
//! let acme = OrgId::new("acme")?;
//! orgkey.keys().create_org(&acme).await?;
//! let info = orgkey.keys().subscribe(&acme, &Actor::new("ops")?).await?;
//! let key = info.key().unwrap().expose_secret().to_owned();
//!
//! let ok = Request::get("/hello").header("x-org-id", "acme").header("x-api-key", &key);
//! let response = service.clone().oneshot(ok.body(String::new())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let no_key = Request::get("/hello").header("x-org-id", "acme").body(String::new())?;
//! assert_eq!(service.clone().oneshot(no_key).await?.status(), StatusCode::UNAUTHORIZED);
//! // orgkey's own routes are served beside the application.
//! let probe = Request::get("/api/v1/authenticatedSession").body(String::new())?;
//! assert_eq!(service.oneshot(probe).await?.status(), StatusCode::UNAUTHORIZED);
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{OrgKeyAuth, ResponseBody, ResponseFuture};
use crate::clock::{Clock, SharedClock, SystemClock};
use crate::directory::{AccountError, Admins};
use crate::http::audit::AuditLogEndpoint;
use crate::http::csrf::{Csrf, CsrfLayer};
use crate::http::keys::KeyManagementEndpoint;
use crate::http::login::{default_client_addr, ClientAddrFn, SessionEndpoint};
use crate::http::verify::{ForwardAuth, VerifyEndpoint, VERIFY_PATH};
use crate::key::KeyFormat;
use crate::keys::{KeyAdmin, KeyError};
use crate::session::{SessionConfig, Sessions};
use crate::store::{ChangeFollower, Replica, Store, StoreError};
use crate::table::OrgTable;
use crate::OrgKeyLayer;

/// How long [`OrgKeyBuilder::open`] waits for a change feed's first reload.
#[cfg(feature = "postgres")]
const FIRST_FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The body of the admin surface's answers.
pub type SurfaceBody = BoxBody<Bytes, Infallible>;

/// Why the stack could not be built. Nothing was served.
#[derive(Debug)]
#[non_exhaustive]
pub enum StackError {
    /// The base URL is not an absolute `http://` or `https://` URL.
    BaseUrl(&'static str),
    /// The store could not be read.
    Store(StoreError),
    /// The orgs could not be loaded.
    Keys(KeyError),
    /// The admin accounts could not be loaded.
    Accounts(AccountError),
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BaseUrl(why) => write!(f, "invalid base URL: {why}"),
            Self::Store(_) => f.write_str("the store could not be read"),
            Self::Keys(_) => f.write_str("the orgs could not be loaded"),
            Self::Accounts(_) => f.write_str("the admin accounts could not be loaded"),
        }
    }
}

impl std::error::Error for StackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::BaseUrl(_) => None,
            Self::Store(e) => Some(e),
            Self::Keys(e) => Some(e),
            Self::Accounts(e) => Some(e),
        }
    }
}

/// Builds an [`OrgKey`]; from [`OrgKey::builder`].
#[must_use]
pub struct OrgKeyBuilder {
    base_url: String,
    api_path: String,
    origin: String,
    format: KeyFormat,
    session_config: SessionConfig,
    clock: Option<SharedClock>,
    client_addr: ClientAddrFn,
    origins: Vec<String>,
}

impl fmt::Debug for OrgKeyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgKeyBuilder")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl OrgKeyBuilder {
    /// Keys of `format` instead of the default 12 characters (K1).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Session timeouts, throttling and cookie settings instead of the defaults for the base
    /// URL ([`SessionConfig::for_base_url`]).
    pub fn session_config(mut self, config: SessionConfig) -> Self {
        self.session_config = config;
        self
    }

    /// The clock for sessions and "last modified on" (tests move it by hand).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(SharedClock::new(clock));
        self
    }

    /// How the login finds the client's address for throttling (A3). Default: a
    /// [`ClientAddr`](crate::http::ClientAddr) or `SocketAddr` in the request's extensions,
    /// which the gateway's server sets. Under axum, read `ConnectInfo<SocketAddr>` here;
    /// behind a load balancer, read its header only when the peer is that balancer. Without
    /// an address every failed login counts against the username alone.
    pub fn client_addr(
        mut self,
        f: impl Fn(&crate::auth::RequestView<'_>) -> Option<std::net::IpAddr> + Send + Sync + 'static,
    ) -> Self {
        self.client_addr = Arc::new(f);
        self
    }

    /// Also accepts browser writes whose `Origin` is `origin` (the base URL's origin always
    /// is), for a page served from another origin (W1).
    ///
    /// # Errors
    ///
    /// [`StackError::BaseUrl`] if `origin` is not `scheme://host[:port]`.
    pub fn allow_origin(mut self, origin: &str) -> Result<Self, StackError> {
        let (origin, _) = split_url(origin)?;
        self.origins.push(origin);
        Ok(self)
    }

    /// Opens `store` and builds the stack over it: loads every org, admin and live session,
    /// and starts following the store's change feed where other processes write to it.
    ///
    /// # Errors
    ///
    /// [`StackError`] if the store cannot be read.
    pub async fn open(self, store: impl Store) -> Result<OrgKey, StackError> {
        let store: Arc<dyn Store> = Arc::new(store);
        let table = OrgTable::new(self.format);
        let mut keys = KeyAdmin::open(table.clone(), Arc::clone(&store))
            .await
            .map_err(StackError::Keys)?
            .with_base_url(&self.base_url);
        if let Some(clock) = &self.clock {
            keys = keys.with_clock(clock.clone());
        }
        let admins = Admins::open(table.clone(), Arc::clone(&store))
            .await
            .map_err(StackError::Accounts)?;
        let clock = self
            .clock
            .clone()
            .unwrap_or_else(|| SharedClock::new(SystemClock));
        let sessions = Sessions::open(
            table.clone(),
            admins.clone(),
            self.session_config.clone(),
            clock,
            Arc::clone(&store),
        )
        .await
        .map_err(StackError::Store)?;
        // Last: the feed follows from the state just loaded (it reloads after LISTEN). Until
        // its first reload the table is untrusted (503, F3); give it a moment, so that a
        // healthy start serves at once.
        let replica = Replica::new(table.clone());
        // Admins and sessions follow a shared store's feed too (F2); only PostgreSQL has one.
        #[cfg(feature = "postgres")]
        let replica = replica
            .with_admins(Arc::new(admins.clone()))
            .with_sessions(Arc::new(sessions.clone()));
        let follower = store.follow_changes(replica);
        #[cfg(feature = "postgres")]
        if follower.is_some() {
            let waited = tokio::time::Instant::now();
            while !table.is_trusted() && waited.elapsed() < FIRST_FOLLOW_WAIT {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            if !table.is_trusted() {
                tracing::warn!(
                    "the change feed does not follow yet; failing closed (503) until it does"
                );
            }
        }
        Ok(self.assemble(keys, admins, sessions, follower))
    }

    fn assemble(
        self,
        keys: KeyAdmin,
        admins: Admins,
        sessions: Sessions,
        follower: Option<ChangeFollower>,
    ) -> OrgKey {
        let mut csrf = CsrfLayer::new(sessions.clone()).allow_origin(&self.origin);
        for origin in &self.origins {
            csrf = csrf.allow_origin(origin);
        }
        let keep_alive: KeepAlive = Arc::new(follower);
        let table = keys.table().clone();
        let protect = OrgKeyLayer::new(table.clone())
            .with_sessions(sessions.clone())
            .keep_alive(Arc::clone(&keep_alive) as _);
        let management = OrgKeyLayer::new(table)
            .with_sessions(sessions.clone())
            .allow_keyless_sessions()
            .keep_alive(Arc::clone(&keep_alive) as _);
        let login = SessionEndpoint::new(sessions.clone()).client_addr_fn(self.client_addr);
        let layer = ProtectLayer {
            csrf: csrf.clone().cookie_requests_only(),
            auth: protect,
        };
        let surface =
            AdminSurface {
                api_path: Arc::from(self.api_path.as_str()),
                login: csrf.layer(login),
                // G4: exactly the protection of application routes (no keyless sessions).
                verify: ForwardAuth::new(layer.layer(VerifyEndpoint)),
                keys: csrf.layer(management.layer(
                    KeyManagementEndpoint::new(keys.clone()).with_sessions(sessions.clone()),
                )),
                audit: csrf.layer(management.layer(AuditLogEndpoint::new(keys.clone()))),
                #[cfg(feature = "admin-page")]
                page: csrf.layer(crate::http::page::AdminPage::at(
                    keys.clone(),
                    sessions.clone(),
                    "/admin",
                    &format!("{}/", self.api_path),
                )),
                _keep_alive: Arc::clone(&keep_alive),
            };
        OrgKey {
            keys,
            admins,
            sessions,
            layer,
            surface,
        }
    }
}

/// Keeps the change feed running while anything built from the stack lives.
type KeepAlive = Arc<Option<ChangeFollower>>;

/// `scheme://authority` and the path of an absolute http(s) URL.
fn split_url(url: &str) -> Result<(String, String), StackError> {
    let uri: Uri = url.parse().map_err(|_| StackError::BaseUrl("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        _ => return Err(StackError::BaseUrl("use http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or(StackError::BaseUrl("no host"))?
        .as_str()
        .to_ascii_lowercase();
    if uri.query().is_some() {
        return Err(StackError::BaseUrl("a base URL has no query"));
    }
    Ok((
        format!("{scheme}://{authority}"),
        uri.path().trim_end_matches('/').to_owned(),
    ))
}

/// The whole stack: the key admin, the admin directory, the sessions and the change feed,
/// and what a server mounts. See the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct OrgKey {
    keys: KeyAdmin,
    admins: Admins,
    sessions: Sessions,
    layer: ProtectLayer,
    surface: AdminSurface,
}

impl fmt::Debug for OrgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgKey")
            .field("base_url", &self.keys.base_url())
            .finish_non_exhaustive()
    }
}

impl OrgKey {
    /// A builder for the deployment whose API lives at `base_url` (shown beside the key, K9;
    /// `https://` makes the session cookie `Secure`; its origin is the one the admin page's
    /// writes may come from, W1; its path prefixes orgkey's API routes).
    ///
    /// # Errors
    ///
    /// [`StackError::BaseUrl`] unless `base_url` is an absolute `http://` or `https://` URL
    /// without a query.
    pub fn builder(base_url: &str) -> Result<OrgKeyBuilder, StackError> {
        let (origin, path) = split_url(base_url)?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        Ok(OrgKeyBuilder {
            session_config: SessionConfig::for_base_url(&base_url),
            base_url,
            api_path: path,
            origin,
            format: KeyFormat::default(),
            clock: None,
            client_addr: Arc::new(default_client_addr),
            origins: Vec::new(),
        })
    }

    /// Subscriptions and the key life cycle (K2-K9).
    pub fn keys(&self) -> &KeyAdmin {
        &self.keys
    }

    /// The admin accounts.
    pub fn admins(&self) -> &Admins {
        &self.admins
    }

    /// Logins and sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Every org's current state.
    pub fn table(&self) -> &OrgTable {
        self.keys.table()
    }

    /// The protection for application routes: the CSRF guard for requests that carry a session
    /// cookie (W1), then the layer (L1-L4) accepting keys and sessions.
    pub fn layer(&self) -> ProtectLayer {
        self.layer.clone()
    }

    /// orgkey's own routes as one service (see the [module docs](self)).
    pub fn admin_surface(&self) -> AdminSurface {
        self.surface.clone()
    }

    /// `app` behind orgkey, with orgkey's own routes beside it: the one service a gateway
    /// serves.
    pub fn wrap<S>(&self, app: S) -> WithOrgKey<S> {
        WithOrgKey {
            app: self.layer.layer(app),
            surface: self.surface.clone(),
        }
    }
}

/// The protection of [`OrgKey::layer`]: `Csrf<OrgKeyAuth<S>>`.
#[derive(Clone, Debug)]
#[must_use]
pub struct ProtectLayer {
    csrf: CsrfLayer,
    auth: OrgKeyLayer,
}

impl<S> Layer<S> for ProtectLayer {
    type Service = Csrf<OrgKeyAuth<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.csrf.layer(self.auth.layer(inner))
    }
}

/// orgkey's own routes, from [`OrgKey::admin_surface`]. Answers 404 outside them.
#[derive(Clone)]
pub struct AdminSurface {
    api_path: Arc<str>,
    login: Csrf<SessionEndpoint>,
    verify: ForwardAuth<Csrf<OrgKeyAuth<VerifyEndpoint>>>,
    keys: Csrf<OrgKeyAuth<KeyManagementEndpoint>>,
    audit: Csrf<OrgKeyAuth<AuditLogEndpoint>>,
    #[cfg(feature = "admin-page")]
    page: Csrf<crate::http::page::AdminPage>,
    _keep_alive: KeepAlive,
}

impl fmt::Debug for AdminSurface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSurface")
            .field("api_path", &self.api_path)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Login,
    Verify,
    Keys,
    Audit,
    #[cfg(feature = "admin-page")]
    Page,
}

impl AdminSurface {
    fn route(&self, path: &str) -> Option<Route> {
        if path == "/authenticatedSession" {
            // The Go SDK logs out here, without the API prefix.
            return Some(Route::Login);
        }
        #[cfg(feature = "admin-page")]
        if path == "/admin" || path.starts_with("/admin/") {
            return Some(Route::Page);
        }
        let tail = path.strip_prefix(&*self.api_path)?;
        if tail == "/authenticatedSession" {
            Some(Route::Login)
        } else if tail == "/apiKeys" || tail.starts_with("/apiKeys/") {
            Some(Route::Keys)
        } else if tail == "/auditLog" {
            Some(Route::Audit)
        } else if tail
            .strip_prefix(VERIFY_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            Some(Route::Verify)
        } else {
            None
        }
    }

    /// Whether `path` is one of orgkey's own routes.
    pub fn handles(&self, path: &str) -> bool {
        self.route(path).is_some()
    }
}

/// Readies `service` (always ready at once here), calls it, and boxes the body.
async fn call_boxed<S, B, ResBody>(
    mut service: S,
    request: Request<B>,
) -> Result<Response<SurfaceBody>, Infallible>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = Infallible>,
    ResBody: Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    let response = service.call(request).await?;
    Ok(response.map(BodyExt::boxed))
}

impl<B> Service<Request<B>> for AdminSurface
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<SurfaceBody>;
    type Error = Infallible;
    type Future = SurfaceFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every route is ready at once; each call readies its own copy.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.route(request.uri().path()) {
            Some(Route::Login) => Box::pin(call_boxed(self.login.clone(), request)),
            Some(Route::Verify) => Box::pin(call_boxed(self.verify.clone(), request)),
            Some(Route::Keys) => Box::pin(call_boxed(self.keys.clone(), request)),
            Some(Route::Audit) => Box::pin(call_boxed(self.audit.clone(), request)),
            #[cfg(feature = "admin-page")]
            Some(Route::Page) => Box::pin(call_boxed(self.page.clone(), request)),
            None => Box::pin(std::future::ready(Ok(crate::response::fixed::<
                http_body_util::Full<Bytes>,
            >(
                http::StatusCode::NOT_FOUND,
                r#"{"code":"RESOURCE_NOT_FOUND","message":"no such orgkey resource"}"#,
            )
            .map(BodyExt::boxed)))),
        }
    }
}

/// An application behind orgkey, with orgkey's routes beside it ([`OrgKey::wrap`]).
#[derive(Clone, Debug)]
pub struct WithOrgKey<S> {
    app: Csrf<OrgKeyAuth<S>>,
    surface: AdminSurface,
}

type SurfaceFuture =
    Pin<Box<dyn Future<Output = Result<Response<SurfaceBody>, Infallible>> + Send>>;

pin_project! {
    /// The future of [`WithOrgKey`]: the protected application's, or the admin surface's.
    pub struct WithOrgKeyFuture<F, ResBody> {
        #[pin]
        kind: Kind<F, ResBody>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResBody> {
        App { #[pin] future: ResponseFuture<ResponseFuture<F, ResBody>, ResponseBody<ResBody>> },
        Surface { #[pin] future: SurfaceFuture },
    }
}

/// The body of [`WithOrgKey`]'s answers.
pub type WithOrgKeyBody<ResBody> = Either<ResponseBody<ResponseBody<ResBody>>, SurfaceBody>;

impl<F, ResBody, E> Future for WithOrgKeyFuture<F, ResBody>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<WithOrgKeyBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::App { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Either::Left))),
            KindProj::Surface { future } => future.poll(cx).map(|result| match result {
                Ok(response) => Ok(response.map(Either::Right)),
                Err(never) => match never {},
            }),
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for WithOrgKey<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<WithOrgKeyBody<ResBody>>;
    type Error = S::Error;
    type Future = WithOrgKeyFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.app.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.surface.handles(request.uri().path()) {
            // The admin surface needs no readiness of the application's.
            WithOrgKeyFuture {
                kind: Kind::Surface {
                    future: self.surface.call(request),
                },
            }
        } else {
            // Called synchronously on the instance `poll_ready` readied.
            WithOrgKeyFuture {
                kind: Kind::App {
                    future: self.app.call(request),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    async fn status(surface: &AdminSurface, method: http::Method, path: &str) -> u16 {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::<Bytes>::default())
            .unwrap();
        let mut surface = surface.clone();
        let response = surface.call(request).await.unwrap();
        if response.status() == http::StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
        }
        response.status().as_u16()
    }

    /// F3: while the orgs cannot be vouched for, the login, the session probe, forward-auth and
    /// the page's session resource fail closed with 503 like the layer (they answered 200 and
    /// 500), a logout still ends sessions, and the page's static files are still served.
    #[tokio::test]
    async fn an_untrusted_table_fails_the_login_the_probe_and_the_page_session_closed() {
        let orgkey = OrgKey::builder("http://gw.example/api/v1")
            .unwrap()
            .open(crate::store::MemoryStore::new())
            .await
            .unwrap();
        let surface = orgkey.admin_surface();
        let login = "/api/v1/authenticatedSession";
        assert_eq!(status(&surface, http::Method::GET, login).await, 401);
        orgkey.table().set_trusted(false);
        assert_eq!(status(&surface, http::Method::GET, login).await, 503);
        assert_eq!(status(&surface, http::Method::POST, login).await, 503);
        assert_eq!(status(&surface, http::Method::DELETE, login).await, 200);
        assert_eq!(
            status(&surface, http::Method::GET, "/api/v1/apiKeys").await,
            503
        );
        assert_eq!(
            status(&surface, http::Method::GET, "/api/v1/auditLog").await,
            503
        );
        // G4: forward-auth is the layer's verdict, so it fails closed too.
        assert_eq!(
            status(&surface, http::Method::GET, "/api/v1/verify").await,
            503
        );
        #[cfg(feature = "admin-page")]
        {
            assert_eq!(
                status(&surface, http::Method::GET, "/admin/session").await,
                503
            );
            assert_eq!(status(&surface, http::Method::GET, "/admin").await, 200);
        }
        orgkey.table().set_trusted(true);
        assert_eq!(status(&surface, http::Method::GET, login).await, 401);
        assert_eq!(
            status(&surface, http::Method::GET, "/api/v1/verify").await,
            401
        );
    }

    #[test]
    fn base_urls_must_be_absolute_http_without_a_query() {
        for bad in [
            "gw.example/api",
            "ftp://gw.example/",
            "https://gw.example/api?x=1",
            "/api/v1",
        ] {
            assert!(OrgKey::builder(bad).is_err(), "{bad}");
        }
        assert!(OrgKey::builder("https://GW.example:8443/api/v1/").is_ok());
    }
}
