//! A virtio device as a hostile driver sees it: register accesses on its MMIO window and guest
//! memory whose descriptors, rings and requests are all the guest's. Any sequence gives
//! responses and used-ring entries, never a panic, an access outside guest memory, or a host
//! write past the device's own backing (the block device's image is checked after each run).
//!
//! Input: a device byte (block read-write, block read-only, console, net), a count n, n 7-byte
//! operations — kind, a 16-bit offset, a 32-bit value (kind 0: register write, 1: register
//! read, 2: queue notify, 3: read the host end of a stream device) — and then the bytes that
//! become the start of guest RAM (descriptor tables, rings, buffers). `corpus/virtio_mmio/`
//! starts from a driver that sets up queues and sends one request per device
//! (`fuzz/seeds.py`).
#![no_main]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;

#[path = "scratch.rs"]
mod scratch;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::console::Console;
use vmm::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm::devices::BusDevice;
use vmm::event_loop::EventLoop;
use vmm::{EgressPolicy, LivePolicy};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RAM: usize = 1 << 20;
const SEEDED: usize = 64 << 10;
const DISK: u64 = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let [device, count, rest @ ..] = data else { return };
    let (ops, memory) = rest.split_at(rest.len().min(usize::from(*count) * 7));
    let memory = &memory[..memory.len().min(SEEDED)];
    let mem = vmm::memory::GuestRam::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    mem.write_slice(memory, GuestAddress(0)).unwrap();
    let el = EventLoop::new().unwrap();
    let mut host_end: Option<UnixStream> = None;
    let mut disk = None;
    let dev: Box<dyn VirtioDevice> = match *device % 4 {
        d @ (0 | 1) => {
            let f = tempfile();
            f.set_len(DISK).unwrap();
            disk = Some(f.try_clone().unwrap());
            Box::new(Block::new(f, d == 1, "fuzz").unwrap())
        }
        2 => {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let interest = el.interest(ours.as_raw_fd());
            host_end = Some(theirs);
            Box::new(Console::new("fuzz", ours, interest).unwrap())
        }
        _ => {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let interest = el.interest(ours.as_raw_fd());
            host_end = Some(theirs);
            Box::new(Net::new([2, 0, 0, 0, 0, 1], LivePolicy::new(EgressPolicy::default()), ours, interest).unwrap())
        }
    };
    if let Some(h) = &host_end {
        h.set_nonblocking(true).unwrap();
    }
    let mut t = MmioTransport::new(dev, mem, Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 4 {
            0 => t.write(offset, &value),
            1 => {
                let mut b = [0u8; 4];
                t.read(offset, &mut b);
            }
            2 => t.write(QUEUE_NOTIFY_OFFSET, &value),
            _ => {
                if let Some(h) = &mut host_end {
                    let mut sink = [0u8; 4096];
                    let _ = h.read(&mut sink);
                }
            }
        }
    }
    if let Some(f) = disk {
        assert_eq!(f.metadata().unwrap().len(), DISK, "the disk image changed size");
    }
});

/// An unnamed scratch file: the block device's image.
fn tempfile() -> std::fs::File {
    let p = scratch::scratch_dir("virtio").join("disk");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    f
}
