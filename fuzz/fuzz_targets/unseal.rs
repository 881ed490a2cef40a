//! Fuzz target: the P4 decryption path. `MasterKeys::open` on corrupted, truncated, spliced,
//! reordered and random sealed values; `seal::sealed_by`; `MasterKeyId::from_hex`; and
//! `MasterKeys::load` on a master key file of fuzzer bytes.
//!
//! Fixture (built once): a ring of two fixed master keys (`NEW` seals, `OLD` only opens) and
//! a third, `FOREIGN`, that the ring does not hold, all read through `MasterKeys::load` from
//! files this target writes, so the keys are the same in every process. `GENUINE` lists
//! values sealed under them (once, by `UNSEAL_PRINT_GENUINE=1`, see below) for several
//! (org, generation, key, format) tuples; two more are sealed fresh at start-up.
//!
//! Input: the first byte selects the function (`% 16`: 0-11 `open`, 12-13 `from_hex`,
//! 14-15 `load`). For `open`, six more header bytes follow: mode, value a, value b, org
//! choice, generation choice, format choice; the rest is data. Modes (`% 8`): 0 value a
//! unmodified; 1 bit flips (3 data bytes each: position u16 LE, xor mask); 2 truncation
//! (data[0..2]: keep the first n bytes; data[2] odd: drop n from the front instead); 3 splice
//! a[..i] + b[j..]; 4 one segment (version, id, nonce, ciphertext, tag) of a replaced by b's;
//! 5 a's segments reordered; 6 raw data; 7 a + data appended. Org choice < 0x80: a's own org,
//! else one of `ORGS`; generation choice < 0x80: a's own, else own+1, own-1, 0, `u64::MAX`,
//! b's, or 8 data bytes; format choice % 3: a's own, the default, 22 characters.
//!
//! Oracles:
//! - `open` never panics and returns exactly what an independent model of the value layout
//!   says: `Malformed` for fewer than 9 bytes or a version other than 1, and for fewer than
//!   49; `UnknownMasterKey(id)` with the value's bytes 1..9 when the ring holds no such key;
//!   `Ok(key)` only when the bytes equal a genuine value byte for byte and org, generation and
//!   format are the value's own (and the key is the original); `NotAKey` for a genuine value
//!   with its own org and generation opened as another format; `Forged` otherwise.
//! - `sealed_by` agrees with the model (id iff >= 9 bytes and version 1).
//! - `Display` and `Debug` of every error name no key material (no plaintext key, no master
//!   key in base64 or hex); an opened key's `Debug` shows no key.
//! - `from_hex`: `Some` iff exactly 16 ASCII hex digits; then `to_hex` is the input in
//!   lowercase and `Display` / `Debug` agree.
//! - `load`: never panics; `Ok` iff the model of the file format (UTF-8; per line, trimmed,
//!   blank and `#` lines skipped, `orgkey-master-key-v1 ` + canonical padded base64 of 32
//!   bytes, no key twice, at least one key) accepts, with as many keys; an error is exactly
//!   `master key file <path> is invalid: <reason naming a line number>`, so it never contains
//!   the file's content; a loaded ring seals and opens.
//!
//! `UNSEAL_PRINT_GENUINE=1 cargo fuzz run unseal -- -runs=1` prints the `GENUINE` table
//! sealed afresh under the fixed keys (the seeds in corpus/unseal/ hold these values).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use orgkey::seal::sealed_by;
use orgkey::{
    ApiKey, Generation, KeyFormat, MasterKeyError, MasterKeyId, MasterKeys, OrgId, SealError,
};

const VERSION: u8 = 1;
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + ID_LEN + NONCE_LEN;
const PREFIX: &str = "orgkey-master-key-v1 ";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Master {
    New,
    Old,
    Foreign,
}

/// A genuine value: what was sealed, for which org and generation, under which key.
struct Spec {
    org: &'static str,
    generation: u64,
    key: &'static str,
    /// Characters of the key format it was sealed for (12 or 22).
    len: usize,
    master: Master,
    /// The sealed value in hex (printed by `UNSEAL_PRINT_GENUINE=1`).
    hex: &'static str,
}

const LONG_ORG: &str = "a234567890123456789012345678901234567890123456789012345678901234";

