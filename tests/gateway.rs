//! End to end: the built gateway example on a free port, spoken to over real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use common::TempDb;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `cargo test` builds the examples before running tests; find the gateway beside this test.
/// (`cargo test --test gateway` alone does not rebuild the example: run
/// `cargo build --all-features --example gateway` first, or the whole `cargo test`.)
fn gateway_binary() -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("examples").join("gateway");
    assert!(path.exists(), "{} not built", path.display());
    path
}

struct Gateway {
    child: Child,
    addr: String,
    lines: Vec<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(state: &TempDb, args: &[&str]) -> Gateway {
    start_with_env(state, args, &[], true)
}

/// Starts the gateway on `state`; `first` says whether it is the first start (then it prints
/// the key, and a generated password unless one is given).
fn start_with_env(state: &TempDb, args: &[&str], env: &[(&str, &str)], first: bool) -> Gateway {
    let mut child = Command::new(gateway_binary())
        .args(["--listen", "127.0.0.1:0", "--state", state.path()])
        .args(args)
        .env_remove("ORGKEY_ADMIN_PASSWORD")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // A generated admin password is printed as a fifth line; a given one never is. The
    // admin page's address comes last.
    let given =
        args.contains(&"--password") || env.iter().any(|(k, _)| *k == "ORGKEY_ADMIN_PASSWORD");
    let expected = match (first, given) {
        (true, false) => 6,
        (true, true) => 5,
        (false, _) => 4,
    };
    // Read on a thread, so a gateway that prints less fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().take(expected) {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    for _ in 0..expected {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the gateway printed only {lines:?}");
            }
        }
    }
    let base = lines[0]
        .strip_prefix("base url: http://")
        .unwrap_or_else(|| panic!("unexpected first line: {lines:?}"));
    let addr = base.strip_suffix("/api/v1").unwrap().to_owned();
    assert_eq!(
        lines.last().unwrap(),
        &format!("admin page: http://{addr}/admin")
    );
    Gateway { child, addr, lines }
}

fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    send(addr, "GET", path, headers, "").1
}

/// One HTTP/1.1 exchange: (the response head, (status, body)).
fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (String, (u16, String)) {
    let mut stream = TcpStream::connect(addr).unwrap();
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
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_owned(), (status, body.to_owned()))
}

/// Logs in with the obfuscated key; returns the status and the session id, if any.
fn login(addr: &str, key: &str, password: &str) -> (u16, Option<String>) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let api_key = orgkey::session::obfuscate::obfuscate(key.as_bytes(), ts).unwrap();
    let body = format!(
        r#"{{"apiKey":"{}","username":"admin@acme.example","password":"{password}","timestamp":{ts}}}"#,
        std::str::from_utf8(&api_key).unwrap()
    );
    let (head, (status, _)) = send(
        addr,
        "POST",
        "/api/v1/authenticatedSession",
        &[("content-type", "application/json")],
        &body,
    );
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: JSESSIONID="))
        .map(|rest| rest.split(';').next().unwrap().to_owned());
    (status, cookie)
}

