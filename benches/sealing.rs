//! Keys at rest (P4): what sealing costs at start-up and per change.
//!
//! - `sealing/seal_one`, `sealing/open_one`: `MasterKeys::seal` / `MasterKeys::open` of one
//!   12-character key (a ring of two master keys, the value sealed under the first).
//! - `startup/unseal_1m`: the pure unseal loop, `MasterKeys::open` over N values sealed
//!   beforehand (one per org, generation 1), no store.
//! - `startup/sqlite_open_load_1m`: `SqliteStore::open` + `Store::load_orgs` of a state file
//!   holding N subscribed orgs with keys (open checks the master keys in use with a scan of
//!   the sealed keys; `load_orgs` reads every row and opens every key), then drop.
//! - `per_change/commit_disk` and `per_change/commit_tmpfs`: `Store::commit` of one key change
//!   (seal, compare-and-set on the generation, update, audit row, commit) on a small state
//!   (1,000 orgs), in the system temp directory (`synchronous=FULL`: an fsync per commit) and
//!   on tmpfs (`/dev/shm`, no device flush: the CPU cost of a commit). The seal's share is
//!   `seal_one` over these.
//!
//! N is 1,000,000 (`ORGKEY_SEALING_ORGS` to change it). The N-org state is built once per
//! run through the store's API (`create_org`, then `commit` of a subscription with a fresh
//! key, one transaction each, as a deployment's provisioning does) on tmpfs when there is
//! one (an fsync per transaction on this machine's disk would take ~20 minutes for 2,000,000
//! transactions), and deleted at the end. Loading it is measured from the page cache either
//! way (the file was just written); a cold start from disk adds reading the file.
//!
//! The store is used outside any async runtime, where its futures are ready at the first
//! poll (it runs SQLite on the calling thread). Run:
//! `cargo bench --all-features --bench sealing`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::cell::OnceCell;
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use orgkey::store::{OrgRecord, SqliteStore, Store};
use orgkey::{Actor, ApiKey, AuditEvent, Generation, KeyAction, KeyFormat, MasterKeys, OrgId};

/// Polls a store future that must be ready (no runtime: the store ran the job already).
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("a store future outside a runtime must be ready"),
    }
}

