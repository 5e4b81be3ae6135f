//! `SandboxConfig`: what `Sandbox::create` takes — exactly the JSON the TypeScript builder
//! produces (camelCase keys) — and its validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::microvm::NetworkScope;
use crate::config::types::{normalize_guest_path, PortPair};
use crate::engine::{BootSpec, EngineChoice, NetSpec, PortForward, Share, GUEST_NET};
use crate::error::{ConfigError, Result, SandboxError};

/// The mount tag of volume `i` (the guest finds it by this name).
fn volume_tag(i: usize) -> String {
    format!("mcvol{i}")
}

use crate::limits::{
    CONSOLE_QUEUE_BYTES, DEFAULT_BOOT_TIMEOUT_MS, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_BOOT_TIMEOUT_MS,
    MAX_CONSOLE_QUEUE_BYTES, MAX_VCPUS, MIN_BOOT_TIMEOUT_MS, MIN_MEMORY_MIB,
};
/// Longest `kernelArgs`.
pub const MAX_KERNEL_ARGS_LEN: usize = 1024;

/// The configuration of one sandbox (camelCase JSON; unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxConfig {
    /// A name for logs and errors; also the guest's hostname. 1-63 letters, digits and '-',
    /// not starting or ending with '-'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Environment for processes run in the sandbox (kept for exec; the agent does not run
    /// processes yet).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory for processes run in the sandbox (absolute guest path; kept for exec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default)]
    pub engine: EngineChoice,
    /// The guest kernel; default: `MICROCELL_KERNEL`, else `<cache>/kernel-current/vmlinux`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// The root disk image; default: `MICROCELL_ROOTFS`, else `<cache>/rootfs-current/rootfs.ext4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_ms: u32,
    /// Host file that receives the guest console (created or truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_output: Option<PathBuf>,
    /// Extra kernel command line, appended to the engine's (for debugging, e.g. `loglevel=8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// The sandbox's longest life: it is killed this long after it was created (or restored),
    /// unless the caller moves the deadline. Enforced by the Node library's `Sandbox` (a
    /// timer); kept here for the configuration's other users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_ms: Option<u32>,
    /// Host directories shared into the guest (virtio-9p on engine `qemu`), mounted at boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// A network interface for the guest (`eth0` behind user-mode NAT: passt, with the egress
    /// policy between, on either engine); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// The caller's own labels (`Sandbox.list({ metadata })` selects by them; snapshots keep
    /// them): at most 64, keys 1-64 and values 0-512 printable characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Console bytes kept for a slow reader of the console stream before the oldest are dropped
    /// (default [`CONSOLE_QUEUE_BYTES`]; `consoleOutput` files get every byte anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_queue_bytes: Option<u32>,
}

/// Most volumes of one sandbox (virtio-mmio slots beside the disk, console and network).
pub const MAX_VOLUMES: usize = 4;

/// A host directory shared into the guest (camelCase JSON; unknown keys refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// An existing host directory (made absolute by validation).
    pub host: PathBuf,
    /// Where the guest mounts it: an absolute path, not `/`, without `,` `:` or spaces.
    pub guest: String,
    /// Mounted read-only, and refused writes on the host side too.
    #[serde(default)]
    pub read_only: bool,
}

fn volume_error(message: String) -> SandboxError {
    ConfigError::Volume(message).into()
}

/// Checks and normalises the volumes: host directories exist (made absolute), guest paths are
/// absolute, usable on the kernel command line, and neither the same nor nested.
fn validate_volumes(volumes: &mut [Volume]) -> Result<()> {
    if volumes.len() > MAX_VOLUMES {
        return Err(volume_error(format!("{} volumes: give at most {MAX_VOLUMES}", volumes.len())));
    }
    for v in volumes.iter_mut() {
        let host = std::fs::canonicalize(&v.host).ok().filter(|p| p.is_dir()).ok_or_else(|| {
            volume_error(format!("volume host path {} is not an existing directory: give one", v.host.display()))
        })?;
        v.host = host;
        let guest = normalize_guest_path("volume guest path", &v.guest).map_err(|e| volume_error(e.to_string()))?;
        if guest == "/" || guest.contains([',', ':']) || guest.chars().any(char::is_whitespace) {
            return Err(volume_error(format!("volume guest path {guest:?} cannot be used: give an absolute path other than / without ',', ':' or spaces")));
        }
        v.guest = guest;
    }
    for (i, a) in volumes.iter().enumerate() {
        for b in &volumes[i + 1..] {
            let nested = |x: &str, y: &str| x == y || y.starts_with(&format!("{x}/"));
            if nested(&a.guest, &b.guest) || nested(&b.guest, &a.guest) {
                return Err(volume_error(format!(
                    "volume guest paths {} and {} overlap: give each its own directory",
                    a.guest, b.guest
                )));
            }
        }
    }
    Ok(())
}

