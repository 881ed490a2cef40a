//! G2 end to end: the built gateway, with short limits set by its flags, against slow, idle and
//! too many clients over real sockets. Bounds are generous (a limit plus several seconds), so a
//! loaded machine makes these tests slower, not flaky.
//!
//! Like tests/gateway.rs this needs the example built: `cargo build --all-features --example
//! gateway` (or a whole `cargo test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::TempDb;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Slack on top of a limit before a test calls it broken.
const SLACK: Duration = Duration::from_secs(5);

/// The gateway binary, which Cargo builds for this test (see tests/gateway.rs).
fn gateway_binary() -> PathBuf {
    // Cargo builds the binary for this test and says where it is.
    PathBuf::from(env!("CARGO_BIN_EXE_orgkey-gateway"))
}

struct Gateway {
    child: Child,
    addr: String,
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
    /// Starts the gateway on a fresh state with `args`; under `ulimit -n fd_limit` if given.
    fn start(args: &[&str], fd_limit: Option<u32>, env: &[(&str, &str)]) -> Self {
        let state = TempDb::new("gateway-limits");
        let mut command = match fd_limit {
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(gateway_binary());
                sh
            }
            None => Command::new(gateway_binary()),
        };
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--state", state.path()])
            .args(args)
            .env_remove("ORGKEY_ADMIN_PASSWORD")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
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
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let last = line.starts_with("admin page: ");
                if tx.send(line).is_err() || last {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let last = line.starts_with("admin page: ");
                    lines.push(line);
                    if last {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the gateway printed only {lines:?}; stderr: {:?}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        let addr = lines[0]
            .strip_prefix("base url: http://")
            .and_then(|base| base.strip_suffix("/api/v1"))
            .unwrap_or_else(|| panic!("unexpected first line: {lines:?}"))
            .to_owned();
        let key = lines
            .iter()
            .find_map(|line| line.strip_prefix("api key: "))
            .unwrap()
            .to_owned();
        Self {
            child,
            addr,
            key,
            log,
            _state: state,
        }
    }

    fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).unwrap()
    }

    /// A keep-alive `GET /api/v1/status` with the org's key.
    fn status_request(&self) -> String {
        format!(
            "GET /api/v1/status HTTP/1.1\r\nhost: {}\r\nx-org-id: acme\r\nx-api-key: {}\r\n\r\n",
            self.addr, self.key
        )
    }

    /// Sends a status request on `stream` and reads the answer (within `bound`).
    fn status_on(&self, stream: &mut TcpStream, bound: Duration) -> Option<(u16, String)> {
        stream.write_all(self.status_request().as_bytes()).ok()?;
        read_response(stream, bound)
    }

    /// A status request on a new connection, answered within `bound`.
    fn status(&self, bound: Duration) -> Option<(u16, String)> {
        self.status_on(&mut self.connect(), bound)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Reads one response (head and `content-length` body) within `bound`; `None` if none
/// arrived in full by then or the connection closed first.
fn read_response(stream: &mut TcpStream, bound: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + bound;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                let status = head.get(9..12)?.parse().ok()?;
                let body = String::from_utf8_lossy(&received[end + 4..end + 4 + length]);
                return Some((status, body.into_owned()));
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

/// What a client saw before the gateway closed its connection.
struct Closed {
    after: Duration,
    received: Vec<u8>,
}

/// Keeps `stream` open, writing the next byte of `trickle` every 250 ms (none if empty),
/// until the gateway closes it; `None` if it is still open after `bound`.
fn wait_for_close(stream: &mut TcpStream, trickle: &[u8], bound: Duration) -> Option<Closed> {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut next = trickle.iter();
    stream
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    while start.elapsed() < bound {
        if let Some(byte) = next.next() {
            if stream.write_all(&[*byte]).is_err() {
                // Closed on the gateway's side (a reset): drain what it sent before.
                let _ = stream.read_to_end(&mut received);
                return Some(Closed {
                    after: start.elapsed(),
                    received,
                });
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Some(Closed {
                    after: start.elapsed(),
                    received,
                })
            }
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                return Some(Closed {
                    after: start.elapsed(),
                    received,
                })
            }
        }
    }
    None
}

/// Opens `n` connections and holds them, sending nothing.
fn hold_idle(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn slow_header_clients_are_disconnected_after_the_header_read_timeout() {
    let limit = Duration::from_secs(1);
    let gw = Gateway::start(&["--header-read-timeout", "1"], None, &[]);
    let head = gw.status_request();
    // Sends nothing; sends part of a head, then nothing; trickles a head one byte at a time
    // (a timeout on inactivity alone would never fire).
    let clients: Vec<(&str, Vec<u8>)> = vec![
        ("silent", Vec::new()),
        ("half a head", Vec::new()),
        ("trickling", {
            let mut bytes = b"GET /api/v1/status HTTP/1.1\r\nx-pad: ".to_vec();
            bytes.extend(std::iter::repeat_n(b'a', 1000));
            bytes
        }),
    ];
    let threads: Vec<_> = clients
        .into_iter()
        .map(|(name, trickle)| {
            let mut stream = gw.connect();
            if name == "half a head" {
                stream.write_all(&head.as_bytes()[..30]).unwrap();
            }
            std::thread::spawn(move || {
                let closed = wait_for_close(&mut stream, &trickle, limit + SLACK);
                (name, closed.map(|c| c.after))
            })
        })
        .collect();
    for thread in threads {
        let (name, closed) = thread.join().unwrap();
        assert!(
            closed.is_some(),
            "{name}: still open {:?} after the header-read timeout",
            SLACK
        );
    }
    // A client that sends its head at once is served as always.
    assert_eq!(
        gw.status(Duration::from_secs(10)),
        Some((200, r#"{"status":"ACTIVE"}"#.to_owned()))
    );
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout_not_the_header_read_timeout() {
    let idle = Duration::from_secs(6);
    let gw = Gateway::start(
        &["--header-read-timeout", "1", "--idle-timeout", "6"],
        None,
        &[],
    );
    let mut stream = gw.connect();
    let bound = Duration::from_secs(10);
    assert_eq!(gw.status_on(&mut stream, bound).map(|r| r.0), Some(200));
    // Twice the header-read timeout later, well within the idle timeout, the connection
    // still takes a request: the header-read timeout does not run between requests.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        gw.status_on(&mut stream, bound).map(|r| r.0),
        Some(200),
        "a keep-alive connection was closed before its idle timeout"
    );
    let closed = wait_for_close(&mut stream, &[], idle + SLACK);
    let closed = closed.expect("an idle keep-alive connection is still open");
    assert!(closed.received.is_empty(), "closed without a response");
}

#[test]
fn a_slow_body_gets_408_and_its_connection_closed_after_the_body_read_timeout() {
    let limit = Duration::from_secs(2);
    let gw = Gateway::start(&["--body-read-timeout", "2"], None, &[]);
    // A login whose body never arrives in full: one stops after 20 bytes, one trickles a byte
    // every 250 ms (it would need a minute for all of them).
    let head = format!(
        "POST /api/v1/authenticatedSession HTTP/1.1\r\nhost: {}\r\ncontent-type: \
         application/json\r\ncontent-length: 240\r\n\r\n{{\"apiKey\":\"aaaaaaaaa",
        gw.addr
    );
    let threads: Vec<_> = [("stalled", Vec::new()), ("trickling", vec![b'a'; 200])]
        .into_iter()
        .map(|(name, trickle)| {
            let mut stream = gw.connect();
            stream.write_all(head.as_bytes()).unwrap();
            std::thread::spawn(move || (name, wait_for_close(&mut stream, &trickle, limit + SLACK)))
        })
        .collect();
    for thread in threads {
        let (name, closed) = thread.join().unwrap();
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after the timeout"));
        let answer = String::from_utf8_lossy(&closed.received);
        assert!(
            answer.starts_with("HTTP/1.1 408 "),
            "{name}: closed after {:?} with {answer:?}",
            closed.after
        );
    }
    assert_eq!(gw.status(Duration::from_secs(10)).map(|r| r.0), Some(200));
}

#[test]
fn over_max_connections_a_client_waits_until_idle_connections_time_out_and_is_then_served() {
    let idle = Duration::from_secs(4);
    let gw = Gateway::start(
        &[
            "--max-connections",
            "3",
            "--idle-timeout",
            "4",
            "--header-read-timeout",
            "60",
        ],
        None,
        &[],
    );
    // Three keep-alive connections, each idle after one request: the cap is reached.
    let before_requests = Instant::now();
    let mut held: Vec<TcpStream> = (0..3).map(|_| gw.connect()).collect();
    for stream in &mut held {
        assert_eq!(
            gw.status_on(stream, Duration::from_secs(10)).map(|r| r.0),
            Some(200)
        );
    }
    let mut fourth = gw.connect();
    fourth.write_all(gw.status_request().as_bytes()).unwrap();
    // The held connections cannot time out before `before_requests + idle`: until shortly
    // before that, the fourth client gets nothing. (Skipped if this thread was too slow.)
    let quiet_until = before_requests + idle - Duration::from_millis(500);
    if let Some(quiet) = quiet_until.checked_duration_since(Instant::now()) {
        fourth.set_read_timeout(Some(quiet)).unwrap();
        let mut byte = [0u8; 1];
        match fourth.read(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("served over the cap while 3 connections were held: {other:?}"),
        }
    }
    assert_eq!(
        read_response(&mut fourth, idle + SLACK + SLACK).map(|r| r.0),
        Some(200),
        "not served once the idle connections timed out"
    );
    for stream in &mut held {
        assert!(
            wait_for_close(stream, &[], SLACK).is_some(),
            "a held connection is still open after its idle timeout"
        );
    }
}

/// Generous: the gateway frees descriptors every header-read timeout and retries accepts at
/// least every second.
const RECOVERY: Duration = Duration::from_secs(30);

#[test]
#[cfg(unix)] // sh and ulimit
fn under_a_low_descriptor_limit_the_default_cap_keeps_serving_while_idle_sockets_are_held() {
    let mut gw = Gateway::start(&["--header-read-timeout", "1"], Some(128), &[]);
    // More sockets than the gateway has descriptors, all silent.
    let held = hold_idle(&gw.addr, 200);
    assert_eq!(
        gw.status(RECOVERY).map(|r| r.0),
        Some(200),
        "a new client was not served while idle sockets were held; stderr: {:?}",
        gw.log()
    );
    assert!(gw.alive());
    drop(held);
    assert_eq!(gw.status(RECOVERY).map(|r| r.0), Some(200));
    assert!(gw.alive());
}

#[test]
#[cfg(unix)] // sh and ulimit
fn when_accept_runs_out_of_descriptors_it_backs_off_logs_sparingly_and_recovers() {
    // A cap above the descriptor limit: accept itself fails with EMFILE.
    let mut gw = Gateway::start(
        &["--header-read-timeout", "2", "--max-connections", "1000"],
        Some(128),
        &[],
    );
    let start = Instant::now();
    let held = hold_idle(&gw.addr, 200);
    assert_eq!(
        gw.status(RECOVERY).map(|r| r.0),
        Some(200),
        "a new client was not served while idle sockets were held; stderr: {:?}",
        gw.log()
    );
    assert!(gw.alive(), "the gateway died out of descriptors");
    drop(held);
    assert_eq!(gw.status(RECOVERY).map(|r| r.0), Some(200));
    assert!(gw.alive());
    let errors: Vec<String> = gw
        .log()
        .into_iter()
        .filter(|line| line.contains("accept error"))
        .collect();
    assert!(
        errors
            .iter()
            .any(|line| line.contains("Too many open files")),
        "accept never ran out of descriptors, so this test tested nothing: {errors:?}"
    );
    // One report when it starts, then at most one per 10 s.
    let allowed = 1 + start.elapsed().as_secs() / 10 + 1;
    assert!(
        errors.len() as u64 <= allowed,
        "{} accept-error lines in {:?}: {errors:?}",
        errors.len(),
        start.elapsed()
    );
}

#[test]
fn rust_log_naming_only_orgkey_keeps_the_gateways_own_info_lines() {
    let gw = Gateway::start(&[], None, &[("RUST_LOG", "orgkey=debug")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().iter().any(|l| l.contains("gateway listening")) {
        assert!(
            Instant::now() < deadline,
            "no `gateway listening` line with RUST_LOG=orgkey=debug: {:?}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
