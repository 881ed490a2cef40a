//! Operator commands (G6): `org create|subscribe|unsubscribe|show`,
//! `admin create|disable|enable|password`, `master-key create|status|rotate|retire` and
//! `backup` / `restore` (P4), on the same binary as the gateway.
//!
//! A command changes the state the gateway serves, and is in force on the running gateway
//! (every replica) when it returns:
//!
//! - **PostgreSQL**: the command writes to the database itself, without following the feed
//!   or holding a lease; in strict mode each write returns only once every live replica has
//!   applied it (F1), as a change through any replica does.
//! - **SQLite**: one state file serves one process (P5). If no gateway holds the file, the
//!   command opens it (taking the lock) and writes. If a gateway holds it, the command sends
//!   itself to that gateway over the gateway's control socket, `<state>.ctl` beside the
//!   file: a Unix socket that only the gateway's own user may use (the socket file is
//!   `0600`, and the gateway checks the peer's user id); the gateway runs the command through
//!   its own handles, so it is in force there when the answer comes back.
//!
//! Every change is made with `--operator NAME` (default: the OS user) as the actor: key and
//! subscription changes are in the org's audit log (K7); admin account changes are recorded
//! on the audit log target `orgkey::audit` of the process that makes them. Bad input gets a
//! clear error and changes nothing.
//!
//! # Master keys and backups (P4)
//!
//! - `master-key rotate` puts a fresh master key first in the master key file (written
//!   atomically, the old keys kept), makes the store use it, and seals every key again under
//!   it, in batches, while the gateway serves. Interrupted (a crash, a kill), it leaves every
//!   key sealed under one of the file's keys, and running it again finishes the same rotation
//!   (it draws a new key only when every stored key is sealed under the file's first).
//!   On PostgreSQL the fleet starts sealing under the new key only once every replica with
//!   a live lease holds it: each reads its own master key file again when the command asks
//!   (replicas sharing the file, or reading it from a mounted secret, need nothing more).
//!   So put the new file where every replica reads it; if some replica does not have it in
//!   time, the command names it and changes nothing more: give it the file (`SIGHUP` or
//!   restart) and run the command again, which resumes (see `PostgresStore`'s docs, "Master
//!   keys in a fleet").
//! - `master-key retire` drops from the file the keys no stored key is sealed under (nor, on
//!   PostgreSQL, the fleet's sealing key).
//! - `backup PATH` copies the SQLite state while the gateway serves (SQLite's online
//!   backup); `restore PATH` replaces a stopped gateway's state with a backup: its keys are
//!   current again, every session ends, and each org's audit log says `restore`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::directory::Admins;
use crate::identity::{Scope, Scopes};
use crate::keys::KeyAdmin;
use crate::seal::{MasterKeyId, MasterKeys};
#[cfg(feature = "sqlite")]
use crate::store::SqliteStore;
use crate::{Actor, OrgId, Password, Username};

/// The operator commands (`orgkey-gateway <command>`; no command serves).
#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Organizations: create, subscribe, unsubscribe, show.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Admin accounts: create, disable, enable, password.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The master key file that seals the keys at rest (P4): create, status, rotate, retire.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Writes a consistent copy of the SQLite state to PATH while the gateway serves (keys
    /// sealed as in the state: the copy is useless without the master key file). PostgreSQL:
    /// use pg_dump (see the README).
    Backup {
        /// The copy to write; it must not exist (created owner-only).
        path: PathBuf,
    },
    /// Replaces the SQLite state with the backup at PATH; the gateway must be stopped. The
    /// backup's keys are current again, every session ends, each org's audit log records
    /// `restore`. PostgreSQL (no PATH): run after pg_restore, every replica stopped: checks
    /// every key opens, ends every session, audits `restore`.
    Restore {
        /// The backup to restore (SQLite).
        path: Option<PathBuf>,
    },
}

