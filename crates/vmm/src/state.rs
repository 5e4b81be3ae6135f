//! The one save/restore trait: every device (serial, i8042, virtio transports and devices),
//! the VM and each vCPU implement it, and `persist` (save) and `builder` (restore) drive it.
//!
//! A restore builds the part fresh from the configuration (fds, sockets, files), then
//! `restore`s the snapshot's state into it; once every part of the VM is restored, and before
//! any vCPU runs, `after_restore` runs on each (what must see the whole VM restored, such as
//! virtio-net's announcement of the guest's MAC, goes there rather than in `restore`).

/// A snapshot-able part of the VM.
pub trait Persist {
    /// What a snapshot keeps of it.
    type State;
    /// Why a state cannot be saved or restored.
    type Error;

    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Puts `state` into a freshly built part; checks it against what this part can hold.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;

    /// Runs once the whole VM is restored, before its vCPUs start.
    fn after_restore(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A device state that does not fit the device it is restored into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    /// The device, as the snapshot names it (`virtio-console`, `serial`, ...).
    pub device: &'static str,
    pub reason: String,
}

impl StateError {
    pub fn new(device: &'static str, reason: impl Into<String>) -> StateError {
        StateError { device, reason: reason.into() }
    }
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} state: {}", self.device, self.reason)
    }
}

impl std::error::Error for StateError {}

impl From<StateError> for crate::error::Error {
    fn from(e: StateError) -> Self {
        crate::error::Error::Snapshot(e.to_string())
    }
}
