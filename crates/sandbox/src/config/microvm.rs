//! `MicroVmConfig`: the launch configuration of one microVM, exactly the JSON that the
//! TypeScript `MicroVm.builder().build()` returns (camelCase keys), and its validation.
//!
//! The options follow microsandbox's `MicroVmBuilder` (log level, rootfs, vCPUs, memory, mapped
//! directories, ports, network scope, IP, subnet, rlimits, working directory, exec path, args,
//! env, console output) plus what the VMM boots today (kernel, initrd, command line). Options
//! whose devices come later (rootfs, mapped directories, ports, network, exec) are validated and
//! kept, not yet used by the VMM.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::types::{
    guest_paths_overlap, normalize_guest_path, validate_printable, EnvPair, Ipv4Subnet, LinuxRlimit, PathPair, PortPair,
};
use super::ConfigError;

pub use crate::limits::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_VCPUS};
/// Longest kernel command line, without its NUL (the VMM has 4096 bytes for it).
pub const MAX_CMDLINE_LEN: usize = 4095;

/// How much the microVM logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The guest's root filesystem: `{"native": "/dir"}`, `{"overlayfs": ["/lower", "/upper"]}` or
/// `{"disk": "/path/rootfs.ext4"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rootfs {
    /// A host directory passed through as the root.
    Native(PathBuf),
    /// Layers stacked in order (later layers on top).
    Overlayfs(Vec<PathBuf>),
    /// A root disk image of the guest platform (raw ext4 with the microcell agent as init, what
    /// `scripts/setup.sh` builds; the default guest's is [`crate::sandbox::default_rootfs`]).
    /// The VM then boots on a sandbox engine (`auto`: the built-in VMM where it can boot Linux,
    /// else QEMU) and runs `execPath` as its workload (`crate::workload`); `kernel` defaults to
    /// the guest platform's kernel. Needs `execPath`.
    Disk(PathBuf),
}

impl Rootfs {
    /// The root disk image, for `{"disk": ...}`.
    pub fn disk(&self) -> Option<&Path> {
        match self {
            Rootfs::Disk(p) => Some(p),
            _ => None,
        }
    }
}

/// Which addresses the guest may talk to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkScope {
    /// No other sandbox and no network.
    None,
    /// Only sandboxes in the same subnet (the default).
    #[default]
    Group,
    /// Any non-private address.
    Public,
    /// Any address.
    Any,
}

/// The launch configuration of one microVM (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MicroVmConfig {
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<Rootfs>,
    #[serde(default = "default_vcpus")]
    pub num_vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// `"host:guest"` or `"path"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped_dirs: Vec<String>,
    /// `"8080:80"` or `"3000"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_map: Vec<String>,
    #[serde(default)]
    pub scope: NetworkScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// CIDR, e.g. `"192.168.1.0/24"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// `"RLIMIT_NOFILE=1024:1024"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// `"KEY=VALUE"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Host file that receives the guest console (created or truncated at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_output: Option<PathBuf>,
    /// Guest kernel: ELF (with or without a PVH note) or bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, used exactly as given; the VMM's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Start even where the host's KVM cannot run the guest well (e.g. Linux on PVM).
    #[serde(default)]
    pub allow_unsupported_host: bool,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl Default for MicroVmConfig {
    fn default() -> Self {
        MicroVmConfig {
            log_level: LogLevel::Off,
            rootfs: None,
            num_vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            mapped_dirs: Vec::new(),
            port_map: Vec::new(),
            scope: NetworkScope::Group,
            ip: None,
            subnet: None,
            rlimits: Vec::new(),
            workdir_path: None,
            exec_path: None,
            args: Vec::new(),
            env: Vec::new(),
            console_output: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            allow_unsupported_host: false,
        }
    }
}

/// What validation needs to know about the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostLimits {
    /// Physical RAM in MiB; `None` when unknown (no check then).
    pub memory_mib: Option<u64>,
}

impl HostLimits {
    /// Reads the host: `MemTotal` from `/proc/meminfo`.
    pub fn detect() -> HostLimits {
        HostLimits { memory_mib: host_memory_mib() }
    }
}

/// `MemTotal` from `/proc/meminfo`, in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_mib(&meminfo)
}

fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    Some(kib / 1024)
}

/// The parsed forms of a valid configuration's string options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedOptions {
    pub mapped_dirs: Vec<PathPair>,
    pub port_map: Vec<PortPair>,
    pub ip: Option<Ipv4Addr>,
    pub subnet: Option<Ipv4Subnet>,
    pub rlimits: Vec<LinuxRlimit>,
    pub env: Vec<EnvPair>,
    pub workdir_path: Option<String>,
}

