//! G1 end to end: the built gateway as a reverse proxy (`--upstream`) in front of upstreams
//! the tests run: `X-Forwarded-*`, an https upstream with a certificate made here, bodies
//! streamed both ways (64 MiB each), 502 and 504 answers, and the upstream's own
//! `Set-Cookie: JSESSIONID`.
//!
//! Bounds on time are a limit plus generous slack, so a loaded machine makes these tests
//! slower, not flaky.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/gateway.rs"]
mod gateway;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{get, head_value, login, read_head, send, Answer, Gateway, Recorder, KEY};

const BY_KEY: [(&str, &str); 2] = [("X-Org-Id", "acme"), ("X-API-Key", KEY)];
/// Slack on top of a limit before a test calls it broken.
const SLACK: Duration = Duration::from_secs(5);
const MIB: usize = 1024 * 1024;

/// An upstream on a free port that hands each connection, with its request head already
/// read, to `handle` (on a thread of its own).
fn upstream(
    handle: impl Fn(BufReader<TcpStream>, TcpStream, String) + Send + Sync + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handle = Arc::clone(&handle);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if let Some(head) = read_head(&mut reader) {
                    handle(reader, stream, head);
                }
            });
        }
    });
    addr
}

fn json(answer: &Answer) -> serde_json::Value {
    serde_json::from_str(&answer.body).unwrap_or_else(|_| panic!("not JSON: {answer:?}"))
}

/// The upstream gets the gateway's `X-Forwarded-*`, never a client's, and its own `Host`.
#[test]
fn forwarded_headers_are_the_gateways_and_a_clients_are_dropped() {
    let recorder = Recorder::start();
    let gw = Gateway::start(
        "proxy-forwarded",
        &["--upstream", &format!("http://{}", recorder.addr)],
        &[],
    );
    let mut headers = BY_KEY.to_vec();
    headers.extend([
        ("X-Forwarded-For", "198.51.100.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        (
            "Forwarded",
            "for=198.51.100.9;proto=https;host=evil.example",
        ),
    ]);
    let answer = get(&gw.addr, "/where", &headers);
    assert_eq!((answer.status, answer.body.as_str()), (200, "upstream"));
    let head = recorder.next();
    assert_eq!(
        head_value(&head, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        head_value(&head, "x-forwarded-proto").as_deref(),
        Some("http")
    );
    // The client asked the gateway for `Host: <gateway>`; the upstream is asked for itself.
    assert_eq!(head_value(&head, "x-forwarded-host"), Some(gw.addr.clone()));
    assert_eq!(head_value(&head, "host"), Some(recorder.addr.clone()));
    assert!(head_value(&head, "forwarded").is_none(), "{head}");
    assert!(
        !head.contains("198.51.100.9") && !head.contains("evil"),
        "{head}"
    );
    assert_eq!(head.matches("x-forwarded-for:").count(), 1, "{head}");
}

// --- https ---------------------------------------------------------------------------------

/// A CA and a server certificate for `localhost` signed by it (PEM of the CA; the server's
/// certificate chain and key for rustls).
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "orgkey test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// A file in the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let path =
            std::env::temp_dir().join(format!("orgkey-ca-{}.pem", u64::from_le_bytes(bytes)));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An https upstream on a free port (`localhost:port`) that reports each request head (or
/// each failed handshake, as `Err`) and answers `200 over tls`.
fn tls_upstream(config: Arc<rustls::ServerConfig>) -> (String, Receiver<Result<String, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (config, tx) = (Arc::clone(&config), tx.clone());
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut reader = BufReader::new(&mut tls);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) => return,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => head.push_str(&line),
                        Err(error) => {
                            let _ = tx.send(Err(error.to_string()));
                            return;
                        }
                    }
                }
                drop(reader);
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nover tls...",
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
                let _ = tx.send(Ok(head.to_ascii_lowercase()));
            });
        }
    });
    (format!("localhost:{port}"), rx)
}

