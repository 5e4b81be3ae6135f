//! The one KVM requirement check of the integration tests (the vmm's and, through `#[path]`,
//! the sandbox crate's). Tests that need KVM are `#[ignore]`d with the reason, so a host that
//! cannot run them counts them as skipped; scripts/test.sh includes them (`--include-ignored`)
//! where the host can, and the nested tier (MICROCELL_NESTED=1) runs the T3 ones (`--ignored`)
//! inside its L1 VM.
//! Reaching one of these checks on a host that cannot run the test is a mistake to report, so
//! they panic with the reason: a test that did not run is never counted as passed.

#![allow(dead_code)]

/// T1: /dev/kvm works (hardware KVM or PVM).
pub fn require_kvm() {
    let host = vmm::host::cached();
    assert!(host.kvm_device, "this test needs a usable /dev/kvm: {}", host.reason);
}

/// T3: the host's KVM boots a stock Linux kernel (hardware KVM, nested included).
pub fn require_linux_kvm() {
    let host = vmm::host::cached();
    assert!(host.can_boot_linux, "this test needs KVM that boots Linux (T3): {}", host.reason);
}
