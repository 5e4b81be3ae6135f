import * as native from './internal/native.js'

/** What this host's KVM is and what it can run. */
export interface HostInfo {
  /** `hardware` (VMX/SVM), `pvm` (KVM without hardware virtualization) or `none`. */
  kvmFlavour: 'hardware' | 'pvm' | 'none'
  /** Whether a stock Linux guest can boot on the built-in VMM here (engine `kvm`). */
  canBootLinux: boolean
  /** Why not, or what is limited (empty when nothing is). */
  reason?: string
  /** Physical RAM of the host in MiB. */
  hostMemoryMib?: number
  /** The engine a sandbox with `engine: 'auto'` gets here: `kvm` where `canBootLinux`, else `qemu`. */
  autoEngine: 'kvm' | 'qemu'
  /** Why `auto` picks that engine. */
  autoEngineReason: string
  /** The QEMU engine in one line (binary, accelerator and why), or null when QEMU is not found. */
  qemu: string | null
  /** Why the QEMU engine cannot run (with how to install QEMU), or null when it can. */
  qemuUnavailable: string | null
  /** More fields from the VMM (KVM device, API version, capabilities, ...). */
  [key: string]: unknown
}

/** Detects the host's KVM (flavour, device, capabilities), what it can run and which engine `auto` picks. */
export function hostInfo(): HostInfo {
  return { ...native.hostInfo(), ...native.engineInfo() } as HostInfo
}