const GENUINE: &[Spec] = &[
    Spec {
        org: "acme",
        generation: 1,
        key: "AbCdEf123456",
        len: 12,
        master: Master::New,
        hex: "011b52cf156f9e866ed16fbcd0c98da79627779752fe27f9cec2069bab2445c01896b7a07e15ac220fe75a4bd6d81ff352324d89138d237c9a6f8c2869",
    },
    Spec {
        org: "acme",
        generation: 2,
        key: "ZyXw98765432",
        len: 12,
        master: Master::New,
        hex: "011b52cf156f9e866e4af2dc15f03ffa9e0b4f968019b27059f48a5002458e33b082592962286c1d7570be7fb0cde9bbda8dea7870d2f5187266ebab72",
    },
    Spec {
        org: "beta-corp",
        generation: 7,
        key: "Gamma0000001",
        len: 12,
        master: Master::Old,
        hex: "01d1423c4db50be27b05befdc13918150d426bcadc317cf2e3ca766f58b8bab1930620e1720cca293cc1f08a4479760870e0cd3984c75cf380dffe8a69",
    },
    Spec {
        org: "zeta",
        generation: u64::MAX,
        key: "AbCdEf123456AbCdEf1234",
        len: 22,
        master: Master::New,
        hex: "011b52cf156f9e866e9a7a5e3b99c8e23f9eaf18bfbca13d8e439a8d9d677283936126586db09fb35046d873c5cbbcf3127ec998acf05942731f68c3a36ebfe72bf864e3666098",
    },
    Spec {
        org: "acme",
        generation: 1,
        key: "Delta0000002",
        len: 12,
        master: Master::Foreign,
        hex: "014865efcb76d97d8fdb0dcf8f68a1774f7fc5502f050827e17c032560e0f04c573e8a21ba5399e20b3a3d0c581bc985ed3340f68ade34187d92a1cc70",
    },
    Spec {
        org: LONG_ORG,
        generation: 0,
        key: "LongOrg00064",
        len: 12,
        master: Master::New,
        hex: "011b52cf156f9e866ee2cbab13ea3470eb5f877f6f2ab8a62be4c7950a24b409d49c858f7448d8cfe15aea3fe3ed9b081a774a0a0c5a793f8bf159a430",
    },
];

/// Sealed afresh at start-up (so `seal` runs in every process), appended to `GENUINE`.
const FRESH: &[(&str, u64, &str, usize, Master)] = &[
    ("acme", 3, "Fresh0000003", 12, Master::New),
    ("beta-corp", 8, "Fresh0000008Fresh00008", 22, Master::Old),
];

/// Org ids the org choice picks from: the values' own, and near misses.
const ORGS: &[&str] = &[
    "acme",
    "beta-corp",
    "zeta",
    LONG_ORG,
    "ACME",
    "acme.",
    "acm",
    "acmea",
    "beta_corp",
    "a23456789012345678901234567890123456789012345678901234567890123",
];

