//! One constant for each limit and default that more than one place uses (both config types,
//! the engines, the addon, and the TypeScript mirrors: `limits()` in the addon, checked by
//! `__test__/types.spec.mjs`). A leaf module: it imports nothing of this crate (only the VMM's
//! own limit where it is the VMM's).

/// Most vCPUs a microVM or sandbox may have: the VMM's MP table limit (engine `qemu` gets the
/// same, so a config runs on either engine).
pub const MAX_VCPUS: u32 = vmm::arch::x86_64::mptable::MAX_CPUS as u32;
/// vCPUs when none are given.
pub const DEFAULT_VCPUS: u32 = 1;
/// Guest memory when none is given, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// The least memory a sandbox's guest kernel and agent are given, in MiB.
pub const MIN_MEMORY_MIB: u32 = 64;
/// How long `Sandbox::create` waits for the agent when no `bootTimeoutMs` is given (TCG boots in
/// ~1 s here; a loaded host with 2 cores can be several times slower).
pub const DEFAULT_BOOT_TIMEOUT_MS: u32 = 30_000;
pub const MIN_BOOT_TIMEOUT_MS: u32 = 100;
pub const MAX_BOOT_TIMEOUT_MS: u32 = 600_000;
/// Console bytes a sandbox keeps for reading when no `consoleQueueBytes` is given.
pub const CONSOLE_QUEUE_BYTES: usize = 64 << 10;
/// Most `consoleQueueBytes` (1 GiB).
pub const MAX_CONSOLE_QUEUE_BYTES: u32 = 1 << 30;
/// Default byte limit of output read from the guest: `exec()`'s `maxOutputBytes` and
/// `fs.read()`'s `maxBytes` (64 MiB).
pub const DEFAULT_OUTPUT_MAX_BYTES: u64 = 64 << 20;
/// Default byte limit of `fs.copyToHost()` (`maxBytes`, 1 GiB).
pub const DEFAULT_COPY_MAX_BYTES: u64 = 1 << 30;

/// How long a path waits for a VM to end once it killed it (SIGKILL to QEMU, the vCPU kick on
/// the built-in VMM: milliseconds in practice); past it the path goes on (and logs where it can).
pub const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every number above by its name, for the addon's `limits()` (the TS mirrors are checked
/// against it).
pub const ALL: &[(&str, u64)] = &[
    ("MAX_VCPUS", MAX_VCPUS as u64),
    ("DEFAULT_VCPUS", DEFAULT_VCPUS as u64),
    ("DEFAULT_MEMORY_MIB", DEFAULT_MEMORY_MIB as u64),
    ("MIN_MEMORY_MIB", MIN_MEMORY_MIB as u64),
    ("DEFAULT_BOOT_TIMEOUT_MS", DEFAULT_BOOT_TIMEOUT_MS as u64),
    ("MIN_BOOT_TIMEOUT_MS", MIN_BOOT_TIMEOUT_MS as u64),
    ("MAX_BOOT_TIMEOUT_MS", MAX_BOOT_TIMEOUT_MS as u64),
    ("CONSOLE_QUEUE_BYTES", CONSOLE_QUEUE_BYTES as u64),
    ("MAX_CONSOLE_QUEUE_BYTES", MAX_CONSOLE_QUEUE_BYTES as u64),
    ("DEFAULT_OUTPUT_MAX_BYTES", DEFAULT_OUTPUT_MAX_BYTES),
    ("DEFAULT_COPY_MAX_BYTES", DEFAULT_COPY_MAX_BYTES),
];
