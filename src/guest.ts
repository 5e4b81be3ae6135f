import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import zlib from 'node:zlib'

import type { Rootfs } from './config.js'
import { MicrocellError } from './errors.js'
import * as native from './internal/native.js'

/** The npm package that ships the default guest images (kernel + root disk with the agent). */
export const GUEST_PACKAGE = 'microcell-guest-linux-x64'

/** Where a default guest image comes from, in lookup order after an explicit option. */
export type GuestImageSource = 'env' | 'package' | 'cache'

/** The installed guest package, when there is one. */
export interface GuestPackageInfo {
  name: string
  version: string
  /** Where the package is installed (its compressed images). */
  dir: string
  /** Where its images are unpacked: `<cacheDir>/guest-pkg-<hash>/`. */
  unpackDir: string
  /** Whether they are unpacked already (else on the first sandbox, or `defaultGuest()`). */
  unpacked: boolean
  /** The guest kernel's release (`uname -r` in the guest). */
  kernelRelease: string
}

/**
 * Where the default guest is looked for. Lookup order, for each of the two images: the config's
 * `kernel` / `rootfs` option; `MICROCELL_KERNEL` / `MICROCELL_ROOTFS`; the installed guest package
 * `microcell-guest-linux-x64` (unpacked into the cache on first use); the cache `scripts/setup.sh`
 * builds (`<cacheDir>/kernel-current/vmlinux`, `<cacheDir>/rootfs-current/rootfs.ext4`).
 */
export interface GuestImages {
  /** The kernel the defaults resolve to. */
  kernel: string
  /** The root disk the defaults resolve to. */
  rootfs: string
  /** `MICROCELL_CACHE`, else `~/.cache/microcell`. */
  cacheDir: string
  /** Where `kernel` comes from. */
  kernelSource: GuestImageSource
  /** Where `rootfs` comes from. */
  rootfsSource: GuestImageSource
  /** The installed guest package, or null. */
  package: GuestPackageInfo | null
  /** Whether both files are there (a package not yet unpacked is not: it unpacks on first use). */
  present: boolean
}

/** One image of the guest package's `manifest.json` (written by `scripts/pack.mjs`). */
interface ManifestImage {
  /** The compressed file in the package (brotli). */
  file: string
  /** Its name once unpacked. */
  target: string
  bytes: number
  sha256: string
  /** The hash of the build inputs (`kernel-<hash>` / `rootfs-<hash>` of scripts/guest/). */
  inputHash: string
}

interface Manifest {
  name: string
  version: string
  compression: 'br'
  kernelRelease: string
  kernel: ManifestImage
  rootfs: ManifestImage
}

interface FoundPackage {
  info: GuestPackageInfo
  manifest: Manifest
  kernel: string
  rootfs: string
}

function isFile(p: string, bytes?: number): boolean {
  try {
    const st = fs.statSync(p)
    return st.isFile() && (bytes === undefined || st.size === bytes)
  } catch {
    return false
  }
}

function missing(message: string, cause?: unknown): MicrocellError {
  return new MicrocellError('E_GUEST_IMAGE_MISSING', message, cause === undefined ? undefined : { cause })
}

/** The installed guest package (resolved from this package, as `require` would), or null. */
function findPackage(cacheDir: string): FoundPackage | null {
  let manifestPath: string
  try {
    manifestPath = require.resolve(`${GUEST_PACKAGE}/manifest.json`, { paths: [__dirname] })
  } catch {
    return null
  }
  let manifest: Manifest
  try {
    manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8')) as Manifest
  } catch (err) {
    throw missing(`${GUEST_PACKAGE} is installed but its manifest.json cannot be read (${String(err)}): reinstall it (npm install ${GUEST_PACKAGE})`, err)
  }
  const dir = path.dirname(manifestPath)
  // Named by what is in it: a new package version unpacks beside the old, never over it.
  const id = crypto.createHash('sha256').update(`${manifest.kernel.sha256}\n${manifest.rootfs.sha256}\n`).digest('hex').slice(0, 16)
  const unpackDir = path.join(cacheDir, `guest-pkg-${id}`)
  const kernel = path.join(unpackDir, manifest.kernel.target)
  const rootfs = path.join(unpackDir, manifest.rootfs.target)
  const unpacked = isFile(kernel, manifest.kernel.bytes) && isFile(rootfs, manifest.rootfs.bytes)
  return {
    info: { name: manifest.name, version: manifest.version, dir, unpackDir, unpacked, kernelRelease: manifest.kernelRelease },
    manifest,
    kernel,
    rootfs,
  }
}

/** Looks for the guest package and registers its images with the addon (unpacked or not yet). */
function lookup(): FoundPackage | null {
  const found = findPackage(native.guestImages().cacheDir)
  if (found === null) native.setPackagedGuest(null, null)
  else native.setPackagedGuest(found.kernel, found.rootfs)
  return found
}

const MiB = 2 ** 20

