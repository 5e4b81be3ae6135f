//! What the guest may send: the egress policy the net device applies to every transmitted frame,
//! before it leaves the VM. The host-side network (passt, a tap) then never sees a dropped frame,
//! whatever the guest does.

use serde::{Deserialize, Serialize};

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HEADER: usize = 40;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicy {
    /// The guest may open connections and send datagrams anywhere the host network reaches.
    pub outbound: bool,
    /// TCP ports the guest serves (forwarded to it from the host). Without `outbound`, the guest
    /// may still answer on these: its segments from them pass when they acknowledge or reset
    /// (a bare SYN from one would be the guest opening a connection, and is dropped).
    #[serde(default)]
    pub inbound_tcp_ports: Vec<u16>,
}

impl EgressPolicy {
    /// Whether `frame` (Ethernet, no FCS) may leave the VM.
    pub fn allows(&self, frame: &[u8]) -> bool {
        if self.outbound {
            return true;
        }
        let Some(ethertype) = frame.get(12..ETH_HEADER).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return false;
        };
        let ip = &frame[ETH_HEADER..];
        match ethertype {
            // Address resolution on the link: the guest must answer "who has" for forwarded
            // connections to reach it.
            ETHERTYPE_ARP => true,
            ETHERTYPE_IPV4 => {
                let Some(&version_ihl) = ip.first() else { return false };
                let header = usize::from(version_ihl & 0x0f) * 4;
                let fragment = ip.get(6..8).map(|b| u16::from_be_bytes([b[0], b[1]]) & 0x1fff);
                // A later fragment carries no TCP header to judge by.
                version_ihl >> 4 == 4 && header >= 20 && fragment == Some(0) && ip.get(9) == Some(&IPPROTO_TCP) && self.answers(ip.get(header..))
            }
            // No extension headers: a TCP answer from a server has none.
            ETHERTYPE_IPV6 => ip.first().is_some_and(|v| v >> 4 == 6) && ip.get(6) == Some(&IPPROTO_TCP) && self.answers(ip.get(IPV6_HEADER..)),
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
        EgressPolicy { outbound: false, inbound_tcp_ports: ports.to_vec() }
    }

    #[test]
    fn outbound_lets_everything_pass() {
        let open = EgressPolicy { outbound: true, inbound_tcp_ports: vec![] };
        for f in [ipv4(17, 0, &[0; 8]), ipv4(IPPROTO_TCP, 0, &tcp(5000, SYN)), ipv6(58, &[0; 8]), vec![1, 2, 3]] {
            assert!(open.allows(&f));
        }
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
