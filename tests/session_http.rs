//! The gateway's own service (`orgkey::gateway::Site`) over real HTTP: log in with the
//! obfuscated key, call with the cookie, regenerate through the admin handle, and the old
//! cookie is answered 401.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use orgkey::session::obfuscate::obfuscate;
use orgkey::{Actor, OrgId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASSWORD: &str = "CorrectHorse12!";

/// One HTTP/1.1 exchange; returns (status, headers text, body).
async fn exchange(addr: SocketAddr, request: String) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_owned(),
        body.to_owned(),
    )
}

fn get(path: &str, cookie: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: gw\r\ncookie: JSESSIONID={cookie}\r\nconnection: close\r\n\r\n")
}

async fn login(addr: SocketAddr, key: &str) -> (u16, String, String) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let api_key = String::from_utf8(obfuscate(key.as_bytes(), ts).unwrap().to_vec()).unwrap();
    // The Go SDK's shape: the timestamp as a string.
    let body = format!(
        r#"{{"apiKey":"{api_key}","username":"admin@acme.example","password":"{PASSWORD}","timestamp":"{ts}"}}"#
    );
    exchange(
        addr,
        format!(
            "POST /api/v1/authenticatedSession HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

fn cookie_of(head: &str) -> String {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap();
    line.split("JSESSIONID=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn login_call_regenerate_and_the_old_cookie_is_rejected_over_http() {
    let gateway = common::served::serve_gateway(
        orgkey::store::MemoryStore::new(),
        "AbCdEf123456",
        "admin@acme.example",
        PASSWORD,
    )
    .await;
    let keys = gateway.orgkey.keys().clone();
    let addr = gateway.addr;

    let (status, head, body) = login(addr, "AbCdEf123456").await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(body.contains(r#""authType":"ADMIN_LOGIN""#));
    let cookie = cookie_of(&head);

    let (status, _, body) = exchange(addr, get("/api/v1/status", &cookie)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ACTIVE"}"#));
    let (status, _, body) = exchange(addr, get("/api/v1/whoami", &cookie)).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"admin":"admin@acme.example","orgId":"acme"}"#)
    );

    let info = keys
        .regenerate(
            &OrgId::new("acme").unwrap(),
            &Actor::new("ops@acme.example").unwrap(),
        )
        .await
        .unwrap();
    let (status, _, body) = exchange(addr, get("/api/v1/status", &cookie)).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        r#"{"code":"SESSION_NOT_VALID","message":"Session is not valid"}"#
    );
    // The probe agrees, and the old key no longer logs in; the new one does.
    let (status, _, _) = exchange(addr, get("/api/v1/authenticatedSession", &cookie)).await;
    assert_eq!(status, 401);
    assert_eq!(login(addr, "AbCdEf123456").await.0, 401);
    let new_key = info.key().unwrap().expose_secret().to_owned();
    let (status, head, _) = login(addr, &new_key).await;
    assert_eq!(status, 200);
    let fresh = cookie_of(&head);
    assert_eq!(exchange(addr, get("/api/v1/status", &fresh)).await.0, 200);

    // K7: the audit log, newest first, paged; no key material.
    let (status, _, body) = exchange(addr, get("/api/v1/auditLog?limit=1", &fresh)).await;
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["action"], "regenerate");
    assert_eq!(page[0]["actor"], "ops@acme.example");
    let seq = page[0]["seq"].as_u64().unwrap();
    let (_, _, body) = exchange(addr, get(&format!("/api/v1/auditLog?before={seq}"), &fresh)).await;
    let older: serde_json::Value = serde_json::from_str(&body).unwrap();
    let actions: Vec<&str> = older
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["edit", "subscribe"], "the gateway's bootstrap");
    assert!(!body.contains("AbCdEf123456") && !body.contains(&new_key));

    // The Go SDK logs out at /authenticatedSession (no /api/v1): that works too.
    let logout = format!(
        "DELETE /authenticatedSession HTTP/1.1\r\nhost: gw\r\ncookie: JSESSIONID={fresh}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let (status, _, body) = exchange(addr, logout).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ACTIVE"}"#));
    assert_eq!(exchange(addr, get("/api/v1/status", &fresh)).await.0, 401);

    // O2: the counters are served, in Prometheus text, and name no org, admin or secret.
    let (status, head, metrics) = exchange(
        addr,
        "GET /metrics HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".to_owned(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let count = |prefix: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{metrics}"))
    };
    assert!(count("orgkey_logins_total{outcome=\"accepted\"}") >= 2);
    assert!(count("orgkey_logins_total{outcome=\"wrong_key\"}") >= 1);
    assert!(count("orgkey_requests_rejected_total{reason=\"session_key_changed\"}") >= 1);
    assert!(count("orgkey_key_changes_total{action=\"regenerate\"}") >= 1);
    for secret in [
        "acme",
        "admin@acme.example",
        PASSWORD,
        new_key.as_str(),
        fresh.as_str(),
    ] {
        assert!(!metrics.contains(secret), "metrics mention {secret:?}");
    }
    drop(gateway);
}
