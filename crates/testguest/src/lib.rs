//! The freestanding test guests of microcell, built from C/asm sources (`guest/`) by build.rs,
//! and helpers to drive them: the `tg.*` command line they expect and a parser for their
//! serial report. See README.md and docs/boot-contract.md.

use std::path::PathBuf;

/// Checks the boot contract, entered by PVH.
pub const BOOTCHECK_PVH: &str = "bootcheck.pvh.elf";
/// Checks the boot contract, entered by the Linux 64-bit boot protocol at the ELF's e_entry.
pub const BOOTCHECK_ELF: &str = "bootcheck.elf";
/// Checks the boot contract, entered by the Linux 64-bit boot protocol as a bzImage.
pub const BOOTCHECK_BZIMAGE: &str = "bootcheck.bzimage";
/// First instruction-level port access is a write to the UART THR, then a line and a reset.
pub const HELLO: &str = "hello.pvh.elf";
/// Prints `TG halt` and halts with interrupts off.
pub const HALT: &str = "halt.pvh.elf";
/// Prints `TG spin` and spins with interrupts off.
pub const SPIN: &str = "spin.pvh.elf";
/// Prints `TG triplefault` and triple faults.
pub const TRIPLEFAULT: &str = "triplefault.pvh.elf";
/// Writes a byte to each of `tg.pages=<n>` pages from 16 MiB, prints `TG touched <n>`, halts.
pub const MEMTOUCH: &str = "memtouch.pvh.elf";
/// Drives every `virtio_mmio.device=` of its command line with an interrupt-driven driver
/// (virtio-blk, virtio-console, virtio-net), expectations from [`virtio_cmdline`] (and
/// [`virtio_net_cmdline`]); reports like bootcheck.
pub const VIRTIO: &str = "virtio.pvh.elf";
/// Fills pages from a seed and computes over them in steps (`TG step <i>`), then prints
/// `TG result <hex>` (= [`compute_expected`]) and resets; command line from [`compute_cmdline`].
pub const COMPUTE: &str = "compute.pvh.elf";

/// Touches `tg.pages=<n>` pages like memtouch, then loops forever doing one port read (one exit)
/// per iteration, printing `TG tick <k>` every `tg.every=<n>` iterations (reset after
/// `tg.ticks=<n>`, if given): a restored clone's first exit follows its restore at once.
pub const IOLOOP: &str = "ioloop.pvh.elf";

/// Every guest image, by file name.
pub const ALL: &[&str] = &[
    BOOTCHECK_PVH,
    BOOTCHECK_ELF,
    BOOTCHECK_BZIMAGE,
    HELLO,
    HALT,
    SPIN,
    TRIPLEFAULT,
    MEMTOUCH,
    VIRTIO,
    COMPUTE,
    IOLOOP,
];

/// The directory build.rs wrote the images to.
pub const DIR: &str = env!("TESTGUEST_DIR");

/// The path of a guest image. Panics on a name not in [`ALL`].
pub fn path(name: &str) -> PathBuf {
    assert!(ALL.contains(&name), "no test guest named {name:?} (have {ALL:?})");
    PathBuf::from(DIR).join(name)
}

/// Whether a guest is entered by PVH (its ELF has the `XEN_ELFNOTE_PHYS32_ENTRY` note).
pub fn is_pvh(name: &str) -> bool {
    name.ends_with(".pvh.elf")
}

/// FNV-1a 32, as the guests compute it over the initrd.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// The expectations bootcheck reads from its command line:
/// `tg.mem=<MiB> tg.cpus=<n> tg.initrd=<size>:<fnv1a32, 8 hex digits>|none`.
pub fn bootcheck_cmdline(mem_mib: u64, cpus: u32, initrd: Option<&[u8]>) -> String {
    let initrd = match initrd {
        Some(d) => format!("{}:{:08x}", d.len(), fnv1a32(d)),
        None => "none".to_string(),
    };
    format!("tg.mem={mem_mib} tg.cpus={cpus} tg.initrd={initrd}")
}

