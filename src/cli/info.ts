import { guestImages } from '../guest.js'
import { hostInfo } from '../host.js'

/** `microcell info`: the host, the engines, the guest images. */
export function infoCommand(json: boolean): number {
  const host = hostInfo()
  const images = guestImages()
  const engines = {
    auto: { picks: host.autoEngine, reason: host.autoEngineReason },
    kvm: { canBootLinux: host.canBootLinux, reason: host.reason ?? '' },
    qemu: host.qemu === null ? { available: false, reason: host.qemuUnavailable } : { available: true, detail: host.qemu },
  }
  if (json) {
    process.stdout.write(`${JSON.stringify({ host, engines, guestImages: images }, null, 2)}\n`)
    return 0
  }
  const lines = [
    `KVM:          ${host.kvmFlavour}${host.kvmDevice ? '' : ' (no usable /dev/kvm)'}`,
    `engine kvm:   ${host.canBootLinux ? 'boots Linux' : 'cannot boot Linux here'}${host.reason ? `: ${host.reason}` : ''}`,
    `engine qemu:  ${host.qemu ?? `unavailable: ${host.qemuUnavailable}`}`,
    `engine auto:  ${host.autoEngine} (${host.autoEngineReason})`,
    `guest kernel: ${images.kernel}`,
    `guest rootfs: ${images.rootfs}`,
    `guest images: ${images.present ? 'present' : images.package !== null ? `in ${images.package.name}@${images.package.version}, unpacked on first use` : 'missing: npm install microcell-guest-linux-x64 (in a clone: ./scripts/setup.sh)'}`,
  ]
  if (host.hostMemoryMib !== undefined) lines.splice(1, 0, `host memory:  ${host.hostMemoryMib} MiB`)
  process.stdout.write(`${lines.join('\n')}\n`)
  return 0
}
