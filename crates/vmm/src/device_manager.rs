//! Attaches virtio-mmio devices: one 4 KiB MMIO slot and one GSI each, an irqfd for the
//! interrupt, an ioeventfd per queue (so queue kicks skip the vCPU thread), the event loop
//! handlers, and the `virtio_mmio.device=` entry the guest kernel finds it by.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};

use crate::memory::GuestRam;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::MMIO_GAP_START;
use crate::devices::virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::persist::TransportState;
use crate::devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::state::Persist;

/// First GSI for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
const FIRST_VIRTIO_GSI: u32 = 5;
/// The IOAPIC has 24 pins.
const LAST_GSI: u32 = 23;

pub struct DeviceManager {
    next_slot: u64,
    next_gsi: u32,
    /// `virtio_mmio.device=...` entries, appended to the kernel command line.
    pub cmdline_entries: Vec<String>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        DeviceManager { next_slot: MMIO_GAP_START, next_gsi: FIRST_VIRTIO_GSI, cmdline_entries: Vec::new() }
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error::Thread(e)
}

impl DeviceManager {
    /// Adds `device`; its host-side fd (`VirtioDevice::host_fd`), if any, joins the event loop
    /// and its readiness goes to `VirtioDevice::host_event`.
    pub fn attach(
        &mut self,
        vm: &VmFd,
        mem: &GuestRam,
        mmio_bus: &mut Bus,
        event_loop: &mut EventLoop,
        device: Box<dyn VirtioDevice>,
        state: Option<&TransportState>,
    ) -> Result<Arc<Mutex<MmioTransport>>> {
        if self.next_gsi > LAST_GSI {
            return Err(Error::Config("too many virtio devices (no free interrupt line)".into()));
        }
        let (base, gsi) = (self.next_slot, self.next_gsi);
        let host_fd = device.host_fd();
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(io_error)?;
        vm.register_irqfd(&irqfd, gsi).map_err(Error::kvm("KVM_IRQFD"))?;
        let interrupt = Interrupt::new(irqfd);
        // The host fd joins the epoll set before the transport exists: restoring one re-activates
        // its device, which sets its interest in the fd (EPOLL_CTL_MOD) right away. Added after,
        // with no events, the fd would stay deaf: a restored console never read its socket.
        // The handler finds the transport once it is made, before the loop thread starts.
        let slot: Arc<OnceLock<Arc<Mutex<MmioTransport>>>> = Arc::default();
        if let Some(fd) = host_fd {
            let slot = slot.clone();
            event_loop
                .add(
                    fd,
                    EventSet::empty(),
                    Box::new(move |events| {
                        if let Some(t) = slot.get() {
                            t.lock().unwrap_or_else(|p| p.into_inner()).device_mut().host_event(events);
                        }
                    }),
                )
                .map_err(io_error)?;
        }
        let mut transport = MmioTransport::new(device, mem.clone(), interrupt);
        if let Some(s) = state {
            transport.restore(s)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let _ = slot.set(transport.clone());
        let queues = transport.lock().unwrap_or_else(|p| p.into_inner()).num_queues();
        for index in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(io_error)?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), index as u32)
                .map_err(Error::kvm("KVM_IOEVENTFD"))?;
            let t = transport.clone();
            let fd = evt.as_raw_fd();
            event_loop
                .add(
                    fd,
                    EventSet::IN,
                    Box::new(move |_| {
                        let _ = evt.read();
                        t.lock().unwrap_or_else(|p| p.into_inner()).queue_notify(index);
                    }),
                )
                .map_err(io_error)?;
        }
        mmio_bus.insert(transport.clone(), base, MMIO_SIZE).map_err(|e| Error::Config(format!("MMIO layout: {e}")))?;
        self.cmdline_entries.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.next_slot += MMIO_SIZE;
        self.next_gsi += 1;
        Ok(transport)
    }
}