/// The fixed master keys (32 bytes each).
fn master_bytes(which: Master) -> [u8; 32] {
    let seed: u8 = match which {
        Master::New => 0x11,
        Master::Old => 0x5a,
        Master::Foreign => 0xc3,
    };
    std::array::from_fn(|i| seed.wrapping_mul(i as u8 + 1).wrapping_add(i as u8 * 7))
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The model's base64 reading of a master key: exactly 44 characters, 43 of the standard
/// alphabet then `=`, with the unused low bits of the last one zero (canonical).
fn b64_decode_key(text: &str) -> Option<[u8; 32]> {
    let t = text.as_bytes();
    if t.len() != 44 || t[43] != b'=' {
        return None;
    }
    let mut bits: Vec<u8> = Vec::with_capacity(43);
    for &c in &t[..43] {
        bits.push(ALPHABET.iter().position(|&a| a == c)? as u8);
    }
    if bits[42] & 3 != 0 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut acc: u32 = 0;
    let mut nbits = 0;
    let mut i = 0;
    for v in bits {
        acc = (acc << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            if i < 32 {
                out[i] = (acc >> nbits) as u8;
                i += 1;
            }
            acc &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("GENUINE hex"))
        .collect()
}

fn format_of(len: usize) -> KeyFormat {
    KeyFormat::with_len(len).expect("12 or 22")
}

struct Value {
    org: OrgId,
    generation: u64,
    key: &'static str,
    format: KeyFormat,
    sealed: Vec<u8>,
}

struct Fixture {
    ring: MasterKeys,
    ring_ids: Vec<String>,
    values: Vec<Value>,
    /// Key material that no message may contain.
    secrets: Vec<String>,
    load_path: PathBuf,
}

fn file_text(keys: &[Master]) -> String {
    let mut text = String::from("# fixed master keys of the unseal fuzz target\n");
    for &k in keys {
        text.push_str(PREFIX);
        text.push_str(&b64_encode(&master_bytes(k)));
        text.push('\n');
    }
    text
}

fn load_fixed(dir: &std::path::Path, name: &str, keys: &[Master]) -> MasterKeys {
    let path = dir.join(name);
    std::fs::write(&path, file_text(keys)).expect("write a fixed key file");
    MasterKeys::load(&path).expect("the fixed key file loads")
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("orgkey-fuzz-unseal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ring = load_fixed(&dir, "ring.key", &[Master::New, Master::Old]);
        let sealer = |m: Master| match m {
            Master::New => load_fixed(&dir, "new.key", &[Master::New]),
            Master::Old => load_fixed(&dir, "old.key", &[Master::Old]),
            Master::Foreign => load_fixed(&dir, "foreign.key", &[Master::Foreign]),
        };
        assert_eq!(ring.current(), sealer(Master::New).current());
        let print = std::env::var_os("UNSEAL_PRINT_GENUINE").is_some();
        let mut values = Vec::new();
        for (i, spec) in GENUINE.iter().enumerate() {
            let org = OrgId::new(spec.org).expect("org id");
            let format = format_of(spec.len);
            let sealed = if spec.hex.is_empty() || print {
                let key = ApiKey::parse_with(spec.key, format).expect("key");
                let sealed = sealer(spec.master)
                    .seal(&org, Generation::new(spec.generation), &key)
                    .expect("seal");
                if print {
                    println!(
                        "GENUINE[{i}] {} {} hex: \"{}\"",
                        spec.org,
                        spec.generation,
                        hex(&sealed)
                    );
                }
                sealed
            } else {
                unhex(spec.hex)
            };
            values.push(Value {
                org,
                generation: spec.generation,
                key: spec.key,
                format,
                sealed,
            });
        }
        for &(org, generation, key, len, master) in FRESH {
            let org = OrgId::new(org).expect("org id");
            let format = format_of(len);
            let parsed = ApiKey::parse_with(key, format).expect("key");
            let sealed = sealer(master)
                .seal(&org, Generation::new(generation), &parsed)
                .expect("seal");
            values.push(Value {
                org,
                generation,
                key,
                format,
                sealed,
            });
        }
        let mut secrets: Vec<String> = GENUINE.iter().map(|s| s.key.to_owned()).collect();
        secrets.extend(FRESH.iter().map(|f| f.2.to_owned()));
        for m in [Master::New, Master::Old, Master::Foreign] {
            let bytes = master_bytes(m);
            secrets.push(b64_encode(&bytes));
            secrets.push(hex(&bytes));
            secrets.push(hex(&bytes[..8]));
        }
        let ring_ids = ring.ids().map(MasterKeyId::to_hex).collect();
        let load_path = dir.join("fuzzed.key");
        Fixture {
            ring,
            ring_ids,
            values,
            secrets,
            load_path,
        }
    })
}

fn assert_no_secret(f: &Fixture, text: &str, what: &str) {
    for secret in &f.secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} reveals key material: {text}"
        );
    }
}

