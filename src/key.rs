//! API keys: format (K1), generation from the OS CSPRNG (K3), and constant-time comparison.
//!
//! An [`ApiKey`] is an organization's shared secret: by default exactly 12 ASCII alphanumerics,
//! as Zscaler's Cloud Service API Key. A deployment may choose a longer length with
//! [`KeyFormat::with_len`] (for example 22 characters for more than 128 bits of entropy).
//!
//! # Secret handling
//!
//! `ApiKey` has a redacted `Debug`, no `Display`, no `PartialEq`, no `Hash`; the bytes are
//! zeroized on drop (best-effort: copies made by the caller after
//! [`ApiKey::expose_secret`] are the caller's to wipe). Compare keys with
//! [`subtle::ConstantTimeEq`], which `ApiKey` implements.

use std::fmt;

use subtle::{Choice, ConstantTimeEq};
use zeroize::Zeroize;

/// Length of a Zscaler-compatible API key (K1).
pub const DEFAULT_KEY_LEN: usize = 12;

/// Longest key length a deployment may configure (about 190 bits of entropy).
pub const MAX_KEY_LEN: usize = 32;

/// The 62 symbols a key is drawn from, in the order the generator indexes them.
const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The accepted key format: a fixed length of ASCII alphanumerics (K1).
///
/// The default is 12 characters, the length Zscaler clients expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFormat {
    len: u8,
}

impl Default for KeyFormat {
    fn default() -> Self {
        Self {
            len: DEFAULT_KEY_LEN as u8,
        }
    }
}

// A key format is never empty (12 characters at least), so `is_empty` would be noise.
#[allow(clippy::len_without_is_empty)]
impl KeyFormat {
    /// A format of `len` characters.
    ///
    /// # Errors
    ///
    /// [`KeyFormatError::UnsupportedLength`] unless `12 <= len <= 32` ([`DEFAULT_KEY_LEN`] to
    /// [`MAX_KEY_LEN`]): shorter keys are too weak, longer ones are not stored inline.
    pub const fn with_len(len: usize) -> Result<Self, KeyFormatError> {
        if len < DEFAULT_KEY_LEN || len > MAX_KEY_LEN {
            return Err(KeyFormatError::UnsupportedLength { len });
        }
        Ok(Self { len: len as u8 })
    }

    /// The number of characters a key of this format has.
    pub const fn len(self) -> usize {
        self.len as usize
    }

    /// Checks `candidate` against this format without keeping it.
    ///
    /// # Errors
    ///
    /// [`KeyFormatError::WrongLength`] or [`KeyFormatError::InvalidCharacter`].
    ///
    /// The character check is branch-free over the whole value, so its time does not depend
    /// on which bytes are letters or digits (a presented key reaches the constant-time compare
    /// after this check; see BENCHMARKS.md, timing-leak harness). Only a failing value takes
    /// a second, ordinary pass to find the offending position.
    pub fn validate(self, candidate: &[u8]) -> Result<(), KeyFormatError> {
        if candidate.len() != self.len() {
            return Err(describe_invalid(self.len(), candidate));
        }
        let all_alphanumeric = candidate
            .iter()
            .fold(1u8, |acc, &b| acc & alphanumeric_bit(b));
        if all_alphanumeric == 1 {
            return Ok(());
        }
        Err(describe_invalid(self.len(), candidate))
    }
}

/// The error for a candidate that failed [`KeyFormat::validate`], counted in characters as a
/// person counts them: `"ABCDEFGHIJKé"` is 12 characters with an invalid one, not 13 of
/// something. A candidate that is not UTF-8 (a raw header value) is counted in bytes.
#[cold]
fn describe_invalid(expected: usize, candidate: &[u8]) -> KeyFormatError {
    match std::str::from_utf8(candidate) {
        Ok(text) => {
            let actual = text.chars().count();
            if actual != expected {
                return KeyFormatError::WrongLength { expected, actual };
            }
            let position = text
                .chars()
                .position(|c| !c.is_ascii_alphanumeric())
                .unwrap_or_default();
            KeyFormatError::InvalidCharacter { position }
        }
        Err(_) => {
            if candidate.len() != expected {
                return KeyFormatError::WrongLength {
                    expected,
                    actual: candidate.len(),
                };
            }
            let position = candidate
                .iter()
                .position(|b| !b.is_ascii_alphanumeric())
                .unwrap_or_default();
            KeyFormatError::InvalidCharacter { position }
        }
    }
}

