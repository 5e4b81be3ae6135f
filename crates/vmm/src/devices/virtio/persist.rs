//! Snapshot state of a virtio-mmio transport and its queues, and of the device behind it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// `virtio_queue::QueueState`, serialisable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// The live queues: the device's own copies once activated, else the registers' view.
    pub queues: Vec<QueueSnapshot>,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub status: u32,
    pub activated: bool,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub device: DeviceState,
}

/// A virtio device's own state beyond its queues, one variant per device model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum DeviceState {
    Block,
    Console(ConsoleState),
    Net,
}

impl DeviceState {
    /// The model this state is for, as errors name it.
    pub fn model(&self) -> &'static str {
        match self {
            DeviceState::Block => "virtio-block",
            DeviceState::Console(_) => "virtio-console",
            DeviceState::Net => "virtio-net",
        }
    }

    /// The error of a `device` handed a state of another model.
    pub fn mismatch(&self, device: &'static str) -> crate::state::StateError {
        crate::state::StateError::new(device, format!("the snapshot holds a {} state for it", self.model()))
    }
}

/// What a snapshot keeps of the console beyond its queues.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsoleState {
    pub(crate) pending_control: Vec<Vec<u8>>,
    /// The transmit chain being written to the host: its head and (address, length) segments.
    pub(crate) pending_tx: Option<(u16, Vec<(u64, usize)>)>,
    pub(crate) guest_open: bool,
}
