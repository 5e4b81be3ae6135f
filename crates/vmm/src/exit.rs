//! Why a VM ended: the one exit-reason type of the VMM. The vCPU loop, the device event loop
//! and the seccomp trap each record an end here, so it sits below all of them.

use serde::Serialize;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum ExitReason {
    /// The guest reset the machine (i8042 `0xfe`, Linux `reboot`): a clean end.
    Reset,
    /// The host asked it to stop.
    Stopped,
    /// The host killed it.
    Killed,
    /// The guest or KVM failed; `code` is stable (`E_GUEST_TRIPLE_FAULT`, `E_KVM_INTERNAL_ERROR`, ...).
    Crashed { code: String, message: String },
}

impl ExitReason {
    pub fn crashed(code: &str, message: impl Into<String>) -> Self {
        ExitReason::Crashed { code: code.to_owned(), message: message.into() }
    }
}