/// 1 if `lo <= b <= hi`, else 0, without branches.
const fn in_range_bit(b: u8, lo: u8, hi: u8) -> u8 {
    let x = b as i16 - lo as i16; // -255..=255
    let past_hi = x - (hi as i16 - lo as i16 + 1); // negative iff x <= hi - lo
                                                   // Sign bit of !x is set iff x >= 0; sign bit of past_hi is set iff x <= hi - lo.
    (((!x & past_hi) as u16) >> 15) as u8
}

/// 1 if `b` is an ASCII letter or digit, else 0, without branches.
const fn alphanumeric_bit(b: u8) -> u8 {
    in_range_bit(b, b'0', b'9') | in_range_bit(b, b'A', b'Z') | in_range_bit(b, b'a', b'z')
}

/// Why a string is not a valid API key, or a format is not supported.
///
/// The messages never contain the rejected value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// The candidate has the wrong number of characters.
    WrongLength {
        /// The length the format requires.
        expected: usize,
        /// The number of characters given (bytes, for a candidate that is not UTF-8).
        actual: usize,
    },
    /// The candidate has the right number of characters, and the one at `position` is not an
    /// ASCII letter or digit.
    InvalidCharacter {
        /// Zero-based position of the first offending character (a byte offset, for a
        /// candidate that is not UTF-8).
        position: usize,
    },
    /// A [`KeyFormat`] was requested with a length outside 12..=32.
    UnsupportedLength {
        /// The requested length.
        len: usize,
    },
}

impl fmt::Display for KeyFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongLength { expected, actual } => write!(
                f,
                "api key must be exactly {expected} characters, got {actual}"
            ),
            Self::InvalidCharacter { position } => write!(
                f,
                "api key may contain only ASCII letters and digits (offending character at position {position})"
            ),
            Self::UnsupportedLength { len } => write!(
                f,
                "key length {len} is not supported (use {DEFAULT_KEY_LEN} to {MAX_KEY_LEN})"
            ),
        }
    }
}

impl std::error::Error for KeyFormatError {}

/// The operating system's random number generator failed (K3).
///
/// orgkey never falls back to a weaker source: a key change that needs randomness fails instead.
#[derive(Debug, Clone)]
pub struct RandomnessError(getrandom::Error);

impl fmt::Display for RandomnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the OS random number generator failed: {}", self.0)
    }
}

impl std::error::Error for RandomnessError {}

/// An organization's API key: a secret of [`KeyFormat::len`] ASCII alphanumerics.
///
/// # Constant-time comparisons
///
/// [`ConstantTimeEq::ct_eq`] (and [`ApiKey::ct_eq_bytes`]) take time that depends only on the
/// lengths involved, never on the contents. Keys of different lengths compare unequal at once:
/// the length of a key is not a secret (it is fixed by the [`KeyFormat`]).
///
/// # Zeroization
///
/// The bytes live inline (no heap allocation) and are overwritten with zeros on drop.
/// Best-effort: moves of the value may leave copies on the stack that Rust does not track.
///
/// ```
/// use orgkey::ApiKey;
///
/// let key = ApiKey::parse("AbCdEf123456").unwrap();
/// assert_eq!(format!("{key:?}"), "ApiKey { len: 12, .. }");
/// assert_eq!(key.expose_secret(), "AbCdEf123456");
/// assert!(ApiKey::parse("too-short").is_err());
/// ```
#[derive(Clone)]
pub struct ApiKey {
    len: u8,
    bytes: [u8; MAX_KEY_LEN],
}

