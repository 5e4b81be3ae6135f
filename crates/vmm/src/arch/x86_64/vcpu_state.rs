//! Saving and restoring one vCPU's architectural state, in the order KVM needs (Firecracker's
//! `arch/x86_64/vcpu.rs` documents why each step sits where it does).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_GET_MSRS takes at most this many entries per call.
const MSR_CHUNK: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// In restore order: TSC before TSC_DEADLINE.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The MSRs worth saving: KVM's list, with TSC_DEADLINE moved after TSC (writing the deadline
/// before the TSC would fire or lose the timer).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().iter().copied().filter(|i| *i != MSR_IA32_TSC_DEADLINE).collect();
    if list.as_slice().contains(&MSR_IA32_TSC_DEADLINE) {
        indices.push(MSR_IA32_TSC_DEADLINE);
    }
    if let Some(pos) = indices.iter().position(|i| *i == MSR_IA32_TSC) {
        let tsc = indices.remove(pos);
        indices.insert(0, tsc);
    }
    Ok(indices)
}

fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..(pos + MSR_CHUNK).min(indices.len())];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR chunk: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        pos += if n < chunk.len() { n + 1 } else { n };
    }
    Ok(out)
}

pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    // MP state first: reading it may flush pending LAPIC events into the state read later.
    let mp_state = fd.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_CPUID2"))?.as_slice().to_vec();
    let msrs = get_msrs(fd, msr_indices)?;
    // Events last: everything above may have changed pending exceptions/interrupts.
    let vcpu_events = fd.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { cpuid, mp_state, regs, sregs, xsave, xcrs, debug_regs, lapic, msrs, vcpu_events, tsc_khz })
}

pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| Error::Snapshot(format!("CPUID in snapshot: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` came from KVM_GET_XSAVE on this kind of host (the snapshot's CPU
    // fingerprint was checked), so its size matches what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
    // The LAPIC after sregs (APIC base) and before MSRs (TSC deadline).
    fd.set_lapic(&s.lapic).map_err(Error::kvm("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| Error::Snapshot(format!("MSRs in snapshot: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(Error::Snapshot(format!(
                "this host's KVM refused MSR {:#x} from the snapshot: it was taken on a different kind of host",
                chunk[n].index
            )));
        }
    }
    fd.set_vcpu_events(&s.vcpu_events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
    // Tell the guest's kvmclock it was paused; not every host supports it.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}
