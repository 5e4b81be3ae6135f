//! T1 for the built-in VMM's network: passt (engine/passt.rs) behind a frame stream, first
//! driven from here with hand-made frames, then by the virtio test guest (crates/testguest)
//! through the VMM's virtio-net device on /dev/kvm (PVM included). The "outside" is a UDP echo
//! server on this host's loopback, which the guest reaches as the gateway 10.0.2.2.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../vmm/tests/common/kvm.rs"]
mod kvm;
use kvm::require_kvm;

use sandbox::engine::passt::{self, Passt};
use sandbox::engine::{EngineKind, NetSpec, PortForward};

const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// passt is part of the set-up (scripts/setup.sh installs it): a missing one fails the test.
fn require_passt(test: &str) {
    if let Err(e) = passt::find_passt() {
        panic!("{test}: needs passt (./scripts/setup.sh installs it): {e}");
    }
}

fn run_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A UDP server on 127.0.0.1 that sends every datagram back XOR 0x5a; counts what it got.
fn echo_server() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            seen.lock().unwrap().push(buf[..n].to_vec());
            let reply: Vec<u8> = buf[..n].iter().map(|b| b ^ testguest::VIRTIO_ECHO_XOR).collect();
            let _ = sock.send_to(&reply, from);
        }
    });
    (port, got)
}

/// One write per frame, as the VMM's device writes them.
fn send_frame(s: &mut UnixStream, f: &[u8]) {
    let mut framed = (f.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(f);
    s.write_all(&framed).unwrap();
}

/// The next frame passt sends whose ethertype is `ethertype`, within 5 s.
fn recv_frame(s: &mut UnixStream, ethertype: u16) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .unwrap_or_else(|e| panic!("a frame of type {ethertype:#06x} from passt within 5 s: {e}"));
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ethertype {
            return f;
        }
        say(&format!("skipped frame {:02x?}", &f[..f.len().min(48)]));
    }
}

fn arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY_IP);
    f
}

fn udp_frame(src_mac: [u8; 6], dst_mac: &[u8], dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&GATEWAY_IP);
    let total = (20 + 8 + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let sum = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&dst_port.to_be_bytes());
    ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

#[test]
fn passt_answers_for_the_gateway_and_carries_udp_to_the_hosts_loopback() {
    require_passt("passt");
    let (port, got) = echo_server();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let dir = run_dir();
    let t = Instant::now();
    let _passt = Passt::start(theirs, &NetSpec { outbound: true, ..Default::default() }, dir.path(), EngineKind::Kvm)
        .expect("passt starts");
    say(&format!("passt ready in {} ms", t.elapsed().as_millis()));
    let mac = passt::GUEST_MAC;
    send_frame(&mut ours, &arp_request(mac));
    let reply = recv_frame(&mut ours, 0x0806);
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[28..32], &GATEWAY_IP, "for the gateway");
    let gateway_mac = reply[22..28].to_vec();
    send_frame(&mut ours, &udp_frame(mac, &gateway_mac, port, b"from the guest"));
    let back = recv_frame(&mut ours, 0x0800);
    let payload = &back[14 + 20 + 8..];
    let expected: Vec<u8> = b"from the guest".iter().map(|b| b ^ testguest::VIRTIO_ECHO_XOR).collect();
    assert_eq!(payload, &expected[..]);
    assert_eq!(got.lock().unwrap().as_slice(), &[b"from the guest".to_vec()]);
}

#[test]
fn a_taken_host_port_is_a_coded_error_that_names_it() {
    require_passt("passt port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let dir = run_dir();
    let err = Passt::start(
        theirs,
        &NetSpec {
            outbound: true,
            ports: vec![PortForward { host: port, guest: 80, udp: false }],
            ..Default::default()
        },
        dir.path(),
        EngineKind::Kvm,
    )
    .err()
    .expect("refused");
    assert_eq!(err.code(), "E_ENGINE_START");
    assert!(err.to_string().contains(&format!("host TCP port {port}")), "{err}");
}

#[test]
fn passt_goes_when_dropped_and_when_the_vm_end_closes() {
    require_passt("passt lifetime");
    // Whether a process runs (a zombie has exited; a reaped one is gone).
    let runs = |pid: u32| -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
    };
    let dir = run_dir();
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let p =
        Passt::start(theirs, &NetSpec { outbound: true, ..Default::default() }, dir.path(), EngineKind::Kvm).unwrap();
    let pid = p.pid();
    assert!(runs(pid));
    drop(p);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped on drop");

    let (ours, theirs) = UnixStream::pair().unwrap();
    let p =
        Passt::start(theirs, &NetSpec { outbound: true, ..Default::default() }, dir.path(), EngineKind::Kvm).unwrap();
    let pid = p.pid();
    drop(ours); // the VM's end: the VM has gone
    let t = Instant::now();
    while runs(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!runs(pid), "passt exits by itself when the VM's end closes");
    drop(p);
}

/// The serial console, kept.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The virtio test guest with `cmdline` and a net device for `net`.
fn virtio_guest(cmdline: String, net: &NetSpec) -> vmm::VmConfig {
    vmm::VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: testguest::path(testguest::VIRTIO),
        cmdline,
        network: Some(passt::network_config(net)),
        ..Default::default()
    }
}

