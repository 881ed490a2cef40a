//! G6: the operator commands on the gateway binary, against a running gateway (SQLite: through
//! its control socket; PostgreSQL: every replica), against a state no gateway holds, and with
//! bad input (a clear error, nothing changed).
// The HTTP helpers are the fleet test's (tests/common/fleet.rs, with PostgreSQL).
#![cfg(all(feature = "gateway", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::fleet::{login, request};
use common::TempDb;

const PASSWORD: &str = "CorrectHorse12!";

/// A gateway on a SQLite state, killed when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(state: &TempDb) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"))
        .args(["--listen", "127.0.0.1:0", "--state", state.path()])
        .env("ORGKEY_ADMIN_PASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(base) = line.strip_prefix("base url: http://") {
                let _ = tx.send(base.trim_end_matches("/api/v1").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the gateway did not start")
        .parse()
        .unwrap();
    Gateway { child, addr }
}

/// What an operator command printed: (exit code, stdout, stderr).
struct Ran {
    code: i32,
    out: String,
    err: String,
}

impl Ran {
    /// The value of the stdout line `name: value`.
    fn value(&self, name: &str) -> Option<String> {
        self.out
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    }
}

fn ops(location: &[&str], args: &[&str], password: Option<&str>) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orgkey-gateway"));
    command
        .args(args)
        .args(location)
        .env_remove("ORGKEY_ADMIN_PASSWORD");
    if let Some(password) = password {
        command.env("ORGKEY_ADMIN_PASSWORD", password);
    }
    let output = command.output().unwrap();
    Ran {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn whoami(addr: SocketAddr, org: &str, key: &str) -> u16 {
    request(
        addr,
        None,
        "GET",
        "/api/v1/whoami",
        &[("x-org-id", org), ("x-api-key", key)],
        "",
    )
    .unwrap()
    .status
}

fn login_status(addr: SocketAddr, key: &str, user: &str, password: &str) -> u16 {
    login(addr, None, key, user, password).unwrap().status
}

/// Every command on a running gateway: in force there as soon as the command returns.
fn exercise(addrs: &[SocketAddr], location: &[&str]) {
    let created = ops(
        location,
        &["org", "create", "globex", "--operator", "ops@example"],
        None,
    );
    assert_eq!(created.code, 0, "{}", created.err);
    assert_eq!(created.value("org id").as_deref(), Some("globex"));
    let key = created.value("api key").expect("a key was printed");
    for &addr in addrs {
        assert_eq!(
            whoami(addr, "globex", &key),
            200,
            "the new org's key works at once"
        );
    }

    let shown = ops(location, &["org", "show", "globex"], None);
    assert_eq!(shown.code, 0, "{}", shown.err);
    assert_eq!(shown.value("api key").as_deref(), Some(key.as_str()));
    assert_eq!(shown.value("subscribed").as_deref(), Some("yes"));
    assert_eq!(
        shown.value("last modified by").as_deref(),
        Some("ops@example"),
        "audited with the operator as the actor"
    );

    // A generated password is printed once; a given one never.
    let admin = ops(
        location,
        &["admin", "create", "bob@globex.example", "--org", "globex"],
        None,
    );
    assert_eq!(admin.code, 0, "{}", admin.err);
    let generated = admin.value("admin password").expect("a generated password");
    for &addr in addrs {
        assert_eq!(
            login_status(addr, &key, "bob@globex.example", &generated),
            200
        );
    }

    let disabled = ops(location, &["admin", "disable", "bob@globex.example"], None);
    assert_eq!(disabled.code, 0, "{}", disabled.err);
    for &addr in addrs {
        assert_eq!(
            login_status(addr, &key, "bob@globex.example", &generated),
            401
        );
    }
    assert_eq!(
        ops(location, &["admin", "enable", "bob@globex.example"], None).code,
        0
    );

    let new_password = "BatteryStaple34?";
    let changed = ops(
        location,
        &["admin", "password", "bob@globex.example"],
        Some(new_password),
    );
    assert_eq!(changed.code, 0, "{}", changed.err);
    assert!(
        !changed.out.contains(new_password),
        "a given password is never printed"
    );
    for &addr in addrs {
        assert_eq!(
            login_status(addr, &key, "bob@globex.example", &generated),
            401
        );
        assert_eq!(
            login_status(addr, &key, "bob@globex.example", new_password),
            200
        );
    }

    // Bad input: a clear error, exit 1, nothing changed.
    for (args, says) in [
        (vec!["org", "create", "globex"], "exists"),
        (vec!["org", "create", "bad id!"], "organization id"),
        (vec!["org", "show", "nope"], "unknown organization"),
        (
            vec!["admin", "create", "carol@x.example", "--org", "nope"],
            "org",
        ),
        (
            vec![
                "admin",
                "create",
                "carol@x.example",
                "--org",
                "globex",
                "--scopes",
                "root",
            ],
            "unknown scope",
        ),
        (vec!["admin", "disable", "nobody@globex.example"], "admin"),
    ] {
        let ran = ops(location, &args, None);
        assert_eq!(ran.code, 1, "{args:?}: {}", ran.out);
        assert!(
            ran.err.starts_with("error: ") && ran.err.contains(says),
            "{args:?}: {}",
            ran.err
        );
        assert!(!ran.out.contains("api key"), "{args:?} printed {}", ran.out);
    }
    let weak = ops(
        location,
        &["admin", "password", "bob@globex.example"],
        Some("short"),
    );
    assert_eq!(weak.code, 1);
    for &addr in addrs {
        assert_eq!(
            login_status(addr, &key, "bob@globex.example", new_password),
            200
        );
        assert_eq!(
            login_status(addr, &key, "carol@x.example", new_password),
            401
        );
    }
    let again = ops(location, &["org", "show", "globex"], None);
    assert_eq!(
        again.value("api key").as_deref(),
        Some(key.as_str()),
        "the key is unchanged"
    );

    let unsubscribed = ops(location, &["org", "unsubscribe", "globex"], None);
    assert_eq!(unsubscribed.code, 0, "{}", unsubscribed.err);
    for &addr in addrs {
        assert_eq!(
            whoami(addr, "globex", &key),
            401,
            "an unsubscribed org's key is dead"
        );
    }
    let resubscribed = ops(location, &["org", "subscribe", "globex"], None);
    let fresh = resubscribed.value("api key").expect("a new key");
    assert_ne!(fresh, key);
    for &addr in addrs {
        assert_eq!(whoami(addr, "globex", &fresh), 200);
    }
}

#[test]
fn operator_commands_are_in_force_on_a_running_sqlite_gateway_when_they_return() {
    let state = TempDb::new("gateway-ops");
    let gateway = serve(&state);
    exercise(&[gateway.addr], &["--state", state.path()]);
}

#[test]
fn operator_commands_work_on_a_state_no_gateway_holds() {
    let state = TempDb::new("gateway-ops");
    drop(serve(&state)); // creates the state
    let location = ["--state", state.path()];
    let created = ops(&location, &["org", "create", "globex"], None);
    assert_eq!(created.code, 0, "{}", created.err);
    let key = created.value("api key").unwrap();
    let gateway = serve(&state);
    assert_eq!(whoami(gateway.addr, "globex", &key), 200);
    // A state file that does not exist is not created by a command.
    let missing = format!("{}.missing", state.path());
    let ran = ops(&["--state", &missing], &["org", "show", "acme"], None);
    assert_eq!(ran.code, 1);
    assert!(ran.err.contains("no state file"), "{}", ran.err);
    assert!(!std::path::Path::new(&missing).exists());
}

#[test]
fn operator_commands_on_postgres_are_in_force_on_every_replica_when_they_return() {
    let Some(schema) = common::pg::TempSchema::new(
        "tests/gateway_ops.rs",
        "the operator commands on PostgreSQL pass without running",
    ) else {
        return;
    };
    let fleet = common::fleet::Fleet::start(&schema.url, &schema.name, 2, &[]);
    exercise(
        &fleet.addrs(),
        &[
            "--postgres",
            &schema.url,
            "--schema",
            &schema.name,
            "--master-key-file",
            fleet.master_key.path(),
        ],
    );
}