pub const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

/// `E_CONFIG_CONSOLE` unless `path` (a config's or a restore's `consoleOutput`) can take the
/// console: one check for every way a console file is named.
pub(crate) fn check_console_output(path: Option<&Path>) -> Result<()> {
    match path.and_then(crate::config::console_file_problem) {
        Some(problem) => Err(ConfigError::Console(problem).into()),
        None => Ok(()),
    }
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    let err = |m: String| SandboxError::from(ConfigError::Metadata(m));
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(err(format!("{} metadata entries: give at most {MAX_METADATA_ENTRIES}", metadata.len())));
    }
    let printable = |s: &str| !s.chars().any(char::is_control);
    for (k, v) in metadata {
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY || !printable(k) {
            return Err(err(format!("metadata key {k:?}: give 1 to {MAX_METADATA_KEY} printable characters")));
        }
        if v.chars().count() > MAX_METADATA_VALUE || !printable(v) {
            return Err(err(format!(
                "metadata value of {k:?}: give at most {MAX_METADATA_VALUE} printable characters"
            )));
        }
    }
    Ok(())
}

/// The guest's network (camelCase JSON; unknown keys refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfig {
    /// Whether the guest may open connections out, to the host's loopback (`10.0.2.2`) and
    /// beyond (default true); forwarded ports work either way.
    #[serde(default = "yes")]
    pub outbound: bool,
    /// Ports forwarded from the host's loopback into the guest: `"HOST:GUEST"` or `"PORT"` (the
    /// same number on both sides), TCP unless followed by `/udp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// With `outbound`: destinations the guest may not reach — `"a.b.c.d"`, `"a.b.c.d/n"`,
    /// `"private"` (loopback, RFC 1918, CGNAT, link-local with cloud metadata, this network;
    /// the host's loopback `10.0.2.2` is inside) or `"host"` (`10.0.2.2` alone). DNS to the
    /// guest's resolver stays open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Destinations that stay reachable inside a denied one (same forms); `allow` wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// A change of a running sandbox's network policy (camelCase JSON; unknown keys refused):
/// what is given replaces what was in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkUpdate {
    pub outbound: Option<bool>,
    pub deny: Option<Vec<String>>,
    pub allow: Option<Vec<String>>,
}

/// What `"private"` stands for in `deny`/`allow`.
pub const PRIVATE_NETWORKS: [&str; 7] =
    ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"];

/// One `deny`/`allow` entry as networks; `E_CONFIG_NETWORK` naming the entry otherwise.
fn destinations(list: &str, entries: &[String]) -> Result<Vec<vmm::Ipv4Net>> {
    let mut nets = Vec::new();
    for e in entries {
        match e.as_str() {
            "private" => nets.extend(PRIVATE_NETWORKS.iter().map(|n| n.parse::<vmm::Ipv4Net>().expect("valid"))),
            "host" => nets.push(format!("{}/32", GUEST_NET.1).parse().expect("valid")),
            other => nets.push(other.parse().map_err(|m| {
                SandboxError::from(ConfigError::Network(format!(
                    "network {list}: {m}; give an IPv4 address, a.b.c.d/prefix, \"private\" or \"host\""
                )))
            })?),
        }
    }
    Ok(nets)
}

fn yes() -> bool {
    true
}

