//! The small string formats of the launch configuration: `host:guest` path and port pairs,
//! `RLIMIT_*=soft:hard`, `KEY=VALUE`, IPv4 subnets, guest paths.
//!
//! In JSON every one of them is a plain string (the exact JSON `build()` returns); these types
//! are what validation parses them into.

use std::fmt;
use std::net::Ipv4Addr;

use super::ConfigError;

/// Checks that `value` is printable ASCII (0x20 space ..= 0x7e '~'), as libkrun/microsandbox
/// require for the exec path and arguments. This excludes NUL, newlines, tabs, DEL and non-ASCII.
pub fn validate_printable(what: &str, value: &str) -> Result<(), ConfigError> {
    if value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err(ConfigError::InvalidString { what: what.to_string(), value: value.to_string() })
    }
}

/// Normalises an absolute guest path lexically: collapses `//`, drops `.` and trailing `/`,
/// resolves `..`. Relative paths and paths that climb above `/` are refused.
pub fn normalize_guest_path(what: &str, path: &str) -> Result<String, ConfigError> {
    let err = |reason| ConfigError::GuestPath { what: what.to_string(), path: path.to_string(), reason };
    if path.is_empty() {
        return Err(err("it is empty: give an absolute path such as /data"));
    }
    validate_printable(what, path)?;
    if !path.starts_with('/') {
        return Err(err("it is relative: guest paths must be absolute, e.g. /data"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(err("it climbs above / with '..': remove the extra '..'"));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// True when two normalised guest paths are the same or one contains the other.
pub fn guest_paths_overlap(a: &str, b: &str) -> bool {
    fn inside(child: &str, parent: &str) -> bool {
        parent == "/" || child == parent || child.strip_prefix(parent).is_some_and(|rest| rest.starts_with('/'))
    }
    inside(a, b) || inside(b, a)
}

/// A directory shared with the guest: `"host:guest"`, or `"path"` for the same path on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPair {
    /// The host directory, as written (relative paths are relative to the current directory).
    pub host: String,
    /// The guest mount point, normalised.
    pub guest: String,
}

impl PathPair {
    pub fn parse(value: &str) -> Result<PathPair, ConfigError> {
        let malformed = || ConfigError::Pair {
            what: "mappedDirs",
            value: value.to_string(),
            expected: "\"/host/dir:/guest/dir\" or \"/same/dir\" (one ':' at most, neither side empty)",
        };
        let (host, guest) = match value.split(':').collect::<Vec<_>>()[..] {
            [single] => (single, single),
            [host, guest] => (host, guest),
            _ => return Err(malformed()),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(malformed());
        }
        validate_printable("mappedDirs host path", host)?;
        let guest = normalize_guest_path("mappedDirs guest path", guest)?;
        if guest == "/" {
            return Err(ConfigError::GuestPath {
                what: "mappedDirs guest path".into(),
                path: value.to_string(),
                reason: "it is the guest's root directory, which the rootfs provides: mount the directory below /, e.g. /data",
            });
        }
        Ok(PathPair { host: host.to_string(), guest })
    }
}

impl fmt::Display for PathPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// A forwarded port: `"host:guest"`, or `"port"` for the same port on both sides, TCP unless
/// it ends in `/udp` (`/tcp` may be written too, docker's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPair {
    pub host: u16,
    pub guest: u16,
    pub udp: bool,
}

impl PortPair {
    pub fn parse(value: &str) -> Result<PortPair, ConfigError> {
        let (ports, udp) = match value.rsplit_once('/') {
            Some((ports, "udp")) => (ports, true),
            Some((ports, "tcp")) => (ports, false),
            Some(_) => ("", false), // an unknown protocol: the shape error below
            None => (value, false),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host, guest) = match parts[..] {
            [single] if !single.is_empty() => (single, single),
            [host, guest] if !host.is_empty() && !guest.is_empty() => (host, guest),
            _ => return Err(ConfigError::Pair {
                what: "portMap",
                value: value.to_string(),
                expected:
                    "\"8080:80\" (host port:guest port), \"3000\" (the same port on both sides), then \"/udp\" for UDP",
            }),
        };
        Ok(PortPair { host: parse_port(value, host)?, guest: parse_port(value, guest)?, udp })
    }

    pub fn protocol(&self) -> &'static str {
        if self.udp {
            "udp"
        } else {
            "tcp"
        }
    }
}

fn parse_port(entry: &str, port: &str) -> Result<u16, ConfigError> {
    let err = |reason: String| ConfigError::Port { value: entry.to_string(), reason };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("{port:?} is not a port number: give a whole number from 1 to 65535")));
    }
    match port.parse::<u32>() {
        Ok(0) => Err(err("port 0 is not a port that can be forwarded: give a number from 1 to 65535".into())),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(err(format!("port {port} is above 65535: give a number from 1 to 65535"))),
    }
}

