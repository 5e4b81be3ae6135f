import * as native from './internal/native.js'

/** What this host's KVM is and what it can run. */
export interface HostInfo {
  /** `hardware` (VMX/SVM), `pvm` (KVM without hardware virtualization) or `none`. */
  kvmFlavour: 'hardware' | 'pvm' | 'none'
  /** Whether a stock Linux guest can boot on the built-in VMM here. */
  canBootLinux: boolean
  /** Why not, or what is limited (empty when nothing is). */
  reason?: string
  /** Physical RAM of the host in MiB. */
  hostMemoryMib?: number
  /** More fields from the VMM (KVM device, API version, capabilities, ...). */
  [key: string]: unknown
}

/** Detects the host's KVM (flavour, device, capabilities) and what it can run. */
export function hostInfo(): HostInfo {
  return native.hostInfo() as HostInfo
}
