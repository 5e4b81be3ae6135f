//! virtio-console with MULTIPORT and one named port: the host⇄guest byte stream (control
//! channel). The guest sees `/dev/vport0p0` with `/sys/class/virtio-ports/vport0p0/name`
//! = the port name; the host end is a Unix stream socket.
//!
//! Flow control both ways, nothing buffered on the host: bytes move straight between the
//! socket and guest buffers; with no guest receive buffers the socket is not read, and a
//! socket that would block keeps the guest's transmit chain pending. Host bytes also wait
//! until the guest has opened the port (PORT_OPEN from the driver): Linux discards what arrives
//! on a port no process has open, so a host that speaks first would otherwise lose its words.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use super::persist::{ConsoleState, DeviceState};
use super::{read_config_bytes, Activation, ActiveQueues, SocketInterest, VirtioDevice, TYPE_CONSOLE};
use crate::event_loop::Interest;
use crate::state::{Persist, StateError};

const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;

// Control events (spec §5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

const PORT_ID: u32 = 0;

fn control(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + extra.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

/// A guest transmit chain not yet fully written to the host socket.
struct PendingTx {
    head: u16,
    segments: VecDeque<(u64, usize)>,
}

pub struct Console {
    port_name: String,
    host: UnixStream,
    interest: SocketInterest,
    active: Option<ActiveQueues>,
    pending_control: VecDeque<Vec<u8>>,
    pending_tx: Option<PendingTx>,
    host_closed: bool,
    /// A guest process has the port open (the driver's last PORT_OPEN said 1).
    guest_open: bool,
    config: [u8; 12],
}

impl Console {
    /// `host` is the device's end of the byte stream; `interest` its registration with the
    /// event loop (the device switches reading on and off).
    pub fn new(port_name: &str, host: UnixStream, interest: Interest) -> std::io::Result<Self> {
        host.set_nonblocking(true)?;
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&1u32.to_le_bytes()); // max_nr_ports
        Ok(Console {
            port_name: port_name.to_owned(),
            host,
            interest: SocketInterest::new(interest),
            active: None,
            pending_control: VecDeque::new(),
            pending_tx: None,
            host_closed: false,
            guest_open: false,
            config,
        })
    }

    fn update_interest(&mut self) {
        self.set_interest(self.can_receive());
    }

    fn can_receive(&self) -> bool {
        self.active.is_some() && self.guest_open && !self.host_closed
    }

    /// Readable when it can receive, writable while a transmit chain is pending.
    fn set_interest(&mut self, can_receive: bool) {
        self.interest.set(can_receive, self.pending_tx.is_some());
    }

    fn raise_interrupt(&mut self) {
        if let Some(a) = self.active.as_mut() {
            a.raise_interrupt();
        }
    }

    /// Moves socket bytes into guest receive buffers until one side runs dry.
    fn host_to_guest(&mut self) {
        if !self.guest_open || self.host_closed {
            return self.set_interest(false); // no open port yet, or the host hung up
        }
        let Some(a) = self.active.as_mut() else {
            return self.set_interest(false); // no driver yet (a hang-up woke us)
        };
        let mut used = false;
        let mut guest_has_room = true;
        while !self.host_closed {
            let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else {
                guest_has_room = false;
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            let mut would_block = false;
            for desc in chain.filter(|d| d.is_write_only()) {
                match a.mem.read_volatile_from(desc.addr(), &mut self.host, desc.len() as usize) {
                    Ok(0) if desc.len() > 0 => {
                        self.host_closed = true;
                        break;
                    }
                    Ok(n) => {
                        written += n;
                        if n < desc.len() as usize {
                            break; // socket drained for now; hand over what we have
                        }
                    }
                    Err(vm_memory::GuestMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                        would_block = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-console: receive into guest buffer failed: {e}");
                        break;
                    }
                }
            }
            if written == 0 {
                // Nothing arrived: give the buffer back for next time.
                a.queues[RX].go_to_previous_position();
                break;
            }
            if a.queues[RX].add_used(&a.mem, head, written as u32).is_err() {
                break;
            }
            used = true;
            if would_block {
                break;
            }
        }
        if used {
            a.notify(RX);
        }
        // No guest buffers: stop reading the socket until the guest posts some.
        self.set_interest(guest_has_room && !self.host_closed);
    }

    /// Writes guest transmit chains to the socket; stops (keeping the chain) when it would block.
    fn guest_to_host(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used = false;
        loop {
            let pending = match self.pending_tx.take() {
                Some(p) => p,
                None => match a.queues[TX].pop_descriptor_chain(&a.mem) {
                    Some(chain) => PendingTx {
                        head: chain.head_index(),
                        segments: chain
                            .filter(|d| !d.is_write_only())
                            .map(|d| (d.addr().0, d.len() as usize))
                            .collect(),
                    },
                    None => break,
                },
            };
            let mut p = pending;
            while let Some((addr, len)) = p.segments.front().copied() {
                if self.host_closed {
                    p.segments.clear(); // nobody listens: drop the bytes, free the guest buffer
                    break;
                }
                match a.mem.write_volatile_to(GuestAddress(addr), &mut self.host, len) {
                    Ok(n) if n == len => {
                        p.segments.pop_front();
                    }
                    Ok(n) => p.segments[0] = (addr + n as u64, len - n),
                    Err(vm_memory::GuestMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(vm_memory::GuestMemoryError::IOError(e)) if e.kind() == ErrorKind::BrokenPipe => {
                        self.host_closed = true;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-console: bad transmit buffer: {e}");
                        p.segments.pop_front();
                    }
                }
            }
            if !p.segments.is_empty() {
                self.pending_tx = Some(p);
                break;
            }
            if a.queues[TX].add_used(&a.mem, p.head, 0).is_ok() {
                used = true;
            }
        }
        if used {
            a.notify(TX);
        }
        self.update_interest();
    }

    fn flush_control(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used = false;
        while let Some(msg) = self.pending_control.front() {
            let Some(chain) = a.queues[CTRL_RX].pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let mut off = 0usize;
            for desc in chain.filter(|d| d.is_write_only()) {
                let n = (desc.len() as usize).min(msg.len() - off);
                if a.mem.write_slice(&msg[off..off + n], desc.addr()).is_err() {
                    break;
                }
                off += n;
                if off == msg.len() {
                    break;
                }
            }
            let _ = a.queues[CTRL_RX].add_used(&a.mem, head, off as u32);
            used = true;
            self.pending_control.pop_front();
        }
        if used {
            a.notify(CTRL_RX);
        }
    }

    fn handle_control_from_driver(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut msgs = Vec::new();
        while let Some(chain) = a.queues[CTRL_TX].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut buf = [0u8; 8];
            if let Some(desc) = chain.clone().find(|d| !d.is_write_only() && d.len() >= 8) {
                if a.mem.read_slice(&mut buf, desc.addr()).is_ok() {
                    msgs.push(buf);
                }
            }
            let _ = a.queues[CTRL_TX].add_used(&a.mem, head, 0);
        }
        a.notify(CTRL_TX);
        for m in msgs {
            let id = u32::from_le_bytes(m[0..4].try_into().unwrap());
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            match event {
                DEVICE_READY if value == 1 => self.pending_control.push_back(control(PORT_ID, DEVICE_ADD, 0, &[])),
                PORT_READY if id == PORT_ID && value == 1 => {
                    self.pending_control.push_back(control(PORT_ID, PORT_NAME, 1, self.port_name.as_bytes()));
                    self.pending_control.push_back(control(PORT_ID, PORT_OPEN, 1, &[]));
                }
                PORT_OPEN if id == PORT_ID => {
                    tracing::debug!("virtio-console: guest {} port {id}", if value == 1 { "opened" } else { "closed" });
                    self.guest_open = value == 1;
                    if self.guest_open {
                        self.host_to_guest(); // what the host sent meanwhile waited in the socket
                    } else {
                        self.update_interest();
                    }
                }
                _ => tracing::debug!("virtio-console: control event {event} id {id} value {value} ignored"),
            }
        }
        self.flush_control();
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) {
        if activation.acked_features & F_MULTIPORT == 0 {
            tracing::warn!("virtio-console: driver did not accept MULTIPORT; the named port will not appear");
        }
        self.active = Some(ActiveQueues::new(activation));
        self.update_interest();
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            RX => self.host_to_guest(),
            TX => self.guest_to_host(),
            CTRL_RX => self.flush_control(),
            CTRL_TX => self.handle_control_from_driver(),
            _ => {}
        }
        self.raise_interrupt();
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.host))
    }

    fn host_event(&mut self, events: EventSet) {
        if events.contains(EventSet::OUT) {
            self.guest_to_host();
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.host_to_guest();
        }
        self.raise_interrupt();
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending_control.clear();
        self.pending_tx = None;
        self.guest_open = false;
        self.update_interest();
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }
}

