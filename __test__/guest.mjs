// Shared by the T2/T3 suites of exec, files and workloads (not a test file: ava only runs
// *.spec.mjs): which tiers run here and why not, the guest images, one sandbox per file.
import fs from 'node:fs'

import { Sandbox, guestImages, hostInfo } from 'microcell'

export const host = hostInfo()

/**
 * T2: engine 'qemu' (TCG where there is no hardware KVM); T3: engine 'kvm' (the built-in VMM),
 * which boots Linux only with hardware KVM. `skip` is why a tier cannot run here, or null.
 *
 * MICROCELL_TIERS (e.g. 'T2' or 'T3') names the tiers this run takes on; the others are left
 * out entirely (not counted at all) because another run of the same suite covers them:
 * with MICROCELL_NESTED=1 on a host that cannot boot Linux on the built-in VMM, scripts/test.sh
 * sets 'T2' for the host's run and runs T3 inside the nested VM (scripts/nested/run-t3.sh),
 * which sets 'T3'.
 */
const only = (process.env.MICROCELL_TIERS ?? '').split(',').map((s) => s.trim()).filter(Boolean)
export const tiers = [
  {
    tier: 'T2',
    engine: 'qemu',
    skip: host.qemu === null ? `QEMU is not installed here: ${host.qemuUnavailable}` : null,
  },
  {
    tier: 'T3',
    engine: 'kvm',
    skip: host.canBootLinux
      ? null
      : `needs a host where the built-in VMM boots Linux (hardware KVM; elsewhere MICROCELL_NESTED=1 ./scripts/test.sh runs it in a nested VM); this host: kvmFlavour=${host.kvmFlavour}: ${host.reason}`,
  },
].filter(({ tier }) => {
  if (only.length === 0 || only.includes(tier)) return true
  console.log(`# ${tier} is left to another run of this suite (MICROCELL_TIERS=${only.join(',')})`)
  return false
})

/** The tier's entry, or undefined where MICROCELL_TIERS leaves it out. */
export const tierOf = (name) => tiers.find((x) => x.tier === name)

/**
 * A T2 test that needs engine 'qemu' itself (volumes: the built-in VMM has no virtio-9p): `test.serial` where T2 runs, else a skipped test that prints why.
 */
export function t2Test(test, title, fn) {
  const t2 = tierOf('T2')
  if (t2 === undefined) return
  const { skip } = t2
  if (skip !== null) {
    console.log(`# SKIP T2 (${title}) skipped: ${skip}`)
    test.skip(`T2 (${title}) skipped: ${skip}`, () => {})
    return
  }
  test.serial(`T2: ${title}`, fn)
}

/** Runs `suite(tier, engine)` for each tier that can run; registers a skipped test (printing why) for the others. */
export function perTier(test, what, suite) {
  for (const { tier, engine, skip } of tiers) {
    if (skip !== null) {
      const title = `${tier} (${what} on engine '${engine}') skipped: ${skip}`
      console.log(`# SKIP ${title}`)
      test.skip(title, () => {})
      continue
    }
    suite(tier, engine)
  }
}

/** Throws (the test fails, never skips) when the guest images were not built. */
export function requireGuestImages() {
  const g = guestImages()
  for (const p of [g.kernel, g.rootfs]) {
    if (!fs.existsSync(p)) {
      throw new Error(`guest image ${p} is missing: run ./scripts/setup.sh (or scripts/guest/build-kernel.sh and build-rootfs.sh)`)
    }
  }
  return g
}

/**
 * One sandbox for the tests of a file on `engine`, booted on first use and stopped after the
 * last test (`test.after.always`). `configure(builder)` adds options.
 */
export function sharedSandbox(test, engine, configure = (b) => b) {
  let booting
  const get = () => {
    booting ??= (async () => {
      requireGuestImages()
      return configure(Sandbox.builder(`shared-${engine}`).engine(engine).memory(256)).create()
    })()
    return booting
  }
  test.after.always(async () => {
    if (booting === undefined) return
    const sb = await booting.catch(() => null)
    await sb?.stop({ timeoutMs: 5000 })
  })
  return get
}

/** This process's children whose command is QEMU (`comm` is cut to 15 characters). */
export function qemuChildren() {
  const found = []
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue
    let stat
    try {
      stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    } catch {
      continue // gone meanwhile
    }
    const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
    if (ppid === process.pid && comm.startsWith('qemu-system')) found.push(`${pid} ${comm}`)
  }
  return found
}