impl NetworkConfig {
    /// A MicroVm's `scope` and `portMap` (validated: no ports with scope `none`) as a workload
    /// VM's network: `none` — no interface; `group` (the default) — an interface only for
    /// forwarded ports, no way out (there is no group of sandboxes to reach yet); `public` —
    /// outbound to public addresses only (`deny: ["private"]`); `any` — outbound anywhere.
    pub fn for_microvm(scope: NetworkScope, port_map: &[String]) -> Option<NetworkConfig> {
        let ports = port_map.to_vec();
        let config = |outbound, deny: &[&str]| NetworkConfig {
            outbound,
            ports: ports.clone(),
            deny: deny.iter().map(|d| d.to_string()).collect(),
            allow: vec![],
        };
        match scope {
            NetworkScope::None => None,
            NetworkScope::Group if ports.is_empty() => None,
            NetworkScope::Group => Some(config(false, &[])),
            NetworkScope::Public => Some(config(true, &["private"])),
            NetworkScope::Any => Some(config(true, &[])),
        }
    }
}

impl NetworkConfig {
    /// The engine's view; `E_CONFIG_NETWORK` for a port that is not `HOST:GUEST` or `PORT`
    /// (1-65535) or a host port given twice.
    pub fn net_spec(&self) -> Result<NetSpec> {
        let mut ports: Vec<PortForward> = Vec::new();
        for p in &self.ports {
            let pair = PortPair::parse(p)
                .map_err(|e| SandboxError::from(ConfigError::Network(format!("network ports: {e}"))))?;
            if ports.iter().any(|q| q.host == pair.host && q.udp == pair.udp) {
                return Err(ConfigError::Network(format!(
                    "network port {p:?} forwards host {} port {} a second time: give each host port once",
                    pair.protocol(),
                    pair.host
                ))
                .into());
            }
            ports.push(PortForward { host: pair.host, guest: pair.guest, udp: pair.udp });
        }
        if !self.outbound && (!self.deny.is_empty() || !self.allow.is_empty()) {
            return Err(ConfigError::Network(
                "network deny/allow choose where outbound traffic may go, and outbound is false: drop them or set outbound".into(),
            )
            .into());
        }
        Ok(NetSpec {
            outbound: self.outbound,
            ports,
            deny: destinations("deny", &self.deny)?,
            allow: destinations("allow", &self.allow)?,
        })
    }
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}
fn default_cpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_boot_timeout() -> u32 {
    DEFAULT_BOOT_TIMEOUT_MS
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            name: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_VCPUS,
            env: BTreeMap::new(),
            workdir: None,
            engine: EngineChoice::Auto,
            kernel: None,
            rootfs: None,
            boot_timeout_ms: DEFAULT_BOOT_TIMEOUT_MS,
            console_output: None,
            kernel_args: None,
            max_duration_ms: None,
            volumes: Vec::new(),
            network: None,
            metadata: BTreeMap::new(),
            console_queue_bytes: None,
        }
    }
}

/// The guest images a configuration resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// The guest image cache: `MICROCELL_CACHE`, else `$HOME/.cache/microcell` (where
/// `scripts/guest/build-*.sh` put their outputs).
pub fn guest_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICROCELL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/microcell")
}

/// The npm package that ships the default guest images (the Node layer unpacks it into the
/// cache and registers the result with [`set_packaged_guest`]).
pub const GUEST_PACKAGE: &str = "microcell-guest-linux-x64";

/// The images of an installed guest package, once the Node layer has unpacked them.
static PACKAGED_GUEST: std::sync::RwLock<Option<GuestImages>> = std::sync::RwLock::new(None);

/// Registers (or, with `None`, forgets) the images of the installed guest package: the
/// defaults after the environment and before the cache `scripts/setup.sh` builds.
pub fn set_packaged_guest(images: Option<GuestImages>) {
    // A poisoned lock only means a panic elsewhere while holding it; the value is still whole.
    *PACKAGED_GUEST.write().unwrap_or_else(|e| e.into_inner()) = images;
}

/// Where a default image comes from: `env` (MICROCELL_KERNEL / MICROCELL_ROOTFS), `package`
/// (the installed guest package) or `cache` (what `scripts/setup.sh` built).
fn default_image(var: &str, packaged: fn(&GuestImages) -> &PathBuf, built: &str) -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), "env");
    }
    if let Some(g) = PACKAGED_GUEST.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return (packaged(g).clone(), "package");
    }
    (guest_cache_dir().join(built), "cache")
}

