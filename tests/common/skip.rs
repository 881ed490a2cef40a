//! Tests that cannot run on this machine (no PostgreSQL, no browser) say so where a plain
//! `cargo test` shows it.
//!
//! libtest captures what a test writes with `print!`/`eprint!` (and shows it only if the test
//! fails), so a "skipped" printed that way is invisible and the test just reads `ok`. These
//! helpers write to the process's stderr handle directly, which libtest does not capture, once
//! per test binary and message.

use std::io::Write;
use std::sync::Mutex;

/// The database the PostgreSQL tests use when `ORGKEY_TEST_POSTGRES_URL` is not set (the
/// local server `.ci/run` uses).
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Writes `SKIPPED (<file>): <what>, because <why>` to stderr, past libtest's capture, the first
/// time this test binary asks for that line.
pub fn announce(file: &str, what: &str, why: &str) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let line = format!("SKIPPED ({file}): {what}, because {why}");
    let mut said = SAID.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if said.contains(&line) {
        return;
    }
    let _ = writeln!(std::io::stderr().lock(), "\n{line}\n");
    said.push(line);
}

/// `url` (a URL or a `key=value` connection string) with the password, if any, replaced by
/// `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url
            .split(' ')
            .map(|part| match part.split_once('=') {
                Some(("password", _)) => "password=***",
                _ => part,
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The PostgreSQL database for the tests of `file`, or `None` after announcing (once) that
/// `what` is skipped.
///
/// - `ORGKEY_TEST_POSTGRES_URL` set (and not empty): that database. If it does not answer,
///   this panics with the reason: someone asked for these tests, so they must not pass
///   without running.
/// - Not set (or empty): [`DEFAULT_POSTGRES_URL`] if a server answers there (connect and
///   `SELECT 1` within a few seconds), else `None` and a `SKIPPED` line on stderr.
///
/// The server is asked once per test binary.
#[cfg(feature = "postgres")]
pub fn postgres_url(file: &str, what: &str) -> Option<String> {
    use std::sync::OnceLock;

    /// (url, explicitly set, whether it answered).
    static PROBED: OnceLock<(String, bool, Result<(), String>)> = OnceLock::new();
    let (url, explicit, answer) =
        PROBED.get_or_init(|| match std::env::var("ORGKEY_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => {
                let answer = probe_postgres(&url);
                (url, true, answer)
            }
            _ => (
                DEFAULT_POSTGRES_URL.to_owned(),
                false,
                probe_postgres(DEFAULT_POSTGRES_URL),
            ),
        });
    match answer {
        Ok(()) => Some(url.clone()),
        Err(e) if *explicit => panic!(
            "ORGKEY_TEST_POSTGRES_URL is {} but the PostgreSQL tests cannot use it: {e}. \
             Start the server or fix the URL, or unset the variable: then they use \
             {DEFAULT_POSTGRES_URL} if it answers and are skipped (with a SKIPPED line) if not",
            redact(url)
        ),
        Err(e) => {
            announce(
                file,
                what,
                &format!(
                    "ORGKEY_TEST_POSTGRES_URL is not set and the default \
                     {DEFAULT_POSTGRES_URL} does not answer ({e}); set ORGKEY_TEST_POSTGRES_URL \
                     to a database where the user may create schemas"
                ),
            );
            None
        }
    }
}

/// Connects to `url` and runs `SELECT 1`, within 3 seconds.
#[cfg(feature = "postgres")]
fn probe_postgres(url: &str) -> Result<(), String> {
    let url = url.to_owned();
    // Callers run inside a tokio runtime: use a runtime of its own on a thread of its own.
    std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let attempt = async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| with_causes(&e))?;
                tokio::spawn(connection);
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| with_causes(&e))
            };
            tokio::time::timeout(std::time::Duration::from_secs(3), attempt)
                .await
                .map_err(|_| "no answer within 3 s".to_owned())?
        })
    })
    .join()
    .map_err(|_| "the connection check panicked".to_owned())?
}

/// `error: cause: cause ...` (tokio-postgres keeps the reason, such as "Connection refused", in
/// the source).
#[cfg(feature = "postgres")]
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
