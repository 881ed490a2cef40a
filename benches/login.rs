//! Login cost (DESIGN.md: argon2id dominates; nothing else in the login path may add more
//! than 5% to it). In one run: one argon2id verification alone, and a whole login through
//! `SessionEndpoint` (JSON body, throttle, argon2id on a blocking thread, key check, session
//! creation, response). Run: `cargo bench --bench login`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::Full;
use orgkey::http::SessionEndpoint;
use orgkey::password::{hash_password, verify_password};
use orgkey::session::obfuscate::obfuscate;
use orgkey::session::{SessionConfig, Sessions, ThrottlePolicy};
use orgkey::{Actor, Admins, ApiKey, KeyAdmin, OrgId, OrgTable, Password, Scopes, Username};
use tower::ServiceExt;

fn login_cost(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let table = OrgTable::default();
    let keys = KeyAdmin::new(table.clone());
    let org = OrgId::new("acme").unwrap();
    let ops = Actor::new("ops").unwrap();
    rt.block_on(keys.create_org(&org)).unwrap();
    rt.block_on(keys.subscribe(&org, &ops)).unwrap();
    rt.block_on(keys.edit(&org, ApiKey::parse("AbCdEf123456").unwrap(), &ops))
        .unwrap();
    let admins = Admins::new(table.clone());
    let password = Password::new("CorrectHorse12!");
    rt.block_on(admins.create(
        &Username::new("alice@acme.example").unwrap(),
        &org,
        &password,
        Scopes::ALL,
    ))
    .unwrap();
    let config = SessionConfig {
        throttle: ThrottlePolicy {
            address_burst: u32::MAX,
            username_burst: u32::MAX,
            ..ThrottlePolicy::default()
        },
        ..SessionConfig::default()
    };
    let sessions = Sessions::with_config(table, admins, config, orgkey::clock::SystemClock);
    let endpoint = SessionEndpoint::new(sessions.clone());
    let phc = hash_password(&password).unwrap();

    let mut group = c.benchmark_group("login");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("argon2id_verify_alone", |b| {
        b.iter(|| assert!(verify_password(&password, &phc)))
    });
    group.bench_function("login_through_endpoint", |b| {
        b.iter(|| {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let key = String::from_utf8(obfuscate(b"AbCdEf123456", ts).unwrap().to_vec()).unwrap();
            let body = format!(
                r#"{{"apiKey":"{key}","username":"alice@acme.example","password":"CorrectHorse12!","timestamp":{ts}}}"#
            );
            let request = Request::post("/api/v1/authenticatedSession")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = rt.block_on(endpoint.clone().oneshot(request)).unwrap();
            assert_eq!(response.status(), 200);
        })
    });
    group.finish();
    eprintln!("sessions created: {}", sessions.len());
}

criterion_group!(benches, login_cost);
criterion_main!(benches);