/// `master-key ...`
#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum MasterKeyCommand {
    /// Creates the master key file (--master-key-file, or the one beside --state) with one
    /// fresh key, owner-only; never overwrites.
    Create,
    /// Shows the file's keys (the first seals) and the keys the stored keys are sealed under.
    Status,
    /// Seals every stored key under a fresh master key, while the gateway serves (PostgreSQL:
    /// once every replica holds it, read from its own file); run again after an interruption
    /// or a refusal to finish.
    Rotate,
    /// Drops from the file the master keys no stored key is sealed under.
    Retire,
}

/// `org ...`
#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum OrgCommand {
    /// Creates an org with an API subscription and a random key; prints `org id:` and
    /// `api key:`.
    Create {
        /// The org's id.
        id: String,
    },
    /// Applies an API subscription (and a random key) to an org without one; prints the key.
    Subscribe {
        /// The org's id.
        id: String,
    },
    /// Removes an org's API subscription, and with it the key (K8).
    Unsubscribe {
        /// The org's id.
        id: String,
    },
    /// Shows the org's key information (K9), the key included: for recovery.
    Show {
        /// The org's id.
        id: String,
    },
}

/// `admin ...`
#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum AdminCommand {
    /// Creates an enabled admin; prints `admin:` and, when generated, `admin password:`
    /// (the password comes from $ORGKEY_ADMIN_PASSWORD when set, else it is generated).
    Create {
        /// The admin's username, name@domain.
        user: String,
        /// The admin's org.
        #[arg(long, value_name = "ID")]
        org: String,
        /// The admin's scopes, comma-separated: api, key-admin.
        #[arg(long, value_name = "LIST", default_value = "api,key-admin")]
        scopes: String,
    },
    /// Disables an admin: logins fail and its sessions end on every replica.
    Disable {
        /// The admin's username.
        user: String,
    },
    /// Enables a disabled admin (its old sessions stay dead).
    Enable {
        /// The admin's username.
        user: String,
    },
    /// Sets a new password ($ORGKEY_ADMIN_PASSWORD when set, else generated and printed
    /// once); the admin's sessions end.
    Password {
        /// The admin's username.
        user: String,
    },
}

/// A command as it travels to a running gateway: the command, who makes it, and the
/// password the operator gave through the environment, if any (over the owner-only socket).
#[derive(Serialize, Deserialize)]
pub(crate) struct Request {
    command: Command,
    operator: String,
    password: Option<String>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("command", &self.command)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

/// What a command printed, or why it failed (nothing changed then).
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct Answer {
    lines: Vec<String>,
    error: Option<String>,
}

impl Request {
    /// The command `command` by `operator` (default: the OS user), with the password of
    /// $ORGKEY_ADMIN_PASSWORD if set.
    pub(crate) fn new(command: Command, operator: Option<String>) -> Result<Self, String> {
        let operator = match operator {
            Some(operator) => operator,
            None => os_user(),
        };
        Actor::new(&operator).map_err(|e| format!("--operator: {e}"))?;
        Ok(Self {
            command,
            operator,
            password: std::env::var("ORGKEY_ADMIN_PASSWORD").ok(),
        })
    }
}

impl Request {
    /// The command.
    pub(crate) fn command(&self) -> &Command {
        &self.command
    }
}

/// The actor of an operator command: `operator`, else the OS user.
pub(crate) fn operator(operator: Option<String>) -> Result<Actor, String> {
    Actor::new(&operator.unwrap_or_else(os_user)).map_err(|e| format!("--operator: {e}"))
}

/// The OS user's name ($USER, $LOGNAME), else `uid:<n>`.
fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| format!("uid:{}", m.uid()))
                .unwrap_or_else(|_| "operator".to_owned())
        })
}

fn org_id(id: &str) -> Result<OrgId, String> {
    OrgId::new(id).map_err(|e| format!("org id {id:?}: {e}"))
}

fn username(user: &str) -> Result<Username, String> {
    Username::new(user).map_err(|e| format!("username: {e}"))
}