impl MicroVmConfig {
    /// Parses the JSON that `build()` returns. Numbers that are not whole numbers in range get
    /// the error code of their option (`E_CONFIG_VCPUS`, `E_CONFIG_MEMORY`); anything else that
    /// does not fit (syntax, unknown option, wrong type) is `E_CONFIG_JSON`.
    pub fn from_json(json: &str) -> Result<MicroVmConfig, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(ConfigError::Json(format!("expected a JSON object, got {}", json_kind(&value))));
        };
        for (key, make) in [
            ("numVcpus", ConfigError::Vcpus as fn(String) -> ConfigError),
            ("memoryMib", ConfigError::Memory as fn(String) -> ConfigError),
        ] {
            if let Some(v) = object.get(key) {
                if v.as_u64().is_none_or(|n| n > u32::MAX as u64) {
                    return Err(make(v.to_string()));
                }
            }
        }
        serde_json::from_value(value).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// The configuration as JSON (defaults filled in, empty options left out).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("MicroVmConfig always serialises")
    }

    /// Checks the whole configuration against this host; see [`Self::validate_with`].
    pub fn validate(&self) -> Result<ParsedOptions, ConfigError> {
        self.validate_with(&HostLimits::detect())
    }

    /// Checks the configuration and returns the parsed string options. The first problem found
    /// is returned, in this order: vCPUs, memory, kernel, initrd, cmdline, rootfs, mapped
    /// directories, ports, network, rlimits, working directory, exec path and args, env,
    /// console output.
    pub fn validate_with(&self, host: &HostLimits) -> Result<ParsedOptions, ConfigError> {
        let mut parsed = ParsedOptions::default();

        if self.num_vcpus == 0 || self.num_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.num_vcpus.to_string()));
        }
        if self.memory_mib == 0 {
            return Err(ConfigError::Memory("0".into()));
        }
        if let Some(host_mib) = host.memory_mib {
            if self.memory_mib as u64 > host_mib {
                return Err(ConfigError::MemoryAboveHost { requested: self.memory_mib as u64, host: host_mib });
            }
        }

        let disk = self.rootfs.as_ref().and_then(Rootfs::disk);
        match &self.kernel {
            Some(kernel) => check_file("kernel", kernel)?,
            // A root disk of the guest platform boots the platform's kernel by default.
            None if disk.is_some() => {}
            None => {
                return Err(ConfigError::Missing {
                    what: "kernel",
                    hint: "give the guest kernel image with .kernel(path): an ELF vmlinux (with or without a PVH note) or a bzImage",
                })
            }
        }
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if let Some(cmdline) = &self.cmdline {
            validate_cmdline(cmdline)?;
        }

        match &self.rootfs {
            None => {}
            Some(Rootfs::Native(path)) => check_dir("rootfs.native", path)?,
            Some(Rootfs::Overlayfs(layers)) => {
                if layers.is_empty() {
                    return Err(ConfigError::Missing {
                        what: "rootfs.overlayfs layer",
                        hint: "give at least one layer directory, lowest first",
                    });
                }
                for layer in layers {
                    check_dir("rootfs.overlayfs layer", layer)?;
                }
            }
            Some(Rootfs::Disk(path)) => {
                check_file("rootfs.disk", path)?;
                if self.exec_path.is_none() {
                    return Err(ConfigError::Missing {
                        what: "execPath (with rootfs.disk)",
                        hint: "a VM on a guest platform root disk runs one program as its workload: give it with .execPath(path) (and .args([...])); for a guest that runs commands on demand use Sandbox",
                    });
                }
            }
        }

        for entry in &self.mapped_dirs {
            let pair = PathPair::parse(entry)?;
            check_dir("mappedDirs host directory", Path::new(&pair.host))?;
            parsed.mapped_dirs.push(pair);
        }
        for (i, a) in parsed.mapped_dirs.iter().enumerate() {
            for b in &parsed.mapped_dirs[i + 1..] {
                if guest_paths_overlap(&a.guest, &b.guest) {
                    return Err(ConfigError::GuestPathConflict { first: a.guest.clone(), second: b.guest.clone() });
                }
            }
        }

        for entry in &self.port_map {
            let pair = PortPair::parse(entry)?;
            if let Some(previous) = parsed.port_map.iter().find(|p| p.host == pair.host && p.udp == pair.udp) {
                return Err(ConfigError::Port {
                    value: entry.clone(),
                    reason: format!(
                        "host {} port {} is already forwarded (by {previous}): forward each host port once",
                        pair.protocol(),
                        pair.host
                    ),
                });
            }
            parsed.port_map.push(pair);
        }
        if self.scope == NetworkScope::None && !self.port_map.is_empty() {
            return Err(ConfigError::Network(
                "portMap needs a network: give scope 'group', 'public' or 'any', or no portMap".into(),
            ));
        }

        if let Some(subnet) = &self.subnet {
            parsed.subnet = Some(Ipv4Subnet::parse(subnet)?);
        }
        if let Some(ip) = &self.ip {
            let addr: Ipv4Addr = ip.parse().map_err(|_| {
                ConfigError::Network(format!(
                    "ip {ip:?} is not an IPv4 address: write it as four numbers, e.g. 192.168.1.100"
                ))
            })?;
            if let Some(subnet) = parsed.subnet {
                if !subnet.contains(addr) {
                    return Err(ConfigError::Network(format!(
                        "ip {addr} is not in subnet {subnet}: choose an address inside the subnet, or a subnet that holds the address"
                    )));
                }
                if subnet.prefix <= 30 && (addr == subnet.network || addr == subnet.broadcast()) {
                    return Err(ConfigError::Network(format!(
                        "ip {addr} is the {} address of subnet {subnet}: choose a host address between them",
                        if addr == subnet.network { "network" } else { "broadcast" }
                    )));
                }
            }
            parsed.ip = Some(addr);
        }

        for entry in &self.rlimits {
            let limit = LinuxRlimit::parse(entry)?;
            if parsed.rlimits.iter().any(|l| l.resource == limit.resource) {
                return Err(ConfigError::Rlimit {
                    value: entry.clone(),
                    reason: format!("{} is given twice: give each limit once", limit.name()),
                });
            }
            parsed.rlimits.push(limit);
        }

        if let Some(workdir) = &self.workdir_path {
            parsed.workdir_path = Some(normalize_guest_path("workdirPath", workdir)?);
        }
        if let Some(exec) = &self.exec_path {
            if exec.is_empty() {
                return Err(ConfigError::InvalidString { what: "execPath (empty)".into(), value: exec.clone() });
            }
            validate_printable("execPath", exec)?;
        }
        for (i, arg) in self.args.iter().enumerate() {
            validate_printable(&format!("args[{i}]"), arg)?;
        }
        for entry in &self.env {
            parsed.env.push(EnvPair::parse(entry)?);
        }
        // With rootfs.disk the workload boots on a sandbox engine and its spec goes over the
        // control channel (MAX_SPEC_BYTES); booted straight on the VMM it has no channel and
        // goes on the kernel command line (MAX_SPEC_WORD): each is checked against its own.
        if let Some(spec) =
            super::workload_spec::spec_from_microvm_config(self).map_err(|e| ConfigError::Cmdline(e.to_string()))?
        {
            if disk.is_none() {
                super::workload_spec::cmdline_word(&spec).map_err(|e| ConfigError::Cmdline(e.to_string()))?;
            }
        }

        if let Some(path) = &self.console_output {
            check_console_output(path)?;
        }
        Ok(parsed)
    }

    /// Validates the configuration and turns it into what the VMM boots. Options whose devices
    /// come later (rootfs, mapped directories, ports, network, exec) are validated, not used.
    pub fn to_vm_config(&self) -> Result<vmm::VmConfig, ConfigError> {
        self.to_vm_config_with(&HostLimits::detect())
    }

    /// [`Self::to_vm_config`] with the host limits given.
    pub fn to_vm_config_with(&self, host: &HostLimits) -> Result<vmm::VmConfig, ConfigError> {
        self.validate_with(host)?;
        if self.kernel.is_none() {
            // Only a `rootfs.disk` configuration validates without a kernel.
            return Err(ConfigError::Missing {
                what: "kernel",
                hint: "a rootfs.disk configuration boots on a sandbox engine, not directly on the VMM: start it with MicroVm.start (which runs it as a workload), or give .kernel(path)",
            });
        }
        let mut cmdline = self.cmdline.clone().unwrap_or_else(|| vmm::DEFAULT_CMDLINE.to_string());
        // With `execPath`, the guest's agent finds its workload in `microcell.exec=` (appended
        // to the command line, given or default; see `crate::workload`).
        if let Some(spec) =
            super::workload_spec::spec_from_microvm_config(self).map_err(|e| ConfigError::Cmdline(e.to_string()))?
        {
            cmdline = super::workload_spec::cmdline_with_spec(&cmdline, &spec)
                .map_err(|e| ConfigError::Cmdline(e.to_string()))?;
        }
        Ok(vmm::VmConfig {
            vcpus: self.num_vcpus as u8,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone().expect("validated: kernel is set"),
            initrd: self.initrd.clone(),
            cmdline,
            allow_unsupported_host: self.allow_unsupported_host,
            // Devices that come with the guest platform (rootfs disk, control channel) are
            // not configured yet.
            ..Default::default()
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn cwd() -> String {
    std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_else(|_| "(unknown)".into())
}

fn path_string(what: &str, path: &Path) -> Result<String, ConfigError> {
    let s = path.to_string_lossy().into_owned();
    if s.is_empty() {
        return Err(ConfigError::PathNotFound { what: what.into(), path: s, cwd: cwd() });
    }
    if s.contains('\0') {
        return Err(ConfigError::InvalidString { what: what.into(), value: s });
    }
    Ok(s)
}

fn metadata(what: &str, path: &Path) -> Result<std::fs::Metadata, ConfigError> {
    let s = path_string(what, path)?;
    std::fs::metadata(path).map_err(|_| ConfigError::PathNotFound { what: what.into(), path: s, cwd: cwd() })
}

fn check_file(what: &str, path: &Path) -> Result<(), ConfigError> {
    if metadata(what, path)?.is_file() {
        Ok(())
    } else {
        Err(ConfigError::PathKind { what: what.into(), path: path.display().to_string(), expected: "a regular file" })
    }
}

fn check_dir(what: &str, path: &Path) -> Result<(), ConfigError> {
    if metadata(what, path)?.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::PathKind { what: what.into(), path: path.display().to_string(), expected: "a directory" })
    }
}

/// Why `path` cannot take the guest console, if it cannot: only a regular file (existing, or to
/// be created) will do. A device (`/dev/full`), FIFO or socket would make the host's writes
/// fail, block or go somewhere else; anything under /proc or /sys (`/proc/self/mem`) is the
/// host's own state. Symlinks are followed; nothing is opened (a FIFO would block).
pub fn console_file_problem(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let pseudo = |p: &Path| ["/proc", "/sys"].into_iter().find(|root| p.starts_with(root));
    match std::fs::metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            let kind = if t.is_dir() {
                Some("a directory")
            } else if t.is_char_device() {
                Some("a character device")
            } else if t.is_block_device() {
                Some("a block device")
            } else if t.is_fifo() {
                Some("a FIFO")
            } else if t.is_socket() {
                Some("a socket")
            } else {
                None
            };
            if let Some(kind) = kind {
                return Some(format!("{shown} is {kind}: give the path of a regular file (created, or truncated)"));
            }
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
            pseudo(&real).map(|root| {
                format!("{shown} is under {root}, the host's own state: give the path of a regular file elsewhere")
            })
        }
        Err(_) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let real = std::fs::canonicalize(parent).ok()?;
            pseudo(&real).map(|root| {
                format!("{shown} is under {root}, the host's own state: give the path of a regular file elsewhere")
            })
        }
    }
}

