//! The built gateway (`orgkey-gateway`) on a free port, and raw HTTP/1.1 to it, for
//! tests/forward_auth.rs and tests/gateway_proxy.rs (included with `#[path]`; each test file
//! also declares `mod common`).
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::TempDb;

/// The key every test gateway starts with.
pub const KEY: &str = "AbCdEf123456";
/// The admin's password every test gateway starts with.
pub const PASSWORD: &str = "CorrectHorse12!";

/// A running gateway, killed when dropped; its stderr goes to a file ([`Gateway::log`]).
pub struct Gateway {
    child: Child,
    /// `127.0.0.1:port`.
    pub addr: String,
    log: PathBuf,
    state: Option<TempDb>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Gateway {
    /// Starts a gateway on a fresh state (org `acme`, key [`KEY`], admin
    /// `admin@acme.example` with [`PASSWORD`]) with `args` and `env` added.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_on(TempDb::new(name), args, env)
    }

    /// [`Gateway::start`] on `state` (a new one, or one a stopped gateway left).
    pub fn start_on(state: TempDb, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = PathBuf::from(format!("{}.log", state.path()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
            .args(["--listen", "127.0.0.1:0", "--state", state.path()])
            .args(["--api-key", KEY, "--password", PASSWORD])
            .args(args)
            .env_remove("ORGKEY_ADMIN_PASSWORD")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // base url, org id, api key (on a new state), admin, admin page (a given password is
        // not printed): up to the admin page's line.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let line = line.unwrap_or_default();
                let last = line.starts_with("admin page: ");
                if tx.send(line).is_err() || last {
                    break;
                }
            }
        });
        let mut lines: Vec<String> = Vec::new();
        while !lines.last().is_some_and(|l| l.starts_with("admin page: ")) {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the gateway printed only {lines:?}; its log: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        let addr = lines[0]
            .strip_prefix("base url: http://")
            .and_then(|base| base.strip_suffix("/api/v1"))
            .unwrap_or_else(|| panic!("unexpected first lines: {lines:?}"))
            .to_owned();
        Self {
            child,
            addr,
            log,
            state: Some(state),
        }
    }

    /// The state file.
    pub fn state(&self) -> &str {
        self.state.as_ref().map_or("", TempDb::path)
    }

    /// Stops the gateway (SIGKILL) and hands its state back, for a restart on it.
    pub fn stop(mut self) -> TempDb {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.state.take().unwrap()
    }

    /// What the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's peak resident memory so far (`VmHWM`, Linux), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Resets [`Gateway::peak_rss`] to the current resident memory (Linux 4.0 and newer;
    /// does nothing elsewhere), so that the peak of what follows is measured, not the first
    /// start's (the admin's argon2 hash alone takes 19 MiB).
    pub fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// Logs in as the admin with `key`; the session id.
    pub fn login(&self, key: &str) -> Option<String> {
        login(&self.addr, key)
    }
}

/// An HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    /// The status line and the headers, as sent.
    pub head: String,
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The values of header `name` (any case).
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// One request on a fresh connection (`connection: close`), read to the end.
pub fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Answer {
        head: head.to_owned(),
        status,
        body: body.to_owned(),
    }
}

/// A GET with `headers`.
pub fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(addr, "GET", path, headers, "")
}

/// Logs in as `admin@acme.example` with `key` (obfuscated, ZIA protocol); the session id.
pub fn login(addr: &str, key: &str) -> Option<String> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let api_key = orgkey::session::obfuscate::obfuscate(key.as_bytes(), ts).unwrap();
    let body = format!(
        r#"{{"apiKey":"{}","username":"admin@acme.example","password":"{PASSWORD}","timestamp":{ts}}}"#,
        std::str::from_utf8(&api_key).unwrap()
    );
    let answer = send(
        addr,
        "POST",
        "/api/v1/authenticatedSession",
        &[("content-type", "application/json")],
        &body,
    );
    if answer.status != 200 {
        return None;
    }
    session_of(&answer)
}

/// The session id an answer sets, if any.
pub fn session_of(answer: &Answer) -> Option<String> {
    answer
        .header("set-cookie")
        .iter()
        .find_map(|c| c.strip_prefix("JSESSIONID="))
        .map(|rest| rest.split(';').next().unwrap().to_owned())
}

/// Regenerates the key through the gateway with `session`: (the new key, the carried-over
/// session).
pub fn regenerate(addr: &str, session: &str) -> (String, String) {
    let answer = send(
        addr,
        "POST",
        "/api/v1/apiKeys/1/regenerate",
        &[("cookie", &format!("JSESSIONID={session}"))],
        "",
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let resource: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let key = resource["keyValue"].as_str().unwrap().to_owned();
    (key, session_of(&answer).expect("a carried-over session"))
}

/// Logs `session` out.
pub fn logout(addr: &str, session: &str) {
    let answer = send(
        addr,
        "DELETE",
        "/api/v1/authenticatedSession",
        &[("cookie", &format!("JSESSIONID={session}"))],
        "",
    );
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// Reads an HTTP/1.x request head (up to the blank line) from `reader`; `None` at EOF.
pub fn read_head(reader: &mut impl BufRead) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}

/// The value of header `name` in a raw head (any case), first one.
pub fn head_value(head: &str, name: &str) -> Option<String> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
}

/// An upstream that records every request head it gets and answers `200 upstream`.
pub struct Recorder {
    /// `127.0.0.1:port`.
    pub addr: String,
    heads: std::sync::mpsc::Receiver<String>,
}

impl Recorder {
    /// Starts one on a free port (a thread that lives as long as the test binary).
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, heads) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let Some(head) = read_head(&mut reader) else {
                    continue;
                };
                let length: u64 = head_value(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let _ = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink());
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream",
                );
                if tx.send(head).is_err() {
                    break;
                }
            }
        });
        Self { addr, heads }
    }

    /// The next request head the upstream got, lower-cased, within 10 s.
    pub fn next(&self) -> String {
        self.heads
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream got no request")
            .to_ascii_lowercase()
    }

    /// Panics if the upstream gets a request within 300 ms.
    pub fn assert_nothing(&self, why: &str) {
        if let Ok(head) = self.heads.recv_timeout(Duration::from_millis(300)) {
            panic!("{why}: the upstream got {head}");
        }
    }
}