// A key is never empty (12 characters at least), so `is_empty` would be noise.
#[allow(clippy::len_without_is_empty)]
impl ApiKey {
    /// Parses a key of the default format (12 ASCII alphanumerics, K1).
    ///
    /// # Errors
    ///
    /// [`KeyFormatError::WrongLength`] or [`KeyFormatError::InvalidCharacter`]; neither message
    /// contains the input.
    pub fn parse(candidate: &str) -> Result<Self, KeyFormatError> {
        Self::parse_with(candidate, KeyFormat::default())
    }

    /// Parses a key of the given format.
    ///
    /// # Errors
    ///
    /// As [`ApiKey::parse`].
    pub fn parse_with(candidate: &str, format: KeyFormat) -> Result<Self, KeyFormatError> {
        let candidate = candidate.as_bytes();
        format.validate(candidate)?;
        let mut bytes = [0u8; MAX_KEY_LEN];
        bytes[..candidate.len()].copy_from_slice(candidate);
        Ok(Self {
            len: format.len,
            bytes,
        })
    }

    /// Draws a new key of the default format from the OS CSPRNG (K3).
    ///
    /// # Errors
    ///
    /// [`RandomnessError`] if the operating system cannot supply randomness.
    pub fn generate() -> Result<Self, RandomnessError> {
        Self::generate_with(KeyFormat::default())
    }

    /// Draws a new key of `format` from the OS CSPRNG, uniformly over the 62 symbols (K3).
    ///
    /// Each symbol comes from one random byte by rejection sampling: the low six bits give a
    /// value in 0..64, and the values 62 and 63 are discarded and drawn again, so every symbol
    /// has probability exactly 1/62 (no modulo bias).
    ///
    /// # Errors
    ///
    /// [`RandomnessError`] if the operating system cannot supply randomness.
    pub fn generate_with(format: KeyFormat) -> Result<Self, RandomnessError> {
        let mut bytes = [0u8; MAX_KEY_LEN];
        fill_symbols(&mut bytes[..format.len()])?;
        Ok(Self {
            len: format.len,
            bytes,
        })
    }