/**
 * Writes `data` to `dest` the way every other process can trust: into a file of its own beside
 * it, holes where a 64 KiB block is all zero (the root disk is mostly empty), synced, then
 * renamed into place. Processes unpacking at the same time each rename a whole, verified file.
 */
function writeSparse(dest: string, data: Buffer): void {
  const tmp = `${dest}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`
  const fd = fs.openSync(tmp, 'wx', 0o644)
  try {
    const block = 64 * 1024
    const zero = Buffer.alloc(block)
    for (let off = 0; off < data.length; off += block) {
      const chunk = data.subarray(off, Math.min(off + block, data.length))
      if (!chunk.equals(zero.subarray(0, chunk.length))) fs.writeSync(fd, chunk, 0, chunk.length, off)
    }
    fs.ftruncateSync(fd, data.length)
    fs.fsyncSync(fd)
    fs.closeSync(fd)
    fs.renameSync(tmp, dest)
  } catch (err) {
    try {
      fs.closeSync(fd)
    } catch {
      // already closed
    }
    fs.rmSync(tmp, { force: true })
    throw err
  }
}

/** Unpacks one image of the package (brotli), checking its sha256 before it is put in place. */
function unpackImage(found: FoundPackage, what: 'kernel' | 'rootfs', dest: string): void {
  const image = found.manifest[what]
  if (isFile(dest, image.bytes)) return
  const label = what === 'kernel' ? `guest kernel ${found.manifest.kernelRelease}` : 'guest root disk'
  const t0 = performance.now()
  process.stderr.write(`microcell: first use: unpacking the ${label} from ${found.info.name}@${found.info.version} into ${found.info.unpackDir} ...`)
  try {
    const data = zlib.brotliDecompressSync(fs.readFileSync(path.join(found.info.dir, image.file)))
    const sha = crypto.createHash('sha256').update(data).digest('hex')
    if (data.length !== image.bytes || sha !== image.sha256) {
      throw missing(
        `${found.info.name}: ${image.file} unpacks to ${data.length} bytes with sha256 ${sha}, not the ${image.bytes} bytes with sha256 ${image.sha256} its manifest records: the package is damaged, reinstall it (npm install ${GUEST_PACKAGE})`,
      )
    }
    fs.mkdirSync(found.info.unpackDir, { recursive: true })
    writeSparse(dest, data)
  } catch (err) {
    process.stderr.write(' failed\n')
    if (err instanceof MicrocellError) throw err
    throw missing(
      `the ${label} of ${found.info.name} cannot be unpacked into ${found.info.unpackDir}: ${err instanceof Error ? err.message : String(err)}; free some space there or point MICROCELL_CACHE at a writable directory`,
      err,
    )
  }
  process.stderr.write(` ${(image.bytes / MiB).toFixed(1)} MiB in ${Math.round(performance.now() - t0)} ms, sha256 verified\n`)
}

/**
 * Makes the default guest usable: registers the installed guest package (if any) and unpacks
 * the images it is to provide into the cache the first time (a few hundred ms, once per
 * package version and cache; a line on stderr says so). `given` says which images the caller's
 * configuration names itself (those are not unpacked). Called by `Sandbox.create()`,
 * `MicroVm.start()` of a workload and `defaultGuest()`. Throws `E_GUEST_IMAGE_MISSING` when the
 * package is damaged or cannot be unpacked.
 */
export function prepareGuest(given: { kernel?: unknown; rootfs?: unknown } = {}): void {
  const found = lookup()
  if (found === null || found.info.unpacked) return
  const g = native.guestImages()
  if (g.kernelSource === 'package' && given.kernel == null) unpackImage(found, 'kernel', found.kernel)
  if (g.rootfsSource === 'package' && given.rootfs == null) unpackImage(found, 'rootfs', found.rootfs)
}

/** The default guest images: the paths `Sandbox` and `defaultGuest()` use, where each comes from, and whether they exist. Unpacks nothing. */
export function guestImages(): GuestImages {
  const found = lookup()
  const g = native.guestImages()
  return {
    kernel: g.kernel,
    rootfs: g.rootfs,
    cacheDir: g.cacheDir,
    kernelSource: g.kernelSource as GuestImageSource,
    rootfsSource: g.rootfsSource as GuestImageSource,
    package: found?.info ?? null,
    present: isFile(g.kernel) && isFile(g.rootfs),
  }
}

/**
 * The default guest's root disk as a MicroVm `rootfs`: `{ disk: guestImages().rootfs }` (the
 * guest package's is unpacked first). A MicroVm with it (and an `execPath`) boots the guest
 * platform's kernel on a sandbox engine (`auto`: the built-in VMM where it boots Linux, else
 * QEMU) and runs that program as its workload:
 * `MicroVm.builder().rootfs(defaultGuest()).execPath('/bin/sh').args(['-c', 'echo hi'])`.
 */
export function defaultGuest(): Rootfs {
  prepareGuest()
  return { disk: native.guestImages().rootfs }
}
