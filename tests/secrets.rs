//! Secret hygiene: `ApiKey` cannot be compared with `==`, printed with `Display`, or hashed;
//! `Debug` of every type that holds a key never shows it.
#![allow(clippy::unwrap_used)]

use orgkey::{Actor, ApiKey, KeyAdmin, KeyInfo, OrgId, OrgTable};
use static_assertions::{assert_impl_all, assert_not_impl_any};

// Compile-time proof (the test crate does not build if any of these is implemented).
assert_not_impl_any!(ApiKey: PartialEq, Eq, PartialOrd, std::fmt::Display, std::hash::Hash, Copy);
assert_not_impl_any!(KeyInfo: PartialEq, std::fmt::Display);
assert_not_impl_any!(orgkey::table::OrgState: PartialEq, std::fmt::Display);
assert_impl_all!(ApiKey: subtle::ConstantTimeEq, zeroize::ZeroizeOnDrop, std::fmt::Debug, Send, Sync);
assert_not_impl_any!(orgkey::Password: PartialEq, Eq, std::fmt::Display, std::hash::Hash);
assert_not_impl_any!(orgkey::session::SessionToken: PartialEq, Eq, std::fmt::Display, std::hash::Hash, Clone);
assert_impl_all!(orgkey::session::SessionToken: subtle::ConstantTimeEq, std::fmt::Debug);
assert_not_impl_any!(orgkey::session::LoginRequest: PartialEq, std::fmt::Display);
assert_not_impl_any!(orgkey::MasterKeys: PartialEq, Eq, std::fmt::Display, std::hash::Hash, Copy);

#[test]
fn debug_of_master_keys_shows_ids_and_never_key_bytes() {
    let dir = std::env::temp_dir().join(format!("orgkey-secrets-mk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("master.key");
    let keys = orgkey::MasterKeys::create(&file)
        .unwrap()
        .with_new_key()
        .unwrap();
    keys.save(&file).unwrap();
    let debug = format!("{keys:?}");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut secrets = 0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("orgkey-master-key-v1 "))
    {
        let encoded = line.split_whitespace().nth(1).unwrap();
        assert!(!debug.contains(encoded), "{debug}");
        secrets += 1;
    }
    assert_eq!(secrets, 2);
    for id in keys.ids() {
        assert!(debug.contains(&id.to_hex()), "{debug}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn debug_of_passwords_login_requests_and_stored_admins_never_shows_the_secret() {
    let password = orgkey::Password::new("CorrectHorse12!");
    let request = orgkey::session::LoginRequest {
        api_key: orgkey::Password::new("24C312f631ff"),
        username: "alice@acme.example".into(),
        password: password.clone(),
        timestamp_ms: 1,
        source: None,
    };
    let admin = orgkey::store::AdminRecord {
        username: orgkey::Username::new("alice@acme.example").unwrap(),
        org: OrgId::new("acme").unwrap(),
        enabled: true,
        scopes: orgkey::Scopes::ALL,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        credential_version: 1,
    };
    for rendering in [
        format!("{password:?}"),
        format!("{request:?}"),
        format!("{request:#?}"),
        format!("{admin:?}"),
    ] {
        assert!(!rendering.contains("CorrectHorse"), "{rendering}");
        assert!(!rendering.contains("24C312"), "{rendering}");
        assert!(!rendering.contains("argon2id"), "{rendering}");
    }
}

const KEY: &str = "Zx9Qw8Er7Ty6";

#[tokio::test]
async fn debug_of_every_type_holding_a_key_never_contains_it() {
    let admin = KeyAdmin::new(OrgTable::default()).with_base_url("https://gw.example/api/v1");
    let org = OrgId::new("acme").unwrap();
    let actor = Actor::new("alice@acme.example").unwrap();
    admin.create_org(&org).await.unwrap();
    admin.subscribe(&org, &actor).await.unwrap();
    let info = admin
        .edit(&org, ApiKey::parse(KEY).unwrap(), &actor)
        .await
        .unwrap();
    let key = ApiKey::parse(KEY).unwrap();
    let state = admin.table().state("acme").unwrap();
    let layer = orgkey::OrgKeyLayer::new(admin.table().clone());

    let renderings = [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{info:?}"),
        format!("{info:#?}"),
        format!("{state:?}"),
        format!("{state:#?}"),
        format!("{:?}", info.key()),
        format!("{admin:?}"),
        format!("{:?}", admin.table()),
        format!("{layer:?}"),
    ];
    for rendering in &renderings {
        assert!(!rendering.contains(KEY), "secret leaked: {rendering}");
        // Not even a recognisable prefix of it.
        assert!(!rendering.contains(&KEY[..6]), "partial leak: {rendering}");
    }
    // The explicit reveal still works, for the admin "view key" feature.
    assert_eq!(info.key().unwrap().expose_secret(), KEY);
}
