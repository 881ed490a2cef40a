//! The audit trail of key and subscription changes (K7).
//!
//! Every change made through [`KeyAdmin`](crate::KeyAdmin) produces one [`AuditEvent`]: which
//! org, which actor, what action, when, and the new generation. An event never carries key
//! material. Events go to an [`AuditSink`]; the default, [`TracingAuditSink`], writes them as
//! `tracing` events with target `orgkey::audit`.

use std::fmt;
use std::time::SystemTime;

use crate::org::{Actor, Generation, OrgId};

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAction {
    /// An API subscription was applied and a key provisioned (K8).
    Subscribe,
    /// The API subscription was removed, and with it the key (K8).
    Unsubscribe,
    /// A random key was added to an org without one (K2).
    Add,
    /// The key was set to an admin-chosen value (K4).
    Edit,
    /// The key was replaced by a new random one (K3).
    Regenerate,
    /// The key was deleted (K5).
    Delete,
    /// The org's state was restored from a backup (P4): its key is the backup's again, and
    /// every session of the state ended.
    Restore,
}

impl KeyAction {
    /// A stable lowercase name, for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::Add => "add",
            Self::Edit => "edit",
            Self::Regenerate => "regenerate",
            Self::Delete => "delete",
            Self::Restore => "restore",
        }
    }
}

impl KeyAction {
    /// The action named `name` ([`KeyAction::as_str`]'s inverse), for stores.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "subscribe" => Self::Subscribe,
            "unsubscribe" => Self::Unsubscribe,
            "add" => Self::Add,
            "edit" => Self::Edit,
            "regenerate" => Self::Regenerate,
            "delete" => Self::Delete,
            "restore" => Self::Restore,
            _ => return None,
        })
    }
}

impl fmt::Display for KeyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change, as recorded in the audit trail. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// The org whose key changed.
    pub org: OrgId,
    /// Who made the change.
    pub actor: Actor,
    /// What the change did.
    pub action: KeyAction,
    /// When the change was made (UTC wall-clock time).
    pub at: SystemTime,
    /// The org's generation after the change.
    pub generation: Generation,
}

/// Where audit events go. Implementations must be cheap and must not block for long: `record`
/// runs after the change is visible, before the admin call returns.
pub trait AuditSink: Send + Sync + 'static {
    /// Records one event.
    fn record(&self, event: &AuditEvent);
}

/// The default sink: one `tracing` event at INFO level, target `orgkey::audit`, per change.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAuditSink;

impl AuditSink for TracingAuditSink {
    fn record(&self, event: &AuditEvent) {
        let at = event
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        tracing::info!(
            target: "orgkey::audit",
            org = %event.org,
            actor = %event.actor,
            action = event.action.as_str(),
            at_unix_ms = at as u64,
            generation = event.generation.get(),
            "api key changed"
        );
    }
}

impl<F> AuditSink for F
where
    F: Fn(&AuditEvent) + Send + Sync + 'static,
{
    fn record(&self, event: &AuditEvent) {
        self(event)
    }
}
