//! G3 end to end: the built gateway with `--tls-cert` / `--tls-key` (a CA and certificates
//! made here with rcgen), spoken to by a rustls client (HTTP/2 and HTTP/1.1 by ALPN) and by
//! curl when the machine has it; certificate reload on SIGHUP under load; G2's limits on TLS
//! connections; the plain-HTTP login refusal; and `--trusted-proxy`.
#![allow(clippy::unwrap_used)]

mod common;

use common::TempDb;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slack on top of a limit before a test calls it broken (see tests/gateway_limits.rs).
const SLACK: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Certificates

/// A test CA and the files the gateway reads: `ca.pem`, `cert.pem`, `key.pem` in a fresh
/// directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "orgkey-gateway-tls-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orgkey test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Self { dir, ca };
        pki.issue("cert.pem", "key.pem");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A new server certificate (new key) for localhost and 127.0.0.1, signed by the CA,
    /// written to `cert` and `key` (each through a rename, as a certificate tool would);
    /// returns the certificate's DER.
    fn issue(&self, cert: &str, key: &str) -> Vec<u8> {
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orgkey gateway");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issued = params.signed_by(&key_pair, &self.ca).unwrap();
        self.replace(cert, &issued.pem());
        self.replace(key, &key_pair.serialize_pem());
        issued.der().to_vec()
    }

    /// Writes `content` to `name` through a temporary file and a rename.
    fn replace(&self, name: &str, content: &str) {
        let temp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&temp, content).unwrap();
        std::fs::rename(&temp, self.path(name)).unwrap();
    }

    fn tls_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("cert.pem").to_string_lossy().into_owned(),
            "--tls-key".into(),
            self.path("key.pem").to_string_lossy().into_owned(),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway process

const PASSWORD: &str = "tls-test-password-0123";

