//! The gateway's command line: flags, the first start's provisioning, and serving.
//!
//! On a first start (a state without the org) the gateway creates the org with an API
//! subscription (key: `--api-key` or random) and an admin with the `api` and `key-admin`
//! scopes (password: `--password`, else `ORGKEY_ADMIN_PASSWORD`, else random), and prints on
//! stdout `base url:`, `org id:`, `api key:`, `admin:`, `admin password:` (only when
//! generated) and `admin page:`. Later starts reuse the state and print no key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use super::forwarded::{ProxyRange, TrustedProxies};
use super::ops;
use super::serve::{self, Limits, Transport};
use super::tls::{PlainHttpLogin, SecureTransport, Tls};
use super::{Site, Upstream};
use crate::store::SqliteStore;
use crate::{Actor, ApiKey, KeyFormat, OrgId, OrgKey, Password, Scopes, Username};

/// orgkey gateway: an API protected by per-organization API keys and ZIA admin sessions.
///
/// On the first start (a new state) the gateway creates the org, its key and the admin, and
/// prints the key (and a generated password) once; later starts reuse the state, ignore
/// --api-key and --password, and print no secret. Send the key in X-API-Key with the org in
/// X-Org-Id:
///     curl -H 'X-Org-Id: acme' -H 'X-API-Key: <key>' http://127.0.0.1:8080/api/v1/whoami
/// or log in as the admin through POST /api/v1/authenticatedSession (see the README).
///
/// With --tls-cert and --tls-key it serves HTTPS (HTTP/2 or HTTP/1.1 by ALPN); SIGHUP reloads
/// both files. Over plain HTTP on a non-loopback address the login is refused (403
/// TLS_REQUIRED) unless --insecure-http, or a --trusted-proxy says X-Forwarded-Proto: https.
///
/// Logs go to stderr, at info by default. RUST_LOG changes the levels of the targets it names
/// (RUST_LOG=orgkey=debug shows every decision); the others stay at info unless it also gives
/// a bare level (RUST_LOG=warn,orgkey=debug). SECS may have a fraction (0.5); each is more
/// than 0 and at most 86400.
#[derive(Parser, Debug)]
#[allow(rustdoc::invalid_html_tags)] // the doc comments are the --help text, verbatim
#[command(name = "orgkey-gateway", version, verbatim_doc_comment)]
pub struct Options {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Id of the organization to create on the first start.
    #[arg(long = "org-id", value_name = "ID", default_value = "acme", value_parser = parse_org)]
    org_id: OrgId,
    /// The organization's key on the first start (12 ASCII letters/digits) [default: random].
    #[arg(long = "api-key", value_name = "KEY")]
    api_key: Option<String>,
    /// The admin to create, name@domain [default: admin@<org-id>.example].
    #[arg(long, value_name = "USER", value_parser = parse_username)]
    admin: Option<Username>,
    /// The admin's password (12+ characters) [default: $ORGKEY_ADMIN_PASSWORD, else random,
    /// printed once].
    #[arg(long, value_name = "PW")]
    password: Option<String>,
    /// Base URL to advertise; https:// makes the session cookie Secure
    /// [default: http://<listen>/api/v1, https://<listen>/api/v1 with --tls-cert].
    #[arg(long = "base-url", value_name = "URL")]
    base_url: Option<String>,
    /// The SQLite state file (created on first start; one gateway per file).
    #[arg(long, value_name = "PATH", default_value = "orgkey.db", global = true)]
    state: PathBuf,
    /// The master key file that seals the keys at rest (P4; owner-only; keep it apart from
    /// the state's backups). SIGHUP reads it again [default: <state>.master-key beside the
    /// SQLite state, created on its first start; --postgres needs one named: create it with
    /// `master-key create` and give every replica a copy].
    #[arg(
        long = "master-key-file",
        value_name = "PATH",
        env = "ORGKEY_MASTER_KEY_FILE",
        global = true
    )]
    master_key_file: Option<PathBuf>,
    /// Keep the state in PostgreSQL instead (schema "orgkey"; needs the `postgres` feature:
    /// cargo run --features postgres --example gateway).
    #[arg(long, value_name = "URL", global = true)]
    postgres: Option<String>,
    /// The PostgreSQL schema of the state; every replica of one fleet names the same one.
    #[arg(long, value_name = "NAME", default_value = "orgkey", global = true)]
    schema: String,
    /// With --postgres: strict (a change returns when every live replica applied it; a
    /// replica that loses its lease fails closed) or loose (a change returns when committed;
    /// other replicas follow within milliseconds). See the README's "Running a fleet".
    #[arg(long = "fleet-mode", value_name = "MODE", default_value = "strict", value_parser = ["strict", "loose"], global = true)]
    fleet_mode: String,
    /// With --postgres, strict mode: a replica's lease, counted from when its renewal was
    /// sent; a replica that has not renewed it for SECS fails closed, and writers stop
    /// waiting for it.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_seconds)]
    lease: Duration,
    /// With --postgres: how often the lease is renewed and the feed's heartbeat sent (at
    /// most half the lease; a stalled feed is detected within seven of these).
    #[arg(long = "lease-renewal", value_name = "SECS", default_value = "0.25", value_parser = parse_seconds)]
    lease_renewal: Duration,
    /// With --postgres, strict mode: how long a change waits for every live replica to
    /// confirm it before answering that it is committed but not confirmed by the replicas it
    /// names.
    #[arg(long = "fleet-wait", value_name = "SECS", default_value = "5", value_parser = parse_seconds, global = true)]
    fleet_wait: Duration,
    /// With --postgres: this replica's name in the fleet, as messages and the
    /// fleet_replicas table show it [default: <host name>:<process id>].
    #[arg(long = "replica-name", value_name = "NAME")]
    replica_name: Option<String>,
    /// Forward authenticated requests to URL (http://host:port or https://host:port, checked
    /// against the system's CA certificates or SSL_CERT_FILE), without orgkey's credentials,
    /// with x-orgkey-org, x-orgkey-admin and x-orgkey-auth set [default: the demo API answers].
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// With --upstream: the longest wait on the upstream (connecting, its answer once the
    /// request is sent, each pause in its answer) before 504 (or a cut answer).
    #[arg(long = "upstream-timeout", value_name = "SECS", default_value = "60", value_parser = parse_seconds)]
    upstream_timeout: Duration,
    /// Close a connection whose request head is not in SECS after it opened, or after the
    /// first byte of a further request on it.
    #[arg(long = "header-read-timeout", value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    header_read_timeout: Duration,
    /// A request body must arrive in full within SECS of its head, else 408 and the connection
    /// is closed; raise it for clients that upload large or slow bodies.
    #[arg(long = "body-read-timeout", value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    body_read_timeout: Duration,
    /// Close a keep-alive connection after SECS without a request.
    #[arg(long = "idle-timeout", value_name = "SECS", default_value = "60", value_parser = parse_seconds)]
    idle_timeout: Duration,
    /// Connections open at once; further clients wait until one closes [default: the
    /// open-file soft limit less a reserve (64, or a quarter of a limit under 256), halved with
    /// --upstream, at most 4096; 960 under the usual limit of 1024].
    #[arg(long = "max-connections", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: Option<u32>,
    /// Operator commands: who makes the change, as the audit log records it [default: the OS
    /// user].
    #[arg(long, value_name = "NAME", global = true)]
    operator: Option<String>,
    /// An operator command (G6); without one, the gateway serves. The command changes the
    /// state of --state (through the running gateway's control socket when one holds it) or
    /// of --postgres (every live replica has applied it when the command returns, strict
    /// mode).
    #[command(subcommand)]
    command: Option<ops::Command>,
    /// Serve HTTPS with this certificate chain (PEM: the server's certificate first, then
    /// its intermediates); needs --tls-key. HTTP/2 or HTTP/1.1 by ALPN. SIGHUP reloads both
    /// files; open connections keep theirs.
    #[arg(long = "tls-cert", value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1, unencrypted).
    #[arg(long = "tls-key", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept the ZIA login over plain HTTP on a non-loopback address (it shows characters
    /// of the key on the wire; by default it is refused there with 403 TLS_REQUIRED).
    #[arg(long = "insecure-http", conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// A load balancer or proxy in front of the gateway (CIDR such as 10.0.0.0/8, or one
    /// address; repeatable): only peers in these ranges may set X-Forwarded-For (the client
    /// address the login throttle counts) and X-Forwarded-Proto (https counts as TLS). From
    /// anyone else both are ignored.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_proxy_range)]
    trusted_proxy: Vec<ProxyRange>,
}

