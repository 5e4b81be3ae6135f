//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, a MAC address, no offloads.
//!
//! The host end is a Unix stream socket carrying Ethernet frames, each after its length as a
//! 4-byte big-endian number: the framing of QEMU's `-netdev socket`/`stream` and of passt, so the network
//! behind the VM is another process the VMM knows nothing about. Every frame the guest sends
//! passes the egress policy first.
//!
//! Flow control both ways: frames from the host wait in the socket while the guest has no
//! receive buffers (the device stops reading it); guest frames are copied out at once, and the
//! device stops taking more while `TX_HIGH_WATER` bytes wait for a socket that would block.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::persist::DeviceState;
use super::{read_config_bytes, Activation, ActiveQueues, SocketInterest, VirtioDevice, TYPE_NET};
use crate::egress::LivePolicy;
use crate::event_loop::Interest;
use crate::memory::GuestRam;
use crate::state::{Persist, StateError};

const F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`, in front of every frame both ways.
const HEADER: usize = 12;
/// `num_buffers` in that header: with no mergeable buffers, always 1 on receive.
const NUM_BUFFERS_OFFSET: usize = 10;
const LENGTH_PREFIX: usize = 4;
/// Largest frame either side may send: a 64 KiB IP packet behind an Ethernet header.
pub const MAX_FRAME: usize = 65_535 + 14;
/// What one read of the socket takes at most.
const READ_CHUNK: usize = 64 << 10;
/// Guest frames waiting for the socket beyond which the transmit queue is not read.
const TX_HIGH_WATER: usize = 256 << 10;

/// Frames dropped, by reason (logged when the device goes away).
#[derive(Default, Debug)]
struct Drops {
    egress: u64,
    too_big_for_guest: u64,
    malformed: u64,
}

pub struct Net {
    config: [u8; 10],
    egress: LivePolicy,
    host: UnixStream,
    interest: SocketInterest,
    active: Option<ActiveQueues>,
    /// Bytes read from the socket and not yet delivered, from `rx_start`.
    rx: Vec<u8>,
    rx_start: usize,
    /// What one read lands in.
    scratch: Box<[u8]>,
    /// Guest frames not yet written to the socket, each behind its length prefix.
    tx: VecDeque<Outgoing>,
    tx_bytes: usize,
    host_closed: bool,
    drops: Drops,
}

impl Net {
    /// `host` is the device's end of the frame stream; `interest` its registration with the
    /// event loop.
    pub fn new(mac: [u8; 6], egress: LivePolicy, host: UnixStream, interest: Interest) -> std::io::Result<Self> {
        host.set_nonblocking(true)?;
        // mac, status (read only with STATUS), max_virtqueue_pairs (read only with MQ)
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&mac);
        config[8..].copy_from_slice(&1u16.to_le_bytes());
        Ok(Net {
            config,
            egress,
            host,
            interest: SocketInterest::new(interest),
            active: None,
            rx: Vec::new(),
            rx_start: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            tx: VecDeque::new(),
            tx_bytes: 0,
            host_closed: false,
            drops: Drops::default(),
        })
    }

    /// The length of the next buffered host frame, once its prefix has arrived.
    fn next_length(&self) -> Option<usize> {
        announced_length(&self.rx[self.rx_start..])
    }

    /// A whole host frame is buffered (and waits for a guest receive buffer).
    fn frame_waiting(&self) -> bool {
        whole_frame(&self.rx[self.rx_start..]).is_some()
    }

    /// Readable while it wants host frames, writable while guest frames wait.
    fn set_interest(&mut self) {
        let open = !self.host_closed;
        self.interest.set(open && self.active.is_some() && !self.frame_waiting(), open && !self.tx.is_empty());
    }

    fn raise_interrupt(&mut self) {
        if let Some(a) = self.active.as_mut() {
            a.raise_interrupt();
        }
    }

    /// Hands whole buffered frames to the guest while it has receive buffers.
    fn deliver(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used = false;
        let mut header = [0u8; HEADER];
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
        while let Some(len) = whole_frame(&self.rx[self.rx_start..]) {
            let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let start = self.rx_start + LENGTH_PREFIX;
            let frame = &self.rx[start..start + len];
            self.rx_start = start + len;
            let room: usize = chain.clone().filter(|d| d.is_write_only()).map(|d| d.len() as usize).sum();
            if room < HEADER + len {
                // Dropped, and the buffer serves the next frame.
                self.drops.too_big_for_guest += 1;
                a.queues[RX].go_to_previous_position();
                continue;
            }
            // The header, then the frame, straight from the stream into the guest's buffers.
            let written = write_across(&a.mem, chain.filter(|d| d.is_write_only()), [&header, frame]);
            if a.queues[RX].add_used(&a.mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        if used {
            a.notify(RX);
        }
        // Keep only the undelivered bytes (at most a frame and a read).
        self.rx.drain(..self.rx_start);
        self.rx_start = 0;
    }

    /// Moves host frames to the guest until the socket runs dry or the guest has no buffers.
    fn host_to_guest(&mut self) {
        loop {
            self.deliver();
            if let Some(len) = self.next_length().filter(|&len| len > MAX_FRAME) {
                // Not a stream of frames: reading on would only buffer without end.
                tracing::error!(
                    "virtio-net: the host announced a frame of {len} bytes (at most {MAX_FRAME}): network stopped"
                );
                self.drops.malformed += 1;
                self.rx.clear();
                self.host_closed = true;
            }
            if self.active.is_none() || self.host_closed || self.frame_waiting() {
                break;
            }
            match self.host.read(&mut self.scratch) {
                Ok(0) => self.host_closed = true,
                Ok(n) => self.rx.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("virtio-net: reading the host socket failed: {e}");
                    self.host_closed = true;
                }
            }
        }
        self.set_interest();
    }

    /// Writes what waits for the socket, one frame per write; false when it would block.
    ///
    /// One write per frame keeps a length prefix in the same socket buffer as the start of its
    /// frame: a reader that sees a prefix alone may lose the stream (passt of 2023 drops the 1-4
    /// bytes a read ends with), and the kernel splits a write only between buffers, each much
    /// larger than a prefix.
    fn flush_tx(&mut self) -> bool {
        while let Some(front) = self.tx.front_mut() {
            match self.host.write(&front.bytes[front.at..]) {
                Ok(n) => {
                    front.at += n;
                    self.tx_bytes -= n;
                    if front.at == front.bytes.len() {
                        self.tx.pop_front();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != ErrorKind::BrokenPipe {
                        tracing::warn!("virtio-net: writing the host socket failed: {e}");
                    }
                    self.host_closed = true;
                    break;
                }
            }
        }
        self.tx.clear();
        self.tx_bytes = 0;
        true
    }

    /// Copies guest frames out (freeing their buffers at once), through the egress policy, to the
    /// socket.
    fn guest_to_host(&mut self) {
        loop {
            if !self.flush_tx() && self.tx_bytes >= TX_HIGH_WATER {
                break;
            }
            let Some(a) = self.active.as_mut() else { break };
            let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            // Gathered once: the header's last bytes become the length prefix in place.
            let mut frame = Vec::new();
            let mut ok = true;
            for desc in chain.filter(|d| !d.is_write_only()) {
                let len = desc.len() as usize;
                if frame.len() + len > HEADER + MAX_FRAME {
                    ok = false;
                    break;
                }
                let at = frame.len();
                frame.resize(at + len, 0);
                if a.mem.read_slice(&mut frame[at..], desc.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            let _ = a.queues[TX].add_used(&a.mem, head, 0);
            a.notify(TX);
            let body = frame.get(HEADER..).filter(|b| ok && b.len() >= 14);
            match body {
                None => self.drops.malformed += 1,
                Some(_) if self.host_closed => {}
                Some(b) if !self.egress.allows(b) => self.drops.egress += 1,
                Some(_) => self.queue_tx(frame, HEADER - LENGTH_PREFIX),
            }
        }
        self.set_interest();
    }

    /// Queues `bytes[at + LENGTH_PREFIX..]` as a frame, its length written over `bytes[at..]`.
    fn queue_tx(&mut self, mut bytes: Vec<u8>, at: usize) {
        let len = (bytes.len() - at - LENGTH_PREFIX) as u32;
        bytes[at..at + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        self.tx_bytes += bytes.len() - at;
        self.tx.push_back(Outgoing { bytes, at });
    }
}

/// A guest frame on its way to the socket: `bytes[at..]` is still to be written.
struct Outgoing {
    bytes: Vec<u8>,
    at: usize,
}

/// Writes `parts` one after the other across `descriptors`; returns the bytes written (fewer
/// when a buffer lies outside guest memory).
fn write_across(mem: &GuestRam, descriptors: impl Iterator<Item = Descriptor>, parts: [&[u8]; 2]) -> usize {
    let mut parts = parts.into_iter().filter(|p| !p.is_empty());
    let (mut part, mut offset, mut written) = (parts.next(), 0usize, 0usize);
    for desc in descriptors {
        let (mut addr, end) = (desc.addr().0, desc.addr().0 + u64::from(desc.len()));
        while let Some(p) = part.filter(|_| addr < end) {
            let n = ((end - addr) as usize).min(p.len() - offset);
            if mem.write_slice(&p[offset..offset + n], GuestAddress(addr)).is_err() {
                tracing::warn!("virtio-net: receive buffer outside guest memory");
                return written;
            }
            (addr, offset, written) = (addr + n as u64, offset + n, written + n);
            if offset == p.len() {
                (part, offset) = (parts.next(), 0);
            }
        }
        if part.is_none() {
            break;
        }
    }
    written
}

/// The length a buffered stream announces for its next frame.
fn announced_length(buffered: &[u8]) -> Option<usize> {
    let prefix = buffered.get(..LENGTH_PREFIX)?;
    Some(u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize)
}

/// The length of the next frame, when all of it is buffered.
fn whole_frame(buffered: &[u8]) -> Option<usize> {
    announced_length(buffered).filter(|len| buffered.len() >= LENGTH_PREFIX + len)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) {
        self.active = Some(ActiveQueues::new(activation));
        self.set_interest();
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            RX => self.host_to_guest(),
            TX => self.guest_to_host(),
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

    /// Frames in flight are dropped, as on a real link reset; the socket stays.
    fn reset(&mut self) {
        self.active = None;
        self.set_interest();
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    // No state beyond the queues: a restored VM gets a new socket (a new network process), whose
    // stream starts at a frame boundary, so half-sent or half-read frames are not kept.
}

/// Nothing beyond its queues (frames half sent or received are the host stream's, which a
/// restore replaces).
impl Persist for Net {
    type State = DeviceState;
    type Error = StateError;

    fn save(&self) -> Result<DeviceState, StateError> {
        Ok(DeviceState::Net)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        match state {
            DeviceState::Net => Ok(()),
            other => Err(other.mismatch("virtio-net")),
        }
    }

    /// Restored (and active): announces the guest's MAC to the new network behind the socket, as
    /// QEMU does after a migration. passt sends to the MAC it has seen from the guest; a guest
    /// that sends nothing by itself (a server without outbound access) would stay unreachable.
    fn after_restore(&mut self) -> Result<(), StateError> {
        let mut bytes = vec![0u8; LENGTH_PREFIX];
        bytes.extend(rarp_announce(self.config[..6].try_into().expect("6 bytes")));
        self.queue_tx(bytes, 0);
        self.set_interest();
        Ok(())
    }
}

/// Socket buffers of a frame stream, each way: passt (of 2023) drops the frames it cannot write at
/// once and leaves their recovery to TCP retransmission, so a stream that fills at the default
/// size (~208 KiB) cut a 32 MiB download from ~65 to ~4 MiB/s (bench/results/net.md).
pub const STREAM_BUFFER_BYTES: usize = 4 << 20;

/// Gives a frame stream's socket [`STREAM_BUFFER_BYTES`] each way: forced where the process may
/// (CAP_NET_ADMIN), else as much as `net.core.wmem_max`/`rmem_max` allow. Best effort.
pub fn size_stream_buffers(socket: &std::os::unix::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let bytes = STREAM_BUFFER_BYTES as libc::c_int;
    for (forced, plain) in [(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF), (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)] {
        for option in [forced, plain] {
            // SAFETY: a live socket fd and a c_int option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

/// A RARP request from `mac` (ethertype 0x8035, padded to the 60-byte minimum): the frame QEMU's
/// self-announce sends; it names the MAC and claims no address.
fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

impl Drop for Net {
    fn drop(&mut self) {
        let d = &self.drops;
        if d.egress + d.too_big_for_guest + d.malformed > 0 {
            tracing::debug!("virtio-net: frames dropped: {d:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{Interrupt, INT_USED_RING};
    use crate::egress::EgressPolicy;
    use crate::event_loop::EventLoop;
    use crate::memory::GuestRam;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;
    const BUF: u64 = 0x10000;
    const MAC: [u8; 6] = [2, 0x4d, 0x43, 0, 0, 1];
    /// An ethertype the egress policy passes with `outbound` whatever the body (not IP).
    const LOCAL_EXPERIMENTAL: u16 = 0x88b5;

    struct Rig<'a> {
        mem: &'a GuestRam,
        queues: Vec<MockSplitQueue<'a, GuestRam>>,
        dev: Net,
        host: UnixStream,
        interrupt: Interrupt,
        _loop: EventLoop,
    }

    fn rig(mem: &GuestRam, egress: EgressPolicy) -> Rig<'_> {
        let (host, device_end) = UnixStream::pair().unwrap();
        let mut el = EventLoop::new().unwrap();
        let fd = device_end.as_raw_fd();
        let mut dev = Net::new(MAC, LivePolicy::new(egress), device_end, el.interest(fd)).unwrap();
        el.add(fd, EventSet::empty(), Box::new(|_| {})).unwrap();
        let queues: Vec<_> = (0..2).map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1000), 16)).collect();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: queues.iter().map(|q| q.create_queue::<Queue>().unwrap()).collect(),
            interrupt: interrupt.clone(),
            acked_features: F_MAC | super::super::VIRTIO_F_VERSION_1,
        });
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Rig { mem, queues, dev, host, interrupt, _loop: el }
    }

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn open() -> EgressPolicy {
        EgressPolicy { outbound: true, ..Default::default() }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used(q: &MockSplitQueue<'_, GuestRam>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    /// An Ethernet frame of `len` bytes with the given ethertype and a recognisable body.
    fn frame(ethertype: u16, len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ seed));
        f
    }

    fn framed(f: &[u8]) -> Vec<u8> {
        let mut v = (f.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(f);
        v
    }

    fn read_framed(host: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        host.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        host.read_exact(&mut f).unwrap();
        f
    }

    #[test]
    fn config_space_holds_the_mac() {
        let mem = memory();
        let r = rig(&mem, open());
        let mut mac = [0u8; 6];
        r.dev.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        assert_eq!(r.dev.features() & F_MAC, F_MAC);
        assert_eq!(r.dev.device_type(), TYPE_NET);
    }

    #[test]
    fn guest_frames_reach_the_host_framed_without_their_header() {
        let mem = memory();
        let mut r = rig(&mem, open());
        let (a, b) = (frame(LOCAL_EXPERIMENTAL, 60, 1), frame(LOCAL_EXPERIMENTAL, 1514, 2));
        // One descriptor: header and frame together.
        r.mem.write_slice(&[0u8; HEADER], GuestAddress(BUF)).unwrap();
        r.mem.write_slice(&a, GuestAddress(BUF + HEADER as u64)).unwrap();
        // Two descriptors: the header, then the frame.
        r.mem.write_slice(&b, GuestAddress(BUF + 0x1000)).unwrap();
        r.queues[TX]
            .add_desc_chains(
                &[
                    desc(BUF, (HEADER + a.len()) as u32, 0, 0),
                    desc(BUF + 0x800, HEADER as u32, NEXT, 2),
                    desc(BUF + 0x1000, b.len() as u32, 0, 0),
                ],
                0,
            )
            .unwrap();
        r.dev.queue_notify(TX);
        assert_eq!(read_framed(&mut r.host), a);
        assert_eq!(read_framed(&mut r.host), b);
        assert_eq!(used(&r.queues[TX], 0), (0, 0));
        assert_eq!(used(&r.queues[TX], 1), (1, 0));
        assert_ne!(r.interrupt.status() & INT_USED_RING, 0);
    }

    #[test]
    fn the_egress_policy_drops_frames_before_the_host_sees_them() {
        let mem = memory();
        let mut r = rig(&mem, EgressPolicy::default());
        let (udp, arp) = (frame(0x0800, 60, 3), frame(0x0806, 42, 4));
        for (i, f) in [&udp, &arp].iter().enumerate() {
            let at = BUF + 0x1000 * i as u64;
            r.mem.write_slice(&[0u8; HEADER], GuestAddress(at)).unwrap();
            r.mem.write_slice(f, GuestAddress(at + HEADER as u64)).unwrap();
        }
        r.queues[TX]
            .add_desc_chains(
                &[desc(BUF, (HEADER + udp.len()) as u32, 0, 0), desc(BUF + 0x1000, (HEADER + arp.len()) as u32, 0, 0)],
                0,
            )
            .unwrap();
        r.dev.queue_notify(TX);
        assert_eq!(read_framed(&mut r.host), arp, "the IPv4 frame was dropped, the ARP one passed");
        assert_eq!(used(&r.queues[TX], 0), (0, 0), "a dropped frame's buffer is given back too");
        assert_eq!(r.dev.drops.egress, 1);
    }

    #[test]
    fn host_frames_wait_for_guest_buffers_and_arrive_with_a_header() {
        let mem = memory();
        let mut r = rig(&mem, open());
        let (a, b) = (frame(0x0800, 100, 5), frame(0x86dd, 1514, 6));
        let mut both = framed(&a);
        both.extend(framed(&b));
        // Split across writes, the second frame's length prefix cut in two.
        r.host.write_all(&both[..104 + 2]).unwrap();
        r.dev.host_event(EventSet::IN);
        r.host.write_all(&both[104 + 2..]).unwrap();
        r.dev.host_event(EventSet::IN);
        // One buffer of one descriptor, one of two (header apart).
        r.queues[RX].add_desc_chains(&[desc(BUF, 2048, WRITE, 0)], 0).unwrap();
        r.dev.queue_notify(RX);
        assert_eq!(used(&r.queues[RX], 0), (0, (HEADER + a.len()) as u32));
        r.queues[RX]
            .add_desc_chains(
                &[desc(BUF + 0x1000, HEADER as u32, WRITE | NEXT, 2), desc(BUF + 0x2000, 1526, WRITE, 0)],
                1,
            )
            .unwrap();
        r.dev.queue_notify(RX);
        assert_eq!(used(&r.queues[RX], 1), (1, (HEADER + b.len()) as u32));
        let mut got = vec![0u8; HEADER + a.len()];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..NUM_BUFFERS_OFFSET], &[0u8; NUM_BUFFERS_OFFSET]);
        assert_eq!(&got[NUM_BUFFERS_OFFSET..HEADER], &1u16.to_le_bytes());
        assert_eq!(&got[HEADER..], &a[..]);
        let mut got = vec![0u8; b.len()];
        r.mem.read_slice(&mut got, GuestAddress(BUF + 0x2000)).unwrap();
        assert_eq!(got, b);
    }

    #[test]
    fn a_frame_larger_than_the_guest_buffer_is_dropped_and_the_buffer_serves_the_next() {
        let mem = memory();
        let mut r = rig(&mem, open());
        let (big, small) = (frame(0x0800, 4000, 7), frame(0x0800, 64, 8));
        r.host.write_all(&framed(&big)).unwrap();
        r.host.write_all(&framed(&small)).unwrap();
        r.queues[RX].add_desc_chains(&[desc(BUF, 2048, WRITE, 0)], 0).unwrap();
        r.dev.queue_notify(RX);
        assert_eq!(used(&r.queues[RX], 0), (0, (HEADER + small.len()) as u32));
        assert_eq!(r.dev.drops.too_big_for_guest, 1);
    }

    #[test]
    fn a_stream_that_is_not_frames_stops_the_network_without_buffering_it() {
        let mem = memory();
        let mut r = rig(&mem, open());
        r.host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        r.host.write_all(&[0u8; 4096]).unwrap();
        r.queues[RX].add_desc_chains(&[desc(BUF, 2048, WRITE, 0)], 0).unwrap();
        r.dev.queue_notify(RX);
        assert!(r.dev.host_closed);
        assert!(r.dev.rx.is_empty());
        assert_eq!(r.dev.drops.malformed, 1);
    }

    #[test]
    fn a_restored_device_announces_the_guests_mac_first() {
        let mem = memory();
        let mut r = rig(&mem, EgressPolicy::default());
        r.dev.after_restore().unwrap();
        r.dev.host_event(EventSet::OUT);
        let f = read_framed(&mut r.host);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[6..12], &MAC, "from the guest's MAC");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&f[22..28], &MAC);
    }

    #[test]
    fn a_closed_host_end_frees_guest_buffers() {
        let mem = memory();
        let mut r = rig(&mem, open());
        drop(std::mem::replace(&mut r.host, UnixStream::pair().unwrap().0));
        let f = frame(LOCAL_EXPERIMENTAL, 60, 9);
        r.mem.write_slice(&f, GuestAddress(BUF + HEADER as u64)).unwrap();
        for i in 0..3u16 {
            r.queues[TX].add_desc_chains(&[desc(BUF, (HEADER + f.len()) as u32, 0, 0)], i).unwrap();
            r.dev.queue_notify(TX);
            assert_eq!(used(&r.queues[TX], usize::from(i)), (u32::from(i), 0));
        }
        assert!(r.dev.host_closed);
    }
}
