//! The orgkey gateway: a small API protected by per-organization API keys and ZIA sessions.
//!
//! ```text
//! cargo run --example gateway -- [--listen ADDR] [--org-id ID] [--api-key KEY]
//!                                [--admin USER] [--password PW] [--base-url URL]
//! ```
//!
//! On start it creates one organization with an API subscription (key: `--api-key` or random)
//! and one admin with the `api` and `key-admin` scopes (password: `--password`, else
//! `ORGKEY_ADMIN_PASSWORD`, else random), and prints `base url: ...`, `org id: ...`,
//! `api key: ...`, `admin: ...` and, when generated, `admin password: ...` on stdout. It serves:
//!
//! - `POST/GET/DELETE /api/v1/authenticatedSession`: the ZIA login protocol;
//! - behind [`OrgKeyLayer`](orgkey::OrgKeyLayer), with a session cookie or `X-Org-Id` +
//!   `X-API-Key`: `GET /api/v1/status` -> `{"status":"ACTIVE"}` and `GET /api/v1/whoami`.
//!
//! Logs (no secrets) go to stderr; `RUST_LOG=orgkey=debug` shows every decision. Ctrl-C or
//! SIGTERM stops it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use orgkey::store::SqliteStore;
use orgkey::{ApiKey, KeyFormat, OrgId, Password, Username};

mod app;
mod serve;

const HELP: &str = "\
orgkey gateway: an API protected by per-organization API keys

USAGE:
    cargo run --example gateway -- [OPTIONS]