/// The model: what `open` must return for `bytes` at (org, generation, format).
#[derive(Debug)]
enum Expected {
    Ok(&'static str),
    Malformed,
    Unknown(String),
    Forged,
    NotAKey,
}

fn model(f: &Fixture, bytes: &[u8], org: &OrgId, generation: u64, format: KeyFormat) -> Expected {
    if bytes.len() < 1 + ID_LEN || bytes[0] != VERSION || bytes.len() < HEADER_LEN + TAG_LEN {
        return Expected::Malformed;
    }
    let id = hex(&bytes[1..1 + ID_LEN]);
    if !f.ring_ids.contains(&id) {
        return Expected::Unknown(id);
    }
    match f.values.iter().find(|v| v.sealed == bytes) {
        Some(v) if &v.org == org && v.generation == generation => {
            if v.format == format {
                Expected::Ok(v.key)
            } else {
                Expected::NotAKey
            }
        }
        _ => Expected::Forged,
    }
}

/// (start, end) of the five segments of a sealed value (clamped to its length).
fn segments(v: &[u8]) -> [(usize, usize); 5] {
    let n = v.len();
    let c = |x: usize| x.min(n);
    let tag_start = n.saturating_sub(TAG_LEN).max(c(HEADER_LEN));
    [
        (0, c(1)),
        (c(1), c(1 + ID_LEN)),
        (c(1 + ID_LEN), c(HEADER_LEN)),
        (c(HEADER_LEN), tag_start),
        (tag_start, n),
    ]
}

fn u16_at(data: &[u8], i: usize) -> usize {
    usize::from(*data.get(i).unwrap_or(&0)) | (usize::from(*data.get(i + 1).unwrap_or(&0)) << 8)
}

fn fuzz_open(f: &Fixture, input: &[u8]) {
    let mut header = [0u8; 6];
    for (i, h) in header.iter_mut().enumerate() {
        *h = *input.get(i).unwrap_or(&0);
    }
    let mut data = input.get(6..).unwrap_or(&[]);
    let [mode, a, b, org_choice, gen_choice, fmt_choice] = header;
    let va = &f.values[usize::from(a) % f.values.len()];
    let vb = &f.values[usize::from(b) % f.values.len()];
    let generation = if gen_choice < 0x80 {
        va.generation
    } else {
        match (gen_choice - 0x80) % 6 {
            0 => va.generation.wrapping_add(1),
            1 => va.generation.wrapping_sub(1),
            2 => 0,
            3 => u64::MAX,
            4 => vb.generation,
            _ => {
                let mut g = [0u8; 8];
                let n = data.len().min(8);
                g[..n].copy_from_slice(&data[..n]);
                data = &data[n..];
                u64::from_le_bytes(g)
            }
        }
    };
    let org = if org_choice < 0x80 {
        va.org.clone()
    } else {
        OrgId::new(ORGS[usize::from(org_choice - 0x80) % ORGS.len()]).expect("org id")
    };
    let format = match fmt_choice % 3 {
        0 => va.format,
        1 => KeyFormat::default(),
        _ => format_of(22),
    };
    let mut bytes = va.sealed.clone();
    match mode % 8 {
        0 => {}
        1 => {
            for chunk in data.chunks(3) {
                if bytes.is_empty() {
                    break;
                }
                let pos = u16_at(chunk, 0) % bytes.len();
                bytes[pos] ^= *chunk.get(2).unwrap_or(&1);
            }
        }
        2 => {
            let n = u16_at(data, 0) % (bytes.len() + 1);
            if data.get(2).is_some_and(|d| d & 1 == 1) {
                bytes.drain(..n);
            } else {
                bytes.truncate(n);
            }
        }
        3 => {
            let i = u16_at(data, 0) % (bytes.len() + 1);
            let j = u16_at(data, 2) % (vb.sealed.len() + 1);
            bytes.truncate(i);
            bytes.extend_from_slice(&vb.sealed[j..]);
        }
        4 => {
            let s = usize::from(*data.first().unwrap_or(&0)) % 5;
            let (sa, ea) = segments(&bytes)[s];
            let (sb, eb) = segments(&vb.sealed)[s];
            bytes.splice(sa..ea, vb.sealed[sb..eb].iter().copied());
        }
        5 => {
            // A permutation of the five segments, from data[0] (Lehmer code).
            let mut code = usize::from(*data.first().unwrap_or(&0)) % 120;
            let segs = segments(&bytes);
            let mut left: Vec<usize> = (0..5).collect();
            let mut out = Vec::with_capacity(bytes.len());
            for radix in (1..=5).rev() {
                let k = left.remove(code % radix);
                code /= radix;
                out.extend_from_slice(&bytes[segs[k].0..segs[k].1]);
            }
            bytes = out;
        }
        6 => bytes = data.to_vec(),
        _ => bytes.extend_from_slice(data),
    }

    let expected = model(f, &bytes, &org, generation, format);
    let result = f
        .ring
        .open(&org, Generation::new(generation), &bytes, format);
    match (&expected, &result) {
        (Expected::Ok(key), Ok(opened)) => {
            assert_eq!(opened.expose_secret(), *key, "opened to another key");
            assert_eq!(opened.format(), format);
            let debug = format!("{opened:?}");
            assert!(!debug.contains(key), "ApiKey Debug shows the key: {debug}");
        }
        (Expected::Malformed, Err(SealError::Malformed))
        | (Expected::Forged, Err(SealError::Forged))
        | (Expected::NotAKey, Err(SealError::NotAKey)) => {}
        (Expected::Unknown(want), Err(SealError::UnknownMasterKey(id))) if id.to_hex() == *want => {
        }
        _ => panic!(
            "open({}, {generation}, {} bytes, len {}) = {:?}, model says {expected:?}",
            org.as_str(),
            bytes.len(),
            format.len(),
            result.as_ref().map(|k| k.len())
        ),
    }
    if let Err(error) = &result {
        assert_no_secret(f, &error.to_string(), "SealError Display");
        assert_no_secret(f, &format!("{error:?}"), "SealError Debug");
    }

    let by = sealed_by(&bytes).map(MasterKeyId::to_hex);
    let want =
        (bytes.len() >= 1 + ID_LEN && bytes[0] == VERSION).then(|| hex(&bytes[1..1 + ID_LEN]));
    assert_eq!(by, want, "sealed_by");
}

fn fuzz_from_hex(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = MasterKeyId::from_hex(&text);
    let valid = text.len() == 2 * ID_LEN && text.bytes().all(|b| b.is_ascii_hexdigit());
    match parsed {
        Some(id) => {
            assert!(valid, "from_hex accepted {text:?}");
            assert_eq!(id.to_hex(), text.to_ascii_lowercase());
            assert_eq!(id.to_string(), id.to_hex());
            assert_eq!(format!("{id:?}"), format!("MasterKeyId({})", id.to_hex()));
            assert_eq!(MasterKeyId::from_hex(&id.to_hex()), Some(id));
        }
        None => assert!(!valid, "from_hex refused {text:?}"),
    }
}

/// The model of the master key file: the keys, or the reason it is invalid.
fn model_load(data: &[u8]) -> Result<Vec<[u8; 32]>, String> {
    let text = std::str::from_utf8(data).map_err(|_| "not UTF-8 text".to_owned())?;
    let mut keys: Vec<[u8; 32]> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = number + 1;
        let encoded = line
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("line {n} does not start with \"{}\"", PREFIX.trim_end()))?;
        let key = b64_decode_key(encoded.trim())
            .ok_or_else(|| format!("line {n} is not 32 bytes in base64"))?;
        if keys.contains(&key) {
            return Err(format!("line {n} repeats a key"));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("it holds no key".to_owned());
    }
    Ok(keys)
}