/// The default kernel and where it comes from: `MICROCELL_KERNEL`, else the installed guest
/// package's, else `<cache>/kernel-current/vmlinux`.
pub fn default_kernel_source() -> (PathBuf, &'static str) {
    default_image("MICROCELL_KERNEL", |g| &g.kernel, "kernel-current/vmlinux")
}

/// The default root disk and where it comes from: `MICROCELL_ROOTFS`, else the installed guest
/// package's, else `<cache>/rootfs-current/rootfs.ext4`.
pub fn default_rootfs_source() -> (PathBuf, &'static str) {
    default_image("MICROCELL_ROOTFS", |g| &g.rootfs, "rootfs-current/rootfs.ext4")
}

/// The default kernel (see [`default_kernel_source`]).
pub fn default_kernel() -> PathBuf {
    default_kernel_source().0
}

/// The default root disk (see [`default_rootfs_source`]).
pub fn default_rootfs() -> PathBuf {
    default_rootfs_source().0
}

impl SandboxConfig {
    /// Parses the JSON the TypeScript builder produces. Numbers that are not whole numbers in
    /// range get the code of their option; anything else that does not fit is `E_CONFIG_JSON`.
    pub fn from_json(json: &str) -> Result<SandboxConfig> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| json_error(e.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(json_error("expected a JSON object".into()));
        };
        for key in ["memoryMib", "cpus", "bootTimeoutMs", "consoleQueueBytes", "maxDurationMs"] {
            if let Some(v) = object.get(key) {
                let whole = matches!(v.as_u64(), Some(n) if n <= u32::MAX as u64);
                if !whole {
                    let v = v.to_string();
                    return Err(match key {
                        "memoryMib" => ConfigError::MemoryBelowMin(v),
                        "cpus" => ConfigError::Cpus(v),
                        "consoleQueueBytes" => ConfigError::ConsoleQueue(v),
                        _ => ConfigError::Timeout(format!("{key} is {v}: give a whole number")),
                    }
                    .into());
                }
            }
        }
        serde_json::from_value(value).map_err(|e| json_error(e.to_string()))
    }

    /// The configuration as JSON (defaults filled in, empty options left out).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("SandboxConfig always serialises")
    }

    /// Checks every option except the guest images (see [`Self::guest_images`]); returns the
    /// configuration normalised (`workdir` made canonical).
    /// What the engine boots for this configuration (validated) from `kernel` and `rootfs`.
    pub fn boot_spec(&self, kernel: PathBuf, rootfs: PathBuf, console_file: Option<PathBuf>) -> BootSpec {
        BootSpec {
            kernel,
            rootfs,
            memory_mib: self.memory_mib,
            vcpus: self.cpus as u8,
            extra_cmdline: self.extra_cmdline(),
            console_file,
            console_queue_bytes: Some(self.console_queue()),
            net: self.network.as_ref().and_then(|n| n.net_spec().ok()),
            shares: self
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| Share { tag: volume_tag(i), host: v.host.clone(), read_only: v.read_only })
                .collect(),
        }
    }

    /// What this configuration needs that only engine `qemu` has, said for `auto`'s reason.
    pub fn qemu_only_devices(&self) -> Option<String> {
        crate::engine::kvm::missing_devices(!self.volumes.is_empty())
    }

    /// The console queue to keep: `consoleQueueBytes`, else the default.
    pub fn console_queue(&self) -> usize {
        self.console_queue_bytes.map_or(CONSOLE_QUEUE_BYTES, |n| n as usize)
    }

    pub fn validate(&self) -> Result<SandboxConfig> {
        let mut c = self.clone();
        if let Some(name) = &c.name {
            validate_name(name)?;
        }
        if c.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryBelowMin(c.memory_mib.to_string()).into());
        }
        if let Some(host) = crate::config::host_memory_mib() {
            if u64::from(c.memory_mib) > host {
                return Err(ConfigError::MemoryAboveHost { requested: c.memory_mib.into(), host }.into());
            }
        }
        if c.cpus == 0 || c.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(c.cpus.to_string()).into());
        }
        for (key, value) in &c.env {
            validate_env(key, value)?;
        }
        if let Some(w) = &c.workdir {
            c.workdir = Some(normalize_guest_path("workdir", w)?);
        }
        if !(MIN_BOOT_TIMEOUT_MS..=MAX_BOOT_TIMEOUT_MS).contains(&c.boot_timeout_ms) {
            return Err(ConfigError::Timeout(format!(
                    "bootTimeoutMs is {}: give {MIN_BOOT_TIMEOUT_MS} to {MAX_BOOT_TIMEOUT_MS} ms (default {DEFAULT_BOOT_TIMEOUT_MS})",
                    c.boot_timeout_ms
            ))
            .into());
        }
        if c.max_duration_ms == Some(0) {
            return Err(ConfigError::Timeout(
                "maxDurationMs is 0: give a whole number of milliseconds from 1 to 4294967295, or none for no limit"
                    .into(),
            )
            .into());
        }
        if let Some(n) = c.console_queue_bytes {
            if !(1..=MAX_CONSOLE_QUEUE_BYTES).contains(&n) {
                return Err(ConfigError::ConsoleQueue(n.to_string()).into());
            }
        }
        if let Some(n) = &c.network {
            n.net_spec()?;
        }
        validate_volumes(&mut c.volumes)?;
        validate_metadata(&c.metadata)?;
        if let Some(args) = &c.kernel_args {
            if args.len() > MAX_KERNEL_ARGS_LEN || !args.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
                return Err(ConfigError::Cmdline(format!(
                    "kernelArgs must be at most {MAX_KERNEL_ARGS_LEN} printable ASCII characters (no newlines or control characters), got {args:?}"
                ))
                .into());
            }
        }
        for (what, path) in [("kernel", &c.kernel), ("rootfs", &c.rootfs), ("consoleOutput", &c.console_output)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(json_error(format!("{what} is an empty path: give a path or leave it out")));
            }
        }
        check_console_output(c.console_output.as_deref())?;
        Ok(c)
    }

    /// The kernel and root disk to boot: the configured paths, else the defaults. Each must be
    /// an existing file (`E_GUEST_IMAGE_MISSING` says how to get it).
    pub fn guest_images(&self) -> Result<GuestImages> {
        let kernel = check_image("kernel", self.kernel.clone(), default_kernel(), "scripts/guest/build-kernel.sh")?;
        let rootfs = check_image("root disk", self.rootfs.clone(), default_rootfs(), "scripts/guest/build-rootfs.sh")?;
        Ok(GuestImages { kernel, rootfs })
    }

    /// The guest kernel command line this configuration adds to the engine's.
    pub fn extra_cmdline(&self) -> String {
        let mut parts = Vec::new();
        if let Some(name) = &self.name {
            parts.push(format!("microcell.hostname={name}"));
        }
        if self.network.is_some() {
            let (addr, gateway, dns) = GUEST_NET;
            parts.push(format!("microcell.net={addr},{gateway},{dns}"));
        }
        if !self.volumes.is_empty() {
            let list: Vec<String> = self
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{}:{}:{}", volume_tag(i), v.guest, if v.read_only { "ro" } else { "rw" }))
                .collect();
            parts.push(format!("microcell.volumes={}", list.join(",")));
        }
        if let Some(args) = &self.kernel_args {
            parts.push(args.trim().to_owned());
        }
        parts.retain(|p| !p.is_empty());
        parts.join(" ")
    }
}