fn parse_proxy_range(value: &str) -> Result<ProxyRange, String> {
    value
        .parse()
        .map_err(|e: super::forwarded::ProxyRangeError| e.to_string())
}

fn parse_org(value: &str) -> Result<OrgId, String> {
    OrgId::new(value).map_err(|e| e.to_string())
}

fn parse_username(value: &str) -> Result<Username, String> {
    Username::new(value).map_err(|e| e.to_string())
}

/// A flag's value in seconds: a positive number, fractions allowed, at most a day.
fn parse_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "expected seconds, more than 0 and at most 86400".to_owned())
}

/// What the gateway was asked for, checked: the secrets parsed without ever echoing them.
struct Checked {
    options: Options,
    api_key: Option<ApiKey>,
    password: Option<Password>,
    upstream: Option<Upstream>,
}

/// Checks the flags that carry secrets (their errors never repeat the value).
fn check(mut options: Options) -> Result<Checked, String> {
    let api_key = options
        .api_key
        .take()
        .map(|key| {
            ApiKey::parse(&zeroize::Zeroizing::new(key)).map_err(|e| format!("--api-key: {e}"))
        })
        .transpose()?;
    let password = match options.password.take() {
        Some(password) => Some(checked_password(password, "--password")?),
        None => match std::env::var("ORGKEY_ADMIN_PASSWORD") {
            Ok(from_env) => Some(checked_password(from_env, "ORGKEY_ADMIN_PASSWORD")?),
            Err(_) => None,
        },
    };
    let upstream = options
        .upstream
        .as_deref()
        .map(|url| {
            // The upstream hears X-Forwarded-Proto https behind TLS, and a load balancer's
            // X-Forwarded-* only from the --trusted-proxy ranges (G1, G3).
            let trusted = TrustedProxies::new(options.trusted_proxy.iter().copied());
            let scheme = if options.tls_cert.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            };
            let headers = crate::http::proxy::ProxyHeaders::new()
                .client_scheme(scheme)
                .trust_forwarded_from(move |peer| trusted.contains(peer));
            Upstream::new(url)
                .map(|upstream| upstream.timeout(options.upstream_timeout).headers(headers))
                .map_err(|e| format!("--upstream {e}"))
        })
        .transpose()?;
    Ok(Checked {
        options,
        api_key,
        password,
        upstream,
    })
}

