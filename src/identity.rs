//! Who an admin is, independent of where accounts are kept: [`Username`] (`name@domain`) and
//! the functional [`Scopes`] (`api`, `key-admin`) that DESIGN.md's vocabulary defines.
//!
//! The store, the sessions, the layer and the directory all speak these words; none of them
//! needs the directory to name an admin.

use std::fmt;
use std::sync::Arc;

/// An admin's username, `name@domain`, compared case-insensitively (stored lowercased).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(Arc<str>);

/// Longest username accepted, in bytes.
pub const MAX_USERNAME_LEN: usize = 254;

impl Username {
    /// Validates and normalizes (lowercases) a username.
    ///
    /// # Errors
    ///
    /// [`InvalidUsername`] unless the name is `local@domain` with both parts non-empty, at most
    /// 254 bytes, without whitespace or control characters.
    pub fn new(name: &str) -> Result<Self, InvalidUsername> {
        let valid = name.len() <= MAX_USERNAME_LEN
            && !name.chars().any(|c| c.is_whitespace() || c.is_control())
            && matches!(name.split_once('@'), Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
        if !valid {
            return Err(InvalidUsername);
        }
        Ok(Self(Arc::from(name.to_lowercase())))
    }

    /// The normalized (lowercase) username.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A username is not of the form `name@domain` (or too long, or has whitespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUsername;

impl fmt::Display for InvalidUsername {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "username must be name@domain, at most {MAX_USERNAME_LEN} bytes, without spaces"
        )
    }
}

impl std::error::Error for InvalidUsername {}

/// A functional scope of an admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scope {
    /// May log in to the API and call it.
    Api,
    /// May view and manage the org's API key.
    KeyAdmin,
}

impl Scope {
    const fn bit(self) -> u8 {
        match self {
            Self::Api => 1,
            Self::KeyAdmin => 2,
        }
    }

    /// The scope's name: `api` or `key-admin`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::KeyAdmin => "key-admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Scope`]s.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// No scope.
    pub const NONE: Self = Self(0);
    /// `api` only.
    pub const API: Self = Self(1);
    /// `api` and `key-admin`.
    pub const ALL: Self = Self(3);

    /// Whether `scope` is in the set.
    pub const fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The set with `scope` added.
    #[must_use]
    pub const fn with(self, scope: Scope) -> Self {
        Self(self.0 | scope.bit())
    }

    /// The set as bits (`api` = 1, `key-admin` = 2), for stores.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// A set from [`Scopes::bits`]; unknown bits are dropped.
    pub const fn from_bits(bits: u8) -> Self {
        Self(bits & 3)
    }

    /// The set with `scope` removed.
    #[must_use]
    pub const fn without(self, scope: Scope) -> Self {
        Self(self.0 & !scope.bit())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut set = f.debug_set();
        for scope in [Scope::Api, Scope::KeyAdmin] {
            if self.contains(scope) {
                set.entry(&scope.as_str());
            }
        }
        set.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_name_at_domain_and_case_insensitive() {
        let a = Username::new("Alice@Acme.Example").unwrap();
        let b = Username::new("alice@acme.example").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "alice@acme.example");
        for bad in [
            "alice",
            "@acme",
            "alice@",
            "a@b@c",
            "al ice@acme",
            "a\n@b",
            "",
        ] {
            assert!(Username::new(bad).is_err(), "{bad:?}");
        }
        assert!(Username::new(&format!("{}@b", "a".repeat(252))).is_ok()); // 254 bytes
        assert!(Username::new(&format!("{}@b", "a".repeat(253))).is_err());
    }

    #[test]
    fn scopes_set_operations() {
        let s = Scopes::NONE.with(Scope::Api);
        assert!(s.contains(Scope::Api) && !s.contains(Scope::KeyAdmin));
        assert_eq!(s.with(Scope::KeyAdmin), Scopes::ALL);
        assert_eq!(
            Scopes::ALL.without(Scope::Api),
            Scopes::NONE.with(Scope::KeyAdmin)
        );
        assert_eq!(format!("{:?}", Scopes::ALL), r#"{"api", "key-admin"}"#);
    }
}