/// `--upstream https://...`: reached over TLS when its certificate chains to a trusted CA
/// (`SSL_CERT_FILE`), refused with a 502 that says why when it does not; a gateway that
/// trusts nothing does not start.
#[test]
fn an_https_upstream_is_reached_and_its_certificate_checked() {
    let ours = pki();
    let (addr, heads) = tls_upstream(Arc::clone(&ours.server));
    let trusted = TempFile::new(&ours.ca_pem);
    let gw = Gateway::start(
        "proxy-https",
        &["--upstream", &format!("https://{addr}")],
        &[("SSL_CERT_FILE", trusted.path())],
    );
    let answer = get(&gw.addr, "/secure?x=1", &BY_KEY);
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "over tls..."),
        "{answer:?}: {}",
        gw.log()
    );
    let head = heads
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert!(head.starts_with("get /secure?x=1 http/1.1"), "{head}");
    assert_eq!(head_value(&head, "x-orgkey-org").as_deref(), Some("acme"));
    assert_eq!(head_value(&head, "host"), Some(addr.clone()));
    assert!(head_value(&head, "x-api-key").is_none(), "{head}");

    // Another CA: the handshake fails, the client is told, the upstream saw no request.
    let other = TempFile::new(&pki().ca_pem);
    let gw = Gateway::start(
        "proxy-https-untrusted",
        &["--upstream", &format!("https://{addr}")],
        &[("SSL_CERT_FILE", other.path())],
    );
    let answer = get(&gw.addr, "/secure", &BY_KEY);
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(json(&answer)["code"], "BAD_GATEWAY");
    assert!(
        json(&answer)["message"].as_str().unwrap().contains("TLS"),
        "{answer:?}"
    );
    assert!(
        heads
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .is_err(),
        "the upstream got a request over an untrusted connection"
    );
    assert!(gw.log().contains("upstream request failed"), "{}", gw.log());

    // Nothing to trust at all: a clear error at start.
    let state = common::TempDb::new("proxy-https-none");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
        .args(["--listen", "127.0.0.1:0", "--state", state.path()])
        .args(["--upstream", &format!("https://{addr}")])
        .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no trusted root certificate"), "{stderr}");
}

// --- Streaming -----------------------------------------------------------------------------

/// 64 MiB up and 64 MiB down: each direction's first bytes arrive before the sender sent
/// its last (so the gateway holds neither body), and the gateway's peak memory stays far
/// below one body.
#[test]
fn bodies_stream_both_ways_without_being_held_in_memory() {
    const BODY: usize = 64 * MIB;
    // The upstream says when the first upload bytes arrive and waits to be told that the
    // client has the first download bytes before sending the rest.
    let (first_up_tx, first_up) = channel::<()>();
    let (first_down_tx, first_down) = channel::<()>();
    let first_down = Arc::new(std::sync::Mutex::new(first_down));
    let first_up_tx = std::sync::Mutex::new(first_up_tx);
    let addr = upstream(move |mut reader, mut stream, head| {
        let length: usize = head_value(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if head.starts_with("PUT") {
            let mut buffer = vec![0u8; 64 * 1024];
            let mut received = 0;
            while received < length {
                let n = reader.read(&mut buffer).unwrap();
                assert!(n > 0, "the upload ended early at {received}");
                if received == 0 {
                    first_up_tx.lock().unwrap().send(()).unwrap();
                }
                received += n;
            }
            let body = received.to_string();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        } else {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            let chunk = vec![b'd'; MIB];
            stream.write_all(&chunk).unwrap();
            first_down
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30))
                .expect("the client got no download bytes while the upstream held the rest");
            for _ in 1..BODY / MIB {
                stream.write_all(&chunk).unwrap();
            }
        }
    });
    let gw = Gateway::start(
        "proxy-stream",
        &[
            "--upstream",
            &format!("http://{addr}"),
            "--body-read-timeout",
            "600",
        ],
        &[],
    );
    gw.reset_peak_rss();
    let before = gw.peak_rss();

    // Up.
    let mut client = TcpStream::connect(&gw.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        client,
        "PUT /upload HTTP/1.1\r\nhost: gw\r\nx-org-id: acme\r\nx-api-key: {KEY}\r\n\
         content-length: {BODY}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'u'; MIB];
    client.write_all(&chunk).unwrap();
    first_up
        .recv_timeout(Duration::from_secs(30))
        .expect("no upload bytes reached the upstream before the client sent the rest");
    for _ in 1..BODY / MIB {
        client.write_all(&chunk).unwrap();
    }
    let mut response = String::new();
    client.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(&format!("\r\n\r\n{BODY}")), "{response}");

    // Down.
    let mut client = TcpStream::connect(&gw.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        client,
        "GET /download HTTP/1.1\r\nhost: gw\r\nx-org-id: acme\r\nx-api-key: {KEY}\r\n\
         connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(client);
    let head = read_head(&mut reader).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0;
    loop {
        let n = reader.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        if received == 0 {
            first_down_tx.send(()).unwrap();
        }
        assert!(buffer[..n].iter().all(|&b| b == b'd'));
        received += n;
    }
    assert_eq!(received, BODY);

    let peak = gw.peak_rss();
    eprintln!("gateway peak RSS: before {before:?}, after 64 MiB each way {peak:?}");
    if let (Some(before), Some(peak)) = (before, peak) {
        assert!(
            peak - before < (BODY / 4) as u64,
            "the gateway's peak memory grew by {} MiB: it held a body",
            (peak - before) / MIB as u64
        );
    }
}