fn scopes(list: &str) -> Result<Scopes, String> {
    let mut scopes = Scopes::NONE;
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        scopes = scopes.with(match name {
            "api" => Scope::Api,
            "key-admin" => Scope::KeyAdmin,
            other => {
                return Err(format!(
                    "--scopes: unknown scope {other:?} (api, key-admin)"
                ))
            }
        });
    }
    if scopes == Scopes::NONE {
        return Err("--scopes: name at least one scope (api, key-admin)".to_owned());
    }
    Ok(scopes)
}

/// The password to set: the operator's, checked, or a generated one (then also returned
/// for printing once).
fn password(given: Option<&str>) -> Result<(Password, Option<Password>), String> {
    match given {
        Some(given) => {
            let password = Password::new(given);
            password
                .check_policy()
                .map_err(|e| format!("ORGKEY_ADMIN_PASSWORD: {e}"))?;
            Ok((password, None))
        }
        None => {
            let password = Password::generate(20).map_err(|e| e.to_string())?;
            Ok((password.clone(), Some(password)))
        }
    }
}

/// What a command runs through: the serving process's handles (or the command's own, when no
/// gateway holds the state), and the master key file they seal with.
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) keys: KeyAdmin,
    pub(crate) admins: Admins,
    /// The master key file of the store (P4).
    pub(crate) master_file: PathBuf,
    /// The SQLite store, for `backup`.
    #[cfg(feature = "sqlite")]
    pub(crate) sqlite: Option<SqliteStore>,
}

/// Runs `request` through `handles` (this process's, or the running gateway's); returns what
/// to print.
pub(crate) async fn execute(request: &Request, handles: &Handles) -> Result<Vec<String>, String> {
    let (keys, admins) = (&handles.keys, &handles.admins);
    let actor = Actor::new(&request.operator).map_err(|e| format!("--operator: {e}"))?;
    let audit = |action: &str, admin: &Username, org: &OrgId| {
        tracing::info!(
            target: "orgkey::audit",
            actor = %actor,
            action,
            admin = %admin,
            org = %org,
            "admin account changed by an operator"
        );
    };
    match &request.command {
        Command::Org(OrgCommand::Create { id }) => {
            let org = org_id(id)?;
            keys.create_org(&org)
                .await
                .map_err(|e| format!("org {org}: {e}"))?;
            let info = keys
                .subscribe(&org, &actor)
                .await
                .map_err(|e| format!("org {org} was created, but not subscribed: {e}"))?;
            Ok(key_lines(&org, &info))
        }
        Command::Org(OrgCommand::Subscribe { id }) => {
            let org = org_id(id)?;
            let info = keys
                .subscribe(&org, &actor)
                .await
                .map_err(|e| format!("org {org}: {e}"))?;
            Ok(key_lines(&org, &info))
        }
        Command::Org(OrgCommand::Unsubscribe { id }) => {
            let org = org_id(id)?;
            let info = keys
                .unsubscribe(&org, &actor)
                .await
                .map_err(|e| format!("org {org}: {e}"))?;
            let mut lines = vec![format!("org id: {org}"), "subscribed: no".to_owned()];
            lines.extend(unconfirmed_line(&info));
            Ok(lines)
        }
        Command::Org(OrgCommand::Show { id }) => {
            let org = org_id(id)?;
            let info = keys.view(&org).map_err(|e| format!("org {org}: {e}"))?;
            let mut lines = vec![format!("org id: {org}")];
            lines.push(format!(
                "subscribed: {}",
                if keys
                    .table()
                    .state(org.as_str())
                    .is_some_and(|s| s.is_subscribed())
                {
                    "yes"
                } else {
                    "no"
                }
            ));
            lines.push(match info.key() {
                Some(key) => format!("api key: {}", key.expose_secret()),
                None => "api key: (none)".to_owned(),
            });
            lines.push(format!("generation: {}", info.generation().get()));
            if let Some(by) = info.last_modified_by() {
                lines.push(format!("last modified by: {by}"));
            }
            if let Some(at) = info.last_modified_on() {
                let ms = crate::store::millis(at);
                lines.push(format!("last modified on: {ms} (ms since the Unix epoch)"));
            }
            Ok(lines)
        }
        Command::Admin(AdminCommand::Create {
            user,
            org,
            scopes: list,
        }) => {
            let user = username(user)?;
            let org = org_id(org)?;
            let scopes = scopes(list)?;
            let (password, generated) = password(request.password.as_deref())?;
            admins
                .create(&user, &org, &password, scopes)
                .await
                .map_err(|e| format!("admin {user}: {e}"))?;
            audit("admin-create", &user, &org);
            let mut lines = vec![format!("admin: {user}"), format!("org id: {org}")];
            if let Some(generated) = generated {
                lines.push(format!("admin password: {}", generated.expose_secret()));
            }
            Ok(lines)
        }
        Command::Admin(AdminCommand::Disable { user }) => {
            let user = username(user)?;
            admins
                .disable(&user)
                .await
                .map_err(|e| format!("admin {user}: {e}"))?;
            admin_changed(admins, &user, "admin-disable", &audit);
            Ok(vec![format!("admin: {user}"), "enabled: no".to_owned()])
        }
        Command::Admin(AdminCommand::Enable { user }) => {
            let user = username(user)?;
            admins
                .enable(&user)
                .await
                .map_err(|e| format!("admin {user}: {e}"))?;
            admin_changed(admins, &user, "admin-enable", &audit);
            Ok(vec![format!("admin: {user}"), "enabled: yes".to_owned()])
        }
        Command::Admin(AdminCommand::Password { user }) => {
            let user = username(user)?;
            let (password, generated) = password(request.password.as_deref())?;
            admins
                .change_password(&user, &password)
                .await
                .map_err(|e| format!("admin {user}: {e}"))?;
            admin_changed(admins, &user, "admin-password", &audit);
            let mut lines = vec![format!("admin: {user}")];
            match generated {
                Some(generated) => {
                    lines.push(format!("admin password: {}", generated.expose_secret()));
                }
                None => lines.push("password: changed".to_owned()),
            }
            Ok(lines)
        }
        Command::MasterKey(command) => master_key(command, handles, &actor).await,
        Command::Backup { path } => backup(path, handles).await,
        Command::Restore { .. } => Err(
            "a gateway serves this state: stop it first (a restore replaces the state it \
             serves, and its sessions)"
                .to_owned(),
        ),
    }
}

