//! virtio devices on the one transport we offer, virtio-mmio (spec 1.2 §4.2, "version 2").
//!
//! A device implements `VirtioDevice`; `MmioTransport` does the register file, feature and
//! queue negotiation, and hands the device its queues when the driver sets DRIVER_OK.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod persist;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use crate::event_loop::Interest;
use crate::memory::GuestRam;
use crate::state::{Persist, StateError};
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
pub use persist::DeviceState;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;

/// Interrupt status bits (InterruptStatus register).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Raises the device's interrupt: sets the status bit the driver reads, then fires the irqfd.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt { status: Arc::new(AtomicU32::new(0)), irqfd: Arc::new(irqfd) }
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device is activated with.
pub struct Activation {
    pub mem: GuestRam,
    pub queues: Vec<Queue>,
    pub interrupt: Interrupt,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device model. All methods run with the transport's lock held, on a vCPU thread
/// (register accesses) or the event loop thread (queue and host events). Its snapshot state
/// (beyond the queues, which the transport keeps) is `Persist`'s: `restore` runs after
/// `activate` when the device was active, `after_restore` once the whole VM is restored.
pub trait VirtioDevice: Send + Persist<State = DeviceState, Error = StateError> {
    fn device_type(&self) -> u32;
    /// One entry per queue: the largest size the device accepts.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered; `VIRTIO_F_VERSION_1` must be among them.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start using the queues.
    fn activate(&mut self, activation: Activation);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: usize);
    /// A host-side fd of the device is ready (only devices that register one).
    fn host_event(&mut self, _events: vmm_sys_util::epoll::EventSet) {}
    /// The host-side fd whose readiness `host_event` handles (the device manager adds it to the
    /// event loop); `None` for devices that need none.
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The driver reset the device: drop the queues, keep host resources.
    fn reset(&mut self);
    /// The queues the device is using (after `activate`), for snapshots.
    fn active_queues(&self) -> Option<&[Queue]>;
}

/// A device's queues once the driver has set DRIVER_OK, and whether it owes the driver an
/// interrupt: `notify` marks what the driver must hear about while an event is handled,
/// `raise_interrupt` then sends one interrupt for all of it (two back-to-back signals would look
/// like a spurious interrupt to the guest).
pub struct ActiveQueues {
    pub mem: GuestRam,
    pub queues: Vec<Queue>,
    interrupt: Interrupt,
    irq_pending: bool,
}

impl ActiveQueues {
    pub fn new(activation: Activation) -> ActiveQueues {
        ActiveQueues {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            irq_pending: false,
        }
    }

    /// The driver must hear about queue `index` (unless it said it need not).
    pub fn notify(&mut self, index: usize) {
        if self.queues[index].needs_notification(&self.mem).unwrap_or(true) {
            self.irq_pending = true;
        }
    }

    pub fn raise_interrupt(&mut self) {
        if std::mem::take(&mut self.irq_pending) {
            self.interrupt.signal(INT_USED_RING);
        }
    }
}

/// What a device waits for on its host socket. With nothing to wait for, the fd is armed
/// one-shot only: a hang-up cannot be masked (epoll always reports EPOLLHUP) and, level-triggered,
/// it would be reported again and again, spinning the event loop while the device is not reading
/// (no driver yet, no guest buffers). It is armed again once the device has something to wait
/// for; a guest posting buffers gets there through `queue_notify`.
pub struct SocketInterest {
    interest: Interest,
    parked: bool,
}

impl SocketInterest {
    pub fn new(interest: Interest) -> SocketInterest {
        SocketInterest { interest, parked: false }
    }

    pub fn set(&mut self, readable: bool, writable: bool) {
        let mut events = EventSet::empty();
        if readable {
            events |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if writable {
            events |= EventSet::OUT;
        }
        if events.is_empty() {
            if !self.parked {
                self.parked = true;
                self.interest.set(EventSet::ONE_SHOT);
            }
        } else {
            self.parked = false;
            self.interest.set(events);
        }
    }
}

/// Reads `data.len()` bytes of a little-endian config space at `offset`; out of range reads 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = offset as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(start + i).copied().unwrap_or(0);
    }
}