fn check_console_output(path: &Path) -> Result<(), ConfigError> {
    let what = "consoleOutput";
    path_string(what, path)?;
    if let Some(problem) = console_file_problem(path) {
        return Err(ConfigError::Console(problem));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(ConfigError::PathNotFound {
            what: "consoleOutput's directory".into(),
            path: parent.display().to_string(),
            cwd: cwd(),
        });
    }
    Ok(())
}

fn validate_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(ConfigError::Cmdline(format!(
            "it is {} bytes long; the guest gets at most {MAX_CMDLINE_LEN}: shorten it",
            cmdline.len()
        )));
    }
    if let Some(b) = cmdline.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(ConfigError::Cmdline(format!(
            "it contains byte 0x{b:02x}: use printable ASCII only (no NUL, newline, tab or non-ASCII)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("kernel"), b"\x7fELF").unwrap();
            fs::write(dir.path().join("initrd"), b"initrd").unwrap();
            fs::create_dir(dir.path().join("a")).unwrap();
            fs::create_dir(dir.path().join("b")).unwrap();
            Fixture { dir }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn s(&self, name: &str) -> String {
            self.path(name).display().to_string()
        }
        fn config(&self) -> MicroVmConfig {
            MicroVmConfig { kernel: Some(self.path("kernel")), ..Default::default() }
        }
    }

    const HOST: HostLimits = HostLimits { memory_mib: Some(8192) };

    fn code(c: &MicroVmConfig) -> &'static str {
        c.validate_with(&HOST).unwrap_err().code()
    }

    #[test]
    fn defaults_from_minimal_json() {
        let c = MicroVmConfig::from_json(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(c.num_vcpus, 1);
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.log_level, LogLevel::Off);
        assert_eq!(c.scope, NetworkScope::Group);
        assert!(!c.allow_unsupported_host);
        assert_eq!(
            c.to_json(),
            r#"{"logLevel":"off","numVcpus":1,"memoryMib":512,"scope":"group","kernel":"/k","allowUnsupportedHost":false}"#
        );
        assert_eq!(MicroVmConfig::from_json("{}").unwrap(), MicroVmConfig::default());
    }

    #[test]
    fn full_json_round_trips() {
        let json = r#"{"logLevel":"debug","rootfs":{"overlayfs":["/l1","/l2"]},"numVcpus":2,"memoryMib":1024,
            "mappedDirs":["/home:/guest/mount","/shared"],"portMap":["8080:80","3000"],"scope":"public",
            "ip":"192.168.1.100","subnet":"192.168.1.0/24","rlimits":["RLIMIT_NOFILE=1024:1024"],
            "workdirPath":"/workdir","execPath":"/bin/example","args":["arg1","arg2"],
            "env":["KEY1=VALUE1","KEY2=VALUE2"],"consoleOutput":"/tmp/console.log","kernel":"/k",
            "initrd":"/i","cmdline":"console=ttyS0","allowUnsupportedHost":true}"#;
        let c = MicroVmConfig::from_json(json).unwrap();
        assert_eq!(c.rootfs, Some(Rootfs::Overlayfs(vec!["/l1".into(), "/l2".into()])));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.scope, NetworkScope::Public);
        assert_eq!(c.args, ["arg1", "arg2"]);
        let again = MicroVmConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(again, c);
        let native = MicroVmConfig::from_json(r#"{"rootfs":{"native":"/tmp"}}"#).unwrap();
        assert_eq!(native.rootfs, Some(Rootfs::Native("/tmp".into())));
        assert!(native.to_json().contains(r#""rootfs":{"native":"/tmp"}"#));
    }

    #[test]
    fn json_errors() {
        for bad in [
            "",
            "not json",
            "[]",
            "null",
            r#"{"numVcpu":2}"#,
            r#"{"logLevel":"loud"}"#,
            r#"{"scope":"world"}"#,
            r#"{"rootfs":"/tmp"}"#,
            r#"{"rootfs":{"nfs":"/tmp"}}"#,
            r#"{"args":"a b"}"#,
            r#"{"allowUnsupportedHost":"yes"}"#,
            r#"{"kernel":5}"#,
        ] {
            let e = MicroVmConfig::from_json(bad).unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_JSON", "{bad}: {e}");
        }
        let e = MicroVmConfig::from_json(r#"{"numVcpu":2}"#).unwrap_err().to_string();
        assert!(e.contains("numVcpu"), "{e}");
    }

    #[test]
    fn numeric_json_errors_carry_the_option_code() {
        for bad in ["-1", "1.5", "\"2\"", "null", "4294967296", "true"] {
            let e = MicroVmConfig::from_json(&format!(r#"{{"numVcpus":{bad}}}"#)).unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_VCPUS", "{bad}");
            let e = MicroVmConfig::from_json(&format!(r#"{{"memoryMib":{bad}}}"#)).unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_MEMORY", "{bad}");
        }
    }

    #[test]
    fn a_good_config_validates_and_parses() {
        let f = Fixture::new();
        let c = MicroVmConfig {
            log_level: LogLevel::Info,
            rootfs: Some(Rootfs::Native(f.path("a"))),
            num_vcpus: 32,
            memory_mib: 8192,
            mapped_dirs: vec![format!("{}:/app/./src/", f.s("a")), format!("{}:/data", f.s("b"))],
            port_map: vec!["8080:80".into(), "3000".into(), "8081:80".into()],
            scope: NetworkScope::Any,
            ip: Some("10.0.0.2".into()),
            subnet: Some("10.0.0.0/24".into()),
            rlimits: vec!["RLIMIT_NOFILE=1024:2048".into(), "RLIMIT_CORE=0".into()],
            workdir_path: Some("/app//src".into()),
            exec_path: Some("/usr/bin/python3".into()),
            args: vec!["-c".into(), "print('hi ~')".into(), "".into()],
            env: vec!["A=1".into(), "EMPTY=".into()],
            console_output: Some(f.path("console.log")),
            kernel: Some(f.path("kernel")),
            initrd: Some(f.path("initrd")),
            cmdline: Some("console=ttyS0 tg.mem=512".into()),
            allow_unsupported_host: true,
        };
        let p = c.validate_with(&HOST).unwrap();
        assert_eq!(p.mapped_dirs[0].guest, "/app/src");
        assert_eq!(p.port_map.len(), 3);
        assert_eq!(p.ip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(p.subnet.unwrap().prefix, 24);
        assert_eq!(p.rlimits[1].name(), "RLIMIT_CORE");
        assert_eq!(p.workdir_path.as_deref(), Some("/app/src"));
        assert_eq!(p.env[1].value, "");
    }

    #[test]
    fn vcpus() {
        let f = Fixture::new();
        for n in [0, 33, 255, 1000] {
            assert_eq!(code(&MicroVmConfig { num_vcpus: n, ..f.config() }), "E_CONFIG_VCPUS", "{n}");
        }
        for n in [1, 2, 4, 32] {
            MicroVmConfig { num_vcpus: n, ..f.config() }.validate_with(&HOST).unwrap();
        }
    }

    #[test]
    fn memory() {
        let f = Fixture::new();
        assert_eq!(code(&MicroVmConfig { memory_mib: 0, ..f.config() }), "E_CONFIG_MEMORY");
        let e = MicroVmConfig { memory_mib: 8193, ..f.config() }.validate_with(&HOST).unwrap_err();
        assert_eq!(e, ConfigError::MemoryAboveHost { requested: 8193, host: 8192 });
        assert!(e.to_string().contains("at most 8192 MiB"), "{e}");
        MicroVmConfig { memory_mib: 8192, ..f.config() }.validate_with(&HOST).unwrap();
        // Unknown host memory: no upper check.
        MicroVmConfig { memory_mib: u32::MAX, ..f.config() }.validate_with(&HostLimits::default()).unwrap();
        // The real host check reads /proc/meminfo.
        let host = host_memory_mib().expect("/proc/meminfo has MemTotal");
        assert!(host > 0);
        let e = MicroVmConfig { memory_mib: (host + 1) as u32, ..f.config() }.validate().unwrap_err();
        assert_eq!(e.code(), "E_CONFIG_MEMORY");
    }

    #[test]
    fn meminfo_parsing() {
        assert_eq!(parse_mem_total_mib("MemTotal:       24567808 kB\nMemFree: 1 kB\n"), Some(23992));
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total_mib("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn kernel_and_initrd() {
        let f = Fixture::new();
        let e = MicroVmConfig::default().validate_with(&HOST).unwrap_err();
        assert_eq!(e.code(), "E_CONFIG_MISSING");
        assert!(e.to_string().contains("kernel"));
        assert_eq!(code(&MicroVmConfig { kernel: Some(f.path("nope")), ..f.config() }), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&MicroVmConfig { kernel: Some(f.path("a")), ..f.config() }), "E_CONFIG_PATH_KIND");
        assert_eq!(code(&MicroVmConfig { kernel: Some("".into()), ..f.config() }), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&MicroVmConfig { initrd: Some(f.path("nope")), ..f.config() }), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&MicroVmConfig { initrd: Some(f.path("b")), ..f.config() }), "E_CONFIG_PATH_KIND");
        let e =
            MicroVmConfig { kernel: Some(f.path("missing-kernel")), ..f.config() }.validate_with(&HOST).unwrap_err();
        assert!(e.to_string().contains("missing-kernel"), "{e}");
    }

    #[test]
    fn cmdline() {
        let f = Fixture::new();
        MicroVmConfig { cmdline: Some("x".repeat(MAX_CMDLINE_LEN)), ..f.config() }.validate_with(&HOST).unwrap();
        MicroVmConfig { cmdline: Some(String::new()), ..f.config() }.validate_with(&HOST).unwrap();
        for bad in ["x".repeat(MAX_CMDLINE_LEN + 1), "a\0b".into(), "a\nb".into(), "é".into()] {
            assert_eq!(code(&MicroVmConfig { cmdline: Some(bad), ..f.config() }), "E_CONFIG_CMDLINE");
        }
    }

    #[test]
    fn rootfs() {
        let f = Fixture::new();
        let native = |p| MicroVmConfig { rootfs: Some(Rootfs::Native(p)), ..f.config() };
        native(f.path("a")).validate_with(&HOST).unwrap();
        assert_eq!(code(&native(f.path("missing"))), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&native(f.path("kernel"))), "E_CONFIG_PATH_KIND");
        let overlay = |v| MicroVmConfig { rootfs: Some(Rootfs::Overlayfs(v)), ..f.config() };
        overlay(vec![f.path("a"), f.path("b")]).validate_with(&HOST).unwrap();
        assert_eq!(code(&overlay(vec![f.path("a"), f.path("missing")])), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&overlay(vec![])), "E_CONFIG_MISSING");
        // A guest platform root disk: an existing file, with execPath; the kernel may be left
        // to the platform's default.
        let disk = |p, exec: Option<&str>| MicroVmConfig {
            rootfs: Some(Rootfs::Disk(p)),
            exec_path: exec.map(Into::into),
            kernel: None,
            ..f.config()
        };
        disk(f.path("kernel"), Some("/bin/sh")).validate_with(&HOST).unwrap();
        assert_eq!(code(&disk(f.path("kernel"), None)), "E_CONFIG_MISSING");
        assert_eq!(code(&disk(f.path("a"), Some("/bin/sh"))), "E_CONFIG_PATH_KIND");
        assert_eq!(code(&disk(f.path("missing"), Some("/bin/sh"))), "E_CONFIG_PATH_NOT_FOUND");
        let c = disk(f.path("kernel"), Some("/bin/sh"));
        assert_eq!(c.to_vm_config_with(&HOST).unwrap_err().code(), "E_CONFIG_MISSING");
        // On a root disk the spec goes over the channel: 3000 bytes of args are fine there,
        // not on the kernel command line of a VM booted on the VMM; past the channel's limit
        // neither is.
        let long = |rootfs, n: usize| MicroVmConfig {
            rootfs,
            exec_path: Some("/bin/sh".into()),
            args: vec!["x".repeat(n)],
            ..f.config()
        };
        long(Some(Rootfs::Disk(f.path("kernel"))), 3000).validate_with(&HOST).unwrap();
        let e = long(None, 3000).validate_with(&HOST).unwrap_err();
        assert_eq!(e.code(), "E_CONFIG_CMDLINE");
        assert!(e.to_string().contains("no control channel"), "{e}");
        let e = long(Some(Rootfs::Disk(f.path("kernel"))), super::super::workload_spec::MAX_SPEC_BYTES)
            .validate_with(&HOST)
            .unwrap_err();
        assert_eq!(e.code(), "E_CONFIG_CMDLINE");
        assert!(e.to_string().contains("control channel's StartWorkload"), "{e}");
        let json = MicroVmConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(json.rootfs.as_ref().and_then(Rootfs::disk), Some(f.path("kernel").as_path()));
        // Without a disk the kernel is still required.
        assert_eq!(code(&MicroVmConfig { kernel: None, ..f.config() }), "E_CONFIG_MISSING");
    }

    #[test]
    fn mapped_dirs() {
        let f = Fixture::new();
        let dirs = |v: Vec<String>| MicroVmConfig { mapped_dirs: v, ..f.config() };
        dirs(vec![format!("{}:/app", f.s("a")), format!("{}:/data", f.s("b"))]).validate_with(&HOST).unwrap();
        // Same host directory twice at different guest paths is fine.
        dirs(vec![format!("{}:/x", f.s("a")), format!("{}:/y", f.s("a"))]).validate_with(&HOST).unwrap();
        // "path" form: the same path in the guest.
        dirs(vec![f.s("a")]).validate_with(&HOST).unwrap();
        assert_eq!(code(&dirs(vec![format!("{}:/app", f.s("missing"))])), "E_CONFIG_PATH_NOT_FOUND");
        assert_eq!(code(&dirs(vec![format!("{}:/app", f.s("kernel"))])), "E_CONFIG_PATH_KIND");
        assert_eq!(code(&dirs(vec![format!("{}:app", f.s("a"))])), "E_CONFIG_GUEST_PATH");
        assert_eq!(code(&dirs(vec!["a:b:c".into()])), "E_CONFIG_PAIR");
        assert_eq!(code(&dirs(vec![":/x".into()])), "E_CONFIG_PAIR");
        for (g1, g2) in [
            ("/app", "/app/data"),
            ("/app/data", "/app"),
            ("/app", "/app"),
            ("/app/./data", "/app/data/"),
            ("/var/log", "//var"),
            ("/x/../app", "/app"),
        ] {
            let e = dirs(vec![format!("{}:{g1}", f.s("a")), format!("{}:{g2}", f.s("b"))])
                .validate_with(&HOST)
                .unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_GUEST_PATH_CONFLICT", "{g1} {g2}");
        }
        // Not a conflict: a shared prefix that is not a path prefix.
        dirs(vec![format!("{}:/app", f.s("a")), format!("{}:/application", f.s("b"))]).validate_with(&HOST).unwrap();
        // Three paths, the conflict between the first and the last.
        let e =
            dirs(vec![format!("{}:/var/log", f.s("a")), format!("{}:/etc", f.s("b")), format!("{}:/var", f.s("b"))])
                .validate_with(&HOST)
                .unwrap_err();
        assert_eq!(e, ConfigError::GuestPathConflict { first: "/var/log".into(), second: "/var".into() });
    }

    #[test]
    fn ports() {
        let f = Fixture::new();
        let ports = |v: &[&str]| MicroVmConfig { port_map: v.iter().map(|s| s.to_string()).collect(), ..f.config() };
        ports(&["8080:80", "2222:22", "3000"]).validate_with(&HOST).unwrap();
        assert_eq!(code(&ports(&["0:80"])), "E_CONFIG_PORT");
        assert_eq!(code(&ports(&["65536:80"])), "E_CONFIG_PORT");
        assert_eq!(code(&ports(&["8080:80", "8080:81"])), "E_CONFIG_PORT");
        assert_eq!(code(&ports(&["3000", "3000:3001"])), "E_CONFIG_PORT");
        assert_eq!(code(&ports(&["80:80:80"])), "E_CONFIG_PAIR");
        assert_eq!(code(&ports(&[""])), "E_CONFIG_PAIR");
    }

    #[test]
    fn network() {
        let f = Fixture::new();
        let net = |ip: Option<&str>, subnet: Option<&str>| MicroVmConfig {
            ip: ip.map(String::from),
            subnet: subnet.map(String::from),
            ..f.config()
        };
        net(Some("192.168.1.100"), Some("192.168.1.0/24")).validate_with(&HOST).unwrap();
        net(Some("192.168.1.100"), None).validate_with(&HOST).unwrap();
        net(None, Some("10.0.0.0/8")).validate_with(&HOST).unwrap();
        net(Some("10.0.0.1"), Some("10.0.0.1/32")).validate_with(&HOST).unwrap();
        net(Some("10.0.0.0"), Some("10.0.0.0/31")).validate_with(&HOST).unwrap();
        for (ip, subnet) in [
            (Some("192.168.2.1"), Some("192.168.1.0/24")),
            (Some("192.168.1.0"), Some("192.168.1.0/24")),
            (Some("192.168.1.255"), Some("192.168.1.0/24")),
            (Some("192.168.1"), None),
            (Some("::1"), None),
            (Some("192.168.1.300"), None),
            (None, Some("192.168.1.0")),
            (None, Some("192.168.1.0/40")),
            (None, Some("192.168.1.1/24")),
        ] {
            assert_eq!(code(&net(ip, subnet)), "E_CONFIG_NETWORK", "{ip:?} {subnet:?}");
        }
        let e = net(Some("192.168.2.1"), Some("192.168.1.0/24")).validate_with(&HOST).unwrap_err().to_string();
        assert!(e.contains("not in subnet 192.168.1.0/24"), "{e}");
    }

    #[test]
    fn rlimits() {
        let f = Fixture::new();
        let r = |v: &[&str]| MicroVmConfig { rlimits: v.iter().map(|s| s.to_string()).collect(), ..f.config() };
        r(&["RLIMIT_NOFILE=1024:1024", "RLIMIT_NPROC=unlimited"]).validate_with(&HOST).unwrap();
        assert_eq!(code(&r(&["RLIMIT_NOPE=1:1"])), "E_CONFIG_RLIMIT");
        assert_eq!(code(&r(&["RLIMIT_NOFILE=2:1"])), "E_CONFIG_RLIMIT");
        assert_eq!(code(&r(&["RLIMIT_NOFILE=x"])), "E_CONFIG_RLIMIT");
        assert_eq!(code(&r(&["RLIMIT_NOFILE=1:1", "RLIMIT_NOFILE=2:2"])), "E_CONFIG_RLIMIT");
    }

    #[test]
    fn strings_and_guest_paths() {
        let f = Fixture::new();
        assert_eq!(
            code(&MicroVmConfig { exec_path: Some("/bin/hello\nworld".into()), ..f.config() }),
            "E_CONFIG_INVALID_STRING"
        );
        assert_eq!(
            code(&MicroVmConfig { exec_path: Some("/bin/echo\0".into()), ..f.config() }),
            "E_CONFIG_INVALID_STRING"
        );
        assert_eq!(code(&MicroVmConfig { exec_path: Some("".into()), ..f.config() }), "E_CONFIG_INVALID_STRING");
        assert_eq!(
            code(&MicroVmConfig { exec_path: Some("/bin/café".into()), ..f.config() }),
            "E_CONFIG_INVALID_STRING"
        );
        MicroVmConfig { exec_path: Some("python3".into()), ..f.config() }.validate_with(&HOST).unwrap();
        let args = |a: &[&str]| MicroVmConfig {
            exec_path: Some("/bin/echo".into()),
            args: a.iter().map(|s| s.to_string()).collect(),
            ..f.config()
        };
        args(&["Hello, World!", "~", " "]).validate_with(&HOST).unwrap();
        for bad in ["hello\tworld", "nul\0", "del\x7f", "🌎"] {
            let e = args(&["ok", bad]).validate_with(&HOST).unwrap_err();
            assert_eq!(e.code(), "E_CONFIG_INVALID_STRING", "{bad:?}");
            assert!(e.to_string().contains("args[1]"), "{e}");
        }
        assert_eq!(code(&MicroVmConfig { workdir_path: Some("work".into()), ..f.config() }), "E_CONFIG_GUEST_PATH");
        assert_eq!(
            code(&MicroVmConfig { workdir_path: Some("/w\x01".into()), ..f.config() }),
            "E_CONFIG_INVALID_STRING"
        );
        let e = MicroVmConfig { exec_path: Some("/bin/a\nb".into()), ..f.config() }.validate_with(&HOST).unwrap_err();
        assert!(e.to_string().contains(r#""/bin/a\nb""#), "the value is shown escaped: {e}");
    }

    #[test]
    fn env() {
        let f = Fixture::new();
        let env = |v: &[&str]| MicroVmConfig { env: v.iter().map(|s| s.to_string()).collect(), ..f.config() };
        env(&["KEY1=VALUE1", "K=a=b", "E="]).validate_with(&HOST).unwrap();
        assert_eq!(code(&env(&["NOEQUALS"])), "E_CONFIG_ENV");
        assert_eq!(code(&env(&["=value"])), "E_CONFIG_ENV");
        assert_eq!(code(&env(&["K=v\0"])), "E_CONFIG_ENV");
    }

    #[test]
    fn console_output() {
        let f = Fixture::new();
        let out = |p: PathBuf| MicroVmConfig { console_output: Some(p), ..f.config() };
        out(f.path("console.log")).validate_with(&HOST).unwrap();
        out(f.path("kernel")).validate_with(&HOST).unwrap(); // an existing file is truncated
        assert_eq!(code(&out(f.path("a"))), "E_CONFIG_CONSOLE");
        for bad in ["/dev/full", "/dev/null", "/proc/self/mem", "/proc/self/new-file", "/sys/kernel/x"] {
            assert_eq!(code(&out(PathBuf::from(bad))), "E_CONFIG_CONSOLE", "{bad}");
        }
        assert_eq!(code(&out(f.path("missing-dir/console.log"))), "E_CONFIG_PATH_NOT_FOUND");
        out(PathBuf::from("relative-console.log")).validate_with(&HOST).unwrap();
    }

    #[test]
    fn every_code_is_documented_and_distinct() {
        let mut codes = ConfigError::CODES.to_vec();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ConfigError::CODES.len());
        assert!(codes.iter().all(|c| c.starts_with("E_CONFIG_")));
    }

    #[test]
    fn to_vm_config_uses_defaults_and_exact_cmdline() {
        let f = Fixture::new();
        let vm = MicroVmConfig { num_vcpus: 4, memory_mib: 4096, ..f.config() }.to_vm_config_with(&HOST).unwrap();
        assert_eq!(vm.vcpus, 4);
        assert_eq!(vm.memory_mib, 4096);
        assert_eq!(vm.kernel, f.path("kernel"));
        assert_eq!(vm.initrd, None);
        assert_eq!(vm.cmdline, vmm::DEFAULT_CMDLINE);
        assert!(!vm.allow_unsupported_host);
        let vm = MicroVmConfig {
            initrd: Some(f.path("initrd")),
            cmdline: Some("  tg.mem=512  ".into()),
            allow_unsupported_host: true,
            ..f.config()
        }
        .to_vm_config_with(&HOST)
        .unwrap();
        assert_eq!(vm.cmdline, "  tg.mem=512  ");
        assert_eq!(vm.initrd, Some(f.path("initrd")));
        assert!(vm.allow_unsupported_host);
        // execPath: the workload word is appended (and decodes back to the config's values).
        let vm = MicroVmConfig {
            cmdline: Some("console=ttyS0".into()),
            exec_path: Some("/bin/sh".into()),
            args: vec!["-c".into(), "echo \"a b\" 'c'".into()],
            env: vec!["K=v w".into()],
            workdir_path: Some("/w".into()),
            rlimits: vec!["RLIMIT_NOFILE=1024:1024".into()],
            ..f.config()
        }
        .to_vm_config_with(&HOST)
        .unwrap();
        let (head, word) = vm.cmdline.split_once(' ').unwrap();
        assert_eq!(head, "console=ttyS0");
        let value = word.strip_prefix("microcell.exec=").unwrap();
        let spec = protocol::WorkloadSpec::from_cmdline_value(value).unwrap();
        assert_eq!(spec.argv, ["/bin/sh", "-c", "echo \"a b\" 'c'"]);
        assert_eq!(spec.env, [("K".to_owned(), "v w".to_owned())]);
        assert_eq!(spec.cwd.as_deref(), Some("/w"));
        assert_eq!(spec.rlimits.len(), 1);
        let e = MicroVmConfig { exec_path: Some("/bin/sh".into()), args: vec!["x".repeat(3000)], ..f.config() }
            .to_vm_config_with(&HOST)
            .unwrap_err();
        assert_eq!(e.code(), "E_CONFIG_CMDLINE", "{e}");
        assert_eq!(
            MicroVmConfig { num_vcpus: 0, ..f.config() }.to_vm_config_with(&HOST).unwrap_err().code(),
            "E_CONFIG_VCPUS"
        );
    }
}
