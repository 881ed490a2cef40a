//! P4 on the gateway binary: the first start creates the master key file; a missing or wrong
//! one stops the start and changes nothing; `master-key rotate` while the gateway serves
//! fails no request; `backup` while it serves, `restore` after; and `kill -9` in the middle
//! of a rotation or of the migration of a state written before sealing loses no key.
#![cfg(feature = "gateway")]
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/gateway.rs"]
mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TempDb;
use orgkey::store::{SqliteStore, Store};
use orgkey::{Generation, KeyFormat, MasterKeys, OrgId};
use support::{get, Gateway, KEY};

/// What a command printed: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
        .args(args)
        .env_remove("ORGKEY_MASTER_KEY_FILE")
        .env_remove("ORGKEY_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A gateway start on `state` with the master key file `file`: (exit code, stdout, stderr).
fn serve_with_key_file(state: &str, file: &str) -> (i32, String, String) {
    run(&[
        "--listen",
        "127.0.0.1:0",
        "--state",
        state,
        "--master-key-file",
        file,
    ])
}

fn key_file(state: &str) -> String {
    format!("{state}.master-key")
}

/// Every byte of the state's files: the database and its write-ahead log (not the shared
/// memory index beside them, which any reader rebuilds).
fn state_bytes(state: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(file) = std::fs::read(format!("{state}{suffix}")) {
            bytes.extend_from_slice(&file);
        }
    }
    bytes
}

/// Whether any of `keys` (all of one length) occurs in `bytes`.
fn holds_any(bytes: &[u8], keys: &HashSet<Vec<u8>>) -> bool {
    let len = keys.iter().next().map_or(12, Vec::len);
    bytes.windows(len).any(|w| keys.contains(w))
}

fn whoami(addr: &str, key: &str) -> u16 {
    get(
        addr,
        "/api/v1/whoami",
        &[("X-Org-Id", "acme"), ("X-API-Key", key)],
    )
    .status
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {out:?}"))
}

#[test]
fn the_first_start_creates_the_master_key_file_and_a_missing_or_wrong_one_stops_the_start() {
    let gw = Gateway::start("seal-start", &[], &[]);
    let state = gw.state().to_owned();
    let file = key_file(&state);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the master key file is owner-only");
    }
    assert!(
        gw.log()
            .contains(&format!("created the master key file {file}")),
        "{}",
        gw.log()
    );
    assert_eq!(whoami(&gw.addr, KEY), 200);
    let keys: HashSet<Vec<u8>> = [KEY.as_bytes().to_vec()].into();
    assert!(!holds_any(&state_bytes(&state), &keys), "the key is sealed");
    let db = gw.stop();
    let before = state_bytes(&state);
    let file_before = std::fs::read(&file).unwrap();

    // The file gone: the start stops, names it, serves nothing, makes no new one.
    let moved = format!("{file}.away");
    std::fs::rename(&file, &moved).unwrap();
    let (code, out, err) = run(&["--listen", "127.0.0.1:0", "--state", &state]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&file) && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("nothing was served or changed"), "{err}");
    assert!(!out.contains("base url"), "{out}");
    assert!(!std::path::Path::new(&file).exists(), "no new key file");
    assert!(state_bytes(&state) == before, "the state changed");

    // Another master key file: refused, named, nothing changed.
    let other = format!("{state}.other-key");
    let (code, out, err) = run(&["--master-key-file", &other, "master-key", "create"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("master key file: {other}")), "{out}");
    let (code, _, err) = serve_with_key_file(&state, &other);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&other) && err.contains("does not hold"),
        "{err}"
    );
    assert!(state_bytes(&state) == before, "the state changed");
    // `master-key create` never overwrites.
    let (code, _, err) = run(&["--master-key-file", &other, "master-key", "create"]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    std::fs::remove_file(&other).unwrap();

    // A named file that does not exist: refused, named.
    let (code, _, err) = serve_with_key_file(&state, &other);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&other) && err.contains("does not exist"),
        "{err}"
    );

    // The right file back (through the environment this time): it serves the same key.
    std::fs::rename(&moved, &file).unwrap();
    assert!(std::fs::read(&file).unwrap() == file_before);
    let gw = Gateway::start_on(db, &[], &[("ORGKEY_MASTER_KEY_FILE", &file)]);
    assert_eq!(whoami(&gw.addr, KEY), 200);
    assert!(!gw.log().contains("created the master key file"));
}

