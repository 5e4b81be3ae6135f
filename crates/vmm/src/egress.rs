//! What the guest may send: the egress policy applied to every frame the guest transmits, before
//! it leaves the VM: by the virtio-net device here, and by whatever relays the frames of a VM
//! this VMM does not run (a `LivePolicy` is shared, so a change reaches every user at once).
//! The host-side network (passt, a tap) then never sees a dropped frame, whatever the guest does.

use serde::{Deserialize, Serialize};

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER: usize = 40;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicy {
    /// The guest may open connections and send datagrams (to the destinations below).
    pub outbound: bool,
    /// TCP ports the guest serves (forwarded to it from the host). The guest may always answer
    /// on these, whatever else is refused: its segments from them pass when they acknowledge or
    /// reset (a bare SYN from one would be the guest opening a connection).
    #[serde(default)]
    pub inbound_tcp_ports: Vec<u16>,
    /// UDP ports the guest serves: its datagrams from them always pass (UDP has no handshake
    /// to tell an answer by; the network behind forwards answers to whoever asked).
    #[serde(default)]
    pub inbound_udp_ports: Vec<u16>,
    /// With `outbound`: IPv4 networks the guest may not reach (a deny rule also stops IPv6,
    /// which the rules cannot describe)...
    #[serde(default)]
    pub deny: Vec<Ipv4Net>,
    /// ...except these, which pass even inside a denied network.
    #[serde(default)]
    pub allow: Vec<Ipv4Net>,
    /// The guest's DNS server: with `outbound`, port 53 on it always passes (names must resolve
    /// for the allowed destinations to be found).
    #[serde(default)]
    pub dns: Option<[u8; 4]>,
}

/// The policy a running VM's frames are checked against, changeable while they flow: the
/// device (or a filter before the network) and its owner share it.
#[derive(Clone, Debug, Default)]
pub struct LivePolicy(std::sync::Arc<std::sync::RwLock<EgressPolicy>>);

impl LivePolicy {
    pub fn new(policy: EgressPolicy) -> LivePolicy {
        LivePolicy(std::sync::Arc::new(std::sync::RwLock::new(policy)))
    }

    pub fn get(&self) -> EgressPolicy {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes effect from the next frame.
    pub fn set(&self, policy: EgressPolicy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    pub fn allows(&self, frame: &[u8]) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).allows(frame)
    }
}

/// An IPv4 network, `a.b.c.d/prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: [u8; 4],
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn contains(&self, ip: [u8; 4]) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0);
        u32::from_be_bytes(ip) & mask == u32::from_be_bytes(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;

    /// `a.b.c.d` (a /32) or `a.b.c.d/n` with n in 0..=32.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: std::net::Ipv4Addr =
            addr.parse().map_err(|_| format!("{s:?} is not an IPv4 address or a.b.c.d/prefix network"))?;
        let prefix = match prefix {
            None => 32,
            Some(p) => {
                p.parse::<u8>().ok().filter(|&p| p <= 32).ok_or_else(|| format!("{s:?}: the prefix must be 0 to 32"))?
            }
        };
        Ok(Ipv4Net { addr: addr.octets(), prefix })
    }
}