struct Gateway {
    child: Child,
    /// `host:port` to connect to (127.0.0.1 when it listens on 0.0.0.0).
    addr: SocketAddr,
    base_url: String,
    key: String,
    /// Its stderr, line by line, as it comes.
    log: Arc<Mutex<Vec<String>>>,
    _state: TempDb,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts the gateway on a fresh state with `--listen listen` and `args`.
    fn start(listen: &str, args: &[String]) -> Self {
        let state = TempDb::new("gateway-tls");
        let mut child = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
            .args(["--listen", listen, "--state", state.path()])
            .args(["--password", PASSWORD])
            .args(args)
            .env_remove("ORGKEY_ADMIN_PASSWORD")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines() {
                match line {
                    Ok(line) => sink.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
        });
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().take(5) {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        for _ in 0..5 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "the gateway printed only {lines:?}; stderr: {:?}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        let base_url = lines[0].strip_prefix("base url: ").unwrap().to_owned();
        let key = lines[2].strip_prefix("api key: ").unwrap().to_owned();
        let host_port = base_url
            .split_once("://")
            .unwrap()
            .1
            .strip_suffix("/api/v1")
            .unwrap();
        let mut addr: SocketAddr = host_port.parse().unwrap();
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Self {
            child,
            addr,
            base_url,
            key,
            log,
            _state: state,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until a stderr line contains `needle`.
    async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn whoami(&self) -> Request<Full<Bytes>> {
        Request::get("/api/v1/whoami")
            .header("x-org-id", "acme")
            .header("x-api-key", &self.key)
            .body(Full::default())
            .unwrap()
    }
}

/// The body of a login for the gateway's admin at `now`, with the right obfuscated key.
fn login_body(key: &str, username: &str, password: &str) -> String {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let api_key = orgkey::session::obfuscate::obfuscate(key.as_bytes(), ts).unwrap();
    format!(
        r#"{{"apiKey":"{}","username":"{username}","password":"{password}","timestamp":{ts}}}"#,
        std::str::from_utf8(&api_key).unwrap()
    )
}

fn login_request(key: &str, username: &str, password: &str) -> Request<Full<Bytes>> {
    Request::post("/api/v1/authenticatedSession")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(login_body(key, username, password))))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Clients: rustls + hyper over one connection, HTTP/2 or HTTP/1.1 as ALPN decides; plain HTTP

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection.
struct Client {
    sender: Sender,
    /// The server's certificate (DER), for TLS connections.
    peer_cert: Option<Vec<u8>>,
    _connection: tokio::task::JoinHandle<()>,
}

type Answer = (StatusCode, Version, http::HeaderMap, String);

impl Client {
    /// A TLS connection to `addr` trusting `ca`, offering `alpn`.
    async fn tls(addr: SocketAddr, ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Self {
        Self::try_tls(addr, ca, alpn).await.unwrap()
    }

    async fn try_tls(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let session = stream.get_ref().1;
        let peer_cert = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| cert.to_vec());
        let h2 = session.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        let (sender, connection) = if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            (
                Sender::Http2(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            (
                Sender::Http1(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        };
        Ok(Self {
            sender,
            peer_cert,
            _connection: connection,
        })
    }

    /// A plain HTTP/1.1 connection to `addr`.
    async fn plain(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        Self {
            sender: Sender::Http1(sender),
            peer_cert: None,
            _connection: tokio::spawn(async move {
                let _ = conn.await;
            }),
        }
    }

    async fn try_send(&mut self, mut request: Request<Full<Bytes>>) -> Result<Answer, String> {
        let response: Response<hyper::body::Incoming> = match &mut self.sender {
            Sender::Http1(sender) => {
                request
                    .headers_mut()
                    .insert(http::header::HOST, "localhost".parse().unwrap());
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                *request.uri_mut() = format!("https://localhost{}", request.uri())
                    .parse()
                    .unwrap();
                *request.version_mut() = Version::HTTP_2;
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((
            parts.status,
            parts.version,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        self.try_send(request).await.unwrap()
    }
}

/// One request on a fresh plain HTTP/1.1 connection (a refused login leaves its body unread,
/// after which a server may close the connection).
async fn plain_once(addr: SocketAddr, request: Request<Full<Bytes>>) -> Answer {
    Client::plain(addr).await.send(request).await
}

/// The `JSESSIONID=...` cookie a login answer sets, whole (attributes included).
fn set_cookie(headers: &http::HeaderMap) -> String {
    headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("JSESSIONID="))
        .unwrap_or_else(|| panic!("no session cookie in {headers:?}"))
        .to_owned()
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http2_by_alpn_and_http1_otherwise() {
    let pki = Pki::new("alpn");
    let gw = Gateway::start("127.0.0.1:0", &pki.tls_args());
    assert_eq!(
        gw.base_url,
        format!("https://{}/api/v1", gw.addr),
        "TLS makes the default base URL https"
    );
    let ca = pki.ca_der();
    for (alpn, version) in [
        (&[&b"h2"[..], b"http/1.1"][..], Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], Version::HTTP_11),
        (&[][..], Version::HTTP_11),
    ] {
        let mut client = Client::tls(gw.addr, &ca, alpn).await;
        for _ in 0..2 {
            let (status, got, _, body) = client.send(gw.whoami()).await;
            assert_eq!((status, got), (StatusCode::OK, version), "ALPN {alpn:?}");
            assert_eq!(body, r#"{"orgId":"acme"}"#);
        }
        let (status, _, _, _) = client
            .send(
                Request::get("/api/v1/whoami")
                    .header("x-org-id", "acme")
                    .header("x-api-key", "WrongKey1234")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // HEAD: the head alone (hyper would send an HTTP/2 HEAD answer's body as DATA frames,
        // which clients take for a protocol error).
        let head = Request::head("/healthz").body(Full::default()).unwrap();
        let (status, _, _, body) = client.send(head).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, ""),
            "ALPN {alpn:?}"
        );
        assert_eq!(
            client.send(gw.whoami()).await.0,
            StatusCode::OK,
            "still usable"
        );
    }
    // A client that does not trust the CA fails the handshake; plain HTTP gets no answer.
    let stranger = Pki::new("stranger");
    let refused = Client::try_tls(gw.addr, &stranger.ca_der(), &[b"h2"]).await;
    assert!(refused.is_err(), "an unknown CA must not verify");
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SLACK, plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plain HTTP on the TLS port: {:?}",
        String::from_utf8_lossy(&answer)
    );

    if !curl_available() {
        eprintln!("SKIPPED (tests/gateway_tls.rs): curl is not installed; the rustls client ran");
        return;
    }
    for (flag, expected) in [("--http2", "HTTP/2 200"), ("--http1.1", "HTTP/1.1 200")] {
        let output = Command::new("curl")
            .args(["-sS", "-I", flag, "--cacert"])
            .arg(pki.ca_pem())
            .arg(gw.base_url.replace("/api/v1", "/healthz"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with(expected),
            "curl -I {flag}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = Command::new("curl")
            .args(["-sS", "-i", flag, "--cacert"])
            .arg(pki.ca_pem())
            .args(["-H", "X-Org-Id: acme", "-H"])
            .arg(format!("X-API-Key: {}", gw.key))
            .arg(format!("{}/whoami", gw.base_url))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with(expected),
            "curl {flag}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.ends_with(r#"{"orgId":"acme"}"#), "{stdout}");
    }
    // Without the CA, curl refuses the certificate.
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .arg(format!("{}/status", gw.base_url))
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_secure_over_tls_and_works_over_http2() {
    let pki = Pki::new("cookie");
    let gw = Gateway::start("127.0.0.1:0", &pki.tls_args());
    let mut client = Client::tls(gw.addr, &pki.ca_der(), &[b"h2", b"http/1.1"]).await;
    let (status, version, headers, body) = client
        .send(login_request(&gw.key, "admin@acme.example", PASSWORD))
        .await;
    assert_eq!(
        (status, version),
        (StatusCode::OK, Version::HTTP_2),
        "{body}"
    );
    let cookie = set_cookie(&headers);
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    let (status, _, _, body) = client
        .send(
            Request::get("/api/v1/whoami")
                .header("cookie", &session)
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::OK,
            r#"{"admin":"admin@acme.example","orgId":"acme"}"#
        )
    );
    // The admin page's address is https too.
    assert!(gw.base_url.starts_with("https://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_under_load_without_failing_a_request() {
    let pki = Pki::new("reload");
    let first = std::fs::read_to_string(pki.path("cert.pem")).unwrap();
    let first_der = CertificateDer::pem_slice_iter(first.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let gw = Arc::new(Gateway::start("127.0.0.1:0", &pki.tls_args()));
    let ca = pki.ca_der();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    // The certificate most recently seen by a new connection.
    let latest = Arc::new(Mutex::new(Vec::<u8>::new()));

    // Load 1: two connections opened before the reload (HTTP/2 and HTTP/1.1 keep-alive),
    // used until the end: they must not be dropped by the reload.
    let mut kept = Vec::new();
    for alpn in [&[&b"h2"[..]][..], &[&b"http/1.1"[..]][..]] {
        let mut client = Client::tls(gw.addr, &ca, alpn).await;
        assert_eq!(client.peer_cert.as_deref(), Some(&first_der[..]));
        let (gw, stop, failures) = (Arc::clone(&gw), Arc::clone(&stop), Arc::clone(&failures));
        kept.push(tokio::spawn(async move {
            let mut done = 0_usize;
            while !stop.load(Ordering::Relaxed) {
                match client.try_send(gw.whoami()).await {
                    Ok((StatusCode::OK, ..)) => done += 1,
                    other => failures
                        .lock()
                        .unwrap()
                        .push(format!("kept connection: {other:?}")),
                }
            }
            done
        }));
    }
    // Load 2: a new connection per request, alternating HTTP/2 and HTTP/1.1.
    let fresh_done = Arc::new(AtomicUsize::new(0));
    let mut fresh = Vec::new();
    for worker in 0..2 {
        let (gw, stop, failures, latest, fresh_done, ca) = (
            Arc::clone(&gw),
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&latest),
            Arc::clone(&fresh_done),
            ca.clone(),
        );
        fresh.push(tokio::spawn(async move {
            let alpn: &[&[u8]] = if worker == 0 {
                &[b"h2"]
            } else {
                &[b"http/1.1"]
            };
            while !stop.load(Ordering::Relaxed) {
                let answer = match Client::try_tls(gw.addr, &ca, alpn).await {
                    Ok(mut client) => {
                        *latest.lock().unwrap() = client.peer_cert.clone().unwrap();
                        client.try_send(gw.whoami()).await
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Ok((StatusCode::OK, ..)) => {
                        fresh_done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures
                        .lock()
                        .unwrap()
                        .push(format!("new connection: {other:?}")),
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fresh_done.load(Ordering::Relaxed);
    assert!(before > 0, "the load runs");
    let second_der = pki.issue("cert.pem", "key.pem");
    gw.hangup();
    let line = gw.wait_for_log("TLS certificate and key reloaded").await;
    assert!(!line.contains("BEGIN"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while *latest.lock().unwrap() != second_der {
        assert!(
            Instant::now() < deadline,
            "new connections never saw the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switched = fresh_done.load(Ordering::Relaxed);

    // A reload that fails (a key that does not belong to the certificate) keeps the second
    // certificate and says why.
    // (A new key in key.pem, its certificate elsewhere.)
    pki.issue("other-cert.pem", "key.pem");
    gw.hangup();
    let line = gw
        .wait_for_log("TLS reload failed; still serving the previous certificate")
        .await;
    assert!(line.contains("does not belong"), "{line}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut kept_done = Vec::new();
    for task in kept {
        kept_done.push(task.await.unwrap());
    }
    for task in fresh {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(
        *latest.lock().unwrap(),
        second_der,
        "the failed reload kept it"
    );
    let total = fresh_done.load(Ordering::Relaxed);
    assert!(
        total > switched && switched > before,
        "requests before / at / after: {before} / {switched} / {total}"
    );
    assert!(kept_done.iter().all(|n| *n > 1), "kept: {kept_done:?}");
    eprintln!(
        "reload under load: {total} requests on new connections, {kept_done:?} on the two kept \
         ones, 0 failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_hold_on_tls_connections_the_handshake_included() {
    let pki = Pki::new("limits");
    let mut args = pki.tls_args();
    args.extend(
        [
            "--header-read-timeout",
            "1",
            "--body-read-timeout",
            "1",
            "--idle-timeout",
            "1",
            "--max-connections",
            "1",
        ]
        .map(String::from),
    );
    let gw = Gateway::start("127.0.0.1:0", &args);
    let ca = pki.ca_der();

    // A client that never finishes its handshake holds the only slot for the header-read
    // timeout, no longer: a second client is served once it is closed.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(gw.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn({
        let (addr, ca, request) = (gw.addr, ca.clone(), gw.whoami());
        async move {
            let mut client = Client::tls(addr, &ca, &[b"h2"]).await;
            let answer = client.send(request).await;
            (answer.0, Instant::now())
        }
    });
    let mut buf = [0_u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1) + SLACK, stalled.read(&mut buf))
        .await
        .expect("the stalled handshake was not closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}"
    );
    let (status, served_at) = tokio::time::timeout(SLACK, second).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        served_at.duration_since(started) >= Duration::from_millis(900),
        "the second client waited for the slot"
    );

    // HTTP/1.1 over TLS: a request head that never ends is closed after the header-read
    // timeout; a body that never ends gets 408 after the body-read timeout.
    let connector = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ))
    };
    let raw = |head: &'static [u8]| {
        let connector = connector.clone();
        let addr = gw.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(head).await.unwrap();
            let started = Instant::now();
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(1) + SLACK, tls.read_to_end(&mut answer))
                    .await
                    .expect("the connection was not closed in time");
            (
                String::from_utf8_lossy(&answer).into_owned(),
                started.elapsed(),
            )
        }
    };
    let (answer, _) = raw(b"GET /api/v1/status HTTP/1.1\r\nhost: x\r\n").await;
    assert_eq!(answer, "", "a head that never ends gets no answer");
    let (answer, after) = raw(
        b"POST /api/v1/authenticatedSession HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(after >= Duration::from_millis(900), "{after:?}");

    // HTTP/2: a body that never ends gets 408 on its stream.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let request = Request::post("https://localhost/api/v1/authenticatedSession")
        .header("content-type", "application/json")
        .header("content-length", "100")
        .body(Stalled(Some(Bytes::from_static(b"{\"a\""))))
        .unwrap();
    let started = Instant::now();
    let response =
        tokio::time::timeout(Duration::from_secs(1) + SLACK, sender.send_request(request))
            .await
            .expect("no 408 in time")
            .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(response.headers().get("connection").is_none());
    // The connection is then idle, and closed after the idle timeout.
    tokio::time::timeout(Duration::from_secs(1) + SLACK, conn)
        .await
        .expect("the idle HTTP/2 connection was not closed")
        .unwrap()
        .ok();
}

/// A request body that sends one chunk and then nothing, forever.
struct Stalled(Option<Bytes>);

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(chunk) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk)))),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_login_is_refused_on_a_non_loopback_listen_address() {
    // The rule is about the listen address: 0.0.0.0 is not loopback, so the login is
    // refused even to this client, which connects through 127.0.0.1.
    let gw = Gateway::start("0.0.0.0:0", &[]);
    assert!(
        gw.base_url.starts_with("http://0.0.0.0:"),
        "{}",
        gw.base_url
    );
    let (status, _, headers, body) = plain_once(
        gw.addr,
        login_request(&gw.key, "admin@acme.example", PASSWORD),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["code"], "TLS_REQUIRED");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("--insecure-http"),
        "{body}"
    );
    assert!(headers.get("set-cookie").is_none());
    // The Go SDK's path is the same login.
    let mut go = login_request(&gw.key, "admin@acme.example", PASSWORD);
    *go.uri_mut() = "/authenticatedSession".parse().unwrap();
    assert_eq!(plain_once(gw.addr, go).await.0, StatusCode::FORBIDDEN);
    // The probe and the logout carry no key and are not refused; direct keys still work.
    let probe = Request::get("/api/v1/authenticatedSession")
        .body(Full::default())
        .unwrap();
    assert_eq!(plain_once(gw.addr, probe).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(plain_once(gw.addr, gw.whoami()).await.0, StatusCode::OK);
    // A client's own X-Forwarded-Proto changes nothing: it is no trusted proxy.
    let mut forged = login_request(&gw.key, "admin@acme.example", PASSWORD);
    forged
        .headers_mut()
        .insert("x-forwarded-proto", "https".parse().unwrap());
    assert_eq!(plain_once(gw.addr, forged).await.0, StatusCode::FORBIDDEN);
    gw.wait_for_log("login over plain HTTP refused").await;
    drop(gw);

    // --insecure-http allows it (and says so in the log).
    let gw = Gateway::start("0.0.0.0:0", &["--insecure-http".to_owned()]);
    let (status, _, headers, body) = plain_once(
        gw.addr,
        login_request(&gw.key, "admin@acme.example", PASSWORD),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !set_cookie(&headers).contains("Secure"),
        "plain HTTP cookie"
    );
    gw.wait_for_log("--insecure-http").await;
    drop(gw);

    // Behind a trusted proxy (here: this machine) that says https, the login is allowed and
    // its cookie is Secure, although the gateway itself speaks plain HTTP.
    let gw = Gateway::start(
        "0.0.0.0:0",
        &["--trusted-proxy".to_owned(), "127.0.0.0/8".to_owned()],
    );
    let mut proxied = login_request(&gw.key, "admin@acme.example", PASSWORD);
    proxied
        .headers_mut()
        .insert("x-forwarded-proto", "https".parse().unwrap());
    proxied
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
    let (status, _, headers, body) = plain_once(gw.addr, proxied).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(set_cookie(&headers).ends_with("; Secure"));
    // The same proxy relaying a plain-HTTP client: refused.
    let mut relayed = login_request(&gw.key, "admin@acme.example", PASSWORD);
    relayed
        .headers_mut()
        .insert("x-forwarded-proto", "http".parse().unwrap());
    assert_eq!(plain_once(gw.addr, relayed).await.0, StatusCode::FORBIDDEN);

    // On a loopback listen address the plain login is accepted (local development).
    let gw = Gateway::start("127.0.0.1:0", &[]);
    let (status, ..) = plain_once(
        gw.addr,
        login_request(&gw.key, "admin@acme.example", PASSWORD),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Sends failed logins (unknown users, so only the address bucket fills: 10 failures, A3)
/// with `forwarded_for` until one is throttled; returns how many were not.
async fn failed_logins_until_throttled(
    client: &mut Client,
    key: &str,
    forwarded_for: impl Fn(usize) -> Option<String>,
) -> usize {
    for attempt in 0..30 {
        let mut request = login_request(key, &format!("nobody{attempt}@acme.example"), "x");
        if let Some(xff) = forwarded_for(attempt) {
            request
                .headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        let (status, _, _, body) = client.send(request).await;
        match status {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::TOO_MANY_REQUESTS => return attempt,
            other => panic!("attempt {attempt}: {other} {body}"),
        }
    }
    panic!("never throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    // No trusted proxy: a forged X-Forwarded-For on every attempt still fills the real
    // address's bucket.
    let gw = Gateway::start("127.0.0.1:0", &[]);
    let mut client = Client::plain(gw.addr).await;
    let allowed =
        failed_logins_until_throttled(&mut client, &gw.key, |n| Some(format!("203.0.113.{n}")))
            .await;
    assert_eq!(allowed, 10, "the address bucket's burst");
    drop(gw);

    // This machine as a trusted proxy: the address it vouches for is the one counted.
    let pki = Pki::new("xff");
    let mut args = pki.tls_args();
    args.extend(["--trusted-proxy", "127.0.0.1"].map(String::from));
    let gw = Gateway::start("127.0.0.1:0", &args);
    let mut client = Client::tls(gw.addr, &pki.ca_der(), &[b"h2"]).await;
    let allowed = failed_logins_until_throttled(&mut client, &gw.key, |_| {
        // A client's forged address on the left, the proxy's view on the right.
        Some("203.0.113.9, 198.51.100.1".to_owned())
    })
    .await;
    assert_eq!(allowed, 10);
    // Another client behind the same proxy has its own bucket, and so has the proxy.
    for other in [Some("198.51.100.2"), None] {
        let mut request = login_request(&gw.key, "nobody-else@acme.example", "x");
        if let Some(xff) = other {
            request
                .headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        assert_eq!(
            client.send(request).await.0,
            StatusCode::UNAUTHORIZED,
            "{other:?}"
        );
    }
}

#[test]
fn tls_flags_fail_clearly_without_showing_the_key() {
    let pki = Pki::new("flags");
    let state = TempDb::new("gateway-tls-flags");
    let run = |args: &[&Path]| {
        let output = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
            .args(["--listen", "127.0.0.1:0", "--state", state.path()])
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let cert = pki.path("cert.pem");
    let key = pki.path("key.pem");
    let flag = |s: &'static str| Path::new(s);

    let (code, stderr) = run(&[flag("--tls-cert"), &cert]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let (code, stderr) = run(&[flag("--tls-key"), &key]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let (code, stderr) = run(&[
        flag("--tls-cert"),
        &cert,
        flag("--tls-key"),
        &key,
        flag("--insecure-http"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run(&[flag("--trusted-proxy"), flag("10.1.2.3/8")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("did you mean 10.0.0.0/8"), "{stderr}");

    let missing = pki.path("missing.pem");
    let (code, stderr) = run(&[flag("--tls-cert"), &missing, flag("--tls-key"), &key]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot read the TLS certificate file {}",
            missing.display()
        )),
        "{stderr}"
    );
    // A key file whose PEM is damaged: named, not quoted.
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let secret_line = key_pem.lines().nth(1).unwrap().to_owned();
    let damaged = pki.path("damaged.pem");
    std::fs::write(
        &damaged,
        key_pem.replacen(&secret_line, &format!("{secret_line}!"), 1),
    )
    .unwrap();
    let (code, stderr) = run(&[flag("--tls-cert"), &cert, flag("--tls-key"), &damaged]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the TLS private key file {} is not valid PEM",
            damaged.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(&secret_line[..16]), "{stderr}");
    // Another certificate's key.
    pki.issue("other-cert.pem", "other-key.pem");
    let other_key = pki.path("other-key.pem");
    let (code, stderr) = run(&[flag("--tls-cert"), &cert, flag("--tls-key"), &other_key]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not belong"), "{stderr}");
}
