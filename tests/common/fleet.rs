//! A fleet of real gateway processes (`orgkey-gateway --postgres`) on one PostgreSQL schema,
//! spoken to over raw HTTP/1.1 (optionally from a chosen loopback source address), plus what
//! the fleet test (`tests/fleet.rs`, issue 11) needs around it: a rotation driver, stale-accept
//! checkers, a private PostgreSQL cluster it may stop, and the figures it prints.
//!
//! Every network call has a timeout and every process and cluster started here is stopped when
//! its owner is dropped, also while a test panics, so a broken gateway fails a test instead of
//! hanging the run.

use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{KEY, PASSWORD};

/// The org the first replica provisions (key [`KEY`], admin [`ADMIN`] with [`PASSWORD`]).
pub const ORG: &str = "acme";
/// The admin the first replica provisions.
pub const ADMIN: &str = "admin@acme.example";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read and write timeout of every HTTP exchange: a regenerate waits at most the fleet's wait
/// bound (5 s by default), so this never cuts a legitimate answer short.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a replica may take to print its `base url:` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// One HTTP response: the status, the head (status line and headers) and the body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The values of every header called `name` (any case).
    pub fn headers<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.to_owned();
        self.head.lines().skip(1).filter_map(move |line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(&name).then(|| value.trim())
        })
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers(name).next()
    }

    /// The (non-empty) JSESSIONID this response sets, if any.
    pub fn session(&self) -> Option<String> {
        self.headers("set-cookie").find_map(|cookie| {
            let value = cookie.strip_prefix("JSESSIONID=")?.split(';').next()?;
            (!value.is_empty()).then(|| value.to_owned())
        })
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether this is a 503 with an integer `Retry-After` (how a replica fails closed, F3).
    pub fn is_fail_closed(&self) -> bool {
        self.status == 503
            && self
                .header("retry-after")
                .is_some_and(|v| v.parse::<u64>().is_ok())
    }

    /// `status body` for messages.
    pub fn brief(&self) -> String {
        format!(
            "{} {}",
            self.status,
            self.body.chars().take(200).collect::<String>()
        )
    }
}

/// A TCP connection to `addr`, from `from` (a loopback address such as 127.0.0.2) when given.
/// The gateway takes the client address from the accepted socket (`ClientAddr`), so this is
/// how a test plays several clients. `std` cannot bind before connecting, tokio's `TcpSocket`
/// can; the connected socket is then used blocking.
fn connect(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match from {
        None => TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?,
        Some(from) => {
            thread_local! {
                static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
            }
            let stream = RUNTIME.with(|runtime| {
                runtime.block_on(async {
                    let socket = match from {
                        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                    };
                    socket.bind(SocketAddr::new(from, 0))?;
                    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect"))??;
                    stream.into_std()
                })
            })?;
            stream.set_nonblocking(false)?;
            stream
        }
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn write_request(
    stream: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    close: bool,
) -> io::Result<()> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        body.len()
    );
    if close {
        request.push_str("connection: close\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())
}

/// Reads one response; the flag says whether the connection may carry another request.
fn read_reply(reader: &mut BufReader<TcpStream>) -> io::Result<(Reply, bool)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {head:?}"),
            ));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut reply = Reply {
        status,
        head: head.trim_end().to_owned(),
        body: String::new(),
    };
    let length = match reply.header("content-length") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| bad("content-length"))?),
        None => None,
    };
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None if reply
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked")) =>
        {
            return Err(bad("chunked responses are not expected from the gateway"));
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    reply.body = String::from_utf8_lossy(&body).into_owned();
    let keep = length.is_some()
        && !reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok((reply, keep))
}

