//! The VMM's one error type. Each variant has a stable code that callers pass on as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm ({0}): KVM is not available to this process; load the kvm module, or give this user access to /dev/kvm, or run the guest under qemu (CPU emulation)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// The configuration is not one the VMM can run.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("kernel image {path} cannot be read: {source}")]
    KernelNotFound { path: PathBuf, source: std::io::Error },
    #[error("kernel image {path} is not a bootable x86_64 ELF (vmlinux) or bzImage: {reason}")]
    KernelFormat { path: PathBuf, reason: String },
    #[error("initrd {path} cannot be used: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("{0}")]
    UnsupportedGuest(String),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u32, reason: String },
    /// A KVM ioctl failed while building the VM.
    #[error("KVM refused {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("snapshot {path} is damaged: {reason}; take the snapshot again")]
    SnapshotCorrupt { path: PathBuf, reason: String },
    #[error("snapshot {path} has format version {found}; this build reads version {supported}: take it again with this version")]
    SnapshotVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("snapshot was taken on a different host CPU ({0}); restore it on the same kind of host")]
    SnapshotHost(String),
    #[error("cannot write or read snapshot file {path}: {source}")]
    SnapshotIo { path: PathBuf, source: std::io::Error },
    #[error("cannot restore the snapshot: {0}")]
    Snapshot(String),
    #[error("{0}")]
    VmState(String),
}

impl Error {
    /// Stable, documented code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NoKvm(_) => "E_NO_KVM",
            Error::Config(_) => "E_CONFIG",
            Error::KernelNotFound { .. } => "E_KERNEL_NOT_FOUND",
            Error::KernelFormat { .. } => "E_KERNEL_FORMAT",
            Error::Initrd { .. } => "E_INITRD",
            Error::UnsupportedGuest(_) => "E_UNSUPPORTED_GUEST",
            Error::Memory { .. } => "E_MEMORY",
            Error::Kvm { .. } => "E_KVM",
            Error::Thread(_) => "E_THREAD",
            Error::SnapshotCorrupt { .. } => "E_SNAPSHOT_CORRUPT",
            Error::SnapshotVersion { .. } => "E_SNAPSHOT_VERSION",
            Error::SnapshotHost(_) => "E_SNAPSHOT_HOST",
            Error::SnapshotIo { .. } => "E_SNAPSHOT_IO",
            Error::Snapshot(_) => "E_SNAPSHOT",
            Error::VmState(_) => "E_VM_STATE",
        }
    }

    /// Every code [`Error::code`] gives, once each (the addon's `errorCodes().vmm`; the TS
    /// `VMM_ERROR_CODES` is checked against it).
    pub const CODES: &'static [&'static str] = &[
        "E_NO_KVM",
        "E_CONFIG",
        "E_KERNEL_NOT_FOUND",
        "E_KERNEL_FORMAT",
        "E_INITRD",
        "E_UNSUPPORTED_GUEST",
        "E_MEMORY",
        "E_KVM",
        "E_THREAD",
        "E_SNAPSHOT_CORRUPT",
        "E_SNAPSHOT_VERSION",
        "E_SNAPSHOT_HOST",
        "E_SNAPSHOT_IO",
        "E_SNAPSHOT",
        "E_VM_STATE",
    ];

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of each variant, in the enum's order.
    fn samples() -> Vec<Error> {
        let kvm = || kvm_ioctls::Error::new(libc::EINVAL);
        let io = || std::io::Error::other("x");
        let s = || "x".to_owned();
        let path = PathBuf::from("/x");
        vec![
            Error::NoKvm(kvm()),
            Error::Config(s()),
            Error::KernelNotFound { path: path.clone(), source: io() },
            Error::KernelFormat { path: path.clone(), reason: s() },
            Error::Initrd { path: path.clone(), reason: s() },
            Error::UnsupportedGuest(s()),
            Error::Memory { mib: 1, reason: s() },
            Error::Kvm { what: "x", source: kvm() },
            Error::Thread(io()),
            Error::SnapshotCorrupt { path: path.clone(), reason: s() },
            Error::SnapshotVersion { path: path.clone(), found: 1, supported: 2 },
            Error::SnapshotHost(s()),
            Error::SnapshotIo { path, source: io() },
            Error::Snapshot(s()),
            Error::VmState(s()),
        ]
    }

    #[test]
    fn codes_lists_each_variants_code_once() {
        let produced: Vec<&str> = samples().iter().map(Error::code).collect();
        assert_eq!(produced, Error::CODES, "CODES is the variants' codes, in their order");
        let mut distinct = produced.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), produced.len(), "two variants share a code: {produced:?}");
        assert!(samples().iter().all(|e| !e.to_string().is_empty()));
    }
}
