//! G4 end to end: the gateway's forward-auth endpoint (`/api/v1/verify`), asked directly and
//! by a real nginx (`auth_request`) in front of a real upstream, with the README's recipe.
//!
//! nginx is Debian's package (`/usr/sbin/nginx`, or `ORGKEY_NGINX`). Without it the nginx
//! tests pass without running and say so on stderr (SKIPPED); with `ORGKEY_REQUIRE_NGINX=1`
//! (`.ci/run`) they fail instead.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/gateway.rs"]
mod gateway;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{get, login, logout, regenerate, send, Gateway, Recorder, KEY};

// --- The endpoint itself ------------------------------------------------------------------

/// Any method, any path below `/api/v1/verify`: 200 with the identity for a key or a session,
/// the layer's 401 otherwise; `no-store` always; a logged-out session is refused.
#[test]
fn verify_answers_the_identity_or_the_layers_refusal_and_is_never_cached() {
    let gw = Gateway::start("verify", &[], &[]);
    let by_key = [("X-Org-Id", "acme"), ("X-API-Key", KEY)];
    for (method, path) in [
        ("GET", "/api/v1/verify"),
        ("HEAD", "/api/v1/verify"),
        ("POST", "/api/v1/verify"),
        ("DELETE", "/api/v1/verify/reports/7?x=1"),
        ("PUT", "/api/v1/verify/"),
    ] {
        let answer = send(&gw.addr, method, path, &by_key, "");
        assert_eq!(answer.status, 200, "{method} {path}: {answer:?}");
        assert_eq!(answer.header("x-orgkey-org"), ["acme"], "{answer:?}");
        assert_eq!(answer.header("x-orgkey-auth"), ["api_key"], "{answer:?}");
        assert!(answer.header("x-orgkey-admin").is_empty(), "{answer:?}");
        assert_eq!(answer.header("cache-control"), ["no-store"], "{answer:?}");
        if method != "HEAD" {
            assert_eq!(answer.body, r#"{"auth":"api_key","orgId":"acme"}"#);
        }
    }
    // A body is not needed, and one sent is not a problem.
    let answer = send(&gw.addr, "POST", "/api/v1/verify", &by_key, "ignored");
    assert_eq!(answer.status, 200, "{answer:?}");

    for (why, headers) in [
        ("no key", vec![("X-Org-Id", "acme")]),
        (
            "wrong key",
            vec![("X-Org-Id", "acme"), ("X-API-Key", "WrongKey1234")],
        ),
        (
            "unknown org",
            vec![("X-Org-Id", "globex"), ("X-API-Key", KEY)],
        ),
        ("no org", vec![("X-API-Key", KEY)]),
        ("nothing", vec![]),
    ] {
        let answer = get(&gw.addr, "/api/v1/verify", &headers);
        assert_eq!(answer.status, 401, "{why}: {answer:?}");
        assert!(answer.header("x-orgkey-org").is_empty(), "{why}");
        assert!(!answer.header("www-authenticate").is_empty(), "{why}");
        assert_eq!(answer.header("cache-control"), ["no-store"], "{why}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert!(body["code"].is_string(), "{why}: {body}");
    }
    // Paths that only look like it are not it.
    let answer = get(&gw.addr, "/api/v1/verifyx", &by_key);
    assert!(answer.header("x-orgkey-org").is_empty(), "{answer:?}");

    // Sessions, as on every protected route, until logged out.
    let session = login(&gw.addr, KEY).unwrap();
    let cookie = format!("JSESSIONID={session}");
    let answer = get(&gw.addr, "/api/v1/verify", &[("Cookie", &cookie)]);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("x-orgkey-auth"), ["session"]);
    assert_eq!(answer.header("x-orgkey-admin"), ["admin@acme.example"]);
    assert_eq!(answer.header("x-orgkey-org"), ["acme"]);
    logout(&gw.addr, &session);
    let answer = get(&gw.addr, "/api/v1/verify", &[("Cookie", &cookie)]);
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.header("cache-control"), ["no-store"]);
    assert!(!gw.log().contains(&session), "a session id in the log");
}

/// With `--upstream`, `/api/v1/verify` is still the gateway's: never forwarded.
#[test]
fn verify_is_answered_by_the_gateway_also_when_it_proxies() {
    let upstream = Recorder::start();
    let gw = Gateway::start(
        "verify-proxy",
        &["--upstream", &format!("http://{}", upstream.addr)],
        &[],
    );
    let by_key = [("X-Org-Id", "acme"), ("X-API-Key", KEY)];
    let answer = get(&gw.addr, "/api/v1/verify/some/path", &by_key);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("x-orgkey-org"), ["acme"]);
    assert_ne!(answer.body, "upstream");
    upstream.assert_nothing("verify was forwarded");
    // Everything else is.
    let answer = get(&gw.addr, "/api/v1/other", &by_key);
    assert_eq!((answer.status, answer.body.as_str()), (200, "upstream"));
    assert!(upstream.next().starts_with("get /api/v1/other "));
}