/// One exchange on a fresh connection (`connection: close`), from `from` when given.
pub fn request(
    addr: SocketAddr,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Reply> {
    let mut stream = connect(addr, from)?;
    write_request(&mut stream, addr, method, path, headers, body, true)?;
    read_reply(&mut BufReader::new(stream)).map(|(reply, _)| reply)
}

/// A keep-alive client for one replica, for the checkers that send thousands of requests (a
/// fresh connection each would run the loopback out of ports). Only for requests that may be
/// sent twice: a request that fails on a reused connection is sent again on a new one.
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> io::Result<Reply> {
        let reused = self.conn.is_some();
        match self.try_get(path, headers) {
            Err(_) if reused => self.try_get(path, headers),
            answer => answer,
        }
    }

    fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> io::Result<Reply> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => BufReader::new(connect(self.addr, None)?),
        };
        write_request(conn.get_mut(), self.addr, "GET", path, headers, "", false)?;
        let (reply, keep) = read_reply(&mut conn)?;
        if keep {
            self.conn = Some(conn);
        }
        Ok(reply)
    }

    /// `GET /api/v1/whoami` with the org and `key`.
    pub fn whoami_key(&mut self, key: &str) -> io::Result<Reply> {
        self.get("/api/v1/whoami", &key_headers(key))
    }
}

