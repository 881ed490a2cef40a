//! The Cloud Service API Key page (W1, issue 5) in a real browser: headless Chromium driven
//! through WebDriver (chromedriver), against the gateway's own service over loopback HTTP.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them
//! the browser tests pass without running and the run's stderr says
//! `SKIPPED (tests/admin_page.rs): ...`, unless `ORGKEY_REQUIRE_BROWSER=1` (set by
//! `.ci/run`), which makes a missing browser a failure. `ORGKEY_CHROMIUM` and
//! `ORGKEY_CHROMEDRIVER` override the paths.
//!
//! A screenshot of every state is saved under `$CARGO_TARGET_TMPDIR/admin-page/` (with the
//! `.ci/run` settings: `~/.cache/orgkey-target/tmp/admin-page/`).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fantoccini::{Client, ClientBuilder, Locator};
use orgkey::store::SqliteStore;
use orgkey::{ApiKey, KeyFormat, OrgId, Password, Scope, Scopes, Username};
use serde_json::{json, Value};

const KEY: &str = "AbCdEf123456";
const EDITED: &str = "Zx9Qw8Er7Ty6";
const ADMIN: &str = "admin@acme.example";
const READER: &str = "reader@acme.example";
const BOB: &str = "bob@globex.example";
const GLOBEX_KEY: &str = "GlobexKey123";
const PASSWORD: &str = "CorrectHorse12!";
/// The browser's time zone: not UTC, so "local time" is visible in what the page shows.
const TIME_ZONE: &str = "Asia/Kolkata";
const TZ_OFFSET_SECS: i64 = 5 * 3600 + 30 * 60;

