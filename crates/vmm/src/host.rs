//! What this host's KVM is, and what it can run.

use std::path::Path;
use std::sync::OnceLock;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmFlavour {
    /// VMX or SVM: any guest, stock Linux included.
    Hardware,
    /// Pagetable-based virtualization (kvm_pvm): freestanding guests only, no stock Linux.
    Pvm,
    /// No usable /dev/kvm.
    None,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    pub kvm_flavour: KvmFlavour,
    /// `vmx` or `svm` when the CPU exposes one.
    pub cpu_virtualization: Option<String>,
    /// /dev/kvm exists and this process can open it.
    pub kvm_device: bool,
    pub api_version: Option<i32>,
    /// Capabilities the VMM relies on, with whether KVM offers each.
    pub capabilities: Vec<(String, bool)>,
    pub max_vcpus: Option<usize>,
    /// Whether a stock Linux guest kernel can boot on the built-in VMM here.
    pub can_boot_linux: bool,
    /// One sentence on why, for users and logs.
    pub reason: String,
    pub host_memory_mib: u64,
    pub host_cpus: usize,
}

const CAPS: &[(&str, Cap)] = &[
    ("irqchip", Cap::Irqchip),
    ("ioeventfd", Cap::Ioeventfd),
    ("irqfd", Cap::Irqfd),
    ("userMemory", Cap::UserMemory),
    ("setTssAddr", Cap::SetTssAddr),
    ("pit2", Cap::Pit2),
    ("pitState2", Cap::PitState2),
    ("adjustClock", Cap::AdjustClock),
    ("vcpuEvents", Cap::VcpuEvents),
    ("debugregs", Cap::Debugregs),
    ("xsave", Cap::Xsave),
    ("xcrs", Cap::Xcrs),
    ("tscDeadlineTimer", Cap::TscDeadlineTimer),
    ("immediateExit", Cap::ImmediateExit),
];

fn cpu_virtualization(cpuinfo: &str) -> Option<String> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    flags.split_whitespace().find(|f| *f == "vmx" || *f == "svm").map(str::to_owned)
}

fn host_memory_mib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// Classifies the KVM flavour from what the host shows.
fn classify(kvm_device: bool, pvm_module: bool, cpu_virt: Option<&str>) -> (KvmFlavour, bool, String) {
    if !kvm_device {
        return (
            KvmFlavour::None,
            false,
            "/dev/kvm is missing or not accessible to this process: this VMM cannot run; load the kvm module and give this user access to /dev/kvm, or run guests under qemu (CPU emulation)".into(),
        );
    }
    if pvm_module {
        return (
            KvmFlavour::Pvm,
            false,
            "/dev/kvm is provided by kvm_pvm (no VMX/SVM): freestanding guests run, but a stock Linux kernel cannot boot (PVM needs a CONFIG_PVM_GUEST kernel); run Linux guests under qemu (CPU emulation)".into(),
        );
    }
    match cpu_virt {
        Some(v) => (KvmFlavour::Hardware, true, format!("hardware KVM ({v}): Linux guests boot on the built-in VMM")),
        None => (
            KvmFlavour::Hardware,
            true,
            "/dev/kvm works but the CPU shows no vmx/svm flag (nested or unusual host); assuming hardware KVM".into(),
        ),
    }
}

pub fn detect() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpu_virt = cpu_virtualization(&cpuinfo);
    let pvm_module = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = Kvm::new().ok();
    let (kvm_flavour, can_boot_linux, reason) = classify(kvm.is_some(), pvm_module, cpu_virt.as_deref());
    let capabilities = kvm
        .as_ref()
        .map(|k| CAPS.iter().map(|(name, cap)| ((*name).to_owned(), k.check_extension(*cap))).collect())
        .unwrap_or_default();
    HostInfo {
        kvm_flavour,
        cpu_virtualization: cpu_virt,
        kvm_device: kvm.is_some(),
        api_version: kvm.as_ref().map(Kvm::get_api_version),
        capabilities,
        max_vcpus: kvm.as_ref().map(Kvm::get_max_vcpus),
        can_boot_linux,
        reason,
        host_memory_mib: host_memory_mib(&meminfo),
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// `detect()`, computed once per process (the answer cannot change while it runs).
pub fn cached() -> &'static HostInfo {
    static INFO: OnceLock<HostInfo> = OnceLock::new();
    INFO.get_or_init(detect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours() {
        assert_eq!(classify(false, true, Some("vmx")).0, KvmFlavour::None);
        let (f, linux, _) = classify(true, true, None);
        assert_eq!((f, linux), (KvmFlavour::Pvm, false));
        let (f, linux, _) = classify(true, false, Some("svm"));
        assert_eq!((f, linux), (KvmFlavour::Hardware, true));
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(cpu_virtualization("processor: 0\nflags\t: fpu vme vmx sse\n").as_deref(), Some("vmx"));
        assert_eq!(cpu_virtualization("flags: fpu sse\n"), None);
        assert_eq!(host_memory_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), 24000);
    }
}