/// Parses, validates and normalises a configuration given as JSON (what the napi layer's
/// `validateSandboxConfig` returns). Guest images are not checked here.
pub fn validate_sandbox_config_json(json: &str) -> Result<String> {
    Ok(SandboxConfig::from_json(json)?.validate()?.to_json())
}

fn json_error(detail: String) -> SandboxError {
    ConfigError::SandboxJson(detail).into()
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(name.to_string()).into())
    }
}

fn validate_env(key: &str, value: &str) -> Result<()> {
    let key_ok = key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !key_ok {
        return Err(ConfigError::Env {
            value: key.to_string(),
            reason: "the name is not usable: use letters, digits and '_', not starting with a digit".into(),
        }
        .into());
    }
    if value.contains('\0') {
        return Err(ConfigError::Env {
            value: key.to_string(),
            reason: "the value contains a NUL byte, which no process can receive".into(),
        }
        .into());
    }
    Ok(())
}

fn check_image(what: &'static str, given: Option<PathBuf>, default: PathBuf, script: &str) -> Result<PathBuf> {
    let (path, hint) = match given {
        Some(p) => (p, format!("fix the {what} path, or leave it out for the default (the installed {GUEST_PACKAGE} package's, or the one scripts/setup.sh builds)")),
        None => (
            default,
            format!("the guest images are not installed: npm install {GUEST_PACKAGE} (the guest kernel and root disk; microcell unpacks them into {} on first use), set MICROCELL_KERNEL / MICROCELL_ROOTFS, or in a clone build them with scripts/setup.sh (or {script})", guest_cache_dir().display()),
        ),
    };
    if is_file(&path) {
        Ok(path)
    } else {
        Err(SandboxError::GuestImageMissing { what, path, hint })
    }
}

