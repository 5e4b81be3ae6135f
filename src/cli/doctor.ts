import fs from 'node:fs'
import path from 'node:path'

import { GUEST_PACKAGE, guestImages, type GuestImageSource } from '../guest.js'
import { hostInfo } from '../host.js'

const SOURCE: Record<GuestImageSource, string> = {
  env: 'from the environment',
  package: 'from the installed guest package',
  cache: 'built by scripts/setup.sh',
}
const ENV_VAR = { kernel: 'MICROCELL_KERNEL', rootfs: 'MICROCELL_ROOTFS' } as const

function onPath(name: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (dir === '') continue
    const p = path.join(dir, name)
    try {
      fs.accessSync(p, fs.constants.X_OK)
      return p
    } catch {
      // not here
    }
  }
  return null
}

/**
 * `microcell doctor`: whether a default sandbox can start here, and if not what to install. Which
 * engine `auto` would run and why, where each guest image was found (lookup order: an explicit
 * option, MICROCELL_KERNEL / MICROCELL_ROOTFS, the guest package, the cache of scripts/setup.sh).
 * Exit status 0 when a sandbox can start, 1 when it cannot.
 */
export function doctorCommand(json: boolean): number {
  const host = hostInfo()
  const images = guestImages()
  const problems: string[] = []
  const engine = host.autoEngine
  if (engine === 'qemu' && host.qemu === null) {
    problems.push(
      `no engine: the built-in VMM cannot boot Linux here (${host.reason ?? 'no usable /dev/kvm'}) and QEMU is unavailable (${host.qemuUnavailable ?? 'not found'}): install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86), or run on a host with hardware KVM (VMX/SVM) and access to /dev/kvm`,
    )
  }
  const image = (what: 'kernel' | 'rootfs') => {
    const file = images[what]
    const source = what === 'kernel' ? images.kernelSource : images.rootfsSource
    const pending = source === 'package' && images.package !== null && !images.package.unpacked
    const present = pending || fs.existsSync(file)
    if (!present) {
      problems.push(
        source === 'env'
          ? `the ${what} ${ENV_VAR[what]} names (${file}) is not there: fix or unset ${ENV_VAR[what]}`
          : `no guest ${what}: npm install ${GUEST_PACKAGE} (or, in a clone, build it with ./scripts/setup.sh)`,
      )
    }
    return { file, source, present, pending, detail: `${SOURCE[source]}${pending ? ', unpacked on first use' : ''}` }
  }
  const kernel = image('kernel')
  const rootfs = image('rootfs')
  const passt = onPath('passt')
  const canStart = problems.length === 0
  if (json) {
    process.stdout.write(
      `${JSON.stringify({ canStart, problems, engine: { picks: engine, reason: host.autoEngineReason, qemu: host.qemu }, kernel, rootfs, package: images.package, cacheDir: images.cacheDir, passt }, null, 2)}\n`,
    )
    return canStart ? 0 : 1
  }
  const pkg = images.package
  const lines = [
    `engine:       ${engine} (${host.autoEngineReason})`,
    ...(engine === 'qemu' ? [`qemu:         ${host.qemu ?? `unavailable: ${host.qemuUnavailable}`}`] : []),
    `guest kernel: ${kernel.file} (${kernel.detail}${kernel.present ? '' : ', MISSING'})`,
    `guest rootfs: ${rootfs.file} (${rootfs.detail}${rootfs.present ? '' : ', MISSING'})`,
    `guest package: ${pkg === null ? `${GUEST_PACKAGE} is not installed` : `${pkg.name}@${pkg.version} (kernel ${pkg.kernelRelease}) in ${pkg.dir}`}`,
    `lookup order: option → ${ENV_VAR.kernel} / ${ENV_VAR.rootfs} → ${GUEST_PACKAGE} → ${images.cacheDir}/{kernel,rootfs}-current`,
    `network:      ${passt === null ? 'passt not found: sandboxes with .network() need it (apt-get install passt)' : `passt ${passt}`}`,
  ]
  if (canStart) lines.push(`ok: sandboxes can start (engine ${engine})`)
  else lines.push('sandboxes cannot start:', ...problems.map((p) => `  - ${p}`))
  process.stdout.write(`${lines.join('\n')}\n`)
  return canStart ? 0 : 1
}