/// The store behind `handles`.
fn store(handles: &Handles) -> Result<&std::sync::Arc<dyn crate::store::Store>, String> {
    handles
        .keys
        .store()
        .ok_or_else(|| "no store: nothing is kept at rest".to_owned())
}

fn ids(ids: impl IntoIterator<Item = MasterKeyId>) -> String {
    let ids: Vec<String> = ids.into_iter().map(|id| id.to_hex()).collect();
    if ids.is_empty() {
        "(none)".to_owned()
    } else {
        ids.join(", ")
    }
}

fn load_master(file: &Path) -> Result<MasterKeys, String> {
    MasterKeys::load(file).map_err(|e| e.to_string())
}

/// `master-key status|rotate|retire` (P4), in the process that holds the store.
async fn master_key(
    command: &MasterKeyCommand,
    handles: &Handles,
    actor: &Actor,
) -> Result<Vec<String>, String> {
    let store = store(handles)?;
    let file = &handles.master_file;
    let in_use = store
        .master_keys_in_use()
        .await
        .map_err(|e| format!("state: {}", super::causes(&e)))?;
    match command {
        MasterKeyCommand::Create => Err(format!(
            "master key file {} exists and is in use (it is never overwritten)",
            file.display()
        )),
        MasterKeyCommand::Status => {
            let master = load_master(file)?;
            Ok(vec![
                format!("master key file: {}", file.display()),
                format!("seals: {}", master.current()),
                format!("opens: {}", ids(master.ids())),
                format!("stored keys sealed under: {}", ids(in_use)),
            ])
        }
        MasterKeyCommand::Rotate => {
            let master = load_master(file)?;
            // An interrupted rotation has stored keys under an older key while the file's
            // first key is the new one: finish that one instead of drawing another.
            let resuming = in_use.iter().any(|id| *id != master.current());
            let master = if resuming {
                master
            } else {
                let rotated = master.with_new_key().map_err(|e| e.to_string())?;
                rotated.save(file).map_err(|e| e.to_string())?;
                rotated
            };
            let current = master.current();
            store
                .set_master_keys(master)
                .await
                .map_err(|e| format!("state: {}", super::causes(&e)))?;
            let resealed = store
                .reseal()
                .await
                .map_err(|e| format!("state: {}", super::causes(&e)))?;
            tracing::info!(
                target: "orgkey::audit",
                actor = %actor,
                action = "master-key-rotate",
                master_key = %current,
                resealed,
                "master key rotated by an operator"
            );
            let left = store
                .master_keys_in_use()
                .await
                .map_err(|e| format!("state: {}", super::causes(&e)))?;
            let mut lines = vec![
                format!("master key file: {}", file.display()),
                format!("seals: {current}"),
                format!("resealed: {resealed}"),
            ];
            if resuming {
                lines.push("resumed an interrupted rotation".to_owned());
            }
            if left.iter().any(|id| *id != current) {
                lines.push(format!(
                    "warning: stored keys are still sealed under {} (changes made meanwhile); \
                     run master-key rotate again",
                    ids(left.into_iter().filter(|id| *id != current))
                ));
            } else {
                lines.push(
                    "old master keys can be retired (master-key retire) once no backup you \
                     keep was made under them"
                        .to_owned(),
                );
            }
            Ok(lines)
        }
        MasterKeyCommand::Retire => {
            let master = load_master(file)?;
            let retired: Vec<MasterKeyId> = master
                .ids()
                .filter(|id| *id != master.current() && !in_use.contains(id))
                .collect();
            if retired.is_empty() {
                return Ok(vec![
                    format!("master key file: {}", file.display()),
                    format!(
                        "retired: (none; stored keys are sealed under {})",
                        ids(in_use)
                    ),
                ]);
            }
            let kept = master.without(|id| retired.contains(&id));
            kept.save(file).map_err(|e| e.to_string())?;
            store
                .set_master_keys(kept)
                .await
                .map_err(|e| format!("state: {}", super::causes(&e)))?;
            tracing::info!(
                target: "orgkey::audit",
                actor = %actor,
                action = "master-key-retire",
                retired = %ids(retired.iter().copied()),
                "master keys retired by an operator"
            );
            Ok(vec![
                format!("master key file: {}", file.display()),
                format!("retired: {}", ids(retired)),
                "backups made under a retired key need a copy of the old file to be restored"
                    .to_owned(),
            ])
        }
    }
}