#[test]
fn gateway_prints_credentials_and_serves_them_with_200_and_everything_else_with_401() {
    let state = TempDb::new("gateway");
    let gw = start(&state, &[]);
    assert_eq!(gw.lines[1], "org id: acme");
    let key = gw.lines[2].strip_prefix("api key: ").unwrap().to_owned();
    assert!(orgkey::ApiKey::parse(&key).is_ok());
    assert_eq!(gw.lines[3], "admin: admin@acme.example");
    let password = gw.lines[4].strip_prefix("admin password: ").unwrap();
    assert_eq!(password.len(), 20, "a generated password is printed once");

    let (status, body) = get(
        &gw.addr,
        "/api/v1/whoami",
        &[("X-Org-Id", "acme"), ("X-API-Key", &key)],
    );
    assert_eq!((status, body.as_str()), (200, r#"{"orgId":"acme"}"#));
    let (status, body) = get(
        &gw.addr,
        "/api/v1/status",
        &[("X-Org-Id", "acme"), ("X-API-Key", &key)],
    );
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ACTIVE"}"#));

    let (status, _) = get(&gw.addr, "/api/v1/whoami", &[("X-Org-Id", "acme")]);
    assert_eq!(status, 401, "no key");
    let (status, _) = get(
        &gw.addr,
        "/api/v1/whoami",
        &[("X-Org-Id", "acme"), ("X-API-Key", "WrongKey1234")],
    );
    assert_eq!(status, 401, "wrong key");
    let (status, _) = get(
        &gw.addr,
        &format!("/api/v1/whoami?apikey={key}"),
        &[("X-Org-Id", "acme")],
    );
    assert_eq!(status, 401, "key only in the query string");
}

#[test]
fn gateway_uses_the_given_key_and_org_and_refuses_bad_flags() {
    let state = TempDb::new("gateway");
    let gw = start_with_env(
        &state,
        &["--org-id", "org-7", "--api-key", "AbCdEf123456"],
        &[("ORGKEY_ADMIN_PASSWORD", "FromTheEnvironment1")],
        true,
    );
    assert_eq!(gw.lines[1], "org id: org-7");
    assert_eq!(gw.lines[2], "api key: AbCdEf123456");
    assert_eq!(gw.lines[3], "admin: admin@org-7.example");
    assert_eq!(gw.lines.len(), 5, "a given password is never printed");
    assert!(gw
        .lines
        .iter()
        .all(|line| !line.contains("FromTheEnvironment1")));
    let (status, _) = get(
        &gw.addr,
        "/api/v1/whoami",
        &[("X-Org-Id", "org-7"), ("X-API-Key", "AbCdEf123456")],
    );
    assert_eq!(status, 200);

    let output = Command::new(gateway_binary())
        .args(["--api-key", "short-key!"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--api-key"), "{stderr}");
    assert!(
        !stderr.contains("short-key!"),
        "the value is never echoed: {stderr}"
    );
}

/// The persistence issue's end-to-end check: regenerate over HTTP, the old session and key
/// die, the new key logs in and names the admin; after a restart on the same state file the
/// old key is still rejected and the new one works, and no secret is printed again.
#[test]
fn regenerate_over_http_then_restart_on_the_same_state_keeps_the_new_key() {
    let state = TempDb::new("gateway");
    let password = "CorrectHorse12!";
    let gw = start_with_env(
        &state,
        &["--api-key", "AbCdEf123456", "--password", password],
        &[],
        true,
    );
    assert_eq!(gw.lines[2], "api key: AbCdEf123456");
    let (status, cookie) = login(&gw.addr, "AbCdEf123456", password);
    assert_eq!(status, 200);
    let cookie = format!("JSESSIONID={}", cookie.unwrap());

    let (_, (status, body)) = send(
        &gw.addr,
        "POST",
        "/api/v1/apiKeys/1/regenerate",
        &[("cookie", &cookie)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let resource: serde_json::Value = serde_json::from_str(&body).unwrap();
    let new_key = resource["keyValue"].as_str().unwrap().to_owned();
    assert_eq!(resource["lastModifiedBy"]["name"], "admin@acme.example");
    assert_ne!(new_key, "AbCdEf123456");

    let old_key = [("X-Org-Id", "acme"), ("X-API-Key", "AbCdEf123456")];
    let fresh_key = [("X-Org-Id", "acme"), ("X-API-Key", new_key.as_str())];
    assert_eq!(
        get(&gw.addr, "/api/v1/status", &[("cookie", &cookie)]).0,
        401
    );
    assert_eq!(get(&gw.addr, "/api/v1/status", &old_key).0, 401);
    assert_eq!(get(&gw.addr, "/api/v1/status", &fresh_key).0, 200);
    assert_eq!(login(&gw.addr, "AbCdEf123456", password).0, 401);
    assert_eq!(login(&gw.addr, &new_key, password).0, 200);
    drop(gw); // SIGKILL: what was acknowledged is on disk

    let gw = start_with_env(&state, &[], &[], false);
    assert_eq!(gw.lines[1], "org id: acme");
    assert_eq!(
        gw.lines[2], "admin: admin@acme.example",
        "no key, no password printed"
    );
    assert_eq!(get(&gw.addr, "/api/v1/status", &old_key).0, 401);
    assert_eq!(get(&gw.addr, "/api/v1/status", &fresh_key).0, 200);
    assert_eq!(login(&gw.addr, &new_key, password).0, 200);
}

/// `--upstream`: authenticated requests are forwarded without credentials and with the
/// identity headers (which clients cannot forge); unauthenticated ones never reach it.
#[test]
fn upstream_mode_forwards_identity_and_strips_credentials() {
    use std::net::TcpListener;
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            tx.send(head).unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream",
                )
                .unwrap();
        }
    });
    let state = TempDb::new("gateway");
    let gw = start_with_env(
        &state,
        &[
            "--api-key",
            "AbCdEf123456",
            "--password",
            "CorrectHorse12!",
            "--upstream",
            &format!("http://{upstream_addr}"),
        ],
        &[],
        true,
    );
    let (status, body) = get(
        &gw.addr,
        "/reports/1?x=2",
        &[
            ("X-Org-Id", "acme"),
            ("X-API-Key", "AbCdEf123456"),
            ("X-Orgkey-Org", "evil"),
            ("X-Orgkey-Admin", "root@evil.example"),
        ],
    );
    assert_eq!((status, body.as_str()), (200, "upstream"));
    let head = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("get /reports/1?x=2 http/1.1"), "{head}");
    assert!(head.contains("x-orgkey-org: acme\r\n"), "{head}");
    assert!(head.contains("x-orgkey-auth: api_key\r\n"), "{head}");
    assert!(
        !head.contains("evil"),
        "client-sent identity headers are dropped: {head}"
    );
    assert!(
        !head.contains("x-api-key"),
        "the key never reaches the upstream: {head}"
    );

    let (status, _) = get(&gw.addr, "/reports/1", &[("X-Org-Id", "acme")]);
    assert_eq!(status, 401);
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "an unauthenticated request never reaches the upstream"
    );
}