// --- Failures ------------------------------------------------------------------------------

/// An upstream that reads requests and never answers.
fn silent_upstream() -> String {
    upstream(|mut reader, _stream, _head| {
        let mut sink = [0u8; 1024];
        while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
    })
}

fn assert_failure(answer: &Answer, status: u16, code: &str, says: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    let body = json(answer);
    assert_eq!(body["code"], code, "{answer:?}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(says), "{message}");
    assert_eq!(answer.header("content-type"), ["application/json"]);
}

#[test]
fn an_upstream_that_does_not_answer_in_time_gets_a_504_and_an_unreachable_one_a_502() {
    let gw = Gateway::start(
        "proxy-timeout",
        &[
            "--upstream",
            &format!("http://{}", silent_upstream()),
            "--upstream-timeout",
            "1",
        ],
        &[],
    );
    let started = Instant::now();
    let answer = get(&gw.addr, "/slow", &BY_KEY);
    let took = started.elapsed();
    assert_failure(
        &answer,
        504,
        "UPSTREAM_TIMEOUT",
        "did not answer within 1 s",
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(1) + SLACK,
        "{took:?}"
    );

    // Nobody listens there.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let gw = Gateway::start(
        "proxy-unreachable",
        &["--upstream", &format!("http://{closed_addr}")],
        &[],
    );
    let answer = get(&gw.addr, "/x", &BY_KEY);
    assert_failure(&answer, 502, "BAD_GATEWAY", "could not be reached");

    // It hangs up without a word.
    let rude = upstream(|_reader, stream, _head| {
        drop(stream);
    });
    let gw = Gateway::start(
        "proxy-rude",
        &["--upstream", &format!("http://{rude}")],
        &[],
    );
    let answer = get(&gw.addr, "/x", &BY_KEY);
    assert_failure(
        &answer,
        502,
        "BAD_GATEWAY",
        "closed the connection without an answer",
    );
}

/// The head's timeout counts from when the request body was sent in full: a client that
/// takes longer than the timeout to upload is not the upstream's fault.
#[test]
fn the_answer_is_due_a_timeout_after_the_body_not_after_the_head() {
    let addr = upstream(|mut reader, mut stream, head| {
        let length: usize = head_value(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .unwrap();
    });
    let gw = Gateway::start(
        "proxy-slow-upload",
        &[
            "--upstream",
            &format!("http://{addr}"),
            "--upstream-timeout",
            "1",
        ],
        &[],
    );
    let mut client = TcpStream::connect(&gw.addr).unwrap();
    write!(
        client,
        "POST /in HTTP/1.1\r\nhost: gw\r\nx-org-id: acme\r\nx-api-key: {KEY}\r\n\
         content-length: 6\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    for byte in b"abcdef" {
        std::thread::sleep(Duration::from_millis(400));
        client.write_all(&[*byte]).unwrap();
    }
    let mut response = String::new();
    client.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
}

/// Connecting includes the TLS handshake: an https upstream that accepts the connection and
/// never speaks gets a 504 too.
#[test]
fn an_upstream_that_never_finishes_the_handshake_gets_a_504() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let ca = TempFile::new(&pki().ca_pem);
    let gw = Gateway::start(
        "proxy-handshake",
        &[
            "--upstream",
            &format!("https://localhost:{port}"),
            "--upstream-timeout",
            "1",
        ],
        &[("SSL_CERT_FILE", ca.path())],
    );
    let started = Instant::now();
    let answer = get(&gw.addr, "/x", &BY_KEY);
    assert_failure(
        &answer,
        504,
        "UPSTREAM_TIMEOUT",
        "did not accept a connection within 1 s",
    );
    assert!(started.elapsed() < Duration::from_secs(1) + SLACK);
}

