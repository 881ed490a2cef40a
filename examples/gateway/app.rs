//! The gateway's service, built from orgkey's parts. `main.rs` runs it; tests include this
//! file (`#[path]`) to test the very same composition over real HTTP.

// `main` does not use every handle; the tests do.
#![allow(dead_code)]

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Json, Router};
use orgkey::audit_api::AuditLogEndpoint;
use orgkey::session::SessionEndpoint;
use orgkey::store::MemoryStore;
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
}

/// What to bootstrap.
pub(crate) struct Bootstrap {
    pub(crate) org: OrgId,
    pub(crate) api_key: Option<ApiKey>,
    pub(crate) admin: Username,
    pub(crate) password: Password,
    pub(crate) base_url: String,
}

/// What the bootstrap produced, for printing.
pub(crate) struct Bootstrapped {
    pub(crate) gateway: Gateway,
    pub(crate) key: ApiKey,
}

/// Builds the gateway and its one org, subscription, key and admin (both scopes).
pub(crate) async fn build(bootstrap: Bootstrap) -> Result<Bootstrapped, String> {
    let table = OrgTable::default();
    // In memory for now: the SQLite state file comes with admins and sessions in the store.
    let keys = KeyAdmin::open(table.clone(), MemoryStore::new())
        .await
        .map_err(|e| e.to_string())?
        .with_base_url(&bootstrap.base_url);
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
    let key = info.key().ok_or("the org has no key")?.clone();

    let admins = Admins::new(table.clone());
    let (admin, org, password) = (bootstrap.admin, bootstrap.org, bootstrap.password);
    admins
        .create(&admin, &org, &password, Scopes::ALL)
        .await
        .map_err(|e| format!("admin: {e}"))?;

    let sessions = Sessions::with_config(
        table.clone(),
        admins.clone(),
        SessionConfig::for_base_url(&bootstrap.base_url),
        orgkey::clock::SystemClock,
    );
    let endpoint = SessionEndpoint::new(sessions.clone()).client_addr(|request| {
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())
    });

    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/whoami", get(whoami))
        .nest_service("/api/v1/apiKeys", KeyManagementEndpoint::new(keys.clone()))
        .route_service("/api/v1/auditLog", AuditLogEndpoint::new(keys.clone()))
        .layer(OrgKeyLayer::new(table).with_sessions(sessions.clone()));
    let router = Router::new()
        .route_service("/api/v1/authenticatedSession", endpoint.clone())
        // The Go SDK sends its logout to /authenticatedSession, without /api/v1.
        .route_service("/authenticatedSession", endpoint)
        // Counters only (O2): no org, user or key in any label. Protect it at the network
        // level like any operations endpoint.
        .route("/metrics", get(metrics))
        .merge(api);

    Ok(Bootstrapped {
        gateway: Gateway {
            keys,
            admins,
            sessions,
            router,
        },
        key,
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

async fn status() -> Json<Value> {
    Json(json!({ "status": "ACTIVE" }))
}

async fn whoami(Extension(auth): Extension<Authenticated>) -> Json<Value> {
    match auth.admin() {
        Some(admin) => Json(json!({ "orgId": auth.org(), "admin": admin.as_str() })),
        None => Json(json!({ "orgId": auth.org() })),
    }
}
