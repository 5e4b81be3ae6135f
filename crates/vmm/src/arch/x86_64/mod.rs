//! x86_64: memory layout, boot protocols and the architectural state of a fresh vCPU.

pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod vcpu_state;
pub mod vm_state;