/// An upstream that stops in the middle of its answer: the client gets what was sent, then
/// the connection closes (a status cannot be taken back), within the timeout.
#[test]
fn an_answer_that_stalls_is_cut_after_the_timeout() {
    let (release_tx, release) = channel::<()>();
    let release = std::sync::Mutex::new(release);
    let addr = upstream(move |_reader, mut stream, _head| {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            .unwrap();
        // Hold the connection open, silent, until the test ends.
        let _ = release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(60));
    });
    let gw = Gateway::start(
        "proxy-stall",
        &[
            "--upstream",
            &format!("http://{addr}"),
            "--upstream-timeout",
            "1",
        ],
        &[],
    );
    let started = Instant::now();
    let mut client = TcpStream::connect(&gw.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(1) + SLACK))
        .unwrap();
    write!(
        client,
        "GET /partial HTTP/1.1\r\nhost: gw\r\nx-org-id: acme\r\nx-api-key: {KEY}\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let result = client.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(
        result.is_ok(),
        "the connection was not closed: {result:?} after {response}"
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("0123456789"), "{response}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(gw.log().contains("stalled"), "{}", gw.log());
    let _ = release_tx.send(());
}

// --- The upstream's cookies ----------------------------------------------------------------

/// The upstream's `Set-Cookie: JSESSIONID` is dropped (logged once, without its value), its
/// other cookies pass, and the admin's gateway session keeps working.
#[test]
fn the_upstreams_session_cookie_never_replaces_the_gateways() {
    let addr = upstream(|_reader, mut stream, _head| {
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nset-cookie: JSESSIONID=upstream-session-value; Path=/; HttpOnly\r\n\
                  set-cookie: theme=dark; Path=/\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            )
            .unwrap();
    });
    let gw = Gateway::start(
        "proxy-cookie",
        &["--upstream", &format!("http://{addr}")],
        &[],
    );
    let session = login(&gw.addr, KEY).unwrap();
    let cookie = format!("JSESSIONID={session}");
    for _ in 0..2 {
        let answer = get(&gw.addr, "/app", &[("Cookie", &cookie)]);
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(
            answer.header("set-cookie"),
            ["theme=dark; Path=/"],
            "{answer:?}"
        );
    }
    let answer = get(&gw.addr, "/app", &BY_KEY);
    assert_eq!(answer.header("set-cookie"), ["theme=dark; Path=/"]);
    // The gateway's session is still the admin's.
    let answer = get(
        &gw.addr,
        "/api/v1/authenticatedSession",
        &[("Cookie", &cookie)],
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let log = gw.log();
    assert_eq!(
        log.matches("dropped the upstream's Set-Cookie: JSESSIONID")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("upstream-session-value"), "{log}");
    assert!(!log.contains(&session), "{log}");
}

/// `send` is used by the forward-auth tests; here a POST with a body goes through unchanged.
#[test]
fn a_request_body_and_method_reach_the_upstream_unchanged() {
    let (tx, rx): (Sender<(String, String)>, _) = channel();
    let tx = std::sync::Mutex::new(tx);
    let addr = upstream(move |mut reader, mut stream, head| {
        let length: usize = head_value(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        tx.lock()
            .unwrap()
            .send((head, String::from_utf8(body).unwrap()))
            .unwrap();
        stream
            .write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone",
            )
            .unwrap();
    });
    let gw = Gateway::start(
        "proxy-post",
        &["--upstream", &format!("http://{addr}")],
        &[],
    );
    let mut headers = BY_KEY.to_vec();
    headers.push(("content-type", "application/json"));
    let answer = send(&gw.addr, "POST", "/items", &headers, r#"{"n":1}"#);
    assert_eq!((answer.status, answer.body.as_str()), (201, "done"));
    let (head, body) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(head.starts_with("POST /items HTTP/1.1"), "{head}");
    assert_eq!(body, r#"{"n":1}"#);
}
