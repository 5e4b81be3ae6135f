//! virtio-blk over a raw image file. Requests move data between the file and guest memory in
//! place; every request is bounds-checked, and a bad one gets VIRTIO_BLK_S_IOERR, never a panic.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use crate::memory::GuestRam;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::persist::DeviceState;
use super::{read_config_bytes, Activation, Interrupt, VirtioDevice, INT_USED_RING, TYPE_BLOCK};
use crate::state::{Persist, StateError};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;

pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    active: Option<(GuestRam, Queue, Interrupt)>,
}

struct Request {
    kind: u32,
    sector: u64,
    data: Vec<(u64, u32, bool)>,
    status_addr: u64,
}

fn parse(chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>, mem: &GuestRam) -> Option<Request> {
    let descs: Vec<_> = chain.collect();
    let (header, rest) = descs.split_first()?;
    let (status, data) = rest.split_last()?;
    if header.is_write_only() || header.len() < 16 || !status.is_write_only() || status.len() < 1 {
        return None;
    }
    let kind: u32 = mem.read_obj(header.addr()).ok()?;
    let sector: u64 = mem.read_obj(GuestAddress(header.addr().0 + 8)).ok()?;
    Some(Request {
        kind,
        sector,
        data: data.iter().map(|d| (d.addr().0, d.len(), d.is_write_only())).collect(),
        status_addr: status.addr().0,
    })
}

