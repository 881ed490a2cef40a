//! Identities: organizations, acting admins, and key generations.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest organization id accepted, in bytes.
pub const MAX_ORG_ID_LEN: usize = 64;

/// An organization (tenant) id: 1 to 64 bytes of ASCII letters, digits, `.`, `_` and `-`.
///
/// Org ids are not secrets, but they arrive in request headers, so the format is strict: it
/// keeps log lines and metrics labels free of attacker-chosen control characters.
/// Cloning is cheap (a reference count), which lets the layer hand the id to the inner service
/// without allocating.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(Arc<str>);

impl OrgId {
    /// Validates and wraps an org id.
    ///
    /// # Errors
    ///
    /// [`InvalidOrgId`] if `id` is empty, longer than [`MAX_ORG_ID_LEN`], or contains a byte
    /// other than ASCII letters, digits, `.`, `_`, `-`.
    pub fn new(id: &str) -> Result<Self, InvalidOrgId> {
        if is_valid_org_id(id) {
            Ok(Self(Arc::from(id)))
        } else {
            Err(InvalidOrgId { len: id.len() })
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An org id copied inline (no heap, no reference count): what a request carries in its
/// [`Authenticated`](crate::Authenticated) extension, so the hot path touches no shared
/// counter of a busy org.
#[derive(Clone, Copy)]
pub(crate) struct InlineOrgId {
    len: u8,
    bytes: [u8; MAX_ORG_ID_LEN],
}

impl InlineOrgId {
    /// Copies `id` if it is not longer than [`MAX_ORG_ID_LEN`]. The characters are not
    /// checked here: an id that is found in the table has the [`OrgId`] format, and
    /// [`InlineOrgId::loggable`] checks before an unverified id is logged.
    pub(crate) fn copy(id: &str) -> Option<Self> {
        if id.len() > MAX_ORG_ID_LEN {
            return None;
        }
        let mut bytes = [0u8; MAX_ORG_ID_LEN];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Some(Self {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The id if it has the [`OrgId`] format (safe to write to logs), else `"-"`.
    pub(crate) fn loggable(&self) -> &str {
        let id = self.as_str();
        if is_valid_org_id(id) {
            id
        } else {
            "-"
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // A whole `&str` was copied in, so the bytes are UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<&InlineOrgId> for OrgId {
    fn from(inline: &InlineOrgId) -> Self {
        // Already validated when it was copied.
        Self(Arc::from(inline.as_str()))
    }
}

impl fmt::Debug for InlineOrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Whether `id` has the [`OrgId`] format; usable on the hot path without allocating.
pub(crate) fn is_valid_org_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ORG_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Borrow<str> for OrgId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string is not a valid [`OrgId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOrgId {
    len: usize,
}

impl fmt::Display for InvalidOrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "organization id must be 1 to {MAX_ORG_ID_LEN} ASCII letters, digits, '.', '_' or '-' (got {} bytes)",
            self.len
        )
    }
}

impl std::error::Error for InvalidOrgId {}

/// Who made a change: an admin's name (`name@domain`) or a system actor such as
/// `"provisioning"`. Recorded as "last modified by" (K7) and in the audit log.
///
/// Cloning is cheap; reuse one `Actor` for many changes to share its memory.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Actor(Arc<str>);

impl Actor {
    /// An actor with the given name.
    ///
    /// # Errors
    ///
    /// [`InvalidActor`] if the name is empty, longer than 256 bytes, or contains control
    /// characters (it is written to logs).
    pub fn new(name: &str) -> Result<Self, InvalidActor> {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(InvalidActor);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The actor's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An actor name is empty, too long, or contains control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidActor;

impl fmt::Display for InvalidActor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("actor name must be 1 to 256 bytes without control characters")
    }
}

impl std::error::Error for InvalidActor {}

/// A per-org counter bumped by every key or subscription change (K6).
///
/// Sessions remember the generation they were created under; a session whose generation is
/// not the org's current one is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(u64);

impl Generation {
    /// Wraps a raw counter value (for stores that persist it).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw counter value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The generation after this one.
    pub(crate) const fn next(self) -> Self {
        Self(self.0.wrapping_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids_accept_the_documented_alphabet() {
        assert!(OrgId::new("acme").is_ok());
        assert!(OrgId::new("org-42_a.b").is_ok());
        assert!(OrgId::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn org_ids_reject_empty_long_and_foreign_bytes() {
        assert!(OrgId::new("").is_err());
        assert!(OrgId::new(&"a".repeat(65)).is_err());
        assert!(OrgId::new("acme corp").is_err());
        assert!(OrgId::new("acme\n").is_err());
        assert!(OrgId::new("äcme").is_err());
    }

    #[test]
    fn actors_reject_control_characters() {
        assert!(Actor::new("admin@acme.example").is_ok());
        assert!(Actor::new("").is_err());
        assert!(Actor::new("admin\r\nforged: line").is_err());
    }
}