/// What the virtio guest expects, in MMIO order of the block devices: `disks` are (image
/// content, read-only); `consoles` is how many virtio-console devices there are. Gives
/// `tg.nblk=<n> tg.ncon=<n>` and per disk `tg.blk<i>=<sectors>:<fnv1a32 of the first 8 sectors>`
/// (and `tg.blk<i>ro=1`). Images must be multiples of 512 bytes, at least 12 sectors.
pub fn virtio_cmdline(disks: &[(&[u8], bool)], consoles: u32) -> String {
    let mut s = format!("tg.nblk={} tg.ncon={consoles}", disks.len());
    for (i, (data, ro)) in disks.iter().enumerate() {
        let head = &data[..data.len().min(VIRTIO_CHECKED_SECTORS * 512)];
        s += &format!(" tg.blk{i}={}:{:08x}", data.len() / 512, fnv1a32(head));
        if *ro {
            s += &format!(" tg.blk{i}ro=1");
        }
    }
    s
}

/// What the virtio guest expects of net device `index` (in MMIO order of the net devices):
/// `tg.net<i>=<mac>,<guest ip>,<gateway ip>,<udp port>,<reply|blocked>`, e.g.
/// `tg.net0=02:4d:43:00:00:01,10.0.2.15,10.0.2.2,5555,reply`. The caller adds `tg.nnet=<n>`
/// (absent means no net devices). The guest ARPs for the gateway, then sends UDP from
/// `guest_ip:`[`VIRTIO_NET_GUEST_UDP_PORT`] to `gateway_ip:udp_port` ([`VIRTIO_NET_PING`], then
/// [`VIRTIO_NET_BATCH`] datagrams of [`virtio_net_batch_payload`]) and expects each back with every
/// payload byte XOR [`VIRTIO_ECHO_XOR`] (`expect_reply`), or no reply within 500 ms.
pub fn virtio_net_cmdline(
    index: usize,
    mac: [u8; 6],
    guest_ip: [u8; 4],
    gateway_ip: [u8; 4],
    udp_port: u16,
    expect_reply: bool,
) -> String {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let ip = |a: [u8; 4]| a.map(|b| b.to_string()).join(".");
    let expect = if expect_reply { "reply" } else { "blocked" };
    format!("tg.net{index}={mac},{},{},{udp_port},{expect}", ip(guest_ip), ip(gateway_ip))
}

/// The UDP port the virtio guest sends from (and expects replies to) on every net device.
pub const VIRTIO_NET_GUEST_UDP_PORT: u16 = 40000;
/// How many datagrams `net<i>.udp_batch` makes available at once (under one notification).
pub const VIRTIO_NET_BATCH: usize = 32;
/// The payload of the single datagram of `net<i>.udp` (guest/virtio.c `NET_PING`).
pub const VIRTIO_NET_PING: &[u8] = b"microcell net ping";

/// The payload of batch datagram `i` (< [`VIRTIO_NET_BATCH`]): `microcell net batch NN`.
pub fn virtio_net_batch_payload(i: usize) -> Vec<u8> {
    format!("microcell net batch {i:02}").into_bytes()
}

/// Sectors at the start of each disk whose checksum the virtio guest compares.
pub const VIRTIO_CHECKED_SECTORS: usize = 8;
/// The virtio guest writes [`virtio_blk_pattern`] to this many sectors at the end of each
/// writable disk.
pub const VIRTIO_WRITTEN_SECTORS: usize = 4;
/// What the virtio guest expects the host to do to every byte it echoes (console bytes, UDP
/// payloads).
pub const VIRTIO_ECHO_XOR: u8 = 0x5a;
/// What the virtio guest expects to receive on the console port first, before it sends anything
/// (the host writes it as soon as the VM starts; guest/virtio.c `CON_GREETING`).
pub const VIRTIO_GREETING: &[u8] = b"microcell host says hello\n";

/// With `tg.clone=1` the virtio guest overwrites this many pages with a byte from the host...
pub const VIRTIO_CLONE_PAGES: usize = 16;
/// ...which hold this byte before (from its start, so in any snapshot taken before the write).
pub const VIRTIO_CLONE_FILL: u8 = 0x11;

