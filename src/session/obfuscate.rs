//! The ZIA login's key obfuscation (PROTOCOL.md), and its constant-time check.
//!
//! ```text
//! n   = the last 6 decimal digits of timestamp (keep leading zeros)
//! r   = int(n) >> 1, written in decimal, left-padded with zeros to 6 digits
//! obf = key[n[0]] .. key[n[5]]  +  key[r[0]+2] .. key[r[5]+2]
//! ```
//!
//! The check samples only the key positions that the digits name: a wrong key that agrees
//! at those positions passes for that timestamp, and each login shows an eavesdropper up to
//! 12 key characters. That is the protocol's weakness, not this implementation's; serve it
//! over TLS only and keep failed logins throttled (A3).

use subtle::ConstantTimeEq;

/// Length of the obfuscated key a client sends.
pub const OBFUSCATED_LEN: usize = 12;

fn six_digits(mut value: u64) -> [usize; 6] {
    let mut digits = [0usize; 6];
    for digit in digits.iter_mut().rev() {
        *digit = (value % 10) as usize;
        value /= 10;
    }
    digits
}

/// The obfuscated form of `key` for `timestamp_ms`, as clients compute it.
///
/// Returns `None` if the key is shorter than 12 characters (the formula indexes 0..=11).
pub fn obfuscate(key: &[u8], timestamp_ms: u64) -> Option<[u8; OBFUSCATED_LEN]> {
    if key.len() < OBFUSCATED_LEN {
        return None;
    }
    let n = timestamp_ms % 1_000_000;
    let high = six_digits(n);
    let low = six_digits(n >> 1);
    let mut out = [0u8; OBFUSCATED_LEN];
    for i in 0..6 {
        out[i] = key[high[i]];
        out[6 + i] = key[low[i] + 2];
    }
    Some(out)
}

/// Whether `presented` is the obfuscation of `key` for `timestamp_ms`, compared in constant
/// time (the positions sampled depend only on the public timestamp).
pub fn matches(key: &[u8], timestamp_ms: u64, presented: &[u8]) -> bool {
    match obfuscate(key, timestamp_ms) {
        Some(expected) if presented.len() == OBFUSCATED_LEN => {
            bool::from(expected.ct_eq(presented))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md's test vectors.
    const VECTORS: [(&str, u64, &str); 4] = [
        ("AbCdEf123456", 1795671792867, "24C312f631ff"),
        ("AbCdEf123456", 1795671000123, "AAAbCdCCCC3d"),
        ("Zx9Qw8Er7Ty6", 1700000000000, "ZZZZZZ999999"),
        ("Zx9Qw8Er7Ty6", 1764150999999, "TTTTTTE66666"),
    ];

    #[test]
    fn protocol_test_vectors() {
        for (key, ts, expected) in VECTORS {
            let got = obfuscate(key.as_bytes(), ts).unwrap();
            assert_eq!(std::str::from_utf8(&got).unwrap(), expected, "{key} {ts}");
            assert!(matches(key.as_bytes(), ts, expected.as_bytes()));
        }
    }

    #[test]
    fn a_different_key_or_timestamp_does_not_match() {
        assert!(!matches(b"AbCdEf123456", 1795671792867, b"24C312f631fe"));
        assert!(!matches(b"AbCdEf123456", 1795671792868, b"24C312f631ff"));
        assert!(!matches(b"AbCdEf123456", 1795671792867, b"24C312f631f"));
        assert!(!matches(b"short", 1795671792867, b"24C312f631ff"));
    }

    #[test]
    fn a_key_wrong_only_where_the_digits_do_not_look_passes_as_documented() {
        // Timestamp ...000123: n = 000123 samples positions 0,0,0,1,2,3; r = 61 -> 000061
        // samples 2,2,2,2,8,3. Position 11 is never read, so a key wrong only there passes.
        assert!(matches(b"AbCdEf12345X", 1795671000123, b"AAAbCdCCCC3d"));
    }
}
