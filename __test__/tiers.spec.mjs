// The test tiers that cannot run yet, or not on this host: skipped, each with its reason printed.
import test from 'ava'

import { hostInfo } from 'microcell'

const t2 = 'T2 (guest platform: real Linux kernel + rootfs + agent under the QEMU engine): the qemu engine and the Sandbox API are not implemented yet'
console.log(`# SKIP ${t2}`)
test.skip(t2, () => {})

const info = hostInfo()
const t3 = info.canBootLinux
  ? 'T3 (the T2 suite on the built-in VMM, engine "kvm"): this host has hardware KVM, but the T2 suite does not exist yet'
  : `T3 (the T2 suite on the built-in VMM, engine "kvm") needs hardware KVM; this host: kvmFlavour=${info.kvmFlavour}: ${info.reason}`
console.log(`# SKIP ${t3}`)
test.skip(t3, () => {})