/// Byte `offset` of `sector` as the virtio guest writes it (guest/virtio.c `blk_pattern`).
pub fn virtio_blk_pattern(sector: u64, offset: usize) -> u8 {
    ((offset as u64 * 7) ^ (sector * 29) ^ 0xc3) as u8
}

/// What the compute guest runs: `pages` pages (1..=4096) filled from `seed`, `steps` steps of
/// `rounds` passes over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compute {
    pub seed: u64,
    pub pages: u64,
    pub steps: u64,
    pub rounds: u64,
}

/// Words used at the start of each page, and pages rewritten per step (guest/compute.c).
pub const COMPUTE_WORDS: usize = 8;
pub const COMPUTE_WINDOW: u64 = 2;
/// Guest-physical address of the compute guest's first page; its marker page is right below.
pub const COMPUTE_REGION: u64 = 16 << 20;

/// `tg.seed=<hex> tg.pages=<n> tg.steps=<n> tg.rounds=<n>`.
pub fn compute_cmdline(c: &Compute) -> String {
    format!("tg.seed={:#x} tg.pages={} tg.steps={} tg.rounds={}", c.seed, c.pages, c.steps, c.rounds)
}

/// The compute guest's `TG result`, computed on the host (guest/compute.c, step by step).
pub fn compute_expected(c: &Compute) -> u64 {
    let xorshift = |s: &mut u64| {
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        x
    };
    let mut s = c.seed ^ 0x9e37_79b9_7f4a_7c15;
    if s == 0 {
        s = 1;
    }
    let mut mem: Vec<[u64; COMPUTE_WORDS]> = (0..c.pages).map(|_| std::array::from_fn(|_| xorshift(&mut s))).collect();
    let mut acc = c.seed;
    for i in 1..=c.steps {
        for _ in 0..c.rounds {
            for page in &mem {
                for &w in page {
                    acc = (acc ^ w).wrapping_mul(0x100_0000_01b3);
                    acc ^= acc >> 29;
                }
            }
        }
        for j in 0..COMPUTE_WINDOW {
            let p = (((i - 1) * COMPUTE_WINDOW + j) % c.pages) as usize;
            for (k, w) in mem[p].iter_mut().enumerate() {
                *w = w.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(acc).wrapping_add(k as u64);
            }
        }
    }
    (acc ^ c.seed).wrapping_mul(0x100_0000_01b3)
}

/// The compute guest's result line: `TG result <hex>` as the guest prints it.
pub fn compute_result_line(c: &Compute) -> String {
    format!("TG result {:#x}", compute_expected(c))
}

/// A bootcheck report, parsed from the serial output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// From `TG begin <guest> entry=<entry>`.
    pub guest: Option<String>,
    pub entry: Option<String>,
    /// From `TG cmdline <...>`.
    pub cmdline: Option<String>,
    /// `TG ok <check>`, in order.
    pub passed: Vec<String>,
    /// `TG FAIL <check>: <detail>`, in order.
    pub failed: Vec<(String, String)>,
    /// From `TG done pass=<n> fail=<n>`.
    pub done: Option<(u32, u32)>,
    /// `TG info <text>`: measurements, not checks (the virtio guest's interrupt counts).
    pub info: Vec<String>,
    /// Lines that do not follow the format (there should be none).
    pub malformed: Vec<String>,
}

impl Report {
    pub fn parse(serial: &str) -> Report {
        let mut r = Report::default();
        for line in serial.lines() {
            if let Some(rest) = line.strip_prefix("TG begin ") {
                match rest.split_once(" entry=") {
                    Some((g, e)) => (r.guest, r.entry) = (Some(g.into()), Some(e.into())),
                    None => r.malformed.push(line.into()),
                }
            } else if let Some(rest) = line.strip_prefix("TG cmdline ") {
                r.cmdline = Some(rest.into());
            } else if line == "TG cmdline" {
                r.cmdline = Some(String::new());
            } else if let Some(text) = line.strip_prefix("TG info ") {
                r.info.push(text.into());
            } else if let Some(check) = line.strip_prefix("TG ok ") {
                r.passed.push(check.into());
            } else if let Some(rest) = line.strip_prefix("TG FAIL ") {
                match rest.split_once(": ") {
                    Some((c, d)) => r.failed.push((c.into(), d.into())),
                    None => r.malformed.push(line.into()),
                }
            } else if let Some(rest) = line.strip_prefix("TG done ") {
                let n = |k: &str| rest.split(' ').find_map(|w| w.strip_prefix(k)?.parse().ok());
                match (n("pass="), n("fail=")) {
                    (Some(p), Some(f)) => r.done = Some((p, f)),
                    _ => r.malformed.push(line.into()),
                }
            } else {
                r.malformed.push(line.into());
            }
        }
        r
    }