fn orgs() -> usize {
    std::env::var("ORGKEY_SEALING_ORGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn org_id(i: usize) -> OrgId {
    OrgId::new(&format!("org-{i:07}")).unwrap()
}

fn ring() -> MasterKeys {
    MasterKeys::generate().unwrap().with_new_key().unwrap()
}

/// A fresh directory for one state, on tmpfs if `tmpfs` and there is one.
fn state_dir(name: &str, tmpfs: bool) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if tmpfs && shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("orgkey-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The change a commit writes: `org` at `generation` with `key`, and its audit event.
fn change(org: &OrgId, generation: u64, key: ApiKey, actor: &Actor) -> (OrgRecord, AuditEvent) {
    let at = SystemTime::now();
    let action = if generation == 1 {
        KeyAction::Subscribe
    } else {
        KeyAction::Regenerate
    };
    (
        OrgRecord {
            org: org.clone(),
            subscribed: true,
            key: Some(key),
            generation: Generation::new(generation),
            last_modified_by: Some(actor.clone()),
            last_modified_on: Some(at),
        },
        AuditEvent {
            org: org.clone(),
            actor: actor.clone(),
            action,
            at,
            generation: Generation::new(generation),
        },
    )
}

/// Creates `n` subscribed orgs with fresh keys in `store`, one `create_org` and one `commit`
/// each.
fn provision(store: &SqliteStore, n: usize, progress: bool) {
    let actor = Actor::new("provisioning").unwrap();
    let started = Instant::now();
    for i in 0..n {
        let org = org_id(i);
        now(store.create_org(&org)).unwrap();
        let (next, audit) = change(&org, 1, ApiKey::generate().unwrap(), &actor);
        now(store.commit(Generation::new(0), &next, &audit)).unwrap();
        if progress && (i + 1) % 100_000 == 0 {
            eprintln!(
                "sealing: provisioned {} orgs in {:.1} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
}

fn one_key(c: &mut Criterion) {
    let keys = ring();
    let org = OrgId::new("acme").unwrap();
    let key = ApiKey::parse("AbCdEf123456").unwrap();
    let generation = Generation::new(7);
    let sealed = keys.seal(&org, generation, &key).unwrap();
    let format = KeyFormat::default();

    let mut group = c.benchmark_group("sealing");
    group.bench_function("seal_one", |b| {
        b.iter(|| {
            black_box(
                keys.seal(black_box(&org), generation, black_box(&key))
                    .unwrap(),
            )
        })
    });
    group.bench_function("open_one", |b| {
        b.iter(|| {
            black_box(
                keys.open(black_box(&org), generation, black_box(&sealed), format)
                    .unwrap(),
            )
        })
    });
    group.finish();
}

fn startup(c: &mut Criterion) {
    let n = orgs();
    let format = KeyFormat::default();
    let label = if n == 1_000_000 {
        "1m".to_owned()
    } else {
        n.to_string()
    };
    let mut group = c.benchmark_group("startup");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));

    // The pure unseal loop. Set up on first use, so a filter that skips it skips the setup.
    let keys = ring();
    let generation = Generation::new(1);
    let sealed: OnceCell<Vec<(OrgId, Vec<u8>)>> = OnceCell::new();
    group.measurement_time(Duration::from_secs(12));
    group.bench_function(format!("unseal_{label}"), |b| {
        let sealed = sealed.get_or_init(|| {
            (0..n)
                .map(|i| {
                    let org = org_id(i);
                    let value = keys
                        .seal(&org, generation, &ApiKey::generate().unwrap())
                        .unwrap();
                    (org, value)
                })
                .collect()
        });
        b.iter(|| {
            for (org, value) in sealed {
                black_box(keys.open(org, generation, value, format).unwrap());
            }
        })
    });
    drop(sealed);

    // SqliteStore::open + load_orgs of an N-org state, built on first use.
    let master = ring();
    let state: OnceCell<PathBuf> = OnceCell::new();
    group.measurement_time(Duration::from_secs(30));
    group.bench_function(format!("sqlite_open_load_{label}"), |b| {
        let path = state.get_or_init(|| {
            let dir = state_dir("sealing-startup", true);
            let path = dir.join("state.db");
            let store = SqliteStore::open(&path, format, master.clone()).unwrap();
            let started = Instant::now();
            provision(&store, n, true);
            drop(store);
            let bytes: u64 = ["state.db", "state.db-wal"]
                .iter()
                .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
                .map(|m| m.len())
                .sum();
            eprintln!(
                "sealing: state of {n} orgs built in {:.1} s under {} ({:.1} MiB with its WAL)",
                started.elapsed().as_secs_f64(),
                dir.display(),
                bytes as f64 / 1048576.0
            );
            path
        });
        b.iter(|| {
            let store = SqliteStore::open(path, format, master.clone()).unwrap();
            let loaded = now(store.load_orgs()).unwrap();
            assert_eq!(loaded.len(), n);
            black_box(loaded);
        })
    });
    group.finish();
    if let Some(dir) = state.get().and_then(|path| path.parent()) {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn per_change(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_change");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    let actor = Actor::new("alice@acme.example").unwrap();
    let org = org_id(500);
    let key = ApiKey::parse("AbCdEf123456").unwrap();
    for (name, tmpfs) in [("commit_disk", false), ("commit_tmpfs", true)] {
        // Built on first use (see `startup`): 1,000 orgs, then one org's key changed.
        let state: OnceCell<(PathBuf, SqliteStore)> = OnceCell::new();
        let mut generation = 1u64;
        group.bench_function(name, |b| {
            let (_, store) = state.get_or_init(|| {
                let dir = state_dir(&format!("sealing-{name}"), tmpfs);
                let store =
                    SqliteStore::open(dir.join("state.db"), KeyFormat::default(), ring()).unwrap();
                provision(&store, 1_000, false);
                (dir, store)
            });
            b.iter(|| {
                let (next, audit) = change(&org, generation + 1, key.clone(), &actor);
                now(store.commit(Generation::new(generation), &next, &audit)).unwrap();
                generation += 1;
            })
        });
        if let Some((dir, store)) = state.into_inner() {
            drop(store);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
    group.finish();
}

criterion_group!(benches, one_key, per_change, startup);
criterion_main!(benches);
