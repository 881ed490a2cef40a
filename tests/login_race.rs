//! K6 for sessions: logins racing key regenerations. A session created with a key that a
//! regeneration then replaced must be dead; no session created under an old key survives.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orgkey::directory::{AdminDirectory, AdminStatus, PasswordRejection};
use orgkey::session::obfuscate::obfuscate;
use orgkey::session::{LoginRequest, SessionConfig, Sessions, ThrottlePolicy};
use orgkey::{Actor, KeyAdmin, OrgId, OrgTable, Password, Scopes, Username};

/// A directory without argon2, so the race runs thousands of logins.
struct Fast(OrgId);

impl AdminDirectory for Fast {
    fn status(&self, _: &Username) -> Option<AdminStatus> {
        Some(AdminStatus {
            org: self.0.clone(),
            enabled: true,
            scopes: Scopes::ALL,
            credential_version: 1,
        })
    }
    fn verify_password(
        &self,
        username: &Username,
        password: &Password,
    ) -> Result<AdminStatus, PasswordRejection> {
        let status = self
            .status(username)
            .ok_or(PasswordRejection::UnknownUser)?;
        if password.expose_secret() == "pw" {
            Ok(status)
        } else {
            Err(PasswordRejection::WrongPassword)
        }
    }
}

#[test]
fn no_session_created_under_an_old_key_survives_its_regeneration() {
    let seconds: u64 = std::env::var("ORGKEY_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let table = OrgTable::default();
    let keys = KeyAdmin::new(table.clone());
    let acme = OrgId::new("acme").unwrap();
    let ops = Actor::new("rotator@acme.example").unwrap();
    runtime.block_on(keys.create_org(&acme)).unwrap();
    runtime.block_on(keys.subscribe(&acme, &ops)).unwrap();
    let config = SessionConfig {
        throttle: ThrottlePolicy {
            address_burst: u32::MAX,
            username_burst: u32::MAX,
            ..ThrottlePolicy::default()
        },
        ..SessionConfig::default()
    };
    let sessions = Sessions::with_config(
        table.clone(),
        Fast(acme.clone()),
        config,
        orgkey::clock::SystemClock,
    );
    let stop = Arc::new(AtomicBool::new(false));
    // (session id, generation of the key the client used)
    let created = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));

    let loggers: Vec<_> = (0..4)
        .map(|_| {
            let (table, sessions, stop, created) = (
                table.clone(),
                sessions.clone(),
                stop.clone(),
                created.clone(),
            );
            let handle = runtime.handle().clone();
            std::thread::spawn(move || {
                let mut attempts = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let state = table.state("acme").unwrap();
                    let key = state.key().unwrap().expose_secret().to_owned();
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    let api_key = obfuscate(key.as_bytes(), ts).unwrap();
                    let attempt = LoginRequest {
                        api_key: Password::new(String::from_utf8(api_key.to_vec()).unwrap()),
                        username: "alice@acme.example".into(),
                        password: Password::new("pw"),
                        timestamp_ms: ts,
                        source: None,
                    };
                    attempts += 1;
                    if let Ok(session) = handle.block_on(sessions.login(attempt)) {
                        created.lock().unwrap().push((
                            session.token.expose_secret().to_owned(),
                            state.generation().get(),
                        ));
                    }
                }
                attempts
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rotations = 0u64;
    let mut violations = Vec::new();
    while Instant::now() < deadline {
        let info = runtime.block_on(keys.regenerate(&acme, &ops)).unwrap();
        rotations += 1;
        // Every session made with a key older than this regeneration must now be dead.
        let current = info.generation().get();
        for (id, generation) in created.lock().unwrap().iter() {
            if *generation < current && sessions.validate(id.as_bytes()).is_ok() {
                violations.push(format!(
                    "session from generation {generation} alive after regeneration to {current}"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    let attempts: u64 = loggers.into_iter().map(|h| h.join().unwrap()).sum();
    let created = created.lock().unwrap();
    // Sessions created under the final key are alive: the check is not vacuous.
    let final_generation = table.state("acme").unwrap().generation().get();
    for (id, generation) in created.iter() {
        if *generation < final_generation && sessions.validate(id.as_bytes()).is_ok() {
            violations.push(format!(
                "session from generation {generation} alive at the end (final {final_generation})"
            ));
        }
    }
    let live_final = created
        .iter()
        .filter(|(id, g)| *g == final_generation && sessions.validate(id.as_bytes()).is_ok())
        .count();
    println!(
        "login race: {attempts} login attempts, {} sessions, {rotations} regenerations, \
         {live_final} live under the final key, {} violations",
        created.len(),
        violations.len()
    );
    assert!(
        rotations > 10 && created.len() > 10,
        "too little happened to test anything"
    );
    assert!(violations.is_empty(), "{:?}", violations.first());
}
