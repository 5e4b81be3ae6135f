//! The network behind a VM, on either engine: passt (<https://passt.top>), user-mode networking
//! in a process of its own, joined to the VM's virtio-net by a socketpair it gets as `--fd`
//! (each frame after its 4-byte length, passt's framing). The built-in VMM's device writes to
//! it directly; QEMU's (`-netdev socket`) goes through [`filter`]'s threads.
//!
//! The guest gets slirp's familiar addresses ([`GUEST_NET`]): `10.0.2.15/24`, the host's
//! loopback as the gateway `10.0.2.2`, DNS forwarded from `10.0.2.3` to the host's resolver,
//! forwarded TCP ports on the host's `127.0.0.1`. passt needs no privileges and keeps no state
//! a snapshot must hold: a restored VM gets a new passt. What the guest may send is the egress
//! policy (`vmm::EgressPolicy`), checked on every frame before passt sees it.
//!
//! The process is tied to ours (killed with it), killed and reaped when the VM is dropped, and
//! exits by itself when the VM's end of the socket closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{spawn, EngineKind, NetSpec, Tail, GUEST_NET};
use crate::error::{Result, SandboxError};

const PASST_BINARY: &str = "passt";
const INSTALL: &str = "install it with `apt-get install passt` (Debian/Ubuntu) or your distribution's passt package, \
                       or set MICROCELL_PASST to the binary";
/// How long passt may take to bind its ports and say so (its pid file); ~20 ms here.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest's MAC address: one per VM is enough, each VM has a passt of its own.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x43, 0x00, 0x00, 0x01];

/// Finds passt: `MICROCELL_PASST` (a path), else `passt` on `PATH`. The error says how to get it.
pub fn find_passt() -> std::result::Result<PathBuf, String> {
    spawn::find_program("MICROCELL_PASST", PASST_BINARY).map_err(|e| format!("{e}: {INSTALL}"))
}

/// The VMM's network device for a spec: the guest MAC, and the egress policy from `outbound`
/// and the forwarded ports (the guest may answer on those either way).
pub fn network_config(net: &NetSpec) -> vmm::NetworkConfig {
    vmm::NetworkConfig {
        mac: GUEST_MAC,
        egress: vmm::EgressPolicy {
            outbound: net.outbound,
            inbound_tcp_ports: net.ports.iter().filter(|p| !p.udp).map(|p| p.guest).collect(),
            inbound_udp_ports: net.ports.iter().filter(|p| p.udp).map(|p| p.guest).collect(),
            deny: net.deny.clone(),
            allow: net.allow.clone(),
            dns: GUEST_NET.2.parse::<std::net::Ipv4Addr>().ok().map(|a| a.octets()),
        },
    }
}