fn browser_paths() -> Option<(PathBuf, PathBuf)> {
    let chromium = PathBuf::from(
        std::env::var("ORGKEY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    let driver = PathBuf::from(
        std::env::var("ORGKEY_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
    );
    if chromium.exists() && driver.exists() {
        return Some((chromium, driver));
    }
    if std::env::var("ORGKEY_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!(
            "ORGKEY_REQUIRE_BROWSER=1 but {} or {} is missing (apt-get install chromium chromium-driver)",
            chromium.display(),
            driver.display()
        );
    }
    common::skip::announce(
        "tests/admin_page.rs",
        "the admin page's browser tests pass without running",
        &format!(
            "{} or {} is missing (apt-get install chromium chromium-driver, or set \
             ORGKEY_CHROMIUM / ORGKEY_CHROMEDRIVER; ORGKEY_REQUIRE_BROWSER=1 makes this a failure)",
            chromium.display(),
            driver.display()
        ),
    );
    None
}

/// Counts the CSRF guard's refusals (its `orgkey::http::csrf` tracing events) in this process.
fn csrf_refusals() -> &'static AtomicUsize {
    static COUNT: OnceLock<&'static AtomicUsize> = OnceLock::new();
    COUNT.get_or_init(|| {
        static REFUSALS: AtomicUsize = AtomicUsize::new(0);
        struct Counter;
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if event.metadata().target() == "orgkey::http::csrf" {
                    REFUSALS.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Counter))
            .expect("no other subscriber in this test binary");
        &REFUSALS
    })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running gateway (the gateway's own service, `orgkey::gateway::Site`) on a SQLite file.
struct Gateway {
    addr: SocketAddr,
    gateway: common::served::Served,
    _state: common::TempDb,
}

impl Gateway {
    async fn start(name: &str) -> Self {
        let state = common::TempDb::new(name);
        let store = SqliteStore::open(&state.0, KeyFormat::default(), common::master_for(&state.0))
            .unwrap();
        let gateway = common::served::serve_gateway(store, KEY, ADMIN, PASSWORD).await;
        gateway
            .orgkey
            .admins()
            .create(
                &Username::new(READER).unwrap(),
                &OrgId::new("acme").unwrap(),
                &Password::new(PASSWORD),
                Scopes::NONE.with(Scope::Api),
            )
            .await
            .unwrap();
        Self {
            addr: gateway.addr,
            gateway,
            _state: state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The key the gateway holds now (`None` after a delete).
    fn key(&self) -> Option<String> {
        self.gateway
            .orgkey
            .keys()
            .view(&OrgId::new("acme").unwrap())
            .unwrap()
            .key()
            .map(|k| k.expose_secret().to_owned())
    }

    fn info(&self) -> orgkey::KeyInfo {
        self.gateway
            .orgkey
            .keys()
            .view(&OrgId::new("acme").unwrap())
            .unwrap()
    }

    /// Status of `GET /api/v1/whoami` with the org and `key` (direct key mode, L1).
    async fn api_status(&self, key: &str) -> u16 {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let request = http::Request::get(self.url("/api/v1/whoami"))
            .header("x-org-id", "acme")
            .header("x-api-key", key)
            .body(http_body_util::Empty::new())
            .unwrap();
        client.request(request).await.unwrap().status().as_u16()
    }
}

/// chromedriver, one headless Chromium session, and where its screenshots go.
struct Browser {
    client: Client,
    driver: Child,
    shots: PathBuf,
    _profile: ProfileDir,
}

struct ProfileDir(PathBuf);

impl Drop for ProfileDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    async fn start(chromium: &Path, driver: &Path) -> Self {
        let port = free_port();
        let mut driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .env("TZ", TIME_ZONE)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            if let Some(status) = driver.try_wait().unwrap() {
                panic!("chromedriver exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = ProfileDir(
            std::env::temp_dir().join(format!("orgkey-chromium-{}-{port}", std::process::id())),
        );
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--lang=en-US",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.0.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-page");
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            client,
            driver,
            shots,
            _profile: profile,
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }

    /// Saves a screenshot of the page as `<name>.png` (a test artifact).
    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn eval(&self, expression: &str) -> Value {
        self.client
            .execute(&format!("return ({expression});"), vec![])
            .await
            .unwrap()
    }

    /// Waits until `expression` is truthy in the page; on timeout saves a screenshot and
    /// fails with `what`.
    async fn wait_for(&self, expression: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self
                .client
                .execute(&format!("return Boolean({expression});"), vec![])
                .await;
            if matches!(value, Ok(Value::Bool(true))) {
                return;
            }
            if Instant::now() > deadline {
                self.shot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await;
                panic!("timed out waiting for {what} ({expression}): last {value:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        let text = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Chromium's en-US dates put a narrow no-break space before AM/PM.
        text.replace('\u{202f}', " ")
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn fill(&self, css: &str, value: &str) {
        let input = self.client.find(Locator::Css(css)).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }

    async fn visible(&self, id: &str) -> bool {
        self.eval(&format!(
            "(() => {{ const e = document.getElementById('{id}'); return !!e && !e.hidden && e.offsetParent !== null; }})()"
        ))
        .await
            == Value::Bool(true)
    }

    async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
        self.wait_for(
            "document.body && document.body.dataset.ready === 'true'",
            "page ready",
        )
        .await;
    }

    async fn sign_in(&self, username: &str, password: &str, key: &str) {
        self.fill("#username", username).await;
        self.fill("#password", password).await;
        self.fill("#api-key", key).await;
        self.click("#sign-in-submit").await;
    }
}

/// `new Date(secs * 1000).toLocaleString('en-US')` in the browser's zone, computed here.
fn en_us_local(epoch_secs: i64) -> String {
    let local = epoch_secs + TZ_OFFSET_SECS;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let (h12, half) = match hour {
        0 => (12, "AM"),
        1..=11 => (hour, "AM"),
        12 => (12, "PM"),
        _ => (hour - 12, "PM"),
    };
    format!("{month}/{day}/{year}, {h12}:{minute:02}:{second:02} {half}")
}

/// The page's address and every resource it loaded or fetched since it was loaded.
async fn loaded_urls(b: &Browser) -> Vec<String> {
    serde_json::from_value(
        b.eval("[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
            .await,
    )
    .unwrap()
}

/// Neither the page's markup nor any form field holds `key`.
async fn assert_no_key_in_page(b: &Browser, key: &str) {
    let html = b.eval("document.documentElement.outerHTML").await;
    assert!(
        !html.as_str().unwrap().contains(key),
        "the key is in the DOM"
    );
    let values = b
        .eval("[...document.querySelectorAll('input, textarea')].map(i => i.value).join(' ')")
        .await;
    assert!(
        !values.as_str().unwrap().contains(key),
        "the key is in a form field"
    );
}

fn epoch_secs(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn local_time_formatting_matches_known_dates() {
    // 2026-11-26 08:56:05 UTC is 14:26:05 in Kolkata.
    assert_eq!(en_us_local(1_795_683_365), "11/26/2026, 2:26:05 PM");
    // Midnight UTC on 2024-02-29 is 05:30 in Kolkata.
    assert_eq!(en_us_local(1_709_164_800), "2/29/2024, 5:30:00 AM");
}

async fn assert_last_modified(browser: &Browser, gw: &Gateway, by: &str) {
    let info = gw.info();
    assert_eq!(browser.text("#modified-by").await, by);
    let on = epoch_secs(info.last_modified_on().unwrap());
    assert_eq!(browser.text("#modified-on").await, en_us_local(on));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_manages_the_key_from_the_page() {
    let Some((chromium, driver)) = browser_paths() else {
        return;
    };
    let gw = Gateway::start("admin-page").await;
    let b = Browser::start(&chromium, &driver).await;
    let page = gw.url("/admin");
    b.open(&page).await;
    assert!(b.visible("sign-in").await);
    b.shot("01-sign-in").await;

    // A wrong password, then a wrong key: the same generic message, no session.
    let generic = "Sign-in failed. Check the username, password and API key.";
    b.sign_in(ADMIN, "not-the-password", KEY).await;
    b.wait_for(
        "!document.getElementById('sign-in-error').hidden",
        "sign-in error",
    )
    .await;
    assert_eq!(b.text("#sign-in-error").await, generic);
    b.shot("02-wrong-password").await;
    b.sign_in(ADMIN, PASSWORD, EDITED).await;
    b.wait_for(
        "document.getElementById('password').value === ''",
        "form cleared",
    )
    .await;
    assert_eq!(b.text("#sign-in-error").await, generic);
    assert!(!b.visible("key-page").await);

    // Sign in: the base URL and the masked key.
    b.sign_in(ADMIN, PASSWORD, KEY).await;
    b.wait_for("!document.getElementById('key-page').hidden", "key page")
        .await;
    b.wait_for("document.getElementById('key-value')", "key row")
        .await;
    assert_eq!(b.text("#base-url").await, gw.url("/api/v1"));
    assert_eq!(b.text("#key-value").await, "•".repeat(12));
    assert!(b.text("#whoami-name").await.starts_with(ADMIN));
    assert_last_modified(&b, &gw, "provisioning").await;
    assert_eq!(
        b.eval("document.getElementById('add-key').disabled").await,
        true
    );
    assert!(b.visible("add-hint").await);
    b.shot("03-signed-in-key-masked").await;

    // Reveal, and copy.
    b.click("#reveal-key").await;
    assert_eq!(b.text("#key-value").await, KEY);
    assert_eq!(b.text("#reveal-key").await, "Hide");
    b.click("#copy-key").await;
    b.wait_for(
        "document.getElementById('copy-status').textContent === 'Copied'",
        "copied",
    )
    .await;
    b.shot("04-key-revealed-and-copied").await;
    // What was copied is the key: paste it (Ctrl+V) into the edit dialog's field, then
    // cancel (nothing changes).
    b.click("#edit-key").await;
    b.wait_for("document.getElementById('confirm').open", "edit dialog")
        .await;
    let field = b.client.find(Locator::Css("#new-key")).await.unwrap();
    field.send_keys("\u{E009}v\u{E000}").await.unwrap();
    assert_eq!(
        b.eval("document.getElementById('new-key').value").await,
        KEY,
        "the clipboard holds the key"
    );
    b.click("#confirm-cancel").await;
    assert_eq!(
        b.eval("document.getElementById('confirm').open").await,
        false
    );
    assert_eq!(b.eval("document.getElementById('new-key').value").await, "");
    assert_eq!(gw.key().as_deref(), Some(KEY));

    // Regenerate, after a confirmation that says what happens to the old key.
    let before = gw.info().generation();
    b.click("#regenerate-key").await;
    b.wait_for("document.getElementById('confirm').open", "confirmation")
        .await;
    let warning = b.text("#confirm").await;
    assert!(warning.contains("stops working immediately"), "{warning}");
    assert!(warning.contains("Update every reference"), "{warning}");
    b.shot("05-regenerate-confirmation").await;
    // A double click: the second lands while the first is in flight and must do nothing
    // (the button is disabled at once), so the key moves on by exactly one generation.
    let disabled = b
        .eval("(() => { const ok = document.getElementById('confirm-ok'); ok.click(); ok.click(); return ok.disabled; })()")
        .await;
    assert_eq!(
        disabled, true,
        "the button is disabled while the change is in flight"
    );
    b.wait_for(
        "document.getElementById('notice').textContent.includes('regenerated')",
        "regenerated",
    )
    .await;
    let regenerated = gw.key().unwrap();
    assert_ne!(regenerated, KEY);
    assert_eq!(gw.info().generation().get(), before.get() + 1, "one change");
    assert_eq!(
        b.eval("performance.getEntriesByType('resource').filter(e => e.name.endsWith('/apiKeys/1/regenerate')).length")
            .await,
        1,
        "one request"
    );
    b.wait_for(
        &format!("document.getElementById('key-value').textContent === '{regenerated}'"),
        "the new key shown",
    )
    .await;
    assert_last_modified(&b, &gw, ADMIN).await;
    assert_eq!(gw.api_status(KEY).await, 401, "the old key is dead (K6)");
    assert_eq!(gw.api_status(&regenerated).await, 200);
    b.shot("06-regenerated").await;

    // Edit: an invalid value is stopped in the page and changes nothing.
    b.click("#edit-key").await;
    b.wait_for("document.getElementById('confirm').open", "edit dialog")
        .await;
    assert!(b
        .text("#confirm")
        .await
        .contains("stops working immediately"));
    b.fill("#new-key", "short!").await;
    b.click("#confirm-ok").await;
    b.wait_for(
        "!document.getElementById('confirm-error').hidden",
        "edit error",
    )
    .await;
    assert_eq!(
        b.text("#confirm-error").await,
        "The key must be exactly 12 letters (A-Z, a-z) or digits (0-9)."
    );
    assert_eq!(gw.key().as_deref(), Some(regenerated.as_str()));
    b.shot("07-edit-invalid-value").await;

    // The server's refusal is shown too (here: key-admin revoked meanwhile), and changes
    // nothing.
    let admin = Username::new(ADMIN).unwrap();
    gw.gateway
        .orgkey
        .admins()
        .revoke(&admin, Scope::KeyAdmin)
        .await
        .unwrap();
    b.fill("#new-key", EDITED).await;
    b.click("#confirm-ok").await;
    b.wait_for(
        "document.getElementById('confirm-error').textContent.includes('key-admin')",
        "the server's refusal",
    )
    .await;
    assert_eq!(
        b.text("#confirm-error").await,
        "managing the API key needs an admin session with the key-admin scope"
    );
    assert_eq!(gw.key().as_deref(), Some(regenerated.as_str()));
    b.shot("08-edit-refused-by-the-server").await;
    gw.gateway
        .orgkey
        .admins()
        .grant(&admin, Scope::KeyAdmin)
        .await
        .unwrap();

    // Edit to a chosen value.
    b.click("#confirm-ok").await;
    b.wait_for(
        "document.getElementById('notice').textContent.includes('changed')",
        "edited",
    )
    .await;
    assert_eq!(gw.key().as_deref(), Some(EDITED));
    b.wait_for(
        &format!("document.getElementById('key-value').textContent === '{EDITED}'"),
        "the edited key shown",
    )
    .await;
    assert_eq!(gw.api_status(&regenerated).await, 401);
    assert_eq!(gw.api_status(EDITED).await, 200);
    b.shot("09-edited").await;

    // Delete: Add becomes available, the old key is dead.
    b.click("#delete-key").await;
    b.wait_for("document.getElementById('confirm').open", "delete dialog")
        .await;
    let warning = b.text("#confirm").await;
    assert!(warning.contains("No API request or sign-in"), "{warning}");
    assert!(warning.contains("stops working immediately"), "{warning}");
    b.click("#confirm-ok").await;
    b.wait_for("document.getElementById('no-key')", "no key")
        .await;
    assert_eq!(gw.key(), None);
    assert_eq!(
        b.eval("document.getElementById('add-key').disabled").await,
        false
    );
    assert!(!b.visible("add-hint").await);
    assert_eq!(
        gw.api_status(EDITED).await,
        401,
        "a deleted key is dead (K5)"
    );
    b.shot("10-deleted").await;

    // Add: a new random key.
    b.click("#add-key").await;
    b.wait_for("document.getElementById('key-row')", "added key")
        .await;
    let added = gw.key().unwrap();
    assert!(ApiKey::parse(&added).is_ok());
    assert_ne!(added, EDITED);
    assert_eq!(gw.api_status(&added).await, 200);
    assert_eq!(
        b.eval("document.getElementById('add-key').disabled").await,
        true
    );
    assert_last_modified(&b, &gw, ADMIN).await;
    b.shot("11-added").await;

    // The audit log lists the changes, newest first.
    b.wait_for(
        "document.querySelectorAll('#audit-rows tr').length >= 5",
        "audit rows",
    )
    .await;
    let actions: Value = b
        .eval("[...document.querySelectorAll('#audit-rows tr')].map(r => [r.cells[1].textContent, r.cells[2].textContent])")
        .await;
    let actions: Vec<(String, String)> = serde_json::from_value(actions).unwrap();
    assert_eq!(
        actions[..4],
        [
            (ADMIN.to_owned(), "add".to_owned()),
            (ADMIN.to_owned(), "delete".to_owned()),
            (ADMIN.to_owned(), "edit".to_owned()),
            (ADMIN.to_owned(), "regenerate".to_owned()),
        ]
    );
    b.eval("document.getElementById('audit-table').scrollIntoView()")
        .await;
    b.shot("12-audit-log").await;
    b.eval("window.scrollTo(0, 0)").await;

    // Hide a column; the choice survives a reload.
    let hidden = "getComputedStyle(document.querySelector('th[data-column=\"modified-by\"]')).display === 'none'";
    assert_eq!(b.eval(hidden).await, false);
    b.click("#columns-button").await;
    b.click("#columns-menu input[data-column=\"modified-by\"]")
        .await;
    assert_eq!(b.eval(hidden).await, true);
    assert_eq!(
        b.eval("getComputedStyle(document.getElementById('modified-by')).display")
            .await,
        "none"
    );
    b.shot("13-column-hidden").await;
    // What the page loaded and called so far (a reload starts a new list).
    let mut urls = loaded_urls(&b).await;
    b.client.refresh().await.unwrap();
    b.wait_for("document.body.dataset.ready === 'true'", "reloaded")
        .await;
    b.wait_for("document.getElementById('key-row')", "key row after reload")
        .await;
    assert_eq!(b.eval(hidden).await, true, "remembered after reload");
    assert_eq!(
        b.eval(
            "document.querySelector('#columns-menu input[data-column=\"modified-by\"]').checked"
        )
        .await,
        false
    );
    // The key is masked again after a reload.
    assert_eq!(b.text("#key-value").await, "•".repeat(12));
    b.shot("14-column-remembered-after-reload").await;
    b.click("#columns-button").await;
    b.click("#columns-menu input[data-column=\"modified-by\"]")
        .await;
    assert_eq!(b.eval(hidden).await, false);

    // No key and no session id ever appeared in a URL the page loaded or called.
    urls.extend(loaded_urls(&b).await);
    let cookies = b.client.get_all_cookies().await.unwrap();
    let session_ids: Vec<String> = cookies
        .iter()
        .filter(|c| c.name() == "JSESSIONID")
        .map(|c| c.value().to_owned())
        .collect();
    assert_eq!(session_ids.len(), 1, "{cookies:?}");
    assert!(urls.len() > 15, "{urls:?}");
    for called in [
        "/api/v1/authenticatedSession",
        "/api/v1/apiKeys/1/regenerate",
        "/admin/session",
    ] {
        assert!(
            urls.iter().any(|u| u.ends_with(called)),
            "{called} in {urls:?}"
        );
    }
    for url in &urls {
        for secret in [KEY, EDITED, &regenerated, &added, &session_ids[0]] {
            assert!(!url.contains(secret), "{url} carries a secret");
        }
        assert!(
            !url.contains('?') || url.contains("/auditLog?limit="),
            "{url}"
        );
    }

    // Sign out (with the key revealed): the session is over on the server too.
    b.click("#reveal-key").await;
    assert_eq!(b.text("#key-value").await, added);
    b.click("#sign-out").await;
    b.wait_for("!document.getElementById('sign-in').hidden", "signed out")
        .await;
    assert_eq!(b.text("#sign-in-error").await, "You are signed out.");
    // Nothing of the signed-out session stays in the page (the key was revealed before).
    assert_no_key_in_page(&b, &added).await;
    assert_eq!(
        gw.gateway
            .orgkey
            .sessions()
            .validate(session_ids[0].as_bytes())
            .err(),
        Some(orgkey::session::SessionRejection::NotFound)
    );
    b.shot("15-signed-out").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_page_is_refused_tabs_stay_consistent_and_readers_see_the_page_read_only() {
    let Some((chromium, driver)) = browser_paths() else {
        return;
    };
    let gw = Gateway::start("admin-page-csrf").await;
    // A second org with its own key-admin, for the identity check below.
    let globex = OrgId::new("globex").unwrap();
    let ops = orgkey::Actor::new("ops@example.com").unwrap();
    gw.gateway.orgkey.keys().create_org(&globex).await.unwrap();
    gw.gateway
        .orgkey
        .keys()
        .subscribe(&globex, &ops)
        .await
        .unwrap();
    gw.gateway
        .orgkey
        .keys()
        .edit(&globex, ApiKey::parse(GLOBEX_KEY).unwrap(), &ops)
        .await
        .unwrap();
    gw.gateway
        .orgkey
        .admins()
        .create(
            &Username::new(BOB).unwrap(),
            &globex,
            &Password::new(PASSWORD),
            Scopes::ALL,
        )
        .await
        .unwrap();
    let globex_key = || {
        gw.gateway
            .orgkey
            .keys()
            .view(&globex)
            .unwrap()
            .key()
            .map(|k| k.expose_secret().to_owned())
    };

    let b = Browser::start(&chromium, &driver).await;
    b.open(&gw.url("/admin")).await;
    b.sign_in(ADMIN, PASSWORD, KEY).await;
    b.wait_for("document.getElementById('key-row')", "signed in")
        .await;

    // A page on the same site (127.0.0.1, another port): SameSite=Strict does not keep the
    // admin's cookie off its requests, so the CSRF guard is what refuses them. It tries a
    // regenerate, an add, a login and a write to the protected API: the requests a page can
    // send without CORS (POST, text/plain).
    let refusals = csrf_refusals();
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_port = evil.local_addr().unwrap().port();
    let target = gw.url("/api/v1");
    let html = format!(
        r#"<!doctype html><title>evil</title><script>
const t = "{target}";
const opts = (method, body) => ({{method, body, credentials: "include", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}}});
Promise.allSettled([
  fetch(t + "/apiKeys/1/regenerate", opts("POST", "{{}}")),
  fetch(t + "/apiKeys", opts("POST", "{{}}")),
  fetch(t + "/authenticatedSession", opts("POST", '{{"username":"x"}}')),
  fetch(t + "/whoami", opts("POST", "{{}}")),
]).then(() => {{ document.title = "done"; }});
</script>"#
    );
    let evil_server = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let html = html.clone();
                async move { axum::response::Html(html) }
            }),
        );
        axum::serve(evil, app).await.unwrap();
    });
    let generation = gw.info().generation();
    let refused_before = refusals.load(Ordering::SeqCst);
    b.client
        .goto(&format!("http://127.0.0.1:{evil_port}/"))
        .await
        .unwrap();
    b.wait_for("document.title === 'done'", "the foreign page's requests")
        .await;
    // All four reached the gateway and were refused by the CSRF guard (another test in
    // this binary may add refusals of its own, never fewer).
    assert!(
        refusals.load(Ordering::SeqCst) >= refused_before + 4,
        "the foreign requests were not all refused by the guard"
    );
    assert_eq!(gw.key().as_deref(), Some(KEY), "nothing changed");
    assert_eq!(gw.info().generation(), generation);
    b.shot("16-foreign-page-changed-nothing").await;
    evil_server.abort();

    // The admin's page still works: the session was not touched.
    b.open(&gw.url("/admin")).await;
    b.wait_for("document.getElementById('key-row')", "still signed in")
        .await;

    // Two tabs. A change in the first carries the session over (new cookie, new CSRF
    // token); the second tab's token is then stale: its write is refused once, and the page
    // retries with a fresh token because the browser is still signed in as the same admin.
    let first = b.client.window().await.unwrap();
    let second = b.client.new_window(true).await.unwrap().handle;
    b.client.switch_to_window(second.clone()).await.unwrap();
    b.open(&gw.url("/admin")).await;
    b.wait_for("document.getElementById('key-row')", "second tab signed in")
        .await;
    b.client.switch_to_window(first.clone()).await.unwrap();
    b.click("#regenerate-key").await;
    b.wait_for("document.getElementById('confirm').open", "confirmation")
        .await;
    b.click("#confirm-ok").await;
    b.wait_for(
        "document.getElementById('notice').textContent.includes('regenerated')",
        "regenerated in the first tab",
    )
    .await;
    b.client.switch_to_window(second.clone()).await.unwrap();
    let refused_before = refusals.load(Ordering::SeqCst);
    b.click("#delete-key").await;
    b.wait_for("document.getElementById('confirm').open", "delete dialog")
        .await;
    b.click("#confirm-ok").await;
    b.wait_for(
        "document.getElementById('no-key')",
        "deleted from the stale tab",
    )
    .await;
    assert!(
        refusals.load(Ordering::SeqCst) > refused_before,
        "the stale token was refused first"
    );
    assert_eq!(gw.key(), None);
    b.click("#add-key").await;
    b.wait_for("document.getElementById('key-row')", "added again")
        .await;
    let key = gw.key().unwrap();

    // The browser's cookie becomes another admin's (a sign-in by a script of the page's
    // origin, which must send the live session's token; no sign-out here): a change
    // confirmed in the other tab for acme must not land on globex.
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let obfuscated = orgkey::session::obfuscate::obfuscate(GLOBEX_KEY.as_bytes(), ts).unwrap();
    let body = json!({
        "apiKey": String::from_utf8(obfuscated.to_vec()).unwrap(),
        "username": BOB,
        "password": PASSWORD,
        "timestamp": ts,
    })
    .to_string();
    b.client.switch_to_window(first.clone()).await.unwrap();
    let status = b
        .client
        .execute(
            "return fetch(arguments[2]).then(r => r.json()).then(s => fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrfToken}, body: arguments[1]})).then(r => r.status);",
            vec![
                json!(gw.url("/api/v1/authenticatedSession")),
                json!(body),
                json!(gw.url("/admin/session")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "bob signed in from a script");
    b.client.switch_to_window(second.clone()).await.unwrap();
    b.click("#delete-key").await;
    b.wait_for("document.getElementById('confirm').open", "delete dialog")
        .await;
    b.click("#confirm-ok").await;
    b.wait_for(
        "!document.getElementById('sign-in').hidden",
        "the page noticed the other admin",
    )
    .await;
    let message = b.text("#sign-in-error").await;
    assert!(message.contains("signed in as another admin"), "{message}");
    assert_eq!(
        globex_key().as_deref(),
        Some(GLOBEX_KEY),
        "globex untouched"
    );
    assert_eq!(gw.key().as_deref(), Some(key.as_str()), "acme untouched");
    b.shot("17-other-admin-in-another-tab-nothing-changed")
        .await;
    // Signing in again works although the browser still holds bob's live session: the
    // page signs in with that session's token, and the new cookie replaces bob's.
    b.sign_in(ADMIN, PASSWORD, &key).await;
    b.wait_for("document.getElementById('key-row')", "alice again")
        .await;
    assert!(b.text("#whoami-name").await.starts_with(ADMIN));

    // Signing out in one tab clears the other, with its key revealed.
    b.client.switch_to_window(first.clone()).await.unwrap();
    b.open(&gw.url("/admin")).await;
    b.wait_for("document.getElementById('key-row')", "first tab")
        .await;
    b.click("#reveal-key").await;
    assert_eq!(b.text("#key-value").await, key);
    b.client.switch_to_window(second.clone()).await.unwrap();
    b.click("#sign-out").await;
    b.wait_for("!document.getElementById('sign-in').hidden", "signed out")
        .await;
    b.client.switch_to_window(first.clone()).await.unwrap();
    b.wait_for(
        "!document.getElementById('sign-in').hidden",
        "the other tab signed out too",
    )
    .await;
    assert_eq!(
        b.text("#sign-in-error").await,
        "You signed out in another tab."
    );
    assert_no_key_in_page(&b, &key).await;

    // An admin without key-admin sees the page read-only.
    b.sign_in(READER, PASSWORD, &key).await;
    b.wait_for(
        "!document.getElementById('key-page').hidden",
        "reader's page",
    )
    .await;
    b.wait_for(
        "document.querySelectorAll('#audit-rows tr').length > 0",
        "audit log for the reader",
    )
    .await;
    assert!(!b.visible("key-section").await);
    let notice = b.text("#notice").await;
    assert!(notice.contains("read-only"), "{notice}");
    assert!(notice.contains("key-admin"), "{notice}");
    assert_eq!(
        b.eval("document.getElementById('key-value')").await,
        Value::Null,
        "no key in the page"
    );
    assert_no_key_in_page(&b, &key).await;
    b.shot("18-read-only-admin").await;

    // Left alone past the idle timeout (the page's clock moved on by an hour), the page
    // signs itself out as the server would.
    b.eval(
        "(() => { window.realNow = Date.now; Date.now = () => window.realNow() + 3600 * 1000; return true; })()",
    )
    .await;
    b.wait_for(
        "!document.getElementById('sign-in').hidden",
        "idle sign-out",
    )
    .await;
    let message = b.text("#sign-in-error").await;
    assert!(message.contains("without activity"), "{message}");
    b.shot("19-idle-signed-out").await;
    // The page ended the session on the server too, and a new sign-in works.
    let cookies = b.client.get_all_cookies().await.unwrap();
    let idle_id = cookies
        .iter()
        .find(|c| c.name() == "JSESSIONID")
        .map(|c| c.value().to_owned())
        .unwrap();
    assert!(gw
        .gateway
        .orgkey
        .sessions()
        .validate(idle_id.as_bytes())
        .is_err());
    // The clock back to the real one: the login's timestamp must be fresh.
    b.eval("(() => { Date.now = window.realNow; return true; })()")
        .await;
    b.sign_in(READER, PASSWORD, &key).await;
    b.wait_for(
        "!document.getElementById('key-page').hidden",
        "signed in after idling",
    )
    .await;
    b.close().await;
}
