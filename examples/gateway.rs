//! The orgkey gateway: a small API protected by per-organization API keys.
//!
//! ```text
//! cargo run --example gateway -- [--listen ADDR] [--org-id ID] [--api-key KEY] [--base-url URL]
//! ```
//!
//! On start it creates one organization with an API subscription, whose key is `--api-key` or
//! a random one, and prints `base url: ...`, `org id: ...` and `api key: ...` on stdout. It then
//! serves, behind [`OrgKeyLayer`]:
//!
//! - `GET /api/v1/status` -> `{"status":"ACTIVE"}`
//! - `GET /api/v1/whoami` -> `{"orgId":"<the authenticated org>"}`
//!
//! Requests carry the org in `X-Org-Id` and the key in `X-API-Key`. Logs (no secrets) go to
//! stderr; set `RUST_LOG=orgkey=debug` to see every decision. Ctrl-C or SIGTERM stops it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::routing::get;
use axum::{Extension, Json, Router};
use orgkey::{Actor, ApiKey, Authenticated, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
use serde_json::{json, Value};

const HELP: &str = "\
orgkey gateway: an API protected by per-organization API keys

USAGE:
    cargo run --example gateway -- [OPTIONS]

OPTIONS:
    --listen ADDR      address to listen on [default: 127.0.0.1:8080]
    --org-id ID        id of the organization to create [default: acme]
    --api-key KEY      the organization's key (12 ASCII letters/digits) [default: random]
    --base-url URL     base URL to advertise [default: http://<listen>/api/v1]
    -h, --help         print this help

The key is printed once on stdout at start. Send it in X-API-Key with the org in X-Org-Id:
    curl -H 'X-Org-Id: acme' -H 'X-API-Key: <key>' http://127.0.0.1:8080/api/v1/whoami
";

struct Options {
    listen: SocketAddr,
    org_id: OrgId,
    api_key: Option<ApiKey>,
    base_url: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        org_id: OrgId::new("acme").map_err(|e| e.to_string())?,
        api_key: None,
        base_url: None,
    };
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value (see --help)"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => {
                let v = value("--listen")?;
                options.listen = v
                    .parse()
                    .map_err(|e| format!("--listen {v:?}: {e} (expected ip:port)"))?;
            }
            "--org-id" => {
                options.org_id =
                    OrgId::new(&value("--org-id")?).map_err(|e| format!("--org-id: {e}"))?;
            }
            "--api-key" => {
                // The error never repeats the value: it may be a real key.
                options.api_key = Some(
                    ApiKey::parse(&value("--api-key")?).map_err(|e| format!("--api-key: {e}"))?,
                );
            }
            "--base-url" => options.base_url = Some(value("--base-url")?),
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    Ok(Some(options))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let base_url = options
        .base_url
        .unwrap_or_else(|| format!("http://{local}/api/v1"));

    let admin = KeyAdmin::new(OrgTable::default()).with_base_url(&base_url);
    let provisioning = Actor::new("provisioning").map_err(|e| e.to_string())?;
    admin
        .create_org(&options.org_id)
        .map_err(|e| e.to_string())?;
    let mut info = admin
        .subscribe(&options.org_id, &provisioning)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(key) = options.api_key {
        info = admin
            .edit(&options.org_id, key, &provisioning)
            .await
            .map_err(|e| e.to_string())?;
    }
    let key = info.key().ok_or("the org has no key")?;

    println!("base url: {base_url}");
    println!("org id: {}", options.org_id);
    println!("api key: {}", key.expose_secret());

    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/whoami", get(whoami))
        .layer(OrgKeyLayer::new(admin.table().clone()));

    tracing::info!(%local, "gateway listening");
    axum::serve(listener, api)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))?;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn status() -> Json<Value> {
    Json(json!({ "status": "ACTIVE" }))
}

async fn whoami(Extension(auth): Extension<Authenticated>) -> Json<Value> {
    Json(json!({ "orgId": auth.org() }))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