impl Persist for Console {
    type State = DeviceState;
    type Error = StateError;

    fn save(&self) -> Result<DeviceState, StateError> {
        Ok(DeviceState::Console(ConsoleState {
            pending_control: self.pending_control.iter().cloned().collect(),
            pending_tx: self.pending_tx.as_ref().map(|p| (p.head, p.segments.iter().copied().collect())),
            guest_open: self.guest_open,
        }))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let err = |reason: String| StateError::new("virtio-console", reason);
        let DeviceState::Console(state) = state else {
            return Err(state.mismatch("virtio-console"));
        };
        // Bounded like the live device: a few control messages, and a pending transmit chain
        // that is one of the guest's descriptors, in guest memory.
        if state.pending_control.len() > MAX_PENDING_CONTROL
            || state.pending_control.iter().any(|m| m.len() > MAX_CONTROL_LEN)
        {
            return Err(err(format!(
                "{} pending control messages, at most {MAX_PENDING_CONTROL} of at most {MAX_CONTROL_LEN} bytes",
                state.pending_control.len()
            )));
        }
        if let (Some((head, segments)), Some(a)) = (&state.pending_tx, &self.active) {
            let size = a.queues[TX].size();
            if *head >= size {
                return Err(err(format!("pending transmit head {head}, the queue has {size} entries")));
            }
            if segments.len() > usize::from(size)
                || segments.iter().any(|&(addr, len)| !a.mem.check_range(GuestAddress(addr), len))
            {
                return Err(err("a pending transmit buffer lies outside guest memory".into()));
            }
        }
        self.pending_control = state.pending_control.iter().cloned().collect();
        self.pending_tx =
            state.pending_tx.clone().map(|(head, segments)| PendingTx { head, segments: segments.into() });
        self.guest_open = state.guest_open;
        self.update_interest();
        Ok(())
    }
}