fn is_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_round_trip() {
        let c = SandboxConfig::from_json("{}").unwrap();
        assert_eq!(c, SandboxConfig::default());
        assert_eq!(c.to_json(), r#"{"memoryMib":512,"cpus":1,"engine":"auto","bootTimeoutMs":30000}"#);
        let json = r#"{"name":"box-1","memoryMib":256,"cpus":2,"env":{"A":"1","B_2":"x y"},"workdir":"/srv//app/","engine":"qemu","kernel":"/k","rootfs":"/r","bootTimeoutMs":5000,"consoleOutput":"/tmp/c.log","kernelArgs":"loglevel=8"}"#;
        let c = SandboxConfig::from_json(json).unwrap();
        assert_eq!(c.engine, EngineChoice::Qemu);
        let v = c.validate().unwrap();
        assert_eq!(v.workdir.as_deref(), Some("/srv/app"));
        assert_eq!(SandboxConfig::from_json(&v.to_json()).unwrap(), v);
        assert_eq!(v.extra_cmdline(), "microcell.hostname=box-1 loglevel=8");
    }

    fn code(json: &str) -> &'static str {
        match SandboxConfig::from_json(json).and_then(|c| c.validate()) {
            Ok(_) => "OK",
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() > 20, "{msg}");
                e.code()
            }
        }
    }

    #[test]
    fn each_bad_option_has_its_code() {
        assert_eq!(code("[]"), "E_CONFIG_JSON");
        assert_eq!(code("{"), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"memory":1}"#), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"engine":"firecracker"}"#), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"memoryMib":1.5}"#), "E_CONFIG_MEMORY");
        assert_eq!(code(r#"{"memoryMib":-1}"#), "E_CONFIG_MEMORY");
        assert_eq!(code(r#"{"memoryMib":16}"#), "E_CONFIG_MEMORY");
        assert_eq!(code(r#"{"memoryMib":4000000000}"#), "E_CONFIG_MEMORY");
        assert_eq!(code(r#"{"cpus":0}"#), "E_CONFIG_VCPUS");
        assert_eq!(code(r#"{"cpus":33}"#), "E_CONFIG_VCPUS");
        assert_eq!(code(r#"{"cpus":"2"}"#), "E_CONFIG_VCPUS");
        assert_eq!(code(r#"{"name":""}"#), "E_CONFIG_NAME");
        assert_eq!(code(r#"{"name":"a_b"}"#), "E_CONFIG_NAME");
        assert_eq!(code(r#"{"name":"-a"}"#), "E_CONFIG_NAME");
        assert_eq!(code(&format!(r#"{{"name":"{}"}}"#, "a".repeat(64))), "E_CONFIG_NAME");
        assert_eq!(code(&format!(r#"{{"name":"{}"}}"#, "a".repeat(63))), "OK");
        assert_eq!(code(r#"{"env":{"1A":"x"}}"#), "E_CONFIG_ENV");
        assert_eq!(code(r#"{"env":{"A-B":"x"}}"#), "E_CONFIG_ENV");
        assert_eq!(code(r#"{"env":{"A":"x\u0000"}}"#), "E_CONFIG_ENV");
        assert_eq!(code(r#"{"env":{"_A":""}}"#), "OK");
        assert_eq!(code(r#"{"workdir":"rel"}"#), "E_CONFIG_GUEST_PATH");
        assert_eq!(code(r#"{"workdir":"/../x"}"#), "E_CONFIG_GUEST_PATH");
        assert_eq!(code(r#"{"bootTimeoutMs":10}"#), "E_CONFIG_TIMEOUT");
        assert_eq!(code(r#"{"bootTimeoutMs":600001}"#), "E_CONFIG_TIMEOUT");
        assert_eq!(code(r#"{"bootTimeoutMs":"1"}"#), "E_CONFIG_TIMEOUT");
        assert_eq!(code(r#"{"kernelArgs":"a\nb"}"#), "E_CONFIG_CMDLINE");
        assert_eq!(code(r#"{"consoleQueueBytes":0}"#), "E_CONFIG_CONSOLE");
        assert_eq!(code(r#"{"consoleQueueBytes":1073741825}"#), "E_CONFIG_CONSOLE");
        for bad in ["/dev/full", "/proc/self/mem", "/sys/x", "/tmp"] {
            assert_eq!(code(&format!(r#"{{"consoleOutput":"{bad}"}}"#)), "E_CONFIG_CONSOLE", "{bad}");
        }
        assert_eq!(code(r#"{"consoleQueueBytes":4096}"#), "OK");
        assert_eq!(code(r#"{"maxDurationMs":0}"#), "E_CONFIG_TIMEOUT");
        assert_eq!(code(r#"{"maxDurationMs":1.5}"#), "E_CONFIG_TIMEOUT");
        assert_eq!(code(r#"{"maxDurationMs":60000}"#), "OK");
        assert_eq!(code(r#"{"network":{}}"#), "OK");
        assert_eq!(code(r#"{"network":{"outbound":false,"ports":["8080:80","22"]}}"#), "OK");
        assert_eq!(code(r#"{"network":{"ports":["80:0"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"ports":["x"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"ports":["70000"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"ports":["80:1","80:2"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"bogus":1}}"#), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"metadata":{"team":"infra","request":"r-1"}}"#), "OK");
        assert_eq!(code(r#"{"metadata":{"":"x"}}"#), "E_CONFIG_METADATA");
        assert_eq!(code(r#"{"metadata":{"k":"a\nb"}}"#), "E_CONFIG_METADATA");
        assert_eq!(code(r#"{"metadata":{"k":1}}"#), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"network":{"deny":["private"],"allow":["10.0.2.2","192.168.1.0/24"]}}"#), "OK");
        assert_eq!(code(r#"{"network":{"deny":["10.0.0.0/33"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"allow":["example.com"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"network":{"outbound":false,"deny":["host"]}}"#), "E_CONFIG_NETWORK");
        assert_eq!(code(r#"{"volumes":[{"host":"/tmp","guest":"/data"}]}"#), "OK");
        assert_eq!(code(r#"{"volumes":[{"host":"/no/such/dir","guest":"/data"}]}"#), "E_CONFIG_VOLUME");
        assert_eq!(code(r#"{"volumes":[{"host":"/tmp","guest":"data"}]}"#), "E_CONFIG_VOLUME");
        assert_eq!(code(r#"{"volumes":[{"host":"/tmp","guest":"/"}]}"#), "E_CONFIG_VOLUME");
        assert_eq!(code(r#"{"volumes":[{"host":"/tmp","guest":"/a,b"}]}"#), "E_CONFIG_VOLUME");
        assert_eq!(
            code(r#"{"volumes":[{"host":"/tmp","guest":"/a"},{"host":"/tmp","guest":"/a/b"}]}"#),
            "E_CONFIG_VOLUME"
        );
        assert_eq!(code(r#"{"volumes":[{"host":"/tmp","guest":"/a","ro":true}]}"#), "E_CONFIG_JSON");
        assert_eq!(code(r#"{"kernel":""}"#), "E_CONFIG_JSON");
        for c in [
            "E_CONFIG_JSON",
            "E_CONFIG_MEMORY",
            "E_CONFIG_VCPUS",
            "E_CONFIG_NAME",
            "E_CONFIG_ENV",
            "E_CONFIG_GUEST_PATH",
            "E_CONFIG_TIMEOUT",
            "E_CONFIG_CMDLINE",
            "E_CONFIG_CONSOLE",
            "E_CONFIG_NETWORK",
            "E_CONFIG_VOLUME",
            "E_CONFIG_METADATA",
        ] {
            assert!(ConfigError::CODES.contains(&c), "{c}");
        }
    }

    #[test]
    fn deny_and_allow_name_networks_private_and_host_included() {
        let net = |deny: &[&str], allow: &[&str]| {
            NetworkConfig {
                outbound: true,
                ports: vec![],
                deny: deny.iter().map(|s| s.to_string()).collect(),
                allow: allow.iter().map(|s| s.to_string()).collect(),
            }
            .net_spec()
            .unwrap()
        };
        let spec = net(&["private"], &["host"]);
        assert_eq!(spec.deny.len(), PRIVATE_NETWORKS.len());
        assert!(spec.deny.iter().any(|n| n.contains([169, 254, 169, 254])), "cloud metadata is private");
        assert!(spec.deny.iter().any(|n| n.contains([10, 0, 2, 2])), "so is the host's loopback");
        assert!(!spec.deny.iter().any(|n| n.contains([8, 8, 8, 8])));
        assert_eq!(spec.allow, vec!["10.0.2.2/32".parse().unwrap()]);
        let err = NetworkConfig {
            outbound: true,
            ports: vec![],
            deny: vec!["10.0.0.0/8".into(), "nope".into()],
            allow: vec![],
        }
        .net_spec()
        .unwrap_err();
        assert!(err.to_string().contains("\"nope\"") && err.to_string().contains("\"private\""), "{err}");
    }

    #[test]
    fn a_microvm_scope_and_port_map_become_a_workload_network() {
        let ports = ["8080:80".to_owned()];
        assert_eq!(NetworkConfig::for_microvm(NetworkScope::None, &[]), None);
        assert_eq!(NetworkConfig::for_microvm(NetworkScope::Group, &[]), None);
        let group = NetworkConfig::for_microvm(NetworkScope::Group, &ports).unwrap();
        assert_eq!((group.outbound, group.ports), (false, ports.to_vec()));
        let public = NetworkConfig::for_microvm(NetworkScope::Public, &[]).unwrap();
        assert_eq!((public.outbound, public.deny), (true, vec!["private".to_string()]));
        let any = NetworkConfig::for_microvm(NetworkScope::Any, &ports).unwrap();
        assert!(any.outbound && any.deny.is_empty());
    }

    #[test]
    fn packaged_guest_comes_after_the_environment_and_before_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let g = GuestImages { kernel: dir.path().join("vmlinux"), rootfs: dir.path().join("rootfs.ext4") };
        set_packaged_guest(Some(g.clone()));
        let env_set = |v: &str| std::env::var_os(v).is_some_and(|p| !p.is_empty());
        let (kernel, ks) = default_kernel_source();
        let (rootfs, rs) = default_rootfs_source();
        set_packaged_guest(None);
        if env_set("MICROCELL_KERNEL") {
            assert_eq!(ks, "env")
        } else {
            assert_eq!((kernel, ks), (g.kernel, "package"))
        }
        if env_set("MICROCELL_ROOTFS") {
            assert_eq!(rs, "env")
        } else {
            assert_eq!((rootfs, rs), (g.rootfs, "package"))
        }
        // Forgotten: back to the environment or the cache scripts/setup.sh fills.
        assert_ne!(default_kernel_source().1, "package");
        if !env_set("MICROCELL_ROOTFS") {
            assert_eq!(default_rootfs_source(), (guest_cache_dir().join("rootfs-current/rootfs.ext4"), "cache"));
        }
    }

    #[test]
    fn missing_images_say_what_to_run() {
        let c = SandboxConfig { kernel: Some("/nonexistent/vmlinux".into()), ..Default::default() };
        let e = c.guest_images().unwrap_err();
        assert_eq!(e.code(), "E_GUEST_IMAGE_MISSING");
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = check_image("kernel", None, dir.path().join("kernel-current/vmlinux"), "scripts/guest/build-kernel.sh")
            .unwrap_err();
        assert_eq!(e.code(), "E_GUEST_IMAGE_MISSING");
        assert!(e.to_string().contains("scripts/setup.sh"), "{e}");
        assert!(e.to_string().contains("npm install microcell-guest-linux-x64"), "{e}");
        // A directory is not an image.
        let e = check_image("kernel", Some(dir.path().into()), PathBuf::new(), "x").unwrap_err();
        assert_eq!(e.code(), "E_GUEST_IMAGE_MISSING");
        let f = dir.path().join("vmlinux");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(check_image("kernel", Some(f.clone()), PathBuf::new(), "x").unwrap(), f);
    }
}