OPTIONS:
    --listen ADDR      address to listen on [default: 127.0.0.1:8080]
    --org-id ID        id of the organization to create [default: acme]
    --api-key KEY      the organization's key (12 ASCII letters/digits) [default: random]
    --admin USER       the admin to create, name@domain [default: admin@<org-id>.example]
    --password PW      the admin's password (12+ characters) [default: $ORGKEY_ADMIN_PASSWORD,
                       else random, printed once]
    --base-url URL     base URL to advertise; https:// makes the session cookie Secure
                       [default: http://<listen>/api/v1]
    --state PATH       the SQLite state file (created on first start) [default: ./orgkey.db]
    --upstream URL     forward authenticated requests to URL (http://host:port), without the
                       key header or session cookie, with x-orgkey-org, x-orgkey-admin and
                       x-orgkey-auth set [default: the demo API answers them]
    --postgres URL     keep the state in PostgreSQL instead (schema \"orgkey\"; needs the
                       `postgres` feature: cargo run --features postgres --example gateway)
    --header-read-timeout SECS
                       close a connection whose request head (request line and headers) is
                       not in SECS after it opened, or after the first byte of a further
                       request on it [default: 10]
    --body-read-timeout SECS
                       a request body must arrive in full within SECS of its head, else the
                       answer is 408 and the connection is closed; raise it for clients that
                       upload large or slow bodies [default: 30]
    --idle-timeout SECS
                       close a keep-alive connection after SECS without a request [default: 60]
    --max-connections N
                       connections open at once; further clients wait until one closes
                       [default: the open-file soft limit less a reserve (64, or a quarter
                       of a limit under 256), halved with --upstream (a proxied request holds
                       a second socket), at most 4096; 960 under the usual limit of 1024]
    -h, --help         print this help

SECS may have a fraction (0.5); each is more than 0 and at most 86400.

On the first start (a new state) the gateway creates the org, its key and the admin, and
prints the key (and a generated password) once; later starts reuse the state, ignore
--api-key and --password, and print no secret. The key is printed once on stdout at start. Send it in X-API-Key with the org in X-Org-Id:
    curl -H 'X-Org-Id: acme' -H 'X-API-Key: <key>' http://127.0.0.1:8080/api/v1/whoami
or log in as the admin through POST /api/v1/authenticatedSession (see the README).

Logs go to stderr, at info by default. RUST_LOG changes the levels of the targets it names
(RUST_LOG=orgkey=debug shows every decision); the others stay at info unless it also gives a
bare level (RUST_LOG=warn,orgkey=debug).
";

struct Options {
    listen: SocketAddr,
    org_id: OrgId,
    api_key: Option<ApiKey>,
    admin: Option<Username>,
    password: Option<Password>,
    base_url: Option<String>,
    state: std::path::PathBuf,
    postgres: Option<String>,
    upstream: Option<axum::http::Uri>,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    idle_timeout: Duration,
    /// `None`: [`serve::default_max_connections`].
    max_connections: Option<usize>,
}

/// A flag's value in seconds: a positive number, fractions allowed, at most a day.
fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag} {value:?}: expected seconds, more than 0 and at most 86400"))
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        org_id: OrgId::new("acme").map_err(|e| e.to_string())?,
        api_key: None,
        admin: None,
        password: None,
        base_url: None,
        state: std::path::PathBuf::from("orgkey.db"),
        postgres: None,
        upstream: None,
        header_read_timeout: serve::DEFAULT_HEADER_READ_TIMEOUT,
        body_read_timeout: serve::DEFAULT_BODY_READ_TIMEOUT,
        idle_timeout: serve::DEFAULT_IDLE_TIMEOUT,
        max_connections: None,
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
            "--admin" => {
                options.admin =
                    Some(Username::new(&value("--admin")?).map_err(|e| format!("--admin: {e}"))?);
            }
            "--password" => {
                let password = Password::new(value("--password")?);
                password
                    .check_policy()
                    .map_err(|e| format!("--password: {e}"))?;
                options.password = Some(password);
            }
            "--base-url" => options.base_url = Some(value("--base-url")?),
            "--state" => options.state = value("--state")?.into(),
            "--postgres" => options.postgres = Some(value("--postgres")?),
            "--upstream" => {
                let v = value("--upstream")?;
                let uri: axum::http::Uri =
                    v.parse().map_err(|e| format!("--upstream {v:?}: {e}"))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(format!("--upstream {v:?}: use http://host:port"));
                }
                options.upstream = Some(uri);
            }
            "--header-read-timeout" => {
                let v = value("--header-read-timeout")?;
                options.header_read_timeout = seconds("--header-read-timeout", &v)?;
            }
            "--body-read-timeout" => {
                let v = value("--body-read-timeout")?;
                options.body_read_timeout = seconds("--body-read-timeout", &v)?;
            }
            "--idle-timeout" => {
                let v = value("--idle-timeout")?;
                options.idle_timeout = seconds("--idle-timeout", &v)?;
            }
            "--max-connections" => {
                let v = value("--max-connections")?;
                options.max_connections = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                        .ok_or_else(|| format!("--max-connections {v:?}: expected 1 to 1000000"))?,
                );
            }
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
        .with_env_filter(log_filter())
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
    let admin = match options.admin {
        Some(admin) => admin,
        None => Username::new(&format!("admin@{}.example", options.org_id))
            .map_err(|e| format!("default admin name: {e}"))?,
    };
    let password = match options.password {
        Some(password) => Some(password),
        None => match std::env::var("ORGKEY_ADMIN_PASSWORD") {
            Ok(from_env) => {
                let password = Password::new(from_env);
                password
                    .check_policy()
                    .map_err(|e| format!("ORGKEY_ADMIN_PASSWORD: {e}"))?;
                Some(password)
            }
            Err(_) => None,
        },
    };
    let bootstrap = app::Bootstrap {
        org: options.org_id.clone(),
        api_key: options.api_key,
        admin: admin.clone(),
        password,
        base_url: base_url.clone(),
        upstream: options.upstream.clone(),
    };
    let built = match &options.postgres {
        Some(url) => build_on_postgres(bootstrap, url).await?,
        None => {
            let store = SqliteStore::open(&options.state, KeyFormat::default()).map_err(|e| {
                format!(
                    "state file {}: {e}{}",
                    options.state.display(),
                    std::error::Error::source(&e)
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                )
            })?;
            tracing::info!(state = %options.state.display(), "state file opened");
            app::build(bootstrap, store).await?
        }
    };

    println!("base url: {base_url}");
    println!("org id: {}", options.org_id);
    match &built.new_key {
        Some(key) => println!("api key: {}", key.expose_secret()),
        None => eprintln!(
            "note: using the stored state; its key is not printed again (and --api-key, if \
             given, was ignored)"
        ),
    }
    println!("admin: {admin}");
    if let Some(password) = &built.generated_password {
        println!("admin password: {}", password.expose_secret());
    }
    let site = base_url
        .strip_suffix("/api/v1")
        .map_or_else(|| format!("http://{local}"), str::to_owned);
    println!("admin page: {site}/admin");

    tracing::info!(%local, "gateway listening");
    // Keep the change feed (PostgreSQL) running while serving.
    let _follower = built.gateway.follower;
    let limits = serve::Limits {
        header_read_timeout: options.header_read_timeout,
        body_read_timeout: options.body_read_timeout,
        idle_timeout: options.idle_timeout,
        max_connections: options
            .max_connections
            .unwrap_or_else(|| serve::default_max_connections(options.upstream.is_some())),
    };
    tracing::info!(
        header_read_timeout = ?limits.header_read_timeout,
        body_read_timeout = ?limits.body_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        max_connections = limits.max_connections,
        "limits"
    );
    serve::serve(listener, built.gateway.router, limits, shutdown_signal()).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// `RUST_LOG`, with info for every target it does not name unless it gives a bare level
/// itself. (`EnvFilter`'s default directive applies only when `RUST_LOG` is empty, so
/// `RUST_LOG=orgkey=debug` alone would silence the gateway's own info lines.)
fn log_filter() -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::filter::LevelFilter;
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&directives);
    let bare_level = directives
        .split(',')
        .map(str::trim)
        // ("" would parse as a level, ERROR.)
        .filter(|directive| !directive.is_empty())
        .any(|directive| directive.parse::<LevelFilter>().is_ok());
    if bare_level {
        filter
    } else {
        filter.add_directive(LevelFilter::INFO.into())
    }
}

#[cfg(feature = "postgres")]
async fn build_on_postgres(
    bootstrap: app::Bootstrap,
    url: &str,
) -> Result<app::Bootstrapped, String> {
    let store = orgkey::store::PostgresStore::connect(url, "orgkey", KeyFormat::default())
        .await
        .map_err(|e| format!("--postgres: {e}"))?;
    app::build(bootstrap, store).await
}

#[cfg(not(feature = "postgres"))]
async fn build_on_postgres(_: app::Bootstrap, _: &str) -> Result<app::Bootstrapped, String> {
    Err(
        "--postgres needs the postgres feature: cargo run --features postgres --example gateway"
            .into(),
    )
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