impl fmt::Display for PortPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}{}", self.host, self.guest, if self.udp { "/udp" } else { "" })
    }
}

/// The Linux resource limits, in `RLIMIT_*` numbering order (x86_64).
pub const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// `RLIM_INFINITY`.
pub const RLIM_INFINITY: u64 = u64::MAX;

/// A resource limit for the guest process: `"RLIMIT_NOFILE=1024:4096"` (soft:hard),
/// `"RLIMIT_NOFILE=1024"` (soft = hard), with `unlimited` (or `infinity`) for no limit.
/// The resource may also be given by its number (`"7=1024:1024"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxRlimit {
    /// Index into [`RLIMIT_NAMES`] (the Linux resource number).
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

impl LinuxRlimit {
    pub fn parse(value: &str) -> Result<LinuxRlimit, ConfigError> {
        let err = |reason: String| ConfigError::Rlimit { value: value.to_string(), reason };
        let Some((name, limits)) = value.split_once('=') else {
            return Err(err("it has no '=': write RLIMIT_NAME=soft:hard, e.g. RLIMIT_NOFILE=1024:1024".into()));
        };
        let resource = match RLIMIT_NAMES.iter().position(|n| *n == name) {
            Some(i) => i as u32,
            None => match name.parse::<u32>() {
                Ok(n) if (n as usize) < RLIMIT_NAMES.len() => n,
                _ => {
                    return Err(err(format!(
                        "{name:?} is not a Linux resource limit: use one of {}",
                        RLIMIT_NAMES.join(", ")
                    )))
                }
            },
        };
        let parse_limit = |s: &str| -> Result<u64, ConfigError> {
            if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("infinity") {
                return Ok(RLIM_INFINITY);
            }
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!(
                    "limit {s:?} is not a whole number: give a number from 0 to {} or 'unlimited'",
                    u64::MAX - 1
                )));
            }
            s.parse::<u64>()
                .map_err(|_| err(format!("limit {s} is too large: give at most {} or 'unlimited'", u64::MAX - 1)))
        };
        let (soft, hard) = match limits.split(':').collect::<Vec<_>>()[..] {
            [both] => {
                let v = parse_limit(both)?;
                (v, v)
            }
            [soft, hard] => (parse_limit(soft)?, parse_limit(hard)?),
            _ => return Err(err("write the limits as soft:hard, e.g. RLIMIT_NOFILE=1024:4096".into())),
        };
        if soft > hard {
            return Err(err(format!(
                "the soft limit ({}) is above the hard limit ({}): the soft limit must be at most the hard limit",
                show_limit(soft),
                show_limit(hard)
            )));
        }
        Ok(LinuxRlimit { resource, soft, hard })
    }

    pub fn name(&self) -> &'static str {
        RLIMIT_NAMES[self.resource as usize]
    }
}

fn show_limit(v: u64) -> String {
    if v == RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

impl fmt::Display for LinuxRlimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}:{}", self.name(), show_limit(self.soft), show_limit(self.hard))
    }
}

/// An environment variable: `"KEY=VALUE"` (the value may be empty and may contain `=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPair {
    pub key: String,
    pub value: String,
}

impl EnvPair {
    pub fn parse(entry: &str) -> Result<EnvPair, ConfigError> {
        let err = |reason: &str| ConfigError::Env { value: entry.to_string(), reason: reason.to_string() };
        let Some((key, value)) = entry.split_once('=') else {
            return Err(err("it has no '=': write KEY=VALUE (KEY= for an empty value)"));
        };
        if key.is_empty() {
            return Err(err("the name before '=' is empty: write KEY=VALUE"));
        }
        if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(err(
                "the name contains spaces, control characters or non-ASCII: use letters, digits and '_' (e.g. MY_VAR)",
            ));
        }
        if value.contains('\0') {
            return Err(err("the value contains a NUL byte, which an environment cannot hold: remove it"));
        }
        Ok(EnvPair { key: key.to_string(), value: value.to_string() })
    }
}