fn key_headers(key: &str) -> [(&str, &str); 2] {
    [("x-org-id", ORG), ("x-api-key", key)]
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `GET /api/v1/whoami` with the org and `key` (direct key mode).
pub fn whoami_key(addr: SocketAddr, key: &str) -> io::Result<Reply> {
    request(addr, None, "GET", "/api/v1/whoami", &key_headers(key), "")
}

/// `method path` with a session cookie.
fn with_session(addr: SocketAddr, method: &str, path: &str, session: &str) -> io::Result<Reply> {
    let cookie = format!("JSESSIONID={session}");
    request(addr, None, method, path, &[("cookie", &cookie)], "")
}

/// `GET /api/v1/whoami` with a session cookie.
pub fn whoami_session(addr: SocketAddr, session: &str) -> io::Result<Reply> {
    with_session(addr, "GET", "/api/v1/whoami", session)
}

/// `GET /api/v1/authenticatedSession` (the session probe) with a session cookie.
pub fn probe_session(addr: SocketAddr, session: &str) -> io::Result<Reply> {
    with_session(addr, "GET", "/api/v1/authenticatedSession", session)
}

/// Logout (`DELETE /api/v1/authenticatedSession`).
pub fn logout(addr: SocketAddr, session: &str) -> io::Result<Reply> {
    with_session(addr, "DELETE", "/api/v1/authenticatedSession", session)
}

/// `POST /api/v1/apiKeys/1/regenerate` with a session cookie.
pub fn regenerate(addr: SocketAddr, session: &str) -> io::Result<Reply> {
    with_session(addr, "POST", "/api/v1/apiKeys/1/regenerate", session)
}

/// The ZIA login (`POST /api/v1/authenticatedSession`) with the key obfuscated for now, from
/// `from` when given.
pub fn login(
    addr: SocketAddr,
    from: Option<IpAddr>,
    key: &str,
    username: &str,
    password: &str,
) -> io::Result<Reply> {
    let body = super::login_body(username, password, key, now_ms());
    request(
        addr,
        from,
        "POST",
        "/api/v1/authenticatedSession",
        &[("content-type", "application/json")],
        &body,
    )
}

// ---------------------------------------------------------------------------------------------
// Gateway processes
// ---------------------------------------------------------------------------------------------

/// One `orgkey-gateway` process, killed (SIGKILL) when dropped. Its stderr goes to a file
/// (shown when a test fails, removed otherwise).
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Replica {
    /// SIGKILL (as `kill -9`), and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- replica {} ({}), last lines of its stderr ({}):\n{}",
                self.name,
                self.addr,
                self.log.display(),
                tail(&self.log, 25)
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Gateway replicas on one PostgreSQL schema, in the fleet mode the flags give. The replicas
/// are called `<tag>-a`, `<tag>-b`, ... with a random tag, so that their connections
/// (`application_name` `orgkey-follow:<name>` and `orgkey:<name>`) are told apart from those of
/// fleets other tests run on the same server at the same time.
pub struct Fleet {
    pub url: String,
    pub schema: String,
    extra: Vec<String>,
    pub replicas: Vec<Replica>,
    /// The master key file every replica (and operator command) opens the schema with (P4).
    pub master_key: MasterKeyFile,
}

/// A master key file in the temporary directory, deleted when dropped.
pub struct MasterKeyFile(pub PathBuf);

impl MasterKeyFile {
    pub fn create() -> Self {
        let path = std::env::temp_dir().join(format!("orgkey-fleet-{}.key", random_hex(8)));
        orgkey::MasterKeys::create(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for MasterKeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Fleet {
    /// Starts `n` replicas with `extra` flags: the first on the empty schema (it provisions
    /// [`ORG`] with [`KEY`] and [`ADMIN`] with [`PASSWORD`]), the others once it serves.
    pub fn start(url: &str, schema: &str, n: usize, extra: &[&str]) -> Self {
        let tag = format!("fleet-{}", random_hex(5));
        let mut fleet = Self {
            url: url.to_owned(),
            schema: schema.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            replicas: Vec::new(),
            master_key: MasterKeyFile::create(),
        };
        for i in 0..n {
            let name = format!("{tag}-{}", char::from(b'a' + i as u8));
            let replica = fleet.spawn(&name);
            fleet.replicas.push(replica);
        }
        fleet
    }

    fn spawn(&self, name: &str) -> Replica {
        let log = std::env::temp_dir().join(format!("orgkey-{name}-{}.log", random_hex(4)));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
            .args(["--listen", "127.0.0.1:0", "--postgres", &self.url])
            .args(["--schema", &self.schema, "--replica-name", name])
            .args(["--master-key-file", self.master_key.path()])
            .args(["--api-key", KEY, "--org-id", ORG])
            .args(&self.extra)
            .env("ORGKEY_ADMIN_PASSWORD", PASSWORD)
            // Not a line per request (orgkey::auth at info): the checkers send hundreds of
            // thousands. RUST_LOG, when set, wins.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,orgkey::auth=warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // Read on a thread (and keep draining the pipe), so a replica that never serves fails
        // the test within START_TIMEOUT instead of hanging it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(base) = line.strip_prefix("base url: http://") {
                        sent = tx.send(base.to_owned()).is_ok();
                    }
                }
            }
        });
        let base = rx.recv_timeout(START_TIMEOUT);
        let addr = base.as_deref().ok().and_then(|base| {
            base.strip_suffix("/api/v1")
                .and_then(|addr| addr.parse::<SocketAddr>().ok())
        });
        match addr {
            Some(addr) => Replica {
                name: name.to_owned(),
                addr,
                child,
                log,
            },
            None => {
                let exited = match child.try_wait() {
                    Ok(Some(status)) => format!("it exited ({status})"),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        format!("it printed no base url line within {START_TIMEOUT:?} ({base:?})")
                    }
                };
                let stderr = tail(&log, 25);
                let _ = std::fs::remove_file(&log);
                panic!("replica {name} did not start: {exited}; its stderr:\n{stderr}");
            }
        }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].addr
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.addr).collect()
    }

    /// Kills replica `i` with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        self.replicas[i].kill9();
    }

    /// Starts replica `i` again under the same name (on a new port), on the stored state.
    pub fn restart(&mut self, i: usize) {
        self.replicas[i].kill9();
        let name = self.replicas[i].name.clone();
        self.replicas[i] = self.spawn(&name);
    }

    /// The pid of replica `i`'s change-feed backend, once exactly one backend has its
    /// `application_name` (`orgkey-follow:<name>`), waiting at most `within`.
    pub fn feed_pid(&self, i: usize, within: Duration) -> Result<i32, String> {
        let app = format!("orgkey-follow:{}", self.replicas[i].name);
        let deadline = Instant::now() + within;
        loop {
            let pids = backend_pids(&self.url, &app)?;
            if let [pid] = pids[..] {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                let names = application_names(&self.url).unwrap_or_default();
                return Err(format!(
                    "{} backends with application_name {app:?} (the server has: {names:?})",
                    pids.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL from the outside: backends, signals, a private cluster
// ---------------------------------------------------------------------------------------------

/// Runs `f` with a connection to `url`, within 10 seconds, on a runtime of its own.
fn with_client<T>(
    url: &str,
    f: impl for<'c> FnOnce(
        &'c tokio_postgres::Client,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + 'c>,
    >,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let work = async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            f(&client).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
    })
}

/// The pids of the backends whose `application_name` is `app`.
pub fn backend_pids(url: &str, app: &str) -> Result<Vec<i32>, String> {
    let app = app.to_owned();
    with_client(url, move |client| {
        Box::pin(async move {
            let rows = client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    })
}

/// Every `application_name` the server has a backend for (for messages).
pub fn application_names(url: &str) -> Result<Vec<String>, String> {
    with_client(url, |client| {
        Box::pin(async move {
            let rows = client
                .query(
                    "SELECT application_name FROM pg_stat_activity \
                     WHERE application_name <> '' ORDER BY 1",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    })
}

/// `pg_terminate_backend(pid)`: whether the server says it signalled it.
pub fn terminate_backend(url: &str, pid: i32) -> Result<bool, String> {
    with_client(url, move |client| {
        Box::pin(async move {
            let row = client
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            Ok(row.get(0))
        })
    })
}

fn signal(which: &str, pid: i32) -> bool {
    Command::new("kill")
        .args([which, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when dropped, also on panic.
pub struct Stopped(i32);

impl Stopped {
    /// `None` if this process may not signal `pid` (not root, not its owner).
    pub fn new(pid: i32) -> Option<Self> {
        signal("-STOP", pid).then_some(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

/// A PostgreSQL cluster of this test's own (initdb in a temporary folder, a free loopback
/// port, trust authentication), which a test may stop and start again without disturbing the
/// shared server other tests use. Stopped and deleted when dropped, also on panic.
pub struct PrivateCluster {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    as_root: bool,
}

impl PrivateCluster {
    /// Creates and starts the cluster, or says why it cannot (no server binaries under
    /// /usr/lib/postgresql, root without `runuser` or a `postgres` user, initdb failing, ...).
    pub fn start() -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;
        let bin = server_binaries()
            .ok_or("no PostgreSQL server binaries in /usr/lib/postgresql/<version>/bin")?;
        let as_root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        if as_root {
            // initdb and pg_ctl refuse root: run them as the postgres user.
            let usable = Command::new("runuser")
                .args(["-u", "postgres", "--", "true"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !usable {
                return Err(
                    "this test runs as root, and `runuser -u postgres` does not work \
                            (initdb refuses root)"
                        .to_owned(),
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("orgkey-fleet-pg-{}", random_hex(6)));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        // From here on, Drop cleans up.
        let cluster = Self {
            port,
            bin,
            dir,
            as_root,
        };
        if as_root {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres", cluster.dir.to_str().unwrap()]);
            run(chown)?;
        }
        let data = cluster.data();
        run(cluster.command(
            "initdb",
            &[
                "-D",
                &data,
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        ))?;
        cluster.restart()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut command = if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.args(args).current_dir(&self.dir);
        command
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (on the same port) and waits until it accepts connections.
    pub fn restart(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log");
        run(self.command(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        ))
        .map_err(|e| format!("{e}; server log:\n{}", tail(&log, 15)))
    }

    /// Stops the server (`pg_ctl -m fast stop`: sessions are ended, as in a clean shutdown).
    pub fn stop(&self) -> Result<(), String> {
        run(self.command(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "30", "stop"],
        ))
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let stopped = run(self.command(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-t", "10", "stop"],
        ));
        if stopped.is_err() {
            // Not running, or stuck: make sure no postmaster outlives the test.
            let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                signal("-CONT", pid);
                signal("-KILL", pid);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` and `pg_ctl`.
fn server_binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn run(mut command: Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotations and the stale-accept checkers
// ---------------------------------------------------------------------------------------------

/// Regenerates the key through any replica, as an admin client would: one session, carried
/// over by each regenerate (W2) and used on whichever replica the next call goes to (S3).
pub struct Rotator {
    /// The key the last regenerate returned (first: [`KEY`]).
    pub key: String,
    /// Every key a regenerate retired, oldest first.
    pub retired: Vec<String>,
    session: Option<String>,
    /// How often a replica refused the carried session (401) and the rotator logged in there
    /// again: with sessions fleet-wide this stays 0.
    pub relogins: usize,
    /// How often a login or regenerate was refused with 503 (failing closed) and sent again.
    pub retries: usize,
}

impl Rotator {
    pub fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            retired: Vec::new(),
            session: None,
            relogins: 0,
            retries: 0,
        }
    }

    /// One regenerate through `addr`; the time the call took. If that replica refuses the
    /// session (401), the rotator logs in there and tries once more (counted in `relogins`).
    /// A replica failing closed (503 + `Retry-After`: nothing was changed) is asked again
    /// every 100 ms for up to 15 s, as a client would (counted in `retries`). The time is
    /// that of the call that succeeded.
    pub fn rotate(&mut self, addr: SocketAddr) -> Result<Duration, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut relogged = false;
        loop {
            let session = match &self.session {
                Some(session) => session.clone(),
                None => match self.login(addr)? {
                    Some(session) => session,
                    None if Instant::now() < deadline => {
                        self.retries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    None => return Err(format!("login on {addr}: 503 for 15 s")),
                },
            };
            let started = Instant::now();
            let reply = regenerate(addr, &session).map_err(|e| {
                let took = started.elapsed();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                        "regenerate on {addr}: no answer within {took:?} (the client's timeout; \
                         a strict-mode call must answer within the fleet's wait bound)"
                    ),
                    _ => format!("regenerate on {addr}: {e} after {took:?}"),
                }
            })?;
            let took = started.elapsed();
            match reply.status {
                200 => {
                    let key = reply.json()["keyValue"]
                        .as_str()
                        .ok_or_else(|| format!("regenerate: no keyValue in {}", reply.body))?
                        .to_owned();
                    self.session = Some(reply.session().unwrap_or(session));
                    let old = std::mem::replace(&mut self.key, key);
                    self.retired.push(old);
                    return Ok(took);
                }
                401 if !relogged => {
                    relogged = true;
                    self.relogins += 1;
                    self.session = None;
                }
                503 if reply.is_fail_closed() && Instant::now() < deadline => {
                    self.retries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(format!(
                        "regenerate on {addr} answered {} after {took:?}",
                        reply.brief()
                    ))
                }
            }
        }
    }

    /// A new session on `addr`, or `None` while it fails closed.
    fn login(&mut self, addr: SocketAddr) -> Result<Option<String>, String> {
        let reply =
            login(addr, None, &self.key, ADMIN, PASSWORD).map_err(|e| format!("login: {e}"))?;
        match (reply.status, reply.session()) {
            (200, Some(session)) => {
                self.session = Some(session.clone());
                Ok(Some(session))
            }
            (503, _) if reply.is_fail_closed() => Ok(None),
            _ => Err(format!("login on {addr} answered {}", reply.brief())),
        }
    }
}

/// What the checkers may know about the rotations: the key in force and the one retired last,
/// and a version that is odd while a regenerate call is in flight.
pub struct Board {
    state: Mutex<(u64, String, Option<String>)>,
}

impl Board {
    pub fn new(key: &str) -> Self {
        Self {
            state: Mutex::new((0, key.to_owned(), None)),
        }
    }

    /// (version, current key, the key retired last).
    pub fn snapshot(&self) -> (u64, String, Option<String>) {
        self.state.lock().unwrap().clone()
    }

    pub fn version(&self) -> u64 {
        self.state.lock().unwrap().0
    }

    /// A regenerate call is about to be sent (the version becomes odd, and new).
    pub fn begin(&self) {
        let version = &mut self.state.lock().unwrap().0;
        *version += 1 + *version % 2;
    }

    /// The regenerate call returned `new_key`: from now on the previous key is retired.
    pub fn end(&self, new_key: &str) {
        let mut state = self.state.lock().unwrap();
        state.0 += 2 - state.0 % 2;
        let old = std::mem::replace(&mut state.1, new_key.to_owned());
        state.2 = Some(old);
    }

    /// The regenerate call failed: which key is in force is unknown from here on, so the
    /// board stays "in flight" (the key retired before is still checked).
    pub fn abandon(&self) {
        let version = &mut self.state.lock().unwrap().0;
        *version += 1 - *version % 2;
    }
}

/// What the checkers saw.
#[derive(Default)]
pub struct Tally {
    pub requests: AtomicU64,
    /// 200 for a retired key, on a request sent after the regenerate that retired it returned.
    pub stale_accepts: AtomicU64,
    /// 401 for the key in force, on a request sent after the regenerate that made it returned
    /// and answered before the next one was sent.
    pub wrong_refusals: AtomicU64,
    /// 503 (failing closed), for either key.
    pub unavailable: AtomicU64,
    /// Transport errors and unexpected statuses.
    pub errors: AtomicU64,
    pub first_unavailable: Mutex<Option<Instant>>,
    pub samples: Mutex<Vec<String>>,
}

impl Tally {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }

    fn note(&self, counter: &AtomicU64, sample: impl FnOnce() -> String) {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 12 {
            samples.push(sample());
        }
    }

    fn unavailable(&self) {
        self.unavailable.fetch_add(1, Ordering::SeqCst);
        self.first_unavailable
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
    }

    pub fn summary(&self) -> String {
        format!(
            "requests={} stale_accepts={} wrong_refusals={} unavailable={} errors={}; samples: {:?}",
            Self::get(&self.requests),
            Self::get(&self.stale_accepts),
            Self::get(&self.wrong_refusals),
            Self::get(&self.unavailable),
            Self::get(&self.errors),
            self.samples.lock().unwrap()
        )
    }
}

/// Checker threads, stopped and joined when dropped (also when the test panics).
pub struct Checkers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Checkers {
    /// `per_replica` threads for each of `addrs`, each sending the key retired last and the key
    /// in force (from `board`) in turn, with `pause` between rounds, until stopped.
    pub fn start(
        addrs: &[SocketAddr],
        per_replica: usize,
        board: &Arc<Board>,
        tally: &Arc<Tally>,
        pause: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .iter()
            .flat_map(|addr| std::iter::repeat_n(*addr, per_replica))
            .map(|addr| {
                let (board, tally, stop) = (Arc::clone(board), Arc::clone(tally), stop.clone());
                std::thread::spawn(move || check_loop(addr, &board, &tally, &stop, pause))
            })
            .collect();
        Self { stop, threads }
    }

    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn check_loop(addr: SocketAddr, board: &Board, tally: &Tally, stop: &AtomicBool, pause: Duration) {
    let mut client = Client::new(addr);
    while !stop.load(Ordering::SeqCst) {
        // Read before sending: a key retired in this snapshot was retired by a regenerate
        // that had returned before the request below was sent.
        let (version, current, retired) = board.snapshot();
        let mut unavailable = false;
        if let Some(old) = retired {
            tally.requests.fetch_add(1, Ordering::SeqCst);
            match client.whoami_key(&old) {
                Ok(reply) if reply.status == 200 => tally.note(&tally.stale_accepts, || {
                    format!(
                        "{addr}: 200 for the key retired by rotation {}",
                        version / 2
                    )
                }),
                Ok(reply) if reply.status == 401 => {}
                Ok(reply) if reply.status == 503 => unavailable = true,
                Ok(reply) => tally.note(&tally.errors, || format!("{addr}: {}", reply.brief())),
                Err(e) => tally.note(&tally.errors, || format!("{addr}: {e}")),
            }
        }
        if version % 2 == 0 {
            tally.requests.fetch_add(1, Ordering::SeqCst);
            let answer = client.whoami_key(&current);
            // A refusal counts only if no regenerate was sent meanwhile.
            let settled = board.version() == version;
            match answer {
                Ok(reply) if reply.status == 200 => {}
                Ok(reply) if reply.status == 401 && settled => {
                    tally.note(&tally.wrong_refusals, || {
                        format!("{addr}: 401 for the key of rotation {}", version / 2)
                    });
                }
                Ok(reply) if reply.status == 401 => {}
                Ok(reply) if reply.status == 503 => unavailable = true,
                Ok(reply) => tally.note(&tally.errors, || format!("{addr}: {}", reply.brief())),
                Err(e) => tally.note(&tally.errors, || format!("{addr}: {e}")),
            }
        }
        if unavailable {
            // Count it, then back off a little, as a client told Retry-After would: a 503
            // costs the replica next to nothing, and a checker spinning on them would starve
            // the very renewals that end the fencing (2 cores).
            tally.unavailable();
            std::thread::sleep(Duration::from_millis(5));
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting, checks, figures
// ---------------------------------------------------------------------------------------------

/// Calls `probe` every `every` until it returns `Some`, for at most `within`; the value and
/// the time since `since`, or `None` on timeout.
pub fn poll<T>(
    since: Instant,
    within: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return Some((value, since.elapsed()));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// The `p`th percentile (nearest rank) of `samples`, in milliseconds.
pub fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Writes `what` with the UTC time of day (as the gateways' logs show it) to the test's output,
/// which libtest shows when the test fails, beside the replicas' logs.
pub fn note(what: impl Display) {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let secs = since_epoch.as_secs() % 86_400;
    eprintln!(
        "{:02}:{:02}:{:02}.{:06}Z {what}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since_epoch.subsec_micros()
    );
}

pub fn ms(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1000.0)
}

/// Promises checked along a test: each broken one is kept, and [`Checks::assert`] fails the
/// test with all of them, so one run shows every gap at once.
#[derive(Default)]
pub struct Checks(Vec<String>);

impl Checks {
    pub fn expect(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            let what = what();
            eprintln!("broken: {what}");
            self.0.push(what);
        }
    }

    /// Expects the status `want`; the message is `what: <got> (expected <want>)`.
    pub fn status(&mut self, got: u16, want: u16, what: impl FnOnce() -> String) {
        self.expect(got == want, || {
            format!("{}: {got} (expected {want})", what())
        });
    }

    pub fn assert(self, test: &str) {
        assert!(
            self.0.is_empty(),
            "{test}: {} promise(s) broken:\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// Held by each fleet test for its whole run: on a 2-core machine, one fleet's load (the
/// rotation loop's checkers keep every core busy) would starve the others' lease renewals
/// and be measured as their latency, so the fleets take turns. Each test still has its own
/// schema and replicas, and runs alone as well.
pub fn fleet_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The order of the figures in the `fleet:` line.
const FIGURES: &[&str] = &[
    "form",
    "replicas",
    "rotations",
    "checked_requests",
    "stale_accepts",
    "wrong_refusals",
    "unavailable",
    "rotate_retries",
    "relogins",
    "rotate_p50_ms",
    "rotate_p99_ms",
    "stall_detect_ms",
    "stall_rotate_ms",
    "stall_recovery_ms",
    "feed_kill_recovery_ms",
    "kill9_rotate_ms",
    "pg_stop_fail_closed_ms",
    "pg_restart_recovery_ms",
];

/// (tests still running that report figures, the figures so far).
static REPORT: Mutex<(usize, Vec<(String, String)>)> = Mutex::new((0, Vec::new()));

/// A test's share of the `fleet:` line. When the last test holding one ends (also by a panic),
/// the line is written to stderr past libtest's capture, with every figure measured so far in
/// this run; tests that end apart each write the line as it stands then.
pub struct Report(());

impl Report {
    pub fn begin() -> Self {
        REPORT.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        Self(())
    }

    pub fn set(&self, name: &str, value: impl Display) {
        let mut report = REPORT.lock().unwrap_or_else(|p| p.into_inner());
        let value = value.to_string();
        match report.1.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => report.1.push((name.to_owned(), value)),
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let mut report = REPORT.lock().unwrap_or_else(|p| p.into_inner());
        report.0 -= 1;
        if report.0 > 0 {
            return;
        }
        let mut figures: Vec<&(String, String)> = report.1.iter().collect();
        figures.sort_by_key(|(name, _)| {
            FIGURES
                .iter()
                .position(|f| f == name)
                .unwrap_or(FIGURES.len())
        });
        let line = figures
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(std::io::stderr().lock(), "\nfleet: {line}\n");
    }
}
