// Shared helpers of the ava tests (not a test file: ava only runs *.spec.mjs).
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { hostInfo } from 'microcell'

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')

/** Where `cargo run -p microcell-testguest --bin testguest-export -- target/testguests` puts the guests. */
export const guestsDir = process.env.MICROCELL_TESTGUESTS ?? path.join(root, 'target', 'testguests')

/** The path of a test guest image; throws (never skips) when it was not built. */
export function guest(name) {
  const p = path.join(guestsDir, name)
  if (!fs.existsSync(p)) {
    throw new Error(
      `test guest ${p} is missing: run ./scripts/setup.sh (or cargo run -p microcell-testguest --bin testguest-export -- target/testguests)`,
    )
  }
  return p
}

/** Why the KVM (T1) tests cannot run here, or null when they can. */
export function kvmSkipReason() {
  if (!fs.existsSync('/dev/kvm')) return '/dev/kvm does not exist on this host (no KVM): the built-in VMM cannot run'
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK)
  } catch (err) {
    return `/dev/kvm is not accessible to this user (${err.code}): add the user to the kvm group or run as root`
  }
  const info = hostInfo()
  if (!info.kvmDevice) return `hostInfo() says KVM is unusable: ${info.reason}`
  return null
}

/** FNV-1a 32 over bytes, as the bootcheck guest computes it over the initrd. */
export function fnv1a32(bytes) {
  let h = 0x811c9dc5
  for (const b of bytes) {
    h ^= b
    h = Math.imul(h, 0x01000193) >>> 0
  }
  return h
}

/** The command line bootcheck reads its expectations from (docs/boot-contract.md). */
export function bootcheckCmdline(memMib, cpus, initrd) {
  const rd = initrd ? `${initrd.length}:${fnv1a32(initrd).toString(16).padStart(8, '0')}` : 'none'
  return `tg.mem=${memMib} tg.cpus=${cpus} tg.initrd=${rd}`
}

/** Reads a Readable to its end, as a string. */
export async function readAll(stream) {
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  return Buffer.concat(chunks).toString('latin1')
}

/** Rejects when `promise` takes longer than `ms`. */
export function within(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** A fresh temporary directory, removed at process exit. */
export function tempDir(prefix = 'microcell-test-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}
