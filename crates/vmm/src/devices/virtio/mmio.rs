//! The virtio-mmio register file (spec 1.2 §4.2.2). One transport per device, 4 KiB each.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

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
    mem: GuestMemoryMmap,
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
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Interrupt) -> Self {
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
            let Ok(queues) = self.queues.iter().map(|q| Queue::try_from(q.state())).collect::<Result<Vec<_>, _>>() else {
                self.status |= STATUS_FAILED;
                return;
            };
            self.device.activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                acked_features: self.acked_features,
            });
            self.activated = true;
        }
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
                if self.device_features_select == 0 { f as u32 } else if self.device_features_select == 1 { (f >> 32) as u32 } else { 0 }
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