// --- Behind a real nginx ------------------------------------------------------------------

/// nginx, started on a free port with a config in its own temp dir; stopped (and the dir
/// removed) when dropped, also when a test panics.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nginx binary, or `None` after saying why the nginx tests are skipped (a panic with
/// `ORGKEY_REQUIRE_NGINX=1`).
fn nginx_binary() -> Option<PathBuf> {
    let binary = std::env::var_os("ORGKEY_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    let why = match Command::new(&binary).arg("-v").output() {
        Ok(output) if output.status.success() => return Some(binary),
        Ok(output) => format!("{} -v failed ({})", binary.display(), output.status),
        Err(error) => format!("{} cannot be run ({error})", binary.display()),
    };
    if std::env::var("ORGKEY_REQUIRE_NGINX").as_deref() == Ok("1") {
        panic!(
            "ORGKEY_REQUIRE_NGINX=1 but {why}: install Debian's nginx (apt-get install nginx) \
             or set ORGKEY_NGINX"
        );
    }
    common::skip::announce(
        "tests/forward_auth.rs",
        "the tests behind a real nginx (behind_nginx_*) pass without running",
        &format!("{why}; install Debian's nginx (apt-get install nginx) or set ORGKEY_NGINX"),
    );
    None
}

/// The nginx recipe of the README (the one ```nginx block), as the test runs it.
fn readme_recipe() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut blocks = readme.split("```nginx\n").skip(1);
    let block = blocks.next().expect("the README has an nginx recipe");
    assert!(blocks.next().is_none(), "one nginx recipe in the README");
    block.split("```").next().unwrap().to_owned()
}

/// A free port on 127.0.0.1 (free when asked; nginx binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    /// nginx with the README's recipe, asking `gateway` and forwarding to `upstream`.
    fn start(binary: &Path, gateway: &str, upstream: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let dir = std::env::temp_dir().join(format!("orgkey-nginx-{}", u64::from_le_bytes(bytes)));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let recipe = readme_recipe();
        for placeholder in ["listen 80;", "http://gateway:8080/", "http://app:8000;"] {
            assert!(recipe.contains(placeholder), "{placeholder} in {recipe}");
        }
        let recipe = recipe
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
            .replace("http://gateway:8080/", &format!("http://{gateway}/"))
            .replace("http://app:8000;", &format!("http://{upstream};"));
        let d = dir.display();
        let config = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             access_log {d}/access.log;\n\
             client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             {recipe}\n\
             }}\n"
        );
        let file = dir.join("nginx.conf");
        std::fs::write(&file, config).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&file)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut nginx = Self {
            child,
            dir,
            addr: format!("127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while TcpStream::connect(&nginx.addr).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.error_log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx does not listen: {}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// The gateway, a recording upstream and nginx in front of both, or `None` (skipped).
fn behind_nginx(test: &str) -> Option<(Gateway, Recorder, Nginx)> {
    let binary = nginx_binary()?;
    let gw = Gateway::start(test, &[], &[]);
    let upstream = Recorder::start();
    let nginx = Nginx::start(&binary, &gw.addr, &upstream.addr);
    Some((gw, upstream, nginx))
}

/// Every header line of `head` whose name is `name` (lower-cased heads).
fn lines_named<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter(|line| {
            line.split_once(':')
                .is_some_and(|(n, _)| n.trim().replace('_', "-") == name)
        })
        .collect()
}

#[test]
fn behind_nginx_a_valid_key_reaches_the_upstream_with_the_identity_and_without_the_key() {
    let Some((_gw, upstream, nginx)) = behind_nginx("nginx-key") else {
        return;
    };
    let answer = get(
        &nginx.addr,
        "/reports/1?x=2",
        &[
            ("X-Org-Id", "acme"),
            ("X-API-Key", KEY),
            // Forged identities, in the spellings a server might read.
            ("X-Orgkey-Org", "globex"),
            ("X-ORGKEY-ADMIN", "root@globex.example"),
            ("x_orgkey_auth", "session"),
            ("Cookie", "theme=dark"),
        ],
    );
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "upstream"),
        "{}",
        nginx.error_log()
    );
    let head = upstream.next();
    assert!(head.starts_with("get /reports/1?x=2 "), "{head}");
    assert_eq!(
        lines_named(&head, "x-orgkey-org"),
        ["x-orgkey-org: acme"],
        "{head}"
    );
    assert_eq!(
        lines_named(&head, "x-orgkey-auth"),
        ["x-orgkey-auth: api_key"],
        "{head}"
    );
    assert!(lines_named(&head, "x-orgkey-admin").is_empty(), "{head}");
    assert!(
        lines_named(&head, "x-api-key").is_empty(),
        "the key reached the upstream: {head}"
    );
    assert!(!head.contains(&KEY.to_ascii_lowercase()), "{head}");
    assert!(
        !head.contains("globex") && !head.contains("root@"),
        "{head}"
    );
    assert!(
        head.contains("cookie: theme=dark\r\n"),
        "other cookies pass: {head}"
    );

    // Refused ones never reach it: nginx answers the gateway's 401.
    for (why, headers) in [
        ("no key", vec![("X-Org-Id", "acme")]),
        (
            "wrong key",
            vec![("X-Org-Id", "acme"), ("X-API-Key", "WrongKey1234")],
        ),
        (
            "forged identity only",
            vec![("X-Orgkey-Org", "acme"), ("X-Orgkey-Auth", "api_key")],
        ),
    ] {
        for method in ["GET", "POST"] {
            let answer = send(&nginx.addr, method, "/reports/1", &headers, "");
            assert_eq!(answer.status, 401, "{why} {method}: {answer:?}");
            upstream.assert_nothing(why);
        }
    }
}