/// Boots the virtio test guest with one net device behind passt, with a UDP echo server on the
/// host's loopback; `net(port)` is the network for the server's port, `reply` whether the guest
/// should hear back. Returns the guest's report, its console and what the server got.
fn run_net_guest(net: impl Fn(u16) -> NetSpec, reply: bool) -> (testguest::Report, String, Vec<Vec<u8>>) {
    let (port, got) = echo_server();
    let net = net(port);
    let cmdline = format!(
        "tg.nblk=0 tg.ncon=0 tg.nnet=1 {}",
        testguest::virtio_net_cmdline(0, passt::GUEST_MAC, GUEST_IP, GATEWAY_IP, port, reply)
    );
    let config = virtio_guest(cmdline, &net);
    let console = Capture::default();
    let t = Instant::now();
    let vm = vmm::Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let dir = run_dir();
    let _passt = Passt::start(vm.take_network().expect("a network socket"), &net, dir.path(), EngineKind::Kvm)
        .expect("passt starts");
    let reason = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        vm.kill();
        panic!("guest did not end within 60 s; console:\n{}", String::from_utf8_lossy(&console.0.lock().unwrap()))
    });
    assert_eq!(reason, vmm::ExitReason::Reset);
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    say(&format!("virtio-net guest ({net:?}) ran in {:?}", t.elapsed()));
    let got = got.lock().unwrap().clone();
    (testguest::Report::parse(&out), out, got)
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn the_virtio_net_guest_reaches_the_host_through_passt() {
    require_kvm();
    require_passt("virtio-net guest");
    let (report, out, got) = run_net_guest(|_| NetSpec { outbound: true, ..Default::default() }, true);
    assert!(report.all_passed(), "failed: {:?}\nconsole:\n{out}", report.failed);
    for check in ["net0.features", "net0.mac", "net0.arp", "net0.udp", "net0.udp_batch", "net0.interrupts"] {
        assert!(report.passed.iter().any(|c| c == check), "{check} did not run:\n{out}");
    }
    // The device writes num_buffers = 1, as the spec says (QEMU leaves it 0).
    assert!(out.contains("num_buffers_unset=0"), "{out}");
    let mut expected = vec![testguest::VIRTIO_NET_PING.to_vec()];
    expected.extend((0..testguest::VIRTIO_NET_BATCH).map(testguest::virtio_net_batch_payload));
    let mut seen = got.clone();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "the host server got each datagram once");
    for line in out.lines().filter(|l| l.starts_with("TG info net0") || l.starts_with("TG info irq net0")) {
        say(line);
    }
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn without_outbound_the_device_drops_what_the_guest_sends_but_arp() {
    require_kvm();
    require_passt("virtio-net egress");
    let (report, out, got) = run_net_guest(|_| NetSpec::default(), false);
    assert!(report.all_passed(), "failed: {:?}\nconsole:\n{out}", report.failed);
    assert!(report.passed.iter().any(|c| c == "net0.arp"), "ARP still resolves:\n{out}");
    assert!(got.is_empty(), "nothing reached the host: {got:?}");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn without_outbound_a_forwarded_udp_port_still_answers() {
    require_kvm();
    require_passt("virtio-net udp port");
    // The guest sends from its UDP port 40000: forwarded, its datagrams pass as answers.
    let guest_port = testguest::VIRTIO_NET_GUEST_UDP_PORT;
    let spare = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (report, out, got) = run_net_guest(
        |_| NetSpec { ports: vec![PortForward { host: spare, guest: guest_port, udp: true }], ..Default::default() },
        true,
    );
    assert!(report.all_passed(), "failed: {:?}\nconsole:\n{out}", report.failed);
    assert_eq!(got.len(), 1 + testguest::VIRTIO_NET_BATCH, "every datagram reached the host");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_restored_vm_announces_the_guests_mac_to_its_new_network() {
    require_kvm();
    let net = NetSpec { outbound: true, ..Default::default() };
    // The guest waits long for an ARP answer nobody gives: a point to snapshot at with the
    // device active.
    let cmdline = format!(
        "tg.nblk=0 tg.ncon=0 tg.nnet=1 tg.wait_ms=30000 {}",
        testguest::virtio_net_cmdline(0, passt::GUEST_MAC, GUEST_IP, GATEWAY_IP, 9, true)
    );
    let config = virtio_guest(cmdline, &net);
    let vm = vmm::Vm::start(&config, Box::new(Capture::default())).expect("VM starts");
    let mut stream = vm.take_network().unwrap();
    let arp = recv_frame(&mut stream, 0x0806);
    assert_eq!(&arp[6..12], &passt::GUEST_MAC, "the guest's ARP request: its driver is up");
    let dir = run_dir();
    vm.snapshot(dir.path(), false).expect("snapshot");
    vm.kill();
    let snapshot = vmm::LoadedSnapshot::load(dir.path()).unwrap();
    let clone =
        vmm::Vm::restore(&snapshot, Box::new(Capture::default()), vmm::RestoreOptions::default()).expect("restore");
    let mut stream = clone.take_network().expect("a new network socket");
    let first = recv_frame(&mut stream, 0x8035);
    assert_eq!(&first[6..12], &passt::GUEST_MAC, "a RARP announce from the guest's MAC");
    clone.kill();
}