/// `backup PATH`: SQLite's online backup, by the process that holds the state.
async fn backup(path: &Path, handles: &Handles) -> Result<Vec<String>, String> {
    #[cfg(feature = "sqlite")]
    if let Some(sqlite) = &handles.sqlite {
        sqlite
            .backup(path)
            .await
            .map_err(|e| format!("backup {}: {}", path.display(), super::causes(&e)))?;
        let master = sqlite.master_keys();
        return Ok(vec![
            format!("backup: {}", path.display()),
            format!(
                "keys sealed under master key {}: keep {} apart from this copy",
                master.current(),
                handles.master_file.display()
            ),
        ]);
    }
    let _ = (path, handles);
    Err("backup copies an SQLite state; for PostgreSQL use pg_dump (see the README)".to_owned())
}

fn admin_changed(
    admins: &Admins,
    user: &Username,
    action: &str,
    audit: &impl Fn(&str, &Username, &OrgId),
) {
    if let Some(status) = admins.get(user) {
        audit(action, user, &status.org);
    }
}

fn key_lines(org: &OrgId, info: &crate::KeyInfo) -> Vec<String> {
    let mut lines = vec![format!("org id: {org}")];
    if let Some(key) = info.key() {
        lines.push(format!("api key: {}", key.expose_secret()));
    }
    lines.extend(unconfirmed_line(info));
    lines
}

