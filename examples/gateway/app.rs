//! The gateway's service, built from orgkey's parts. `main.rs` runs it; tests include this
//! file (`#[path]`) to test the very same composition over real HTTP.

// `main` does not use every handle; the tests do.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Json, Router};
use orgkey::http::audit::AuditLogEndpoint;
use orgkey::http::csrf::CsrfLayer;
use orgkey::http::page::AdminPage;
use orgkey::http::proxy::ProxyHeaders;
use orgkey::http::SessionEndpoint;
use orgkey::store::{ChangeFollower, Store};
use orgkey::{
    Actor, Admins, ApiKey, Authenticated, KeyAdmin, KeyManagementEndpoint, OrgId, OrgKeyLayer,
    OrgTable, Password, Scopes, SessionConfig, Sessions, Username,
};
use serde_json::{json, Value};

/// What the gateway is made of: the handles tests and `main` need, and the router.
pub(crate) struct Gateway {
    /// Changes keys and subscriptions.
    pub(crate) keys: KeyAdmin,
    /// The admin accounts.
    pub(crate) admins: Admins,
    /// Logins and sessions.
    pub(crate) sessions: Sessions,
    /// The HTTP service.
    pub(crate) router: Router,
    /// The change feed, on stores other replicas write too (PostgreSQL); runs while held.
    pub(crate) follower: Option<ChangeFollower>,
}

/// What to bootstrap on a first start (a store without the org).
pub(crate) struct Bootstrap {
    pub(crate) org: OrgId,
    pub(crate) api_key: Option<ApiKey>,
    pub(crate) admin: Username,
    /// `None`: generate one (and report it) if the admin has to be created.
    pub(crate) password: Option<Password>,
    pub(crate) base_url: String,
    /// Where authenticated requests go (`--upstream`); `None`: the demo API answers them.
    pub(crate) upstream: Option<http::Uri>,
}

/// What was built; on a first start, also the secrets created, to print once.
pub(crate) struct Bootstrapped {
    pub(crate) gateway: Gateway,
    /// The org's key, on a first start only.
    pub(crate) new_key: Option<ApiKey>,
    /// The admin's password, if it was generated on this start.
    pub(crate) generated_password: Option<Password>,
}

/// Builds the gateway over `store`. On a first start (the org is not in the store) it creates
/// the org, its subscription and key, and the admin with both scopes; later starts reuse the
/// stored state and create nothing.
pub(crate) async fn build(bootstrap: Bootstrap, store: impl Store) -> Result<Bootstrapped, String> {
    let store: Arc<dyn Store> = Arc::new(store);
    let table = OrgTable::default();
    let keys = KeyAdmin::open(table.clone(), Arc::clone(&store))
        .await
        .map_err(|e| format!("state: {e}"))?
        .with_base_url(&bootstrap.base_url);
    let admins = Admins::open(table.clone(), Arc::clone(&store))
        .await
        .map_err(|e| format!("state: {e}"))?;

    let mut new_key = None;
    if table.state(bootstrap.org.as_str()).is_none() {
        let provisioning = Actor::new("provisioning").map_err(|e| e.to_string())?;
        keys.create_org(&bootstrap.org)
            .await
            .map_err(|e| e.to_string())?;
        let mut info = keys
            .subscribe(&bootstrap.org, &provisioning)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(key) = bootstrap.api_key {
            info = keys
                .edit(&bootstrap.org, key, &provisioning)
                .await
                .map_err(|e| e.to_string())?;
        }
        new_key = Some(info.key().ok_or("the org has no key")?.clone());
    }
    let mut generated_password = None;
    if admins.get(&bootstrap.admin).is_none() {
        let password = match bootstrap.password {
            Some(password) => password,
            None => {
                let password = Password::generate(20).map_err(|e| e.to_string())?;
                generated_password = Some(password.clone());
                password
            }
        };
        admins
            .create(&bootstrap.admin, &bootstrap.org, &password, Scopes::ALL)
            .await
            .map_err(|e| format!("admin: {e}"))?;
    }

    let sessions = Sessions::open(
        table.clone(),
        admins.clone(),
        SessionConfig::for_base_url(&bootstrap.base_url),
        orgkey::clock::SystemClock,
        Arc::clone(&store),
    )
    .await
    .map_err(|e| format!("state: {e}"))?;
    let endpoint = SessionEndpoint::new(sessions.clone()).client_addr(|request| {
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())
    });

    let proxying = bootstrap.upstream.is_some();
    let api = match bootstrap.upstream {
        Some(upstream) => Router::new().fallback(proxy_to(upstream)),
        None => Router::new()
            .route("/api/v1/status", get(status))
            .route("/api/v1/whoami", get(whoami)),
    };

    // W1: browser-originated writes need the same origin and the session's CSRF token.
    let csrf = CsrfLayer::new(sessions.clone()).allow_origin(&bootstrap.base_url);
    // The protected API: key requests from any origin (CORS callers) pass the CSRF guard
    // untouched; a browser's request riding on an admin's session cookie gets its full rules.
    let api = api
        .layer(OrgKeyLayer::new(table.clone()).with_sessions(sessions.clone()))
        .layer(csrf.clone().cookie_requests_only());
    // Key management and the audit log: sessions carried over a key change (W2) stay
    // usable here, also after a delete, so the admin can add a key; nowhere else (K5).
    let management = Router::new()
        .nest_service(
            "/api/v1/apiKeys",
            KeyManagementEndpoint::new(keys.clone()).with_sessions(sessions.clone()),
        )
        .route_service("/api/v1/auditLog", AuditLogEndpoint::new(keys.clone()))
        .layer(
            OrgKeyLayer::new(table)
                .with_sessions(sessions.clone())
                .allow_keyless_sessions(),
        );
    let page = AdminPage::new(keys.clone(), sessions.clone());
    // What the admin page calls, guarded against cross-site requests (W1); non-browser
    // clients (no Origin, no Sec-Fetch-Site) pass unchanged.
    let guarded = Router::new()
        .route_service("/api/v1/authenticatedSession", endpoint.clone())
        // The Go SDK sends its logout to /authenticatedSession, without /api/v1.
        .route_service("/authenticatedSession", endpoint)
        .merge(management)
        .route_service("/admin", page.clone())
        .route_service("/admin/{*asset}", page)
        .layer(csrf);
    // A person who opens the page's folder, or the demo gateway's root, lands on the page
    // (with --upstream the root belongs to the upstream, behind the layer). Not behind the
    // layer: a redirect carries no data.
    let to_page = || get(|| async { axum::response::Redirect::to("/admin") });
    let mut router = Router::new().route("/admin/", to_page());
    if !proxying {
        router = router.route("/", to_page());
    }
    let router = router
        // Counters only (O2): no org, user or key in any label. Protect it at the network
        // level like any operations endpoint.
        .route("/metrics", get(metrics))
        .merge(guarded)
        .merge(api);

    // F1: follow what other replicas commit (PostgreSQL); nothing to follow on SQLite.
    let follower = store.follow_changes(keys.table().clone());
    Ok(Bootstrapped {
        gateway: Gateway {
            keys,
            admins,
            sessions,
            router,
            follower,
        },
        new_key,
        generated_password,
    })
}

