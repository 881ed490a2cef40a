//! Fuzz target: `ApiKey::parse`, `ApiKey::parse_with`, `KeyFormat::validate`, `ct_eq_bytes`.
//!
//! Oracles (K1, K3 of the design contract):
//! - a candidate is accepted exactly when it is N ASCII alphanumerics (N = 12 by default, 22
//!   for `KeyFormat::with_len(22)`, and a length taken from the first input byte);
//! - the error is exactly `WrongLength { expected: N, actual: len }` when the number of
//!   characters is wrong, otherwise `InvalidCharacter { position }` at the first character
//!   that is not alphanumeric (bytes for input that is not UTF-8);
//! - on success `expose_secret()` returns the input, `ct_eq_bytes` accepts the input and
//!   rejects any other byte string, and `Debug` (`{:?}`, `{:#?}`) never shows the input;
//! - the error's `Display` / `Debug` never echo the input: checked differentially against a
//!   canary candidate of the same shape but different bytes (so inputs that merely happen to
//!   be words of the fixed message, like "must", are not false alarms);
//! - nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orgkey::key::{DEFAULT_KEY_LEN, MAX_KEY_LEN};
use orgkey::{ApiKey, KeyFormat, KeyFormatError};
use subtle::ConstantTimeEq;

/// The language of K1: exactly `n` ASCII alphanumerics.
fn is_valid(candidate: &[u8], n: usize) -> bool {
    candidate.len() == n && candidate.iter().all(u8::is_ascii_alphanumeric)
}

/// The error the spec requires for an invalid candidate: lengths and positions count
/// characters (bytes only for a candidate that is not UTF-8).
fn expected_error(candidate: &[u8], n: usize) -> KeyFormatError {
    let units: Vec<bool> = match std::str::from_utf8(candidate) {
        Ok(text) => text.chars().map(|c| c.is_ascii_alphanumeric()).collect(),
        Err(_) => candidate.iter().map(u8::is_ascii_alphanumeric).collect(),
    };
    if units.len() != n {
        KeyFormatError::WrongLength {
            expected: n,
            actual: units.len(),
        }
    } else {
        let position = units
            .iter()
            .position(|ok| !ok)
            .expect("invalid candidate of the right length has a bad character");
        KeyFormatError::InvalidCharacter { position }
    }
}

/// A candidate with the same number of characters and the same first-invalid position as
/// `candidate`, whose every character differs from `candidate`'s at the same position. All
/// ASCII.
fn canary(candidate: &str) -> String {
    let first_bad = candidate.chars().position(|c| !c.is_ascii_alphanumeric());
    candidate
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let (a, alt) = match first_bad {
                Some(p) if i == p => ('-', '_'), // not alphanumeric, as the original
                _ => ('Q', '7'),                 // alphanumeric before; anything after
            };
            if c == a {
                alt
            } else {
                a
            }
        })
        .collect()
}

