import fs from 'node:fs'

import type { Rootfs } from './config.js'
import * as native from './internal/native.js'

/** Where the default guest (the guest platform `scripts/setup.sh` builds) is looked for. */
export interface GuestImages {
  /** The kernel: `MICROCELL_KERNEL`, else `<cacheDir>/kernel-current/vmlinux`. */
  kernel: string
  /** The root disk: `MICROCELL_ROOTFS`, else `<cacheDir>/rootfs-current/rootfs.ext4`. */
  rootfs: string
  /** `MICROCELL_CACHE`, else `~/.cache/microcell`. */
  cacheDir: string
  /** Whether both files are there (else run `scripts/setup.sh`). */
  present: boolean
}

/** The default guest images: the paths `Sandbox` and `defaultGuest()` use, and whether they exist. */
export function guestImages(): GuestImages {
  const g = native.guestImages()
  const isFile = (p: string) => {
    try {
      return fs.statSync(p).isFile()
    } catch {
      return false
    }
  }
  return { ...g, present: isFile(g.kernel) && isFile(g.rootfs) }
}

/**
 * The default guest's root disk as a MicroVm `rootfs`: `{ disk: guestImages().rootfs }`. A
 * MicroVm with it (and an `execPath`) boots the guest platform's kernel on a sandbox engine
 * (`auto`: the built-in VMM where it boots Linux, else QEMU) and runs that program as its
 * workload: `MicroVm.builder().rootfs(defaultGuest()).execPath('/bin/sh').args(['-c', 'echo hi'])`.
 */
export function defaultGuest(): Rootfs {
  return { disk: native.guestImages().rootfs }
}