/// Requests with the key from two threads until stopped; (sent, failed).
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..2)
            .map(|_| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                let addr = addr.to_owned();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if whoami(&addr, KEY) != 200 {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            threads,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn the_master_key_rotates_while_the_gateway_serves_and_no_request_fails() {
    let gw = Gateway::start("seal-rotate", &[], &[]);
    let state = gw.state().to_owned();
    let mut keys = vec![KEY.to_owned()];
    for id in ["globex", "initech", "hooli"] {
        let (code, out, err) = run(&["--state", &state, "org", "create", id]);
        assert_eq!(code, 0, "{out}{err}");
        keys.push(line(&out, "api key: ").to_owned());
    }
    let (_, status, _) = run(&["--state", &state, "master-key", "status"]);
    let first = line(&status, "seals: ").to_owned();

    let load = Load::start(&gw.addr);
    std::thread::sleep(Duration::from_millis(200));
    let (code, out, err) = run(&["--state", &state, "master-key", "rotate"]);
    std::thread::sleep(Duration::from_millis(200));
    let (sent, failed) = load.finish();
    assert_eq!(code, 0, "{out}{err}");
    let second = line(&out, "seals: ").to_owned();
    assert_ne!(second, first);
    assert_eq!(line(&out, "resealed: "), "4", "{out}");
    assert!(sent > 50, "the load ran ({sent} requests)");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the rotation"
    );

    let (_, status, _) = run(&["--state", &state, "master-key", "status"]);
    assert_eq!(line(&status, "seals: "), second);
    assert_eq!(line(&status, "opens: "), format!("{second}, {first}"));
    assert_eq!(line(&status, "stored keys sealed under: "), second);
    let secrets: HashSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    assert!(!holds_any(&state_bytes(&state), &secrets));
    assert!(!gw.log().contains(KEY), "no key in the gateway's log");

    // Run again with nothing left under the old key: a new rotation.
    // Retire the old key: the file holds only the new one, and a restart serves.
    let (code, out, err) = run(&["--state", &state, "master-key", "retire"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(line(&out, "retired: "), first);
    let (_, status, _) = run(&["--state", &state, "master-key", "status"]);
    assert_eq!(line(&status, "opens: "), second);
    let db = gw.stop();
    let gw = Gateway::start_on(db, &[], &[]);
    assert_eq!(whoami(&gw.addr, KEY), 200);
}

#[test]
fn a_backup_made_while_serving_restores_its_keys_ends_every_session_and_is_audited() {
    let gw = Gateway::start("seal-backup", &[], &[]);
    let state = gw.state().to_owned();
    let session = gw.login(KEY).expect("login");
    let backup = TempDb::new("seal-backup-copy");
    let load = Load::start(&gw.addr);
    let (code, out, err) = run(&["--state", &state, "backup", backup.path()]);
    let (sent, failed) = load.finish();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("backup: {}", backup.path())), "{out}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the backup"
    );
    let secrets: HashSet<Vec<u8>> = [KEY.as_bytes().to_vec()].into();
    assert!(!holds_any(&std::fs::read(&backup.0).unwrap(), &secrets));
    // A relative path is the operator's directory's, not the gateway's.
    let here = std::env::temp_dir().join(format!("orgkey-seal-backup-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&here).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
        .args(["--state", &state, "backup", "relative.db"])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(here.join("relative.db").exists());
    std::fs::remove_dir_all(&here).unwrap();
    // A second backup to the same file is refused.
    let (code, _, err) = run(&["--state", &state, "backup", backup.path()]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    // After the backup: acme loses its key, globex is created.
    let (code, out, err) = run(&["--state", &state, "org", "unsubscribe", "acme"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&["--state", &state, "org", "create", "globex"]);
    assert_eq!(code, 0);
    let globex_key = line(&out, "api key: ").to_owned();
    assert_eq!(whoami(&gw.addr, KEY), 401);
    // A restore while the gateway runs: refused, nothing changed.
    let (code, _, err) = run(&["--state", &state, "restore", backup.path()]);
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");

    let db = gw.stop();
    let (code, out, err) = run(&[
        "--state",
        &state,
        "--operator",
        "ops@acme.example",
        "restore",
        backup.path(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sessions: all ended"), "{out}");
    let gw = Gateway::start_on(db, &[], &[]);
    // The backup's key is current again; globex never existed; the old session is dead.
    assert_eq!(whoami(&gw.addr, KEY), 200);
    let globex = get(
        &gw.addr,
        "/api/v1/whoami",
        &[("X-Org-Id", "globex"), ("X-API-Key", &globex_key)],
    );
    assert_eq!(globex.status, 401);
    let with_cookie = get(
        &gw.addr,
        "/api/v1/whoami",
        &[("Cookie", &format!("JSESSIONID={session}"))],
    );
    assert_eq!(with_cookie.status, 401, "{with_cookie:?}");
    // Audited: acme's log says restore, by the operator.
    let raw =
        rusqlite::Connection::open_with_flags(&state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let (actor, action): (String, String) = raw
        .query_row(
            "SELECT actor, action FROM audit WHERE org = 'acme' ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("ops@acme.example", "restore")
    );
}

/// How many orgs the kill tests write: enough that a rotation or a migration takes a while.
const MANY: u32 = 30_000;

fn many_key(i: u32) -> String {
    format!("K{i:07}abcd")
}

fn many_org(i: u32) -> String {
    format!("org{i:07}")
}

/// Every org's key as the state at `state` holds it, opened with `master` in a copy of the
/// files (so the copy, not the state, is what an open migrates).
fn keys_in_copy(state: &str, master: MasterKeys) -> Vec<(String, Option<String>)> {
    let copy = TempDb::new("seal-kill-copy");
    for suffix in ["", "-wal"] {
        if std::path::Path::new(&format!("{state}{suffix}")).exists() {
            std::fs::copy(
                format!("{state}{suffix}"),
                format!("{}{suffix}", copy.path()),
            )
            .unwrap();
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = SqliteStore::open(&copy.0, KeyFormat::default(), master).unwrap();
    let orgs = runtime.block_on(store.load_orgs()).unwrap();
    orgs.into_iter()
        .map(|r| {
            (
                r.org.as_str().to_owned(),
                r.key.map(|k| k.expose_secret().to_owned()),
            )
        })
        .collect()
}

fn expected_many() -> Vec<(String, Option<String>)> {
    let mut all: Vec<(String, Option<String>)> = (0..MANY)
        .map(|i| (many_org(i), Some(many_key(i))))
        .collect();
    all.sort();
    all
}

/// Kills `args` (a gateway command) with SIGKILL after `after`; whether it had ended by itself.
fn kill_after(args: &[&str], after: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
        .args(args)
        .env_remove("ORGKEY_MASTER_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let ended = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    ended
}

#[test]
fn kill_9_during_a_rotation_loses_no_key_and_a_rerun_finishes_it() {
    let db = TempDb::new("seal-kill-rotate");
    let state = db.path().to_owned();
    let file = key_file(&state);
    let master = MasterKeys::load_or_create(&file).unwrap();
    drop(SqliteStore::open(&db.0, KeyFormat::default(), master.clone()).unwrap());
    {
        let mut raw = rusqlite::Connection::open(&db.0).unwrap();
        let tx = raw.transaction().unwrap();
        for i in 0..MANY {
            let org = OrgId::new(&many_org(i)).unwrap();
            let key = orgkey::ApiKey::parse(&many_key(i)).unwrap();
            let sealed = master.seal(&org, Generation::new(1), &key).unwrap();
            tx.execute(
                "INSERT INTO orgs (id, subscribed, sealed_key, generation) VALUES (?1, 1, ?2, 1)",
                rusqlite::params![org.as_str(), sealed],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let expected = expected_many();
    // The master keys the stored keys are sealed under, as hex ids.
    let in_use = |state: &str| -> Vec<String> {
        let raw = rusqlite::Connection::open_with_flags(
            state,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut statement = raw
            .prepare("SELECT DISTINCT lower(hex(substr(sealed_key, 2, 8))) FROM orgs")
            .unwrap();
        let ids = statement
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        ids
    };
    // Kill the command at moments that move with what the last kill hit, until kills land in
    // the middle of the resealing (stored keys under two master keys).
    let mut after = Duration::from_millis(300);
    let mut landed_midway = 0;
    for _ in 0..20 {
        let keys_before = MasterKeys::load(&file).unwrap().ids().count();
        kill_after(&["--state", &state, "master-key", "rotate"], after);
        let keys = MasterKeys::load(&file).unwrap();
        let used = in_use(&state);
        // Whatever the moment: every key opens with the file as the kill left it.
        assert_eq!(
            keys_in_copy(&state, keys.clone()),
            expected,
            "a key was lost by a kill after {after:?}"
        );
        if used.len() == 2 {
            landed_midway += 1;
            if landed_midway >= 2 {
                break;
            }
            continue;
        }
        let finished = keys.ids().count() > keys_before && used == [keys.current().to_hex()];
        after = if finished {
            after * 2 / 3
        } else {
            after * 3 / 2
        };
    }
    assert!(
        landed_midway > 0,
        "no kill landed in the middle of a rotation (last delay {after:?})"
    );
    // A rerun finishes the interrupted rotation (it draws no further key).
    let ids_before = MasterKeys::load(&file).unwrap().ids().count();
    let (code, out, err) = run(&["--state", &state, "master-key", "rotate"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed an interrupted rotation"), "{out}");
    assert_eq!(MasterKeys::load(&file).unwrap().ids().count(), ids_before);
    assert_eq!(
        in_use(&state),
        [MasterKeys::load(&file).unwrap().current().to_hex()]
    );
    assert_eq!(
        keys_in_copy(&state, MasterKeys::load(&file).unwrap()),
        expected
    );
}

#[test]
fn kill_9_during_the_migration_of_a_state_written_before_sealing_loses_no_key() {
    let db = TempDb::new("seal-kill-migrate");
    let state = db.path().to_owned();
    let file = key_file(&state);
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state-before-sealing.db"
        ),
        &db.0,
    )
    .unwrap();
    {
        let mut raw = rusqlite::Connection::open(&db.0).unwrap();
        let tx = raw.transaction().unwrap();
        tx.execute("DELETE FROM orgs", []).unwrap();
        for i in 0..MANY {
            tx.execute(
                "INSERT INTO orgs (id, subscribed, api_key, generation) VALUES (?1, 1, ?2, 1)",
                rusqlite::params![many_org(i), many_key(i)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let expected = expected_many();
    let clear: HashSet<Vec<u8>> = (0..MANY).map(|i| many_key(i).into_bytes()).collect();
    let serve = [
        "--listen",
        "127.0.0.1:0",
        "--state",
        &state,
        "--password",
        "CorrectHorse12!",
    ];
    let mut after = Duration::from_millis(20);
    for _ in 0..8 {
        kill_after(&serve, after);
        // The key file exists once the start created it; before that the state is in clear.
        let master = MasterKeys::load_or_create(&file).unwrap();
        let mut keys = keys_in_copy(&state, master);
        keys.retain(|(org, _)| org.starts_with("org"));
        assert_eq!(keys, expected, "a key was lost by a kill after {after:?}");
        after *= 2;
    }
    // A start that is let run: sealed, scrubbed, serving.
    let gw = Gateway::start_on(db, &[], &[]);
    assert!(!holds_any(&state_bytes(gw.state()), &clear));
    assert_eq!(
        get(
            &gw.addr,
            "/api/v1/whoami",
            &[("X-Org-Id", "org0012345"), ("X-API-Key", &many_key(12_345))],
        )
        .status,
        200
    );
}