#[test]
fn behind_nginx_a_session_passes_until_logged_out_and_its_cookie_stays_at_the_proxy() {
    let Some((gw, upstream, nginx)) = behind_nginx("nginx-session") else {
        return;
    };
    let session = login(&gw.addr, KEY).unwrap();
    let cookie = format!("theme=dark; JSESSIONID={session}");
    let answer = get(&nginx.addr, "/app", &[("Cookie", &cookie)]);
    assert_eq!(answer.status, 200, "{answer:?} {}", nginx.error_log());
    let head = upstream.next();
    assert_eq!(
        lines_named(&head, "x-orgkey-auth"),
        ["x-orgkey-auth: session"],
        "{head}"
    );
    assert_eq!(
        lines_named(&head, "x-orgkey-admin"),
        ["x-orgkey-admin: admin@acme.example"],
        "{head}"
    );
    assert_eq!(
        lines_named(&head, "x-orgkey-org"),
        ["x-orgkey-org: acme"],
        "{head}"
    );
    assert!(
        !head.contains(&session.to_ascii_lowercase()),
        "the session id reached the upstream: {head}"
    );
    assert!(lines_named(&head, "cookie").is_empty(), "{head}");

    logout(&gw.addr, &session);
    let answer = get(&nginx.addr, "/app", &[("Cookie", &cookie)]);
    assert_eq!(answer.status, 401, "{answer:?}");
    upstream.assert_nothing("a logged-out session");
}

/// W1 behind forward-auth: nginx asks with GET, but the recipe names the client's method, so
/// a cross-site POST carrying the admin's cookie is refused before the upstream, while the
/// same admin's same-site read passes.
#[test]
fn behind_nginx_a_cross_site_post_with_the_session_never_reaches_the_upstream() {
    let Some((gw, upstream, nginx)) = behind_nginx("nginx-csrf") else {
        return;
    };
    let session = login(&gw.addr, KEY).unwrap();
    let cookie = format!("JSESSIONID={session}");
    let forged = send(
        &nginx.addr,
        "POST",
        "/app/transfer",
        &[
            ("Cookie", &cookie),
            ("Origin", "https://evil.example"),
            ("Sec-Fetch-Site", "cross-site"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "amount=1000",
    );
    assert_eq!(forged.status, 403, "{forged:?} {}", nginx.error_log());
    upstream.assert_nothing("a cross-site POST with the admin's session");
    let read = get(&nginx.addr, "/app", &[("Cookie", &cookie)]);
    assert_eq!(read.status, 200, "{read:?}");
    let _ = upstream.next();
}

#[test]
fn behind_nginx_a_regenerate_is_in_force_as_soon_as_it_returns() {
    let Some((gw, upstream, nginx)) = behind_nginx("nginx-regenerate") else {
        return;
    };
    let mut key = KEY.to_owned();
    assert_eq!(
        get(
            &nginx.addr,
            "/r",
            &[("X-Org-Id", "acme"), ("X-API-Key", &key)]
        )
        .status,
        200
    );
    upstream.next();
    let mut session = login(&gw.addr, &key).unwrap();
    for round in 0..3 {
        let (new_key, carried) = regenerate(&gw.addr, &session);
        session = carried;
        // At once, no pause: nginx asks on every request and nothing caches the answer.
        let old = [("X-Org-Id", "acme"), ("X-API-Key", key.as_str())];
        let answer = get(&nginx.addr, "/r", &old);
        assert_eq!(
            answer.status, 401,
            "round {round}: the old key still passes: {answer:?}"
        );
        upstream.assert_nothing("the old key");
        let fresh = [("X-Org-Id", "acme"), ("X-API-Key", new_key.as_str())];
        let answer = get(&nginx.addr, "/r", &fresh);
        assert_eq!(answer.status, 200, "round {round}: {answer:?}");
        assert!(upstream.next().contains("x-orgkey-org: acme\r\n"));
        key = new_key;
    }
}