impl fmt::Display for EnvPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// An IPv4 network in CIDR notation (`"192.168.1.0/24"`); the host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Subnet {
    pub fn parse(value: &str) -> Result<Ipv4Subnet, ConfigError> {
        let err = |why: String| ConfigError::Network(format!("subnet {value:?} {why}"));
        let Some((addr, prefix)) = value.split_once('/') else {
            return Err(err("is not in CIDR notation: write it as address/prefix, e.g. 192.168.1.0/24".into()));
        };
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| err(format!("has {addr:?}, which is not an IPv4 address: write e.g. 192.168.1.0/24")))?;
        let prefix: u8 = match prefix.parse::<u8>() {
            Ok(p) if p <= 32 && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(err(format!("has prefix {prefix:?}: the prefix length is a number from 0 to 32"))),
        };
        let subnet = Ipv4Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            let base = Ipv4Addr::from(u32::from(network) & subnet.mask());
            return Err(err(format!("has host bits set: did you mean {base}/{prefix}?")));
        }
        Ok(subnet)
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_accepts_the_whole_range_and_nothing_else() {
        assert!(validate_printable("x", "").is_ok());
        assert!(validate_printable("x", " ~hello world!@#$%^&*()/path_to-file").is_ok());
        for bad in ["\n", "\t", "\r", "\x1b", "a\0b", "hello\x7f", "über", "café", "你好", "hi🌎"] {
            let e = validate_printable("exec path", bad).unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_INVALID_STRING", "{bad:?}");
        }
    }

    #[test]
    fn guest_paths_are_normalised() {
        let n = |p| normalize_guest_path("p", p).unwrap();
        assert_eq!(n("/app/./data"), "/app/data");
        assert_eq!(n("/app/data/"), "/app/data");
        assert_eq!(n("//etc//config"), "/etc/config");
        assert_eq!(n("/a/b/../c"), "/a/c");
        assert_eq!(n("/"), "/");
        for bad in ["app", "./app", "", "/..", "/a/../.."] {
            assert_eq!(normalize_guest_path("p", bad).unwrap_err().code(), "E_CONFIG_GUEST_PATH", "{bad:?}");
        }
        assert_eq!(normalize_guest_path("p", "/a\nb").unwrap_err().code(), "E_CONFIG_INVALID_STRING");
    }

    #[test]
    fn overlap() {
        assert!(guest_paths_overlap("/app", "/app"));
        assert!(guest_paths_overlap("/app", "/app/data"));
        assert!(guest_paths_overlap("/var/log", "/var"));
        assert!(guest_paths_overlap("/", "/x"));
        assert!(!guest_paths_overlap("/app", "/application"));
        assert!(!guest_paths_overlap("/app/data", "/app/database"));
        assert!(!guest_paths_overlap("/a", "/b"));
    }

    #[test]
    fn path_pairs() {
        assert_eq!(
            PathPair::parse("/data:/mnt/data").unwrap(),
            PathPair { host: "/data".into(), guest: "/mnt/data".into() }
        );
        assert_eq!(PathPair::parse("./:/app").unwrap(), PathPair { host: "./".into(), guest: "/app".into() });
        assert_eq!(PathPair::parse("/shared").unwrap(), PathPair { host: "/shared".into(), guest: "/shared".into() });
        assert_eq!(PathPair::parse("/h:/g/./x/").unwrap().guest, "/g/x");
        for bad in [":", ":/g", "/h:", "/a:/b:/c", ""] {
            assert_eq!(PathPair::parse(bad).unwrap_err().code(), "E_CONFIG_PAIR", "{bad:?}");
        }
        assert_eq!(PathPair::parse("/h:g").unwrap_err().code(), "E_CONFIG_GUEST_PATH");
        assert_eq!(PathPair::parse("relative").unwrap_err().code(), "E_CONFIG_GUEST_PATH");
        assert_eq!(PathPair::parse("/h:/").unwrap_err().code(), "E_CONFIG_GUEST_PATH");
        assert_eq!(PathPair::parse("/h\n:/g").unwrap_err().code(), "E_CONFIG_INVALID_STRING");
        assert_eq!(PathPair::parse("/data:/mnt/data").unwrap().to_string(), "/data:/mnt/data");
    }

    #[test]
    fn port_pairs() {
        let pair = |host, guest, udp| PortPair { host, guest, udp };
        assert_eq!(PortPair::parse("8080:80").unwrap(), pair(8080, 80, false));
        assert_eq!(PortPair::parse("3000").unwrap(), pair(3000, 3000, false));
        assert_eq!(PortPair::parse("65535:1").unwrap(), pair(65535, 1, false));
        assert_eq!(PortPair::parse("5353:53/udp").unwrap(), pair(5353, 53, true));
        assert_eq!(PortPair::parse("22/tcp").unwrap(), pair(22, 22, false));
        assert_eq!(PortPair::parse("5353:53/udp").unwrap().to_string(), "5353:53/udp");
        for bad in ["", ":", "80:", ":80", "1:2:3", "80/sctp", "/udp", "80:81/"] {
            assert_eq!(PortPair::parse(bad).unwrap_err().code(), "E_CONFIG_PAIR", "{bad:?}");
        }
        for bad in ["0", "0:80", "80:0", "65536", "70000:80", "abc", "-1:80", "8o:80", "99999999999999999999"] {
            assert_eq!(PortPair::parse(bad).unwrap_err().code(), "E_CONFIG_PORT", "{bad:?}");
        }
        assert_eq!(PortPair::parse("8080:80").unwrap().to_string(), "8080:80");
    }

    #[test]
    fn rlimits() {
        let r = LinuxRlimit::parse("RLIMIT_NOFILE=1024:1024").unwrap();
        assert_eq!((r.resource, r.soft, r.hard), (7, 1024, 1024));
        assert_eq!(r.to_string(), "RLIMIT_NOFILE=1024:1024");
        for (i, name) in RLIMIT_NAMES.iter().enumerate() {
            let r = LinuxRlimit::parse(&format!("{name}=1:2")).unwrap();
            assert_eq!(r.resource as usize, i);
            assert_eq!(r.name(), *name);
        }
        assert_eq!(LinuxRlimit::parse("RLIMIT_CORE=0").unwrap(), LinuxRlimit { resource: 4, soft: 0, hard: 0 });
        assert_eq!(LinuxRlimit::parse("7=5:6").unwrap(), LinuxRlimit { resource: 7, soft: 5, hard: 6 });
        let u = LinuxRlimit::parse("RLIMIT_STACK=8388608:unlimited").unwrap();
        assert_eq!((u.soft, u.hard), (8388608, RLIM_INFINITY));
        assert_eq!(u.to_string(), "RLIMIT_STACK=8388608:unlimited");
        assert_eq!(LinuxRlimit::parse("RLIMIT_AS=infinity").unwrap().soft, RLIM_INFINITY);
        for bad in [
            "RLIMIT_NOFILE",
            "RLIMIT_FOO=1:1",
            "rlimit_nofile=1:1",
            "16=1:1",
            "RLIMIT_NOFILE=2048:1024",
            "RLIMIT_NOFILE=unlimited:1",
            "RLIMIT_NOFILE=-1:1",
            "RLIMIT_NOFILE=1:2:3",
            "RLIMIT_NOFILE=:",
            "RLIMIT_NOFILE=",
            "RLIMIT_NOFILE=1.5",
            "RLIMIT_NOFILE=99999999999999999999999",
            "=1:1",
        ] {
            assert_eq!(LinuxRlimit::parse(bad).unwrap_err().code(), "E_CONFIG_RLIMIT", "{bad:?}");
        }
    }

    #[test]
    fn env_pairs() {
        assert_eq!(EnvPair::parse("KEY=VALUE").unwrap(), EnvPair { key: "KEY".into(), value: "VALUE".into() });
        assert_eq!(EnvPair::parse("K=").unwrap().value, "");
        assert_eq!(EnvPair::parse("K=a=b").unwrap().value, "a=b");
        assert_eq!(EnvPair::parse("ALLOWED=localhost,127.0.0.1").unwrap().to_string(), "ALLOWED=localhost,127.0.0.1");
        for bad in ["KEY", "", "=VALUE", "=", "MY KEY=1", "K\n=1", "K=a\0b"] {
            assert_eq!(EnvPair::parse(bad).unwrap_err().code(), "E_CONFIG_ENV", "{bad:?}");
        }
    }

    #[test]
    fn subnets() {
        let s = Ipv4Subnet::parse("192.168.1.0/24").unwrap();
        assert!(s.contains("192.168.1.100".parse().unwrap()));
        assert!(!s.contains("192.168.2.1".parse().unwrap()));
        assert_eq!(s.broadcast(), "192.168.1.255".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.to_string(), "192.168.1.0/24");
        assert!(Ipv4Subnet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Ipv4Subnet::parse("10.0.0.1/32").unwrap().contains("10.0.0.1".parse().unwrap()));
        for bad in
            ["192.168.1.0", "192.168.1.0/33", "192.168.1.0/", "300.1.1.1/8", "192.168.1.100/24", "a/b", "10.0.0.0/+8"]
        {
            assert_eq!(Ipv4Subnet::parse(bad).unwrap_err().code(), "E_CONFIG_NETWORK", "{bad:?}");
        }
        let msg = Ipv4Subnet::parse("192.168.1.100/24").unwrap_err().to_string();
        assert!(msg.contains("192.168.1.0/24"), "{msg}");
    }
}