    /// Complete (begin and done seen, counts agree) with no failures and no stray lines.
    pub fn all_passed(&self) -> bool {
        self.guest.is_some()
            && self.failed.is_empty()
            && self.malformed.is_empty()
            && self.done == Some((self.passed.len() as u32, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_cmdline() {
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(bootcheck_cmdline(256, 1, None), "tg.mem=256 tg.cpus=1 tg.initrd=none");
        assert_eq!(bootcheck_cmdline(64, 2, Some(b"a")), "tg.mem=64 tg.cpus=2 tg.initrd=1:e40c292c");
    }

    #[test]
    fn parse_report() {
        let r = Report::parse(
            "TG begin bootcheck entry=pvh\nTG cmdline tg.mem=256\nTG ok a\nTG FAIL b: got 0x1, want 0x2\nTG done pass=1 fail=1\n",
        );
        assert_eq!(r.guest.as_deref(), Some("bootcheck"));
        assert_eq!(r.entry.as_deref(), Some("pvh"));
        assert_eq!(r.cmdline.as_deref(), Some("tg.mem=256"));
        assert_eq!(r.passed, ["a"]);
        assert_eq!(r.failed, [("b".to_string(), "got 0x1, want 0x2".to_string())]);
        assert_eq!(r.done, Some((1, 1)));
        assert!(r.malformed.is_empty());
        assert!(!r.all_passed());
        assert!(Report::parse("TG begin x entry=pvh\nTG ok a\nTG done pass=1 fail=0\n").all_passed());
        let r = Report::parse("TG begin x entry=pvh\nTG info irq blk0 count=3\nTG ok a\nTG done pass=1 fail=0\n");
        assert_eq!(r.info, ["irq blk0 count=3"]);
        assert!(r.all_passed());
    }

    #[test]
    fn compute_expectations() {
        let c = Compute { seed: 0x1234, pages: 64, steps: 8, rounds: 1 };
        assert_eq!(compute_cmdline(&c), "tg.seed=0x1234 tg.pages=64 tg.steps=8 tg.rounds=1");
        // What compute.pvh.elf printed for it under KVM.
        assert_eq!(compute_result_line(&c), "TG result 0xedcb40c4d9e96d95");
    }

    #[test]
    fn virtio_expectations() {
        let disk = vec![0u8; 16 * 512];
        let cmdline = virtio_cmdline(&[(&disk, false), (&disk[..12 * 512], true)], 1);
        let fnv = fnv1a32(&disk[..8 * 512]);
        assert_eq!(cmdline, format!("tg.nblk=2 tg.ncon=1 tg.blk0=16:{fnv:08x} tg.blk1=12:{fnv:08x} tg.blk1ro=1"));
        assert_eq!(virtio_blk_pattern(0, 0), 0xc3);
        assert_eq!(
            virtio_net_cmdline(0, [2, 0x4d, 0x43, 0, 0, 1], [10, 0, 2, 15], [10, 0, 2, 2], 5555, true),
            "tg.net0=02:4d:43:00:00:01,10.0.2.15,10.0.2.2,5555,reply"
        );
        assert_eq!(
            virtio_net_cmdline(1, [0xaa; 6], [192, 168, 1, 10], [192, 168, 1, 1], 9, false),
            "tg.net1=aa:aa:aa:aa:aa:aa,192.168.1.10,192.168.1.1,9,blocked"
        );
        assert_eq!(virtio_net_batch_payload(7), b"microcell net batch 07");
        assert_eq!(virtio_blk_pattern(1, 1), 0xc3 ^ 29 ^ 7);
    }
}