async fn metrics() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        orgkey::metrics::render(),
    )
}

/// A handler that forwards each authenticated request to `upstream` (same path and query)
/// as [`ProxyHeaders`] prescribes (G1): without orgkey's credentials (key header, session
/// cookie, key-like query parameters), without hop-by-hop headers or client-sent look-alikes
/// of the identity headers, and with the identity in the `x-orgkey-*` headers.
fn proxy_to(
    upstream: http::Uri,
) -> impl Fn(
    Extension<Authenticated>,
    axum::extract::Request,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = axum::response::Response> + Send>>
       + Clone
       + Send
       + 'static {
    use axum::response::IntoResponse;
    let client: hyper_util::client::legacy::Client<_, axum::body::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let headers = ProxyHeaders::new();
    move |Extension(auth): Extension<Authenticated>, mut request: axum::extract::Request| {
        let client = client.clone();
        let upstream = upstream.clone();
        let headers = headers.clone();
        Box::pin(async move {
            let stripped = headers.for_upstream(&mut request, &auth);
            if stripped.query_keys > 0 {
                // The names and values stay out of the log: they may be keys.
                tracing::warn!(
                    org = %auth.org(),
                    parameters = stripped.query_keys,
                    "stripped key-like query parameters before forwarding (keys are never accepted in the URL)"
                );
            }
            let mut parts = upstream.into_parts();
            parts.path_and_query = request.uri().path_and_query().cloned();
            let Ok(uri) = http::Uri::from_parts(parts) else {
                return upstream_error(http::StatusCode::BAD_GATEWAY, "bad upstream address");
            };
            *request.uri_mut() = uri;
            request.headers_mut().remove(http::header::HOST);
            match client.request(request).await {
                Ok(response) => {
                    let mut response = response.map(axum::body::Body::new);
                    headers.for_client(&mut response);
                    response.into_response()
                }
                Err(error) => {
                    tracing::warn!(%error, "upstream request failed");
                    upstream_error(
                        http::StatusCode::BAD_GATEWAY,
                        "the upstream could not be reached",
                    )
                }
            }
        })
    }
}

/// A `{"code","message"}` answer for an upstream failure.
fn upstream_error(status: http::StatusCode, message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        status,
        Json(json!({ "code": "UPSTREAM_ERROR", "message": message })),
    )
        .into_response()
}

async fn status() -> Json<Value> {
    Json(json!({ "status": "ACTIVE" }))
}

async fn whoami(Extension(auth): Extension<Authenticated>) -> Json<Value> {
    match auth.admin() {
        Some(admin) => Json(json!({ "orgId": auth.org(), "admin": admin.as_str() })),
        None => Json(json!({ "orgId": auth.org() })),
    }
}