impl EgressPolicy {
    /// Whether `frame` (Ethernet, no FCS) may leave the VM.
    pub fn allows(&self, frame: &[u8]) -> bool {
        let Some(ethertype) = frame.get(12..ETH_HEADER).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return false;
        };
        let ip = &frame[ETH_HEADER..];
        match ethertype {
            // Address resolution on the link: the guest must answer "who has" for forwarded
            // connections to reach it.
            ETHERTYPE_ARP => true,
            ETHERTYPE_IPV4 => self.allows_ipv4(ip),
            ETHERTYPE_IPV6 if self.outbound && self.deny.is_empty() => true,
            // No extension headers: a TCP answer from a server has none.
            ETHERTYPE_IPV6 => {
                ip.first().is_some_and(|v| v >> 4 == 6)
                    && ip.get(6) == Some(&IPPROTO_TCP)
                    && self.answers(ip.get(IPV6_HEADER..))
            }
            _ => self.outbound && self.deny.is_empty(),
        }
    }

    fn allows_ipv4(&self, ip: &[u8]) -> bool {
        let Some(&version_ihl) = ip.first() else { return false };
        let header = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || header < 20 || ip.len() < header {
            return false;
        }
        let destination: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
        let protocol = ip[9];
        // A later fragment carries no transport header to judge by; it goes where its first did.
        let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        let transport = first_fragment.then(|| &ip[header..]);
        if self.outbound {
            let dns = self.dns == Some(destination)
                && (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP)
                && transport.and_then(|t| t.get(2..4)).is_some_and(|p| u16::from_be_bytes([p[0], p[1]]) == 53);
            let denied = self.deny.iter().any(|n| n.contains(destination))
                && !self.allow.iter().any(|n| n.contains(destination));
            if dns || !denied {
                return true;
            }
        }
        match protocol {
            IPPROTO_TCP => self.answers(transport),
            IPPROTO_UDP => transport
                .and_then(|t| t.get(0..2))
                .is_some_and(|p| self.inbound_udp_ports.contains(&u16::from_be_bytes([p[0], p[1]]))),
            _ => false,
        }
    }

    /// A TCP segment from a served port that acknowledges or resets.
    fn answers(&self, tcp: Option<&[u8]>) -> bool {
        let Some(tcp) = tcp.filter(|t| t.len() >= 20) else { return false };
        let source_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        self.inbound_tcp_ports.contains(&source_port) && tcp[13] & (TCP_ACK | TCP_RST) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0x4d, 0x43, 0, 0, 1]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn tcp(source: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&source.to_be_bytes());
        t[2..4].copy_from_slice(&40000u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn ipv4(protocol: u8, fragment_offset: u16, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[6..8].copy_from_slice(&fragment_offset.to_be_bytes());
        h[8] = 64;
        h[9] = protocol;
        h.extend_from_slice(payload);
        eth(ETHERTYPE_IPV4, &h)
    }

    fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[6] = next;
        h.extend_from_slice(payload);
        eth(ETHERTYPE_IPV6, &h)
    }

    fn closed(ports: &[u16]) -> EgressPolicy {
        EgressPolicy { outbound: false, inbound_tcp_ports: ports.to_vec(), ..Default::default() }
    }

    fn ipv4_to(destination: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = ipv4(protocol, 0, payload);
        f[ETH_HEADER + 16..ETH_HEADER + 20].copy_from_slice(&destination);
        f
    }

    fn udp_to(port: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&40000u16.to_be_bytes());
        u[2..4].copy_from_slice(&port.to_be_bytes());
        u
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        assert_eq!(net("10.0.0.0/8"), Ipv4Net { addr: [10, 0, 0, 0], prefix: 8 });
        assert_eq!(net("1.2.3.4"), Ipv4Net { addr: [1, 2, 3, 4], prefix: 32 });
        assert!(net("10.0.0.0/8").contains([10, 200, 1, 1]));
        assert!(!net("10.0.0.0/8").contains([11, 0, 0, 1]));
        assert!(net("0.0.0.0/0").contains([8, 8, 8, 8]));
        assert!(net("192.168.1.77/24").contains([192, 168, 1, 1]), "host bits are ignored");
        for bad in ["10.0.0/8", "10.0.0.0/33", "10.0.0.0/x", "::1", "", "host"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_and_allow_pick_destinations_allow_winning() {
        let p = EgressPolicy {
            outbound: true,
            deny: vec![net("10.0.0.0/8"), net("192.168.0.0/16")],
            allow: vec![net("10.0.2.2")],
            dns: Some([10, 0, 2, 3]),
            inbound_tcp_ports: vec![8080],
            inbound_udp_ports: vec![],
        };
        assert!(p.allows(&ipv4_to([1, 1, 1, 1], IPPROTO_TCP, &tcp(40000, SYN))), "a public address");
        assert!(!p.allows(&ipv4_to([10, 1, 2, 3], IPPROTO_TCP, &tcp(40000, SYN))), "a denied network");
        assert!(!p.allows(&ipv4_to([192, 168, 1, 1], 17, &udp_to(9))), "UDP into a denied network");
        assert!(p.allows(&ipv4_to([10, 0, 2, 2], IPPROTO_TCP, &tcp(40000, SYN))), "allowed inside a denied network");
        assert!(p.allows(&ipv4_to([10, 0, 2, 3], 17, &udp_to(53))), "DNS to the resolver");
        assert!(!p.allows(&ipv4_to([10, 0, 2, 3], 17, &udp_to(54))), "not DNS");
        assert!(p.allows(&ipv4_to([10, 9, 9, 9], IPPROTO_TCP, &tcp(8080, SYN_ACK))), "an answer from a served port");
        assert!(!p.allows(&ipv6(IPPROTO_TCP, &tcp(40000, SYN))), "IPv6 with deny rules");
        assert!(p.allows(&eth(ETHERTYPE_ARP, &[0; 28])));
        let open = EgressPolicy { outbound: true, ..Default::default() };
        assert!(open.allows(&ipv6(IPPROTO_TCP, &tcp(40000, SYN))), "IPv6 without rules");
    }

    #[test]
    fn outbound_lets_everything_pass() {
        let open = EgressPolicy { outbound: true, ..Default::default() };
        for f in [ipv4(17, 0, &[0; 8]), ipv4(IPPROTO_TCP, 0, &tcp(5000, SYN)), ipv6(58, &[0; 8]), eth(0x88cc, &[0; 40])]
        {
            assert!(open.allows(&f));
        }
        assert!(!open.allows(&[1, 2, 3]), "not a frame");
    }

    #[test]
    fn without_outbound_only_arp_and_answers_from_served_ports_pass() {
        let p = closed(&[80, 8080]);
        assert!(p.allows(&eth(ETHERTYPE_ARP, &[0; 28])), "ARP");
        assert!(p.allows(&ipv4(IPPROTO_TCP, 0, &tcp(80, SYN_ACK))), "SYN-ACK from a served port");
        assert!(p.allows(&ipv4(IPPROTO_TCP, 0, &tcp(8080, TCP_ACK))), "data from a served port");
        assert!(p.allows(&ipv4(IPPROTO_TCP, 0, &tcp(80, TCP_RST))), "reset from a served port");
        assert!(p.allows(&ipv6(IPPROTO_TCP, &tcp(80, SYN_ACK))), "IPv6 answer");
        assert!(!p.allows(&ipv4(IPPROTO_TCP, 0, &tcp(80, SYN))), "a connection opened from a served port");
        assert!(!p.allows(&ipv4(IPPROTO_TCP, 0, &tcp(81, SYN_ACK))), "another port");
        assert!(!p.allows(&ipv4(17, 0, &tcp(80, TCP_ACK))), "UDP");
        assert!(!p.allows(&ipv4(1, 0, &[8, 0, 0, 0])), "ICMP");
        assert!(!p.allows(&ipv6(58, &[0; 8])), "ICMPv6");
        assert!(!p.allows(&ipv4(IPPROTO_TCP, 185, &tcp(80, TCP_ACK))), "a later fragment");
        assert!(!p.allows(&ipv4(17, 0, &udp_to(53))), "DNS too");
        let udp_server = EgressPolicy { inbound_udp_ports: vec![40000], ..closed(&[]) };
        assert!(
            udp_server.allows(&ipv4(17, 0, &udp_to(53))),
            "a datagram from a served UDP port (udp_to sends from 40000)"
        );
        assert!(!closed(&[40000]).allows(&ipv4(17, 0, &udp_to(53))), "a TCP-served port says nothing for UDP");
        assert!(!p.allows(&eth(0x8100, &[0; 40])), "VLAN-tagged");
    }

    #[test]
    fn short_or_malformed_frames_are_dropped() {
        let p = closed(&[80]);
        let good = ipv4(IPPROTO_TCP, 0, &tcp(80, TCP_ACK));
        for len in 0..good.len() - 1 {
            if len < ETH_HEADER + 20 + 20 {
                assert!(!p.allows(&good[..len]), "cut at {len}");
            }
        }
        let mut bad_ihl = good.clone();
        bad_ihl[ETH_HEADER] = 0x44; // 16-byte header
        assert!(!p.allows(&bad_ihl));
        let mut long_ihl = good.clone();
        long_ihl[ETH_HEADER] = 0x4f; // 60-byte header: the TCP header is cut short
        assert!(!p.allows(&long_ihl));
        let mut v6_in_v4 = good;
        v6_in_v4[ETH_HEADER] = 0x65;
        assert!(!p.allows(&v6_in_v4));
    }
}
