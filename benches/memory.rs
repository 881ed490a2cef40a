//! Memory per org at 1,000,000 orgs (DESIGN.md budget: <= 256 bytes, key and metadata, no
//! admins).
//!
//! Builds the table the way a deployment does (create the org, apply the subscription, which
//! provisions a random key; every change recorded as made by one shared actor) and measures
//! the growth of the process's resident set, so allocator overhead and table slack count.
//! Run: `cargo bench --bench memory`.
#![allow(clippy::unwrap_used, missing_docs)]

use orgkey::{Actor, KeyAdmin, OrgId, OrgTable};

fn resident_bytes() -> u64 {
    // /proc/self/statm: size resident shared ... (in pages)
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` compatibility
    }
    let n: usize = std::env::var("ORGKEY_MEMORY_ORGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let actor = Actor::new("provisioning").unwrap();
    let before = resident_bytes();
    let admin = KeyAdmin::new(OrgTable::default());
    for i in 0..n {
        // The table keeps the only reference to each id string, so it is counted below.
        let id = OrgId::new(&format!("org-{i:07}")).unwrap();
        rt.block_on(admin.create_org(&id)).unwrap();
        rt.block_on(admin.subscribe(&id, &actor)).unwrap();
    }
    let after = resident_bytes();
    let grown = after.saturating_sub(before) as f64;
    let per_org = grown / n as f64;
    println!(
        "memory: {n} orgs (ids of 11 bytes), resident growth {:.1} MiB => {per_org:.0} bytes per org (budget 256)",
        grown / 1048576.0,
    );
    println!(
        "memory: size_of OrgState = {} bytes, ApiKey = {} bytes",
        std::mem::size_of::<orgkey::table::OrgState>(),
        std::mem::size_of::<orgkey::ApiKey>()
    );
    assert!(admin.table().len() == n);
    std::hint::black_box(&admin);
}