impl Block {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        let capacity = file.metadata()?.len() / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block { file, read_only, capacity, id: id_bytes, active: None })
    }

    /// Executes one request; returns (status, bytes written into guest buffers).
    fn execute(&mut self, mem: &GuestRam, req: &Request) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|d| u64::from(d.1)).sum();
        let in_bounds = |total: u64| {
            req.sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|s| s.checked_add(total))
                .is_some_and(|end| end <= self.capacity * SECTOR_SIZE)
        };
        match req.kind {
            T_IN | T_OUT => {
                let write = req.kind == T_OUT;
                if (write && self.read_only) || !in_bounds(total) || !total.is_multiple_of(SECTOR_SIZE) {
                    return (S_IOERR, 0);
                }
                // Data buffers must point the right way: the device writes IN buffers only.
                if req.data.iter().any(|d| d.2 == write) {
                    return (S_IOERR, 0);
                }
                if self.file.seek(SeekFrom::Start(req.sector * SECTOR_SIZE)).is_err() {
                    return (S_IOERR, 0);
                }
                for (addr, len, _) in &req.data {
                    let r = if write {
                        mem.write_all_volatile_to(GuestAddress(*addr), &mut self.file, *len as usize)
                    } else {
                        mem.read_exact_volatile_from(GuestAddress(*addr), &mut self.file, *len as usize)
                    };
                    if let Err(e) = r {
                        tracing::warn!("virtio-blk: request at sector {} failed: {e}", req.sector);
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, if write { 0 } else { total as u32 })
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => match req.data.first() {
                Some((addr, len, true)) => {
                    let n = (*len as usize).min(ID_BYTES);
                    match mem.write_slice(&self.id[..n], GuestAddress(*addr)) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        }
    }

    fn process(&mut self) {
        let Some((mem, mut queue, interrupt)) = self.active.take() else { return };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let (status, len, status_addr) = match parse(chain, &mem) {
                Some(req) => {
                    let (s, l) = self.execute(&mem, &req);
                    (s, l, Some(req.status_addr))
                }
                None => (S_IOERR, 0, None),
            };
            let mut written = len;
            if let Some(addr) = status_addr {
                if mem.write_obj(status, GuestAddress(addr)).is_ok() {
                    written += 1;
                }
            }
            if queue.add_used(&mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.signal(INT_USED_RING);
        }
        self.active = Some((mem, queue, interrupt));
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.capacity.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) {
        let queue = a.queues.into_iter().next().expect("one queue");
        self.active = Some((a.mem, queue, a.interrupt));
    }

    fn queue_notify(&mut self, _index: usize) {
        self.process();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|(_, q, _)| std::slice::from_ref(q))
    }
}

/// Nothing beyond its queue: every request completes before the transport lock is let go.
impl Persist for Block {
    type State = DeviceState;
    type Error = StateError;

    fn save(&self) -> Result<DeviceState, StateError> {
        Ok(DeviceState::Block)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        match state {
            DeviceState::Block => Ok(()),
            other => Err(other.mismatch("virtio-block")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x13000;

    fn image(sectors: u64) -> File {
        let path =
            std::env::temp_dir().join(format!("mc-blk-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&vec![0u8; (sectors * SECTOR_SIZE) as usize]).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Runs one request chain through a fresh device; returns (status byte, used len).
    fn run(dev: &mut Block, mem: &GuestRam, kind: u32, sector: u64, chain: &[RawDescriptor]) -> (u8, u32) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mq = MockSplitQueue::new(mem, 16);
        mq.add_desc_chains(chain, 0).unwrap();
        let queue = mq.create_queue::<Queue>().unwrap();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt: interrupt.clone(),
            acked_features: 0,
        });
        dev.queue_notify(0);
        let used = mq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(interrupt.status() & INT_USED_RING, INT_USED_RING, "device must interrupt");
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn request(data_flags: u16, data_len: u32) -> Vec<RawDescriptor> {
        vec![desc(HDR, 16, NEXT, 1), desc(DATA, data_len, data_flags | NEXT, 2), desc(STATUS, 1, WRITE, 0)]
    }

    #[test]
    fn write_then_read_round_trips_every_byte_value() {
        let mem = mem();
        let mut dev = Block::new(image(64), false, "disk0").unwrap();
        let pattern: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(run(&mut dev, &mem, T_OUT, 3, &request(0, 1024)), (S_OK, 1));
        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(run(&mut dev, &mem, T_IN, 3, &request(WRITE, 1024)), (S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn out_of_range_and_read_only_requests_fail_with_ioerr() {
        let mem = mem();
        let mut dev = Block::new(image(8), false, "d").unwrap();
        assert_eq!(run(&mut dev, &mem, T_IN, 7, &request(WRITE, 1024)).0, S_IOERR, "past the end");
        assert_eq!(run(&mut dev, &mem, T_IN, u64::MAX / 2, &request(WRITE, 512)).0, S_IOERR, "overflowing sector");
        assert_eq!(run(&mut dev, &mem, T_IN, 0, &request(WRITE, 100)).0, S_IOERR, "not sector aligned");
        assert_eq!(run(&mut dev, &mem, T_IN, 0, &request(0, 512)).0, S_IOERR, "read into a read-only buffer");
        let mut ro = Block::new(image(8), true, "d").unwrap();
        assert_ne!(ro.features() & F_RO, 0);
        assert_eq!(run(&mut ro, &mem, T_OUT, 0, &request(0, 512)).0, S_IOERR);
    }

    #[test]
    fn buffers_outside_guest_memory_fail_without_panicking() {
        let mem = mem();
        let mut dev = Block::new(image(8), false, "d").unwrap();
        let chain = vec![desc(HDR, 16, NEXT, 1), desc(0xfff_0000, 512, WRITE | NEXT, 2), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(run(&mut dev, &mem, T_IN, 0, &chain).0, S_IOERR);
    }

    #[test]
    fn malformed_chains_are_completed_without_a_status() {
        let mem = mem();
        let mut dev = Block::new(image(8), false, "d").unwrap();
        // A header alone: no status descriptor to write; the chain is still returned.
        assert_eq!(run(&mut dev, &mem, T_IN, 0, &[desc(HDR, 16, 0, 0)]), (0xff, 0));
        // A status descriptor the device may not write.
        let chain = vec![desc(HDR, 16, NEXT, 1), desc(STATUS, 1, 0, 0)];
        assert_eq!(run(&mut dev, &mem, T_IN, 0, &chain), (0xff, 0));
    }

    #[test]
    fn flush_id_and_unknown_requests() {
        let mem = mem();
        let mut dev = Block::new(image(8), false, "microcell-vda").unwrap();
        let flush = vec![desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(run(&mut dev, &mem, T_FLUSH, 0, &flush), (S_OK, 1));
        assert_eq!(run(&mut dev, &mem, T_GET_ID, 0, &request(WRITE, 20)), (S_OK, 21));
        let mut id = [0u8; 13];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"microcell-vda");
        assert_eq!(run(&mut dev, &mem, 99, 0, &flush).0, S_UNSUPP);
    }

    #[test]
    fn capacity_is_in_sectors() {
        let dev = Block::new(image(10), false, "d").unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 10);
    }

    #[test]
    fn a_state_of_another_model_is_refused() {
        let mut dev = Block::new(image(8), false, "d").unwrap();
        assert_eq!(dev.save().unwrap().model(), "virtio-block");
        dev.restore(&DeviceState::Block).unwrap();
        let e = dev.restore(&DeviceState::Net).unwrap_err();
        assert_eq!(e.device, "virtio-block");
        assert!(e.reason.contains("virtio-net"), "{e}");
    }
}
