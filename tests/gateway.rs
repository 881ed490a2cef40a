//! End to end: the built gateway example on a free port, spoken to over real HTTP.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `cargo test` builds the examples before running tests; find the gateway beside this test.
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

fn start(args: &[&str]) -> Gateway {
    start_with_env(args, &[])
}

fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
    let mut child = Command::new(gateway_binary())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("ORGKEY_ADMIN_PASSWORD")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // A generated admin password is printed as a fifth line; a given one never is.
    let given =
        args.contains(&"--password") || env.iter().any(|(k, _)| *k == "ORGKEY_ADMIN_PASSWORD");
    let expected = if given { 4 } else { 5 };
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
    let base = lines[0].strip_prefix("base url: http://").unwrap();
    let addr = base.strip_suffix("/api/v1").unwrap().to_owned();
    Gateway { child, addr, lines }
}

fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[test]
fn gateway_prints_credentials_and_serves_them_with_200_and_everything_else_with_401() {
    let gw = start(&[]);
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
    let gw = start_with_env(
        &["--org-id", "org-7", "--api-key", "AbCdEf123456"],
        &[("ORGKEY_ADMIN_PASSWORD", "FromTheEnvironment1")],
    );
    assert_eq!(gw.lines[1], "org id: org-7");
    assert_eq!(gw.lines[2], "api key: AbCdEf123456");
    assert_eq!(gw.lines[3], "admin: admin@org-7.example");
    assert_eq!(gw.lines.len(), 4, "a given password is never printed");
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