/// Bounds on a restored console's queued control messages (the live device queues a handful,
/// each a few bytes plus a port name).
const MAX_PENDING_CONTROL: usize = 1024;
const MAX_CONTROL_LEN: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{Interrupt, INT_USED_RING};
    use crate::event_loop::EventLoop;
    use crate::memory::GuestRam;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const WRITE: u16 = 2;
    const BUF: u64 = 0x10000;

    struct Rig<'a> {
        mem: &'a GuestRam,
        queues: Vec<MockSplitQueue<'a, GuestRam>>,
        dev: Console,
        host: UnixStream,
        interrupt: Interrupt,
        _loop: EventLoop,
    }

    fn rig(mem: &GuestRam) -> Rig<'_> {
        let (host, device_end) = UnixStream::pair().unwrap();
        let mut el = EventLoop::new().unwrap();
        let fd = device_end.as_raw_fd();
        let mut dev = Console::new("agent", device_end, el.interest(fd)).unwrap();
        el.add(fd, EventSet::empty(), Box::new(|_| {})).unwrap();
        let queues: Vec<_> = (0..4).map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1000), 16)).collect();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: queues.iter().map(|q| q.create_queue::<Queue>().unwrap()).collect(),
            interrupt: interrupt.clone(),
            acked_features: F_MULTIPORT,
        });
        dev.guest_open = true; // as after the driver's PORT_OPEN (its own test below)
        host.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        Rig { mem, queues, dev, host, interrupt, _loop: el }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn used(q: &MockSplitQueue<'_, GuestRam>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn guest_bytes_reach_the_host_unchanged() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut r = rig(&mem);
        let all: Vec<u8> = (0..=255u8).collect();
        r.mem.write_slice(&all, GuestAddress(BUF)).unwrap();
        r.queues[TX].add_desc_chains(&[desc(BUF, 256, 0)], 0).unwrap();
        r.dev.queue_notify(TX);
        let mut got = vec![0u8; 256];
        r.host.read_exact(&mut got).unwrap();
        assert_eq!(got, all);
        assert_eq!(used(&r.queues[TX], 0), (0, 0));
        assert_ne!(r.interrupt.status() & INT_USED_RING, 0);
    }

    #[test]
    fn host_bytes_wait_for_guest_buffers() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut r = rig(&mem);
        r.host.write_all(b"hello guest").unwrap();
        // No receive buffers yet: the bytes stay in the socket.
        r.dev.host_event(EventSet::IN);
        r.queues[RX].add_desc_chains(&[desc(BUF, 4, WRITE)], 0).unwrap();
        r.dev.queue_notify(RX);
        assert_eq!(used(&r.queues[RX], 0), (0, 4));
        r.queues[RX].add_desc_chains(&[desc(BUF + 0x100, 64, WRITE)], 1).unwrap();
        r.dev.queue_notify(RX);
        assert_eq!(used(&r.queues[RX], 1), (1, 7));
        let mut a = [0u8; 4];
        let mut b = [0u8; 7];
        r.mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
        r.mem.read_slice(&mut b, GuestAddress(BUF + 0x100)).unwrap();
        assert_eq!((&a, &b), (b"hell", b"o guest"));
    }

    #[test]
    fn host_bytes_wait_until_the_guest_opens_the_port() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut r = rig(&mem);
        r.dev.guest_open = false;
        r.host.write_all(b"early").unwrap();
        r.queues[RX].add_desc_chains(&[desc(BUF, 64, WRITE)], 0).unwrap();
        r.dev.queue_notify(RX);
        r.dev.host_event(EventSet::IN);
        // Linux would discard bytes on a port nobody opened: they stay in the socket.
        assert_eq!(r.queues[RX].used().idx().load(), 0);
        r.mem.write_slice(&control(PORT_ID, PORT_OPEN, 1, &[]), GuestAddress(BUF + 0x1000)).unwrap();
        r.queues[CTRL_TX].add_desc_chains(&[desc(BUF + 0x1000, 8, 0)], 0).unwrap();
        r.dev.queue_notify(CTRL_TX);
        assert_eq!(used(&r.queues[RX], 0), (0, 5));
        let mut got = [0u8; 5];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"early");
    }

    #[test]
    fn control_handshake_names_the_port() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut r = rig(&mem);
        // The driver posts three control receive buffers, then says DEVICE_READY and PORT_READY.
        let rx: Vec<_> = (0..3).map(|i| desc(BUF + 0x100 * i, 64, WRITE)).collect();
        r.queues[CTRL_RX].add_desc_chains(&rx, 0).unwrap();
        r.mem.write_slice(&control(0, DEVICE_READY, 1, &[]), GuestAddress(BUF + 0x1000)).unwrap();
        r.queues[CTRL_TX].add_desc_chains(&[desc(BUF + 0x1000, 8, 0)], 0).unwrap();
        r.dev.queue_notify(CTRL_TX);
        let mut m = [0u8; 8];
        r.mem.read_slice(&mut m, GuestAddress(BUF)).unwrap();
        assert_eq!(m.to_vec(), control(PORT_ID, DEVICE_ADD, 0, &[]));

        r.mem.write_slice(&control(0, PORT_READY, 1, &[]), GuestAddress(BUF + 0x1100)).unwrap();
        r.queues[CTRL_TX].add_desc_chains(&[desc(BUF + 0x1100, 8, 0)], 1).unwrap();
        r.dev.queue_notify(CTRL_TX);
        let mut name = [0u8; 13];
        r.mem.read_slice(&mut name, GuestAddress(BUF + 0x100)).unwrap();
        assert_eq!(name.to_vec(), control(PORT_ID, PORT_NAME, 1, b"agent"));
        assert_eq!(used(&r.queues[CTRL_RX], 1), (1, 13));
        r.mem.read_slice(&mut m, GuestAddress(BUF + 0x200)).unwrap();
        assert_eq!(m.to_vec(), control(PORT_ID, PORT_OPEN, 1, &[]));
    }

    /// EPOLLHUP cannot be masked: a host end that hangs up while the device is not reading (no
    /// driver yet, or no guest receive buffers) must not make the event loop run the handler
    /// over and over. Buffered bytes and the EOF still reach the guest once it posts a buffer.
    #[test]
    fn a_hung_up_host_end_does_not_spin_the_event_loop() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        // The memory type comes from Activation (inferred).
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for activate_first in [false, true] {
            let (mut host, device_end) = UnixStream::pair().unwrap();
            let mut el = EventLoop::new().unwrap();
            let fd = device_end.as_raw_fd();
            let dev = Arc::new(Mutex::new(Console::new("agent", device_end, el.interest(fd)).unwrap()));
            let runs = Arc::new(AtomicUsize::new(0));
            let (d, n) = (dev.clone(), runs.clone());
            el.add(
                fd,
                EventSet::empty(),
                Box::new(move |events| {
                    n.fetch_add(1, Ordering::SeqCst);
                    d.lock().unwrap().host_event(events);
                }),
            )
            .unwrap();
            let queues: Vec<_> = (0..4).map(|i| MockSplitQueue::create(&mem, GuestAddress(i * 0x1000), 16)).collect();
            let activate = |dev: &Arc<Mutex<Console>>| {
                dev.lock().unwrap().activate(Activation {
                    mem: mem.clone(),
                    queues: queues.iter().map(|q| q.create_queue::<Queue>().unwrap()).collect(),
                    interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    acked_features: F_MULTIPORT,
                });
                dev.lock().unwrap().guest_open = true; // as after the driver's PORT_OPEN
            };
            if activate_first {
                activate(&dev); // the driver is there, but has posted no receive buffers
            }
            let _loop = el.spawn("test-hup".into()).unwrap();
            host.write_all(b"last words").unwrap();
            drop(host);
            std::thread::sleep(Duration::from_millis(300));
            let spins = runs.load(Ordering::SeqCst);
            assert!(
                spins <= 3,
                "activated {activate_first}: the handler ran {spins} times in 300 ms after the hang-up"
            );
            if !activate_first {
                activate(&dev);
            }
            // A receive buffer: the bytes written before the hang-up arrive, then the EOF is seen.
            queues[RX].add_desc_chains(&[desc(BUF, 64, WRITE)], 0).unwrap();
            dev.lock().unwrap().queue_notify(RX);
            assert_eq!(used(&queues[RX], 0), (0, 10));
            let mut got = [0u8; 10];
            mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
            assert_eq!(&got, b"last words");
            queues[RX].add_desc_chains(&[desc(BUF + 0x100, 64, WRITE)], 1).unwrap();
            dev.lock().unwrap().queue_notify(RX);
            assert!(dev.lock().unwrap().host_closed, "EOF noticed");
            let before = runs.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            let spins = runs.load(Ordering::SeqCst) - before;
            assert!(spins <= 2, "activated {activate_first}: after EOF the handler ran {spins} times in 100 ms");
        }
    }

    #[test]
    fn a_closed_host_end_frees_guest_buffers() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut r = rig(&mem);
        drop(std::mem::replace(&mut r.host, UnixStream::pair().unwrap().0));
        r.queues[TX].add_desc_chains(&[desc(BUF, 16, 0)], 0).unwrap();
        r.dev.queue_notify(TX);
        assert_eq!(used(&r.queues[TX], 0), (0, 0), "transmit chain completed even with nobody listening");
    }
}
