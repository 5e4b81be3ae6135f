//! CPUID as the guest sees it: KVM's supported set, with topology and the hypervisor bit.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_EPB: u32 = 1 << 3;

/// Bits needed to number `count` logical CPUs.
fn id_bits(count: u32) -> u32 {
    32 - (count.max(1) - 1).leading_zeros()
}

/// Rewrites `cpuid` (as KVM_GET_SUPPORTED_CPUID returned it) for vCPU `index` of `count`:
/// one package, `count` cores, one thread per core, APIC id = vCPU index.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
    let (index, count) = (u32::from(index), u32::from(count));
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package in EAX[31:26]; each cache is private to one core
                // except the last level, which all cores share.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            LEAF_THERMAL_POWER => e.ecx &= !ECX_EPB,
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                let (shift, cpus, level_type) = match e.index {
                    0 => (0, 1, 1),                  // SMT: one thread per core
                    1 => (id_bits(count), count, 2), // core level: the whole package
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = cpus;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = index;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn leaf1_and_topology_describe_the_vcpu() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]).unwrap();
        filter(&mut cpuid, 2, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8, e[2].edx), (2, 4, 2, 2));
        assert_eq!(e[3].ebx, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