/// passt's arguments for `net`, with the VM's socket as `fd` and the pid file it writes once
/// its ports are bound.
pub fn args(net: &NetSpec, fd: i32, pid_file: &Path) -> Vec<String> {
    let (addr, gateway, dns) = GUEST_NET;
    let (ip, prefix) = addr.split_once('/').unwrap_or((addr, "24"));
    let mut a: Vec<String> =
        ["--foreground", "--quiet", "--fd", &fd.to_string(), "--pid"].iter().map(|s| s.to_string()).collect();
    a.push(pid_file.display().to_string());
    a.extend(
        [
            "--ipv4-only",
            "--address",
            ip,
            "--netmask",
            prefix,
            "--gateway",
            gateway,
            "--mtu",
            "1500",
            "--dns-forward",
            dns,
            "--dns",
            dns,
            "--no-dhcp",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for p in &net.ports {
        a.push(if p.udp { "--udp-ports" } else { "--tcp-ports" }.into());
        a.push(format!("127.0.0.1/{}:{}", p.host, p.guest));
    }
    a
}

fn start_error(engine: EngineKind, message: String) -> SandboxError {
    SandboxError::EngineStart { engine: engine.name(), message }
}

/// A running passt, killed and reaped on drop.
pub struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt on `socket` (the VM's `Vm::take_network()`, or [`filter`]'s) and waits until
    /// its ports are bound. `run_dir` holds its pid file; errors name `engine`.
    pub fn start(socket: UnixStream, net: &NetSpec, run_dir: &Path, engine: EngineKind) -> Result<Passt> {
        let start_error = |message| start_error(engine, message);
        let binary =
            find_passt().map_err(|reason| SandboxError::EngineUnavailable { engine: engine.name(), reason })?;
        // A taken host port is the likely failure: say which, before passt exits over it.
        for p in &net.ports {
            let taken = if p.udp {
                UdpSocket::bind((Ipv4Addr::LOCALHOST, p.host)).err()
            } else {
                TcpListener::bind((Ipv4Addr::LOCALHOST, p.host)).err()
            };
            if let Some(e) = taken {
                let protocol = if p.udp { "UDP" } else { "TCP" };
                return Err(start_error(format!(
                    "host {protocol} port {} cannot be forwarded to the guest's port {} ({e}): choose another host port",
                    p.host, p.guest
                )));
            }
        }
        // passt started as root drops to `nobody` before it opens its pid file, which then could
        // not reach a file in our private run directory by its path; it gets the file as an
        // inherited fd instead (`/proc/self/fd/N` needs no access to the directory).
        let pid_path = run_dir.join("passt.pid");
        let pid_file = std::fs::File::create(&pid_path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o622)).map(|()| f))
            .map_err(|e| start_error(format!("cannot create {} ({e})", pid_path.display())))?;
        let (fd, pid_fd) = (socket.as_raw_fd(), pid_file.as_raw_fd());
        let mut cmd = Command::new(&binary);
        cmd.args(args(net, fd, Path::new(&format!("/proc/self/fd/{pid_fd}"))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                spawn::die_with_parent(parent)?;
                // Both cross exec (std opens every fd close-on-exec).
                for keep in [fd, pid_fd] {
                    if libc::fcntl(keep, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = spawn::spawn(cmd)
            .map_err(|e| start_error(format!("cannot start {} ({e}): {INSTALL}", binary.display())))?;
        drop((socket, pid_file));
        let stderr = Tail::new(2 << 10);
        if let Some(out) = child.stderr.take() {
            let tail = stderr.clone();
            let _ = std::thread::Builder::new().name("mc-passt-log".into()).spawn(move || {
                for line in BufReader::new(out).lines().map_while(std::result::Result::ok) {
                    tracing::debug!(target: "microcell::passt", "{line}");
                    tail.push(format!("{line}\n").as_bytes());
                }
            });
        }
        let mut passt = Passt { child };
        let started = Instant::now();
        loop {
            if std::fs::read_to_string(&pid_path).is_ok_and(|s| !s.trim().is_empty()) {
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "passt ready");
                return Ok(passt);
            }
            if let Ok(Some(status)) = passt.child.try_wait() {
                std::thread::sleep(Duration::from_millis(20)); // let the log thread read the last words
                return Err(start_error(format!("passt exited at start ({status}): {}", stderr.text(5).trim())));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(start_error(format!(
                    "passt did not start within {READY_TIMEOUT:?}: {}",
                    stderr.text(5).trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Passt {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Puts the egress policy between a VM whose network device does not apply it (QEMU's
/// virtio-net) and passt: returns the socket to give passt. Two threads copy frames, the guest's
/// through `policy`, passt's as they come; when either side closes, both sockets are shut down
/// and the threads end (QEMU gone → passt sees EOF and exits, and the reverse).
pub fn filter(vm: UnixStream, policy: vmm::LivePolicy) -> std::io::Result<UnixStream> {
    let (ours, for_passt) = UnixStream::pair()?;
    for s in [&vm, &ours, &for_passt] {
        vmm::size_stream_buffers(s);
    }
    let (vm_reader, ours_writer) = (vm.try_clone()?, ours.try_clone()?);
    std::thread::Builder::new().name("mc-net-out".into()).spawn(move || {
        // Buffered: a guest frame is two reads (its length, then it), mostly of one buffer.
        let _ = guest_frames(BufReader::with_capacity(256 << 10, vm_reader), &ours_writer, &policy);
        let _ = ours_writer.shutdown(std::net::Shutdown::Both);
    })?;
    std::thread::Builder::new().name("mc-net-in".into()).spawn(move || {
        // passt to the guest: the stream as it is (QEMU reassembles frames across reads), in
        // large reads (io::copy's 8 KiB would be four syscalls a 64 KiB frame).
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = (&ours).read(&mut buf) {
            if n == 0 || (&vm).write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = vm.shutdown(std::net::Shutdown::Both);
        let _ = ours.shutdown(std::net::Shutdown::Both);
    })?;
    Ok(for_passt)
}

/// Copies length-prefixed frames from `vm` to `out` while `policy` allows them, one write per
/// frame (see the VMM's net device); ends at EOF or on a stream that is not frames.
fn guest_frames(mut vm: impl Read, mut out: &UnixStream, policy: &vmm::LivePolicy) -> std::io::Result<()> {
    let mut frame = Vec::new();
    loop {
        let mut prefix = [0u8; 4];
        vm.read_exact(&mut prefix)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > vmm::MAX_FRAME {
            tracing::error!("the VM sent a frame of {len} bytes (at most {}): its network is stopped", vmm::MAX_FRAME);
            return Ok(());
        }
        frame.clear();
        frame.extend_from_slice(&prefix);
        frame.resize(4 + len, 0);
        vm.read_exact(&mut frame[4..])?;
        if policy.allows(&frame[4..]) {
            out.write_all(&frame)?;
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PortForward;
    use std::time::Duration;

    #[test]
    fn args_give_the_guest_slirps_addresses_and_forward_host_loopback_ports() {
        let net = NetSpec {
            ports: vec![
                PortForward { host: 8080, guest: 80, udp: false },
                PortForward { host: 2222, guest: 22, udp: false },
                PortForward { host: 5353, guest: 53, udp: true },
            ],
            ..Default::default()
        };
        let a = args(&net, 7, Path::new("/run/x/passt.pid")).join(" ");
        assert!(a.starts_with("--foreground --quiet --fd 7 --pid /run/x/passt.pid --ipv4-only"), "{a}");
        assert!(a.contains("--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2"), "{a}");
        assert!(a.contains("--dns-forward 10.0.2.3 --dns 10.0.2.3"), "{a}");
        assert!(
            a.ends_with("--tcp-ports 127.0.0.1/8080:80 --tcp-ports 127.0.0.1/2222:22 --udp-ports 127.0.0.1/5353:53"),
            "{a}"
        );
    }

    #[test]
    fn the_filter_passes_allowed_guest_frames_whole_and_the_networks_stream_as_is() {
        let (mut vm, qemu_end) = UnixStream::pair().unwrap();
        let mut passt_end = filter(qemu_end, vmm::LivePolicy::default()).unwrap();
        passt_end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        vm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let frame = |ethertype: u16, len: usize| {
            let mut f = vec![0xff; 12];
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.resize(len, 0xab);
            let mut framed = (f.len() as u32).to_be_bytes().to_vec();
            framed.extend(f);
            framed
        };
        // An IPv4 frame (refused without outbound), then ARP, written in pieces.
        let (ipv4, arp) = (frame(0x0800, 60), frame(0x0806, 42));
        let both = [ipv4.clone(), arp.clone()].concat();
        for piece in both.chunks(7) {
            vm.write_all(piece).unwrap();
        }
        let mut got = vec![0u8; arp.len()];
        passt_end.read_exact(&mut got).unwrap();
        assert_eq!(got, arp, "only the ARP frame, whole");
        // The other way the bytes pass untouched.
        passt_end.write_all(&ipv4).unwrap();
        let mut back = vec![0u8; ipv4.len()];
        vm.read_exact(&mut back).unwrap();
        assert_eq!(back, ipv4);
        // The VM's end closing closes passt's.
        drop(vm);
        let mut rest = Vec::new();
        assert_eq!(passt_end.read_to_end(&mut rest).unwrap(), 0, "EOF for passt");
    }

    #[test]
    fn the_egress_policy_follows_outbound_and_lets_the_guest_answer_on_forwarded_ports() {
        let deny: Vec<vmm::Ipv4Net> = vec!["10.0.0.0/8".parse().unwrap()];
        let net = NetSpec {
            outbound: false,
            ports: vec![
                PortForward { host: 8080, guest: 80, udp: false },
                PortForward { host: 5353, guest: 53, udp: true },
            ],
            deny: deny.clone(),
            allow: vec![],
        };
        let c = network_config(&net);
        assert_eq!(c.mac, GUEST_MAC);
        assert_eq!(
            c.egress,
            vmm::EgressPolicy {
                outbound: false,
                inbound_tcp_ports: vec![80],
                inbound_udp_ports: vec![53],
                deny,
                allow: vec![],
                dns: Some([10, 0, 2, 3])
            }
        );
        assert!(network_config(&NetSpec { outbound: true, ..Default::default() }).egress.outbound);
    }
}