fn check(candidate: &str, format: KeyFormat) {
    let n = format.len();
    let bytes = candidate.as_bytes();
    let valid = is_valid(bytes, n);
    let result = if n == DEFAULT_KEY_LEN && format == KeyFormat::default() {
        let default = ApiKey::parse(candidate);
        // `parse` is `parse_with(default)`: they must agree.
        let with = ApiKey::parse_with(candidate, format);
        assert_eq!(default.is_ok(), with.is_ok());
        default
    } else {
        ApiKey::parse_with(candidate, format)
    };
    assert_eq!(
        format.validate(bytes).is_ok(),
        valid,
        "validate disagrees with K1 for len {n}"
    );
    match result {
        Ok(key) => {
            assert!(valid, "accepted a candidate outside K1 (len {n})");
            assert_eq!(
                key.expose_secret(),
                candidate,
                "expose_secret does not round-trip"
            );
            assert_eq!(key.len(), n);
            assert_eq!(key.format(), format);
            assert!(
                key.ct_eq_bytes(bytes),
                "ct_eq_bytes rejects the key's own bytes"
            );
            // A one-byte change, a prefix and an extension are all rejected.
            let mut flipped = bytes.to_vec();
            flipped[0] ^= 0x20; // letter case flip, or digit -> other byte: differs either way
            assert!(!key.ct_eq_bytes(&flipped));
            assert!(!key.ct_eq_bytes(&bytes[..n - 1]));
            let mut longer = bytes.to_vec();
            longer.push(b'A');
            assert!(!key.ct_eq_bytes(&longer));
            let clone = key.clone();
            assert!(bool::from(key.ct_eq(&clone)), "ct_eq rejects a clone");
            let debug = format!("{key:?} {key:#?}");
            assert!(
                !debug.contains(candidate),
                "Debug of ApiKey shows the secret: {debug}"
            );
            // The key re-parses to an equal key.
            let again = ApiKey::parse_with(key.expose_secret(), format).expect("re-parse");
            assert!(
                bool::from(key.ct_eq(&again)),
                "ct_eq rejects the re-parsed key"
            );
        }
        Err(err) => {
            assert!(!valid, "rejected a valid K1 candidate (len {n}): {err}");
            assert_eq!(err, expected_error(bytes, n), "wrong error value");
            let shown = format!("{err}");
            let debugged = format!("{err:?}");
            let canary = canary(candidate);
            debug_assert_eq!(canary.chars().count(), candidate.chars().count());
            let canary_err = ApiKey::parse_with(&canary, format)
                .expect_err("canary has the same shape, so must fail too");
            // The error depends on the shape only, not on the contents.
            assert_eq!(err, canary_err, "error depends on the key's contents");
            if candidate.len() >= 4 {
                // An echo of the input would appear in `shown` but not in the canary's
                // message; text that the fixed template happens to contain appears in both.
                let canary_shown = format!("{canary_err}");
                let canary_debugged = format!("{canary_err:?}");
                assert!(
                    !shown.contains(candidate) || canary_shown.contains(candidate),
                    "error Display echoes the input: {shown}"
                );
                assert!(
                    !debugged.contains(candidate) || canary_debugged.contains(candidate),
                    "error Debug echoes the input: {debugged}"
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let lossy;
    let candidate: &str = match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(_) => {
            // Raw bytes: `validate` must still follow K1, and so must the lossy string.
            for n in [DEFAULT_KEY_LEN, 22] {
                let format = KeyFormat::with_len(n).expect("supported length");
                assert_eq!(format.validate(data).is_ok(), is_valid(data, n));
                if let Err(e) = format.validate(data) {
                    assert_eq!(e, expected_error(data, n));
                }
            }
            lossy = String::from_utf8_lossy(data).into_owned();
            &lossy
        }
    };

    check(candidate, KeyFormat::default());
    check(candidate, KeyFormat::with_len(22).expect("22 is supported"));

    // A length from the first byte: `with_len` accepts exactly 12..=32; the rest of the input
    // is the candidate for that format.
    if let Some((&first, rest)) = data.split_first() {
        let n = usize::from(first);
        match KeyFormat::with_len(n) {
            Ok(format) => {
                assert!((DEFAULT_KEY_LEN..=MAX_KEY_LEN).contains(&n));
                assert_eq!(format.len(), n);
                if let Ok(rest) = std::str::from_utf8(rest) {
                    check(rest, format);
                }
            }
            Err(e) => {
                assert!(!(DEFAULT_KEY_LEN..=MAX_KEY_LEN).contains(&n));
                assert_eq!(e, KeyFormatError::UnsupportedLength { len: n });
            }
        }
    }

    // ct_eq_bytes against a fixed key agrees with plain equality for any presented bytes.
    let fixed = ApiKey::parse("AbCdEf123456").expect("valid fixed key");
    assert_eq!(fixed.ct_eq_bytes(data), data == b"AbCdEf123456");
    // ...and `ConstantTimeEq` between keys agrees with equality of the secrets, across formats.
    for n in [DEFAULT_KEY_LEN, 22] {
        let format = KeyFormat::with_len(n).expect("supported length");
        if let Ok(key) = ApiKey::parse_with(candidate, format) {
            assert_eq!(
                bool::from(fixed.ct_eq(&key)),
                key.expose_secret() == fixed.expose_secret()
            );
            assert_eq!(bool::from(key.ct_eq(&fixed)), bool::from(fixed.ct_eq(&key)));
        }
    }
});