    /// The key's characters, for the admin "view key" feature (K9) and for clients.
    ///
    /// This is the only way to see the secret; grep for it when auditing where keys go.
    pub fn expose_secret(&self) -> &str {
        // Only ASCII alphanumerics are ever stored (parse and generate validate), so this
        // cannot fail; the fallback keeps the method panic-free regardless.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The number of characters of the key.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The format this key was parsed or generated with.
    pub fn format(&self) -> KeyFormat {
        KeyFormat { len: self.len }
    }

    /// Compares the key with `presented` in constant time for a given length.
    ///
    /// A `presented` value of a different length returns `false` without looking at the
    /// contents (the key length is public, L4).
    pub fn ct_eq_bytes(&self, presented: &[u8]) -> bool {
        let own = self.as_bytes();
        if own.len() != presented.len() {
            return false;
        }
        // OR of the XORed bytes: the loop runs the public length, no branch depends on the
        // contents; one barrier (subtle's) at the end instead of one per byte.
        let diff = own
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        bool::from(diff.ct_eq(&0))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Fills `out` with bytes from the OS CSPRNG.
pub(crate) fn fill_random(out: &mut [u8]) -> Result<(), RandomnessError> {
    getrandom::fill(out).map_err(RandomnessError)
}

/// Fills `out` with symbols drawn uniformly from the 62 ASCII letters and digits, from the OS
/// CSPRNG, by rejection sampling (see [`ApiKey::generate_with`]).
pub(crate) fn fill_symbols(out: &mut [u8]) -> Result<(), RandomnessError> {
    let mut pool = [0u8; 64];
    let mut filled = 0;
    while filled < out.len() {
        getrandom::fill(&mut pool).map_err(RandomnessError)?;
        for &b in &pool {
            if filled == out.len() {
                break;
            }
            if let Some(symbol) = symbol_for(b) {
                out[filled] = symbol;
                filled += 1;
            }
        }
    }
    pool.zeroize();
    Ok(())
}

/// Maps a random byte to a symbol, or `None` for the two values that rejection sampling drops.
fn symbol_for(random: u8) -> Option<u8> {
    ALPHABET.get(usize::from(random & 0x3f)).copied()
}

impl ConstantTimeEq for ApiKey {
    fn ct_eq(&self, other: &Self) -> Choice {
        if self.len != other.len {
            return Choice::from(0);
        }
        self.as_bytes().ct_eq(other.as_bytes())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for ApiKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_twelve_alphanumerics() {
        let key = ApiKey::parse("AbCdEf123456").unwrap();
        assert_eq!(key.expose_secret(), "AbCdEf123456");
        assert_eq!(key.len(), 12);
    }

    #[test]
    fn parse_reports_wrong_length_distinctly() {
        assert_eq!(
            ApiKey::parse("AbCdEf12345").unwrap_err(),
            KeyFormatError::WrongLength {
                expected: 12,
                actual: 11
            }
        );
        assert_eq!(
            ApiKey::parse("AbCdEf1234567").unwrap_err(),
            KeyFormatError::WrongLength {
                expected: 12,
                actual: 13
            }
        );
        assert!(matches!(
            ApiKey::parse("").unwrap_err(),
            KeyFormatError::WrongLength { actual: 0, .. }
        ));
    }

    #[test]
    fn parse_reports_invalid_character_with_position() {
        assert_eq!(
            ApiKey::parse("AbCdEf12345-").unwrap_err(),
            KeyFormatError::InvalidCharacter { position: 11 }
        );
        assert_eq!(
            ApiKey::parse(" bCdEf123456").unwrap_err(),
            KeyFormatError::InvalidCharacter { position: 0 }
        );
        // Non-ASCII letters are not alphanumerics for K1; lengths and positions count
        // characters, not bytes (issue 9, item 10).
        assert_eq!(
            ApiKey::parse("ÄbCdEf123456").unwrap_err(),
            KeyFormatError::InvalidCharacter { position: 0 }
        );
        assert_eq!(
            ApiKey::parse("ABCDEFGHIJKé").unwrap_err(),
            KeyFormatError::InvalidCharacter { position: 11 }
        );
        assert_eq!(
            ApiKey::parse("ÄbCdEf12345").unwrap_err(),
            KeyFormatError::WrongLength {
                expected: 12,
                actual: 11
            }
        );
        let message = ApiKey::parse("ABCDEFGHIJKé").unwrap_err().to_string();
        assert!(!message.contains("13"), "{message}");
        assert!(!message.contains("ABCDEFGHIJK"), "{message}");
        // Not UTF-8 (a raw header value): counted in bytes.
        assert_eq!(
            KeyFormat::default().validate(b"ABCDEFGHIJ\xff\xfe"),
            Err(KeyFormatError::InvalidCharacter { position: 10 })
        );
    }

    #[test]
    fn error_messages_never_contain_the_input() {
        let secret = "SeCrEt-value";
        let err = ApiKey::parse(secret).unwrap_err();
        assert!(!err.to_string().contains("SeCrEt"));
        assert!(!format!("{err:?}").contains("SeCrEt"));
    }

    #[test]
    fn longer_formats_are_configurable_within_bounds() {
        let format = KeyFormat::with_len(22).unwrap();
        let key = ApiKey::generate_with(format).unwrap();
        assert_eq!(key.len(), 22);
        assert!(ApiKey::parse_with(key.expose_secret(), format).is_ok());
        assert!(ApiKey::parse(key.expose_secret()).is_err());
        assert_eq!(
            KeyFormat::with_len(11),
            Err(KeyFormatError::UnsupportedLength { len: 11 })
        );
        assert_eq!(
            KeyFormat::with_len(33),
            Err(KeyFormatError::UnsupportedLength { len: 33 })
        );
        assert!(KeyFormat::with_len(32).is_ok());
    }

    #[test]
    fn generated_keys_are_valid_and_distinct() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        assert!(ApiKey::parse(a.expose_secret()).is_ok());
        assert!(!bool::from(a.ct_eq(&b)), "two 71-bit random keys collided");
    }

    #[test]
    fn rejection_sampling_maps_every_byte_to_a_symbol_or_none_uniformly() {
        // Over all 256 byte values, each of the 62 symbols is produced exactly 4 times and
        // exactly 8 values are rejected: uniform given uniform input bytes.
        let mut counts = [0u32; 62];
        let mut rejected = 0;
        for b in 0..=255u8 {
            match symbol_for(b) {
                Some(s) => {
                    let index = ALPHABET.iter().position(|&a| a == s).unwrap();
                    counts[index] += 1;
                }
                None => rejected += 1,
            }
        }
        assert!(counts.iter().all(|&c| c == 4), "{counts:?}");
        assert_eq!(rejected, 8);
    }

    #[test]
    fn generated_symbols_are_roughly_uniform() {
        // 62 symbols x 12 positions over 2,000 keys: a chi-squared test on the symbol counts.
        // With 61 degrees of freedom the 99.9999% quantile is about 130; a biased generator
        // (say modulo 62 on a byte) would exceed it by far at this sample size only for large
        // biases, so this is a smoke test, and the exhaustive test above is the proof.
        let mut counts = [0f64; 62];
        let n = 2_000;
        for _ in 0..n {
            for &b in ApiKey::generate().unwrap().as_bytes() {
                counts[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1.0;
            }
        }
        let expected = (n * 12) as f64 / 62.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 130.0, "chi-squared {chi2} too high: {counts:?}");
    }

    #[test]
    fn constant_time_comparison_distinguishes_keys_and_lengths() {
        let key = ApiKey::parse("AbCdEf123456").unwrap();
        assert!(key.ct_eq_bytes(b"AbCdEf123456"));
        assert!(!key.ct_eq_bytes(b"AbCdEf123457"));
        assert!(!key.ct_eq_bytes(b"bCdEf123456"));
        assert!(!key.ct_eq_bytes(b""));
        let other =
            ApiKey::parse_with("AbCdEf123456AbCdEf123456", KeyFormat::with_len(24).unwrap())
                .unwrap();
        assert!(!bool::from(key.ct_eq(&other)));
        assert!(bool::from(key.ct_eq(&key.clone())));
    }

    #[test]
    fn branch_free_class_check_agrees_with_std_for_every_byte() {
        for b in 0..=255u8 {
            assert_eq!(
                alphanumeric_bit(b) == 1,
                b.is_ascii_alphanumeric(),
                "byte {b}"
            );
        }
    }

    #[test]
    fn debug_is_redacted() {
        let key = ApiKey::parse("AbCdEf123456").unwrap();
        let debug = format!("{key:?} {key:#?}");
        assert!(!debug.contains("AbCdEf123456"));
        assert!(!debug.contains("AbCd"));
    }

    proptest! {
        #[test]
        fn parse_accepts_exactly_the_k1_language(s in "\\PC{0,20}") {
            let valid = s.len() == 12 && s.bytes().all(|b| b.is_ascii_alphanumeric());
            prop_assert_eq!(ApiKey::parse(&s).is_ok(), valid);
        }

        #[test]
        fn parse_round_trips_valid_keys(s in "[A-Za-z0-9]{12}") {
            let key = ApiKey::parse(&s).unwrap();
            prop_assert_eq!(key.expose_secret(), s.as_str());
            prop_assert!(key.ct_eq_bytes(s.as_bytes()));
        }

        #[test]
        fn parse_rejects_any_single_bad_byte(s in "[A-Za-z0-9]{12}", pos in 0usize..12, bad in any::<u8>().prop_filter("not alnum", |b| b.is_ascii() && !b.is_ascii_alphanumeric())) {
            let mut bytes = s.into_bytes();
            bytes[pos] = bad;
            let candidate = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(ApiKey::parse(&candidate).unwrap_err(), KeyFormatError::InvalidCharacter { position: pos });
        }

        #[test]
        fn ct_eq_bytes_agrees_with_plain_equality(a in "[A-Za-z0-9]{12}", b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let key = ApiKey::parse(&a).unwrap();
            prop_assert_eq!(key.ct_eq_bytes(&b), a.as_bytes() == b.as_slice());
        }
    }
}