fn fuzz_load(f: &Fixture, data: &[u8]) {
    if std::fs::write(&f.load_path, data).is_err() {
        return;
    }
    let loaded = MasterKeys::load(&f.load_path);
    let expected = model_load(data);
    match (&expected, &loaded) {
        (Ok(keys), Ok(ring)) => {
            assert_eq!(ring.ids().count(), keys.len(), "number of keys");
            let debug = format!("{ring:?}");
            for key in keys {
                assert!(
                    !debug.contains(&b64_encode(key)),
                    "MasterKeys Debug shows a key"
                );
                assert!(!debug.contains(&hex(key)), "MasterKeys Debug shows a key");
            }
            let org = OrgId::new("acme").expect("org id");
            let key = ApiKey::parse("AbCdEf123456").expect("key");
            let sealed = ring.seal(&org, Generation::new(5), &key).expect("seal");
            let opened = ring
                .open(&org, Generation::new(5), &sealed, KeyFormat::default())
                .expect("a loaded ring opens what it sealed");
            assert_eq!(opened.expose_secret(), "AbCdEf123456");
        }
        (Err(reason), Err(error @ MasterKeyError::Invalid { .. })) => {
            let message = error.to_string();
            let want = format!(
                "master key file {} is invalid: {reason}",
                f.load_path.display()
            );
            assert_eq!(message, want, "load's message");
        }
        _ => panic!(
            "load: {:?}, model says {:?}",
            loaded
                .as_ref()
                .map(|r| r.ids().count())
                .map_err(|e| e.to_string()),
            expected.as_ref().map(Vec::len)
        ),
    }
}

fuzz_target!(|input: &[u8]| {
    let f = fixture();
    let Some((&which, rest)) = input.split_first() else {
        return;
    };
    match which % 16 {
        0..=11 => fuzz_open(f, rest),
        12 | 13 => fuzz_from_hex(rest),
        _ => fuzz_load(f, rest),
    }
});