fn unconfirmed_line(info: &crate::KeyInfo) -> Option<String> {
    info.unconfirmed().map(|u| format!("warning: {u}"))
}

/// The control socket of the gateway serving the SQLite state `state`.
pub(crate) fn socket_path(state: &Path) -> PathBuf {
    let mut path = state.as_os_str().to_owned();
    path.push(".ctl");
    PathBuf::from(path)
}

/// Prints an answer's lines; its error becomes the command's.
pub(crate) fn print(answer: Result<Vec<String>, String>) -> Result<(), String> {
    for line in answer? {
        println!("{line}");
    }
    Ok(())
}

/// Sends `request` to the gateway listening on `socket`, and returns its answer.
pub(crate) async fn send(socket: &Path, request: &Request) -> Result<Vec<String>, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "the state is held by a running gateway, but its control socket {} does not \
             answer ({e}); stop that gateway or run the command as its user",
            socket.display()
        )
    })?;
    // Only to the gateway's own user (or root): a socket planted in a shared folder must
    // not receive the password, nor answer for the gateway.
    {
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .map_err(|e| format!("control socket: who am I: {e}"))?;
        let peer = stream
            .peer_cred()
            .map_err(|e| format!("control socket {}: {e}", socket.display()))?;
        if peer.uid() != me && peer.uid() != 0 {
            return Err(format!(
                "the control socket {} belongs to another user (uid {}); refusing to send the \
                 command",
                socket.display(),
                peer.uid()
            ));
        }
    }
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("control socket: {e}"))?;
    let mut reply = String::new();
    BufReader::new(read)
        .read_line(&mut reply)
        .await
        .map_err(|e| format!("control socket: {e}"))?;
    let answer: Answer = serde_json::from_str(&reply)
        .map_err(|_| "the running gateway gave no answer (it may have stopped)".to_owned())?;
    match answer.error {
        Some(error) => Err(error),
        None => Ok(answer.lines),
    }
}

/// Serves operator commands on `socket` for the gateway that owns the SQLite state (P5),
/// until the returned task is aborted. Only the gateway's own user (or root) may send one.
pub(crate) fn listen(
    socket: PathBuf,
    handles: Handles,
) -> Result<tokio::task::JoinHandle<()>, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // A socket file left by a gateway that died: this process holds the state's lock, so
    // no live gateway uses it.
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("control socket {}: {e}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("control socket {}: {e}", socket.display()))?;
    let owner = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("control socket: who am I: {e}"))?;
    tracing::info!(socket = %socket.display(), "operator commands accepted on the control socket");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let allowed = stream
                .peer_cred()
                .is_ok_and(|cred| cred.uid() == owner || cred.uid() == 0);
            if !allowed {
                tracing::warn!("control socket: a command from another user was refused");
                continue;
            }
            let handles = handles.clone();
            tokio::spawn(async move { answer(stream, &handles).await });
        }
    }))
}

/// Reads one command from `stream`, runs it, writes the answer.
async fn answer(stream: tokio::net::UnixStream, handles: &Handles) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A command is small: at most 64 KiB.
    let read = BufReader::new(read.take(64 * 1024))
        .read_line(&mut line)
        .await;
    let result = match read {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => execute(&request, handles).await,
            Err(_) => Err("the command could not be read".to_owned()),
        },
        Err(e) => Err(format!("control socket: {e}")),
    };
    let answer = match result {
        Ok(lines) => Answer { lines, error: None },
        Err(error) => Answer {
            lines: Vec::new(),
            error: Some(error),
        },
    };
    if let Ok(mut reply) = serde_json::to_string(&answer) {
        reply.push('\n');
        let _ = write.write_all(reply.as_bytes()).await;
    }
}
