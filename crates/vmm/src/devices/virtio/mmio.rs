//! The virtio-mmio register file (spec 1.2 §4.2.2). One transport per device, 4 KiB each.

use std::sync::{Arc, Mutex};

use crate::memory::GuestRam;
use virtio_queue::{Queue, QueueT};

use super::persist::{QueueSnapshot, TransportState};
use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::state::{Persist, StateError};

pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: the ioeventfd for each queue sits here with the queue index as data.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d43_454c; // "LECM"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestRam, interrupt: Interrupt) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue notification from the event loop (ioeventfd) or from a QueueNotify write.
    pub fn queue_notify(&mut self, index: usize) {
        if self.activated && index < self.queues.len() {
            self.device.queue_notify(index);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are writable only before the driver is done setting up.
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: refuse FEATURES_OK (spec §3.1.1).
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        let newly_ok = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if newly_ok && !self.activated {
            let expected = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            if value & expected != expected || !self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem)) {
                self.status |= STATUS_FAILED;
                return;
            }
            // The device gets its own copies; the transport keeps the registers' view.
            let Ok(queues) = self.queues.iter().map(|q| Queue::try_from(q.state())).collect::<Result<Vec<_>, _>>()
            else {
                self.status |= STATUS_FAILED;
                return;
            };
            self.activate_device(queues);
        }
    }

    /// Hands the device its queues (DRIVER_OK, or a restore of an active transport).
    fn activate_device(&mut self, queues: Vec<Queue>) {
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        });
        self.activated = true;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features() | VIRTIO_F_VERSION_1;
                if self.device_features_select == 0 {
                    f as u32
                } else if self.device_features_select == 1 {
                    (f >> 32) as u32
                } else {
                    0
                }
            }
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let set_low = |old: u64, v: u32| (old & !0xffff_ffff) | u64::from(v);
        let set_high = |old: u64, v: u32| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            0x14 => self.device_features_select = v,
            0x20 => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    let offered = self.device.features() | VIRTIO_F_VERSION_1;
                    let acked = match self.driver_features_select {
                        0 => set_low(self.acked_features, v),
                        1 => set_high(self.acked_features, v),
                        _ => self.acked_features,
                    };
                    self.acked_features = acked & offered;
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY_OFFSET => self.queue_notify(v as usize),
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(q) = self.selected_queue() else { return };
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                match offset & !4 {
                    0x80 => q.set_desc_table_address(lo, hi),
                    0x90 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

impl Persist for MmioTransport {
    type State = TransportState;
    type Error = StateError;

    fn save(&self) -> Result<TransportState, StateError> {
        let live = self.device.active_queues().filter(|_| self.activated).unwrap_or(&self.queues);
        Ok(TransportState {
            device_type: self.device.device_type(),
            queues: live.iter().map(QueueSnapshot::from).collect(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            activated: self.activated,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            device: self.device.save()?,
        })
    }

    /// Into a fresh transport (`new`): the registers, the queues, and the device re-activated.
    fn restore(&mut self, state: &TransportState) -> Result<(), StateError> {
        let err = |reason: String| StateError::new("virtio-mmio", reason);
        let t = self;
        if state.device_type != t.device.device_type() || state.queues.len() != t.queues.len() {
            return Err(err(format!(
                "virtio device type {} in the snapshot does not match the configured device",
                state.device_type
            )));
        }
        let queues: Vec<Queue> = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("virtio queue: {e:?}")))?;
        // The device's own queue sizes, and rings inside guest RAM: a snapshot cannot widen a
        // queue past what the device allocates for, nor point the device outside the guest.
        for (i, (q, fresh)) in queues.iter().zip(&t.queues).enumerate() {
            if q.max_size() != fresh.max_size() {
                return Err(err(format!(
                    "virtio queue {i}: max_size {} in the snapshot, the device has {}",
                    q.max_size(),
                    fresh.max_size()
                )));
            }
            if q.ready() && !q.is_valid(&t.mem) {
                return Err(err(format!("virtio queue {i}: its rings lie outside guest memory or are misaligned")));
            }
        }
        t.queues = queues;
        t.queue_select = state.queue_select;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.acked_features = state.acked_features;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.interrupt.set_status(state.interrupt_status);
        if state.activated {
            let queues = state
                .queues
                .iter()
                .map(QueueSnapshot::to_queue)
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("virtio queue: {e:?}")))?;
            t.activate_device(queues);
            t.device.restore(&state.device)?;
        }
        Ok(())
    }

    fn after_restore(&mut self) -> Result<(), StateError> {
        if self.activated {
            self.device.after_restore()?;
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

pub type SharedTransport = Arc<Mutex<MmioTransport>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::DeviceState;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dummy {
        activations: Arc<AtomicUsize>,
        notified: Arc<AtomicUsize>,
        after_restores: Arc<AtomicUsize>,
    }

    impl Persist for Dummy {
        type State = DeviceState;
        type Error = StateError;
        fn save(&self) -> Result<DeviceState, StateError> {
            Ok(DeviceState::Block)
        }
        fn restore(&mut self, _: &DeviceState) -> Result<(), StateError> {
            Ok(())
        }
        fn after_restore(&mut self) -> Result<(), StateError> {
            self.after_restores.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(&mut self, a: Activation) {
            assert_eq!(a.queues.len(), 2);
            self.activations.fetch_add(1, Ordering::SeqCst);
        }
        fn queue_notify(&mut self, _index: usize) {
            self.notified.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&mut self) {}
        fn active_queues(&self) -> Option<&[Queue]> {
            None
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (t, a, n, _) = counting_transport();
        (t, a, n)
    }

    /// `transport`, and how often the device's `after_restore` ran.
    fn counting_transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (a, n, r) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let dev = Dummy { activations: a.clone(), notified: n.clone(), after_restores: r.clone() };
        (MmioTransport::new(Box::new(dev), mem, Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())), a, n, r)
    }

    /// Sets up both queues of a negotiated transport (16 entries, rings in the first pages).
    fn ready_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            wr(t, 0x30, q);
            wr(t, 0x38, 16);
            wr(t, 0x80, 0x1000 * (q + 1));
            wr(t, 0x90, 0x1000 * (q + 1) + 0x100);
            wr(t, 0xa0, 0x1000 * (q + 1) + 0x200);
            wr(t, 0x44, 1);
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, high_features: u32) {
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, 1 << 3);
        wr(t, 0x24, 1);
        wr(t, 0x20, high_features);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    #[test]
    fn identifies_itself_and_offers_version_1() {
        let (mut t, _, _) = transport();
        assert_eq!((rd(&mut t, 0), rd(&mut t, 4), rd(&mut t, 8)), (MAGIC, 2, 42));
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VIRTIO_F_VERSION_1 is bit 32");
        wr(&mut t, 0x14, 0);
        assert_eq!(rd(&mut t, 0x10), 1 << 3);
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x34), 16);
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&mut t, 0x34), 0, "no such queue");
        let mut cfg = [0u8; 2];
        t.read(0x104, &mut cfg);
        assert_eq!(cfg, [4, 4]);
    }

    #[test]
    fn legacy_drivers_are_refused() {
        let (mut t, act, _) = transport();
        negotiate(&mut t, 0);
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(act.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn driver_ok_activates_once_and_reset_starts_over() {
        let (mut t, act, notified) = transport();
        negotiate(&mut t, 1);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        wr(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(notified.load(Ordering::SeqCst), 0, "no notifications before activation");
        ready_queues(&mut t);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        wr(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(notified.load(Ordering::SeqCst), 1);
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x70, 0);
        assert_eq!((rd(&mut t, 0x70), rd(&mut t, 0x44)), (0, 0));
    }

    #[test]
    fn queue_outside_guest_memory_fails_activation() {
        let (mut t, act, _) = transport();
        negotiate(&mut t, 1);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0x4000_0000);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FAILED, 0);
        assert_eq!(act.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_saved_transport_restores_into_a_fresh_one_and_only_an_active_device_hears_after_restore() {
        let (t, _, _) = transport();
        let idle = t.save().unwrap();
        let (mut fresh, act, _, after) = counting_transport();
        fresh.restore(&idle).unwrap();
        fresh.after_restore().unwrap();
        assert_eq!((act.load(Ordering::SeqCst), after.load(Ordering::SeqCst)), (0, 0), "an idle device is left alone");

        let (mut t, _, _) = transport();
        negotiate(&mut t, 1);
        ready_queues(&mut t);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let active = t.save().unwrap();
        assert!(active.activated);
        let (mut fresh, act, _, after) = counting_transport();
        fresh.restore(&active).unwrap();
        assert_eq!(act.load(Ordering::SeqCst), 1, "re-activated by the restore");
        assert_eq!(after.load(Ordering::SeqCst), 0, "after_restore waits for the whole VM");
        fresh.after_restore().unwrap();
        assert_eq!(after.load(Ordering::SeqCst), 1);
        assert_eq!(
            (rd(&mut fresh, 0x70), fresh.save().unwrap().acked_features),
            (rd(&mut t, 0x70), active.acked_features)
        );

        let mut other = active.clone();
        other.device_type = 7;
        let e = counting_transport().0.restore(&other).unwrap_err();
        assert_eq!(e.device, "virtio-mmio");
        assert!(e.reason.contains("device type 7"), "{e}");
    }
}