fn checked_password(password: String, source: &str) -> Result<Password, String> {
    let password = Password::new(password);
    password
        .check_policy()
        .map_err(|e| format!("{source}: {e}"))?;
    Ok(password)
}

/// Runs the gateway as `cargo run --example gateway` or `orgkey-gateway` do: parses the
/// command line, sets up logging, serves until Ctrl-C or SIGTERM. Exit code 2 for bad flags,
/// 1 when the gateway cannot start.
pub fn main() -> ExitCode {
    let options = match Options::try_parse() {
        Ok(options) => options,
        Err(error) => {
            // --help and --version print to stdout and succeed; errors exit 2. clap's errors
            // may quote a value: the secret-carrying flags are plain strings here, checked
            // below with messages that never repeat them.
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(log_filter(if options.command.is_some() {
            // An operator command prints its result; its log says only what went wrong.
            tracing_subscriber::filter::LevelFilter::WARN
        } else {
            tracing_subscriber::filter::LevelFilter::INFO
        }))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(command) = options.command.clone() {
        return match runtime.block_on(operate(&options, command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let checked = match check(options) {
        Ok(checked) => checked,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(checked)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG`, with info for every target it does not name unless it gives a bare level
/// itself. (`EnvFilter`'s default directive applies only when `RUST_LOG` is empty, so
/// `RUST_LOG=orgkey=debug` alone would silence the gateway's own info lines.)
fn log_filter(default: tracing_subscriber::filter::LevelFilter) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::filter::LevelFilter;
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&directives);
    let bare_level = directives
        .split(',')
        .map(str::trim)
        // ("" would parse as a level, ERROR.)
        .filter(|directive| !directive.is_empty())
        .any(|directive| directive.parse::<LevelFilter>().is_ok());
    let mut filter = if bare_level {
        filter
    } else {
        filter.add_directive(default.into())
    };
    // Operator commands log warnings only, but their audit records always (G6).
    if default == LevelFilter::WARN && !directives.contains("orgkey::audit") {
        if let Ok(audit) = "orgkey::audit=info".parse() {
            filter = filter.add_directive(audit);
        }
    }
    // The decision spans (O1, target `orgkey::span`) are for tracing backends; a log on
    // stderr does not need them, and they cost throughput. RUST_LOG=orgkey::span=info (or a
    // level for it) turns them on.
    match "orgkey::span=off".parse() {
        Ok(off) if !directives.contains("orgkey::span") => filter.add_directive(off),
        _ => filter,
    }
}

/// What a first start created, to print once.
struct Provisioned {
    new_key: Option<ApiKey>,
    generated_password: Option<Password>,
}

async fn run(checked: Checked) -> Result<(), String> {
    let Checked {
        options,
        api_key,
        password,
        upstream,
    } = checked;
    let tls = match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::load(cert, key).map_err(|e| super::causes(&e))?),
        // clap requires both or neither.
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = options
        .base_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}/api/v1"));
    let admin = match options.admin.clone() {
        Some(admin) => admin,
        None => Username::new(&format!("admin@{}.example", options.org_id))
            .map_err(|e| format!("default admin name: {e}"))?,
    };
    let builder = OrgKey::builder(&base_url).map_err(|e| format!("--base-url: {e}"))?;
    let (master_file, master, created) = master_keys(&options)?;
    let mut sqlite = None;
    let orgkey = match &options.postgres {
        Some(url) => builder.open(postgres(url, &options, master).await?).await,
        None => {
            let store = SqliteStore::open(&options.state, KeyFormat::default(), master)
                .map_err(|e| state_error(&options, &e))?;
            tracing::info!(state = %options.state.display(), "state file opened");
            sqlite = Some(store.clone());
            builder.open(store).await
        }
    }
    .map_err(|e| format!("state: {}", super::causes(&e)))?;
    if created {
        eprintln!(
            "note: created the master key file {} (owner-only): it seals the keys in {}; \
             without it they cannot be read. Keep it apart from the state's backups.",
            master_file.display(),
            options.state.display()
        );
    }
    let provisioned = provision(&orgkey, &options.org_id, api_key, &admin, password).await?;
    let handles = ops::Handles {
        keys: orgkey.keys().clone(),
        admins: orgkey.admins().clone(),
        master_file: master_file.clone(),
        sqlite,
    };
    // P5: this process owns the SQLite file; operator commands come through it (G6).
    let control = match &options.postgres {
        Some(_) => None,
        None => {
            let socket = ops::socket_path(&options.state);
            let task = ops::listen(socket.clone(), handles.clone())?;
            Some((socket, task))
        }
    };
    #[cfg(unix)]
    reload_master_keys_on_hangup(handles)
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    // Before anything is printed: from here on SIGHUP reloads instead of ending the process.
    #[cfg(unix)]
    if let Some(tls) = &tls {
        tls.reload_on_hangup()
            .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    }

    println!("base url: {base_url}");
    println!("org id: {}", options.org_id);
    match &provisioned.new_key {
        Some(key) => println!("api key: {}", key.expose_secret()),
        None => eprintln!(
            "note: using the stored state; its key is not printed again (and --api-key, if \
             given, was ignored)"
        ),
    }
    println!("admin: {admin}");
    if let Some(password) = &provisioned.generated_password {
        println!("admin password: {}", password.expose_secret());
    }
    let site = base_url
        .strip_suffix("/api/v1")
        .map_or_else(|| format!("{scheme}://{local}"), str::to_owned);
    println!("admin page: {site}/admin");

    let limits = Limits {
        header_read_timeout: options.header_read_timeout,
        body_read_timeout: options.body_read_timeout,
        idle_timeout: options.idle_timeout,
        max_connections: options.max_connections.map_or_else(
            || serve::default_max_connections(upstream.is_some()),
            |n| n as usize,
        ),
    };
    tracing::info!(
        header_read_timeout = ?limits.header_read_timeout,
        body_read_timeout = ?limits.body_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        max_connections = limits.max_connections,
        "limits"
    );
    let plain_login = plain_http_login(&options);
    log_transport(tls.as_ref(), &options, plain_login);
    tracing::info!(%local, "gateway listening");
    let transport = Transport {
        tls,
        trusted_proxies: TrustedProxies::new(options.trusted_proxy.iter().copied()),
    };
    let site = SecureTransport::new(
        Site::new(&orgkey, upstream),
        api_path(&base_url),
        plain_login,
    );
    serve::serve_with(listener, site, limits, transport, shutdown_signal()).await;
    if let Some((socket, task)) = control {
        task.abort();
        let _ = std::fs::remove_file(socket);
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Runs an operator command (G6) against the state the flags name; see [`ops`].
async fn operate(options: &Options, command: ops::Command) -> Result<(), String> {
    use crate::store::{Store, StoreError};
    use std::sync::Arc;
    if let ops::Command::MasterKey(ops::MasterKeyCommand::Create) = command {
        let (file, _) = master_key_path(options)?;
        let master = crate::MasterKeys::create(&file).map_err(|e| e.to_string())?;
        println!("master key file: {}", file.display());
        println!("seals: {}", master.current());
        return Ok(());
    }
    // A running gateway writes the backup: a relative path means the operator's directory,
    // not the gateway's.
    let command = match command {
        ops::Command::Backup { path } => ops::Command::Backup {
            path: std::path::absolute(&path)
                .map_err(|e| format!("backup {}: {e}", path.display()))?,
        },
        other => other,
    };
    let request = ops::Request::new(command, options.operator.clone())?;
    let mut sqlite = None;
    let (master_file, store): (PathBuf, Arc<dyn Store>) = match &options.postgres {
        Some(url) => {
            let (file, master) = existing_master_keys(options)?;
            (file, Arc::new(postgres(url, options, master).await?))
        }
        None => {
            if !options.state.exists() {
                return Err(format!(
                    "no state file at {} (start the gateway once to create it, or name it \
                     with --state)",
                    options.state.display()
                ));
            }
            let (file, master) = existing_master_keys(options)?;
            match SqliteStore::open(&options.state, KeyFormat::default(), master) {
                Ok(store) => {
                    sqlite = Some(store.clone());
                    (file, Arc::new(store))
                }
                // P5: a gateway holds the file; it runs the command itself.
                Err(StoreError::InUse { .. }) => {
                    let socket = ops::socket_path(&options.state);
                    return ops::print(ops::send(&socket, &request).await);
                }
                Err(e) => return Err(state_error(options, &e)),
            }
        }
    };
    if let ops::Command::Restore { path } = &request.command() {
        return restore(options, sqlite, &store, path.as_deref()).await;
    }
    let keys = crate::KeyAdmin::open(crate::OrgTable::default(), Arc::clone(&store))
        .await
        .map_err(|e| format!("state: {e}"))?;
    let admins = crate::Admins::open(keys.table().clone(), store)
        .await
        .map_err(|e| format!("state: {e}"))?;
    let handles = ops::Handles {
        keys,
        admins,
        master_file,
        sqlite,
    };
    ops::print(ops::execute(&request, &handles).await)
}

/// `restore PATH` on a SQLite state no gateway holds, or `restore` on a PostgreSQL schema
/// after `pg_restore` (P4).
async fn restore(
    options: &Options,
    sqlite: Option<SqliteStore>,
    store: &std::sync::Arc<dyn crate::store::Store>,
    path: Option<&Path>,
) -> Result<(), String> {
    let operator = ops::operator(options.operator.clone())?;
    let (restored, from) = match (sqlite, path) {
        (Some(sqlite), Some(path)) => (
            sqlite
                .restore(path, operator.clone())
                .await
                .map_err(|e| format!("restore {}: {}", path.display(), super::causes(&e)))?,
            path.display().to_string(),
        ),
        (Some(_), None) => {
            return Err("restore needs the backup: orgkey-gateway restore PATH".to_owned())
        }
        (None, Some(_)) => {
            return Err(
                "on PostgreSQL, restore a pg_dump with pg_restore (every replica stopped), \
                 then run `orgkey-gateway --postgres URL restore` without a PATH (see the \
                 README)"
                    .to_owned(),
            )
        }
        (None, None) => (
            store
                .restored(&operator)
                .await
                .map_err(|e| format!("restore: {}", super::causes(&e)))?,
            format!("schema {}", options.schema),
        ),
    };
    tracing::info!(
        target: "orgkey::audit",
        actor = %operator,
        action = "restore",
        from = %from,
        orgs = restored,
        "state restored from a backup by an operator"
    );
    match path {
        Some(path) => println!(
            "restored: {} from {}",
            options.state.display(),
            path.display()
        ),
        None => println!("restored: {from}"),
    }
    println!("orgs: {restored} (each audited as restore by {operator})");
    println!("sessions: all ended");
    Ok(())
}

/// The master key file the flags name: `--master-key-file` / `ORGKEY_MASTER_KEY_FILE`, else
/// (SQLite) `<state>.master-key`; and whether it was named.
fn master_key_path(options: &Options) -> Result<(PathBuf, bool), String> {
    match (&options.master_key_file, &options.postgres) {
        (Some(file), _) => Ok((file.clone(), true)),
        (None, Some(_)) => Err(
            "--postgres needs --master-key-file PATH (or ORGKEY_MASTER_KEY_FILE): create one \
             with `orgkey-gateway --master-key-file PATH master-key create` and give every \
             replica a copy"
                .to_owned(),
        ),
        (None, None) => {
            let mut path = options.state.as_os_str().to_owned();
            path.push(".master-key");
            Ok((PathBuf::from(path), false))
        }
    }
}

/// The master keys of an existing state (operator commands): the file must exist.
fn existing_master_keys(options: &Options) -> Result<(PathBuf, crate::MasterKeys), String> {
    let (file, named) = master_key_path(options)?;
    match crate::MasterKeys::load(&file) {
        Ok(master) => Ok((file, master)),
        Err(crate::MasterKeyError::Missing(_)) if !named => Err(format!(
            "master key file {} does not exist: name the state's with --master-key-file",
            file.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The master keys to serve with (P4), the file, and whether this start created it: the
/// named file, which must exist; else the one beside the SQLite state, created on the first
/// start (a state that holds no sealed key yet). A missing or unreadable file stops the start
/// before anything is served or changed.
fn master_keys(options: &Options) -> Result<(PathBuf, crate::MasterKeys, bool), String> {
    let (file, named) = master_key_path(options)?;
    match crate::MasterKeys::load(&file) {
        Ok(master) => Ok((file, master, false)),
        Err(crate::MasterKeyError::Missing(_)) if named => Err(format!(
            "master key file {} does not exist (--master-key-file or ORGKEY_MASTER_KEY_FILE); \
             nothing was served or changed. Give the state's file, or create a new one for a \
             new state with `orgkey-gateway --master-key-file {} master-key create`",
            file.display(),
            file.display()
        )),
        Err(crate::MasterKeyError::Missing(_)) => {
            let sealed = SqliteStore::holds_sealed_keys(&options.state)
                .map_err(|e| state_error(options, &e))?;
            if sealed {
                return Err(format!(
                    "state file {} holds sealed keys, but its master key file {} does not \
                     exist: name the right one with --master-key-file (or \
                     ORGKEY_MASTER_KEY_FILE); nothing was served or changed",
                    options.state.display(),
                    file.display()
                ));
            }
            let master = crate::MasterKeys::create(&file).map_err(|e| e.to_string())?;
            Ok((file, master, true))
        }
        Err(e) => Err(format!("{e}; nothing was served or changed")),
    }
}

/// The message for a state that cannot be opened, with its cause.
fn state_error(options: &Options, e: &crate::store::StoreError) -> String {
    format!(
        "state file {}: {}; nothing was served or changed",
        options.state.display(),
        super::causes(e)
    )
}

/// On `SIGHUP`, reads the master key file again and hands it to the store, which takes it
/// only if it opens every stored key (P4; a rotation's keys reach a running replica so).
#[cfg(unix)]
fn reload_master_keys_on_hangup(handles: ops::Handles) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let file = &handles.master_file;
            let reloaded = match crate::MasterKeys::load(file) {
                Ok(master) => {
                    let current = master.current();
                    match handles.keys.store() {
                        Some(store) => store.set_master_keys(master).await.map(|()| current),
                        None => Ok(current),
                    }
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "master key file not taken; the previous keys stay in use");
                    continue;
                }
            };
            match reloaded {
                Ok(current) => tracing::info!(
                    file = %file.display(),
                    seals = %current,
                    "master key file read again"
                ),
                // PostgreSQL: the keys were taken, but the fleet could not switch to the
                // file's first key (some replica lacks it).
                Err(error @ crate::store::StoreError::MasterKeyNotShared { .. }) => {
                    tracing::error!(
                        file = %file.display(),
                        %error,
                        "master key file read again and taken; the fleet did not switch to its first key"
                    )
                }
                Err(error) => tracing::error!(
                    file = %file.display(),
                    %error,
                    "master key file not taken; the previous keys stay in use"
                ),
            }
        }
    });
    Ok(())
}

/// Whether the login may be used over plain HTTP: on a loopback listen address, or with
/// `--insecure-http`. The listen address decides, not the client's: a gateway on `0.0.0.0`
/// refuses a plain login even to a client that connects through 127.0.0.1.
fn plain_http_login(options: &Options) -> PlainHttpLogin {
    if options.insecure_http || options.listen.ip().to_canonical().is_loopback() {
        PlainHttpLogin::Allowed
    } else {
        PlainHttpLogin::Refused
    }
}

/// The path part of a base URL (`https://gw.example/api/v1` -> `/api/v1`).
fn api_path(base_url: &str) -> &str {
    let after_scheme = base_url
        .split_once("://")
        .map_or(base_url, |(_, rest)| rest);
    after_scheme.find('/').map_or("", |at| &after_scheme[at..])
}

/// Says on stderr how clients reach the gateway: TLS or not, the login's policy, the
/// trusted proxies.
fn log_transport(tls: Option<&Tls>, options: &Options, plain_login: PlainHttpLogin) {
    match tls {
        Some(tls) => tracing::info!(
            certificate = %tls.certificate_path().display(),
            key = %tls.key_path().display(),
            fingerprint = %tls.fingerprint(),
            "TLS on (HTTP/2 or HTTP/1.1 by ALPN); SIGHUP reloads the certificate and key"
        ),
        None if options.insecure_http => tracing::warn!(
            "--insecure-http: the login is accepted over plain HTTP, where it shows characters \
             of the API key to anyone on the path"
        ),
        None if plain_login == PlainHttpLogin::Refused => tracing::info!(
            "plain HTTP on a non-loopback address: the login is refused (403 TLS_REQUIRED) \
             unless a trusted proxy says X-Forwarded-Proto: https; see --tls-cert, \
             --trusted-proxy, --insecure-http"
        ),
        None => tracing::info!("plain HTTP on a loopback address: the login is accepted"),
    }
    for range in &options.trusted_proxy {
        if range.is_everything() {
            tracing::warn!(
                %range,
                "--trusted-proxy {range} trusts every peer: any client can choose its address \
                 for the login throttle and claim https"
            );
        }
    }
    if !options.trusted_proxy.is_empty() {
        let ranges: Vec<String> = options
            .trusted_proxy
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            ranges = %ranges.join(", "),
            "trusted proxies: X-Forwarded-For and X-Forwarded-Proto are read from these peers only"
        );
    }
}

/// On a first start (the org is not in the store), creates the org, its subscription and
/// key, and the admin with both scopes; later starts create nothing but a missing admin.
async fn provision(
    orgkey: &OrgKey,
    org: &OrgId,
    api_key: Option<ApiKey>,
    admin: &Username,
    password: Option<Password>,
) -> Result<Provisioned, String> {
    let keys = orgkey.keys();
    let mut new_key = None;
    // Replicas starting together on an empty schema race here: the one whose create wins
    // provisions; the others use what it made.
    let created = match keys.table().state(org.as_str()) {
        Some(_) => false,
        None => match keys.create_org(org).await {
            Ok(()) => true,
            Err(crate::KeyError::OrgExists) => {
                // Another replica's: this one's feed brings it (at once in strict mode).
                let waited = tokio::time::Instant::now();
                while keys.table().state(org.as_str()).is_none() {
                    if waited.elapsed() > std::time::Duration::from_secs(10) {
                        return Err(format!("org {org} exists in the store but never arrived"));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                false
            }
            Err(e) => return Err(e.to_string()),
        },
    };
    if created {
        let provisioning = Actor::new("provisioning").map_err(|e| e.to_string())?;
        let mut info = keys
            .subscribe(org, &provisioning)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(key) = api_key {
            info = keys
                .edit(org, key, &provisioning)
                .await
                .map_err(|e| e.to_string())?;
        }
        new_key = Some(info.key().ok_or("the org has no key")?.clone());
    }
    let mut generated_password = None;
    if orgkey.admins().get(admin).is_none() {
        let password = match password {
            Some(password) => password,
            None => {
                let password = Password::generate(20).map_err(|e| e.to_string())?;
                generated_password = Some(password.clone());
                password
            }
        };
        match orgkey
            .admins()
            .create(admin, org, &password, Scopes::ALL)
            .await
        {
            Ok(()) => {}
            // Another replica created it first: its password stands, this one is not shown.
            Err(crate::AccountError::AdminExists) => generated_password = None,
            Err(e) => return Err(format!("admin: {e}")),
        }
    }
    Ok(Provisioned {
        new_key,
        generated_password,
    })
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    options: &Options,
    master: crate::MasterKeys,
) -> Result<impl crate::store::Store, String> {
    use crate::store::{FleetConfig, FleetMode, PostgresStore};
    let mut fleet = FleetConfig {
        mode: if options.fleet_mode == "loose" {
            FleetMode::Loose
        } else {
            FleetMode::Strict
        },
        lease: options.lease,
        renewal: options.lease_renewal,
        wait: options.fleet_wait,
        ..FleetConfig::default()
    };
    if let Some(name) = &options.replica_name {
        fleet.name.clone_from(name);
    }
    tracing::info!(
        schema = %options.schema,
        replica = %fleet.name,
        mode = ?fleet.mode,
        lease = ?fleet.lease,
        renewal = ?fleet.renewal,
        wait = ?fleet.wait,
        "fleet"
    );
    PostgresStore::connect_with(url, &options.schema, KeyFormat::default(), fleet, master)
        .await
        .map_err(|e| format!("--postgres: {}", super::causes(&e)))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: &str, _: &Options, _: crate::MasterKeys) -> Result<SqliteStore, String> {
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
