//! Passwords: a secret type, and argon2id hashing with OWASP parameters (A1).
//!
//! Passwords are stored only as argon2id PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$...`),
//! the OWASP-recommended minimum (19 MiB of memory, 2 passes, 1 lane). Verification takes its
//! parameters from the stored string, so hashes made with stronger parameters keep working.
//! [`dummy_verify`] spends the same effort on a password of an unknown user, so that "no such
//! user" and "wrong password" cost the same time.

use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

/// argon2id memory cost, in KiB (OWASP: 19 MiB).
pub const ARGON2_M_COST_KIB: u32 = 19_456;
/// argon2id passes.
pub const ARGON2_T_COST: u32 = 2;
/// argon2id lanes.
pub const ARGON2_P_COST: u32 = 1;

/// Shortest password [`crate::directory::Admins`] accepts, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted anywhere, in bytes (longer input is refused before hashing).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A password: redacted `Debug`, no `Display`, no `PartialEq`, zeroized on drop.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// Wraps a password. No policy is applied here (see [`Password::check_policy`]).
    pub fn new(password: impl Into<String>) -> Self {
        Self(Zeroizing::new(password.into()))
    }

    /// The password's characters. Grep for this when auditing where passwords go.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Checks the policy for new passwords: 12 characters or more, at most 1024 bytes, no
    /// control characters.
    ///
    /// # Errors
    ///
    /// [`PasswordPolicyError`] naming the violated rule; never the password.
    pub fn check_policy(&self) -> Result<(), PasswordPolicyError> {
        let chars = self.0.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            return Err(PasswordPolicyError::TooShort { chars });
        }
        if self.0.len() > MAX_PASSWORD_BYTES {
            return Err(PasswordPolicyError::TooLong);
        }
        if self.0.chars().any(char::is_control) {
            return Err(PasswordPolicyError::ControlCharacter);
        }
        Ok(())
    }

    /// A new random password of `len` ASCII letters and digits, from the OS CSPRNG.
    ///
    /// # Errors
    ///
    /// [`crate::key::RandomnessError`] if the OS cannot supply randomness.
    pub fn generate(len: usize) -> Result<Self, crate::key::RandomnessError> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        crate::key::fill_symbols(&mut bytes)?;
        // Only ASCII symbols were written.
        Ok(Self::new(String::from_utf8_lossy(&bytes).into_owned()))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Password").finish_non_exhaustive()
    }
}

/// A new password breaks the policy of [`Password::check_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordPolicyError {
    /// Fewer than 12 characters.
    TooShort {
        /// How many characters were given.
        chars: usize,
    },
    /// More than 1024 bytes.
    TooLong,
    /// Contains a control character.
    ControlCharacter,
}

impl fmt::Display for PasswordPolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { chars } => write!(
                f,
                "password must have at least {MIN_PASSWORD_CHARS} characters (got {chars})"
            ),
            Self::TooLong => write!(f, "password must be at most {MAX_PASSWORD_BYTES} bytes"),
            Self::ControlCharacter => f.write_str("password must not contain control characters"),
        }
    }
}

impl std::error::Error for PasswordPolicyError {}

/// Hashing failed (the OS random number generator, for the salt).
#[derive(Debug)]
pub struct HashError(String);

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "password hashing failed: {}", self.0)
    }
}

impl std::error::Error for HashError {}

impl HashError {
    pub(crate) fn panicked() -> Self {
        Self("the hashing task panicked".to_owned())
    }
}

fn hasher() -> Argon2<'static> {
    // The constants are valid argon2 parameters; `Params::DEFAULT` is the fallback only to
    // keep this panic-free (it is the same OWASP set in argon2 0.5).
    let params = Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None)
        .unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into an argon2id PHC string with a fresh 16-byte random salt.
///
/// Takes about 20 ms of CPU: call it from a blocking context.
///
/// # Errors
///
/// [`HashError`] if the OS random number generator fails.
pub fn hash_password(password: &Password) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| HashError(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError(e.to_string()))?;
    hasher()
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Verifies `password` against a stored PHC string. A malformed stored string verifies
/// nothing (and still costs an argon2 run, via [`dummy_verify`]).
pub fn verify_password(password: &Password, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => hasher()
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok(),
        Err(_) => {
            dummy_verify(password);
            false
        }
    }
}

/// Computes the dummy hash of [`dummy_verify`] now (about 20 ms, once per process).
pub fn warm_up() {
    dummy_hash();
}

fn dummy_hash() -> Option<&'static str> {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    DUMMY
        .get_or_init(|| {
            Password::generate(32)
                .ok()
                .and_then(|p| hash_password(&p).ok())
        })
        .as_deref()
}

/// Spends one argon2id verification on `password` against a hash of a random password, so
/// that an unknown user costs what a wrong password costs (A1). Always "fails".
pub fn dummy_verify(password: &Password) {
    if let Some(phc) = dummy_hash() {
        if let Ok(parsed) = PasswordHash::new(phc) {
            let _ = hasher().verify_password(password.expose_secret().as_bytes(), &parsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let password = Password::new("correct horse battery");
        let phc = hash_password(&password).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password(&password, &phc));
        assert!(!verify_password(
            &Password::new("wrong horse battery"),
            &phc
        ));
        assert!(!verify_password(&password, "not a phc string"));
        // Same password, new salt.
        assert_ne!(phc, hash_password(&password).unwrap());
    }

    #[test]
    fn policy_names_the_rule_and_never_the_password() {
        assert_eq!(
            Password::new("short").check_policy(),
            Err(PasswordPolicyError::TooShort { chars: 5 })
        );
        assert_eq!(
            Password::new("a".repeat(1025)).check_policy(),
            Err(PasswordPolicyError::TooLong)
        );
        assert_eq!(
            Password::new("twelve chars\n!").check_policy(),
            Err(PasswordPolicyError::ControlCharacter)
        );
        assert!(Password::new("twelve chars").check_policy().is_ok());
        let err = Password::new("hunter2").check_policy().unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn debug_is_redacted_and_generated_passwords_are_random() {
        let p = Password::new("SuperSecret123");
        assert!(!format!("{p:?}").contains("SuperSecret"));
        let a = Password::generate(20).unwrap();
        let b = Password::generate(20).unwrap();
        assert_eq!(a.expose_secret().len(), 20);
        assert!(a.expose_secret().bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
