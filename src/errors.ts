/**
 * The one error type of microcell. `code` is stable across releases: match on it, not on the
 * message. Codes: `E_CONFIG_*` (invalid configuration), `E_NO_KVM`, `E_KVM`, `E_KERNEL_NOT_FOUND`,
 * `E_KERNEL_FORMAT`, `E_INITRD`, `E_UNSUPPORTED_GUEST`, `E_MEMORY`, `E_CONSOLE_OUTPUT`,
 * `E_CONSOLE_NOT_ENABLED`, `E_NATIVE_LOAD`, `E_INVALID_ARGUMENT`, `E_INTERNAL`, snapshots:
 * `E_SNAPSHOT_IO`, `E_SNAPSHOT_CORRUPT`, `E_SNAPSHOT_VERSION`, `E_SNAPSHOT_HOST`, `E_SNAPSHOT`,
 * `E_VM_STATE` (pause/snapshot of a VM that has ended), `E_POOL_CLOSED`, sandboxes:
 * `SANDBOX_ERROR_CODES` (`E_GUEST_IMAGE_MISSING`, `E_BOOT_TIMEOUT`, `E_AGENT_EXITED`, ...).
 */
export class MicrocellError extends Error {
  /** Stable error code, e.g. `E_CONFIG_VCPUS`. */
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'MicrocellError'
    this.code = code
  }
}

/**
 * The configuration codes `build()` and `start()` / `create()` can throw (both builders; the
 * last four are `Sandbox.builder()`'s own). The Rust list is `ConfigError::CODES`; a test checks
 * that the two agree.
 */
export const CONFIG_ERROR_CODES = [
  'E_CONFIG_JSON',
  'E_CONFIG_VCPUS',
  'E_CONFIG_MEMORY',
  'E_CONFIG_MISSING',
  'E_CONFIG_PATH_NOT_FOUND',
  'E_CONFIG_PATH_KIND',
  'E_CONFIG_INVALID_STRING',
  'E_CONFIG_GUEST_PATH',
  'E_CONFIG_GUEST_PATH_CONFLICT',
  'E_CONFIG_PAIR',
  'E_CONFIG_PORT',
  'E_CONFIG_RLIMIT',
  'E_CONFIG_ENV',
  'E_CONFIG_NETWORK',
  'E_CONFIG_CMDLINE',
  'E_CONFIG_CONSOLE',
  'E_CONFIG_NAME',
  'E_CONFIG_TIMEOUT',
  'E_CONFIG_VOLUME',
  'E_CONFIG_METADATA',
] as const

export type ConfigErrorCode = (typeof CONFIG_ERROR_CODES)[number]

/**
 * The codes `Sandbox.create()` and a sandbox's methods reject with, beside the configuration's
 * (`E_CONFIG_JSON`, `E_CONFIG_NAME`, `E_CONFIG_MEMORY`, `E_CONFIG_VCPUS`, `E_CONFIG_ENV`,
 * `E_CONFIG_GUEST_PATH`, `E_CONFIG_TIMEOUT`, `E_CONFIG_CMDLINE`, `E_CONFIG_CONSOLE`, `E_CONFIG_NETWORK`, `E_CONFIG_VOLUME`, `E_CONFIG_METADATA`, also thrown by
 * `build()`):
 * - `E_GUEST_IMAGE_MISSING`: the guest kernel or root disk is not there (`npm install microcell-guest-linux-x64`; in a clone `scripts/setup.sh`), or the installed guest package cannot be unpacked;
 * - `E_QEMU_NOT_FOUND`: the QEMU engine was chosen and `qemu-system-x86_64` is not installed;
 * - `E_NO_KVM`: engine `kvm` without a usable `/dev/kvm`;
 * - `E_ENGINE_UNAVAILABLE`: engine `kvm` on a host whose KVM cannot boot Linux (see `hostInfo()`);
 * - `E_ENGINE_START`, `E_HOST_IO`, `E_CONSOLE_OUTPUT`, `E_THREAD`: the host could not start it;
 * - `E_BOOT_TIMEOUT`: the guest agent was not ready within `bootTimeoutMs` (the message has the console tail);
 * - `E_AGENT_EXITED`: the VM ended before the agent was ready (kernel panic, bad root disk, QEMU error);
 * - `E_PROTOCOL`, `E_AGENT_ERROR`, `E_CHANNEL_CLOSED`, `E_AGENT_TIMEOUT`: the control channel;
 * - `E_VM_STATE`: a request to a paused sandbox (resume it first), a pause of one that has ended;
 * - `E_OUTPUT_LIMIT`: `exec()` output beyond `maxOutputBytes` (the process was killed), `fs.read()`
 *   or `fs.copyToHost()` beyond `maxBytes` (the transfer was stopped);
 * - `E_SNAPSHOT`: a snapshot could not be taken or restored; `E_INVALID_ARGUMENT`: a request
 *   that makes no sense (empty argv, a relative guest path); `E_HOST_FILE`: a host file of a copy;
 * - the VMM's own codes on engine `kvm` (`E_KERNEL_FORMAT`, `E_KVM`, `E_MEMORY`, ...).
 *
 * The list is Rust's `SandboxError::CODES` plus the VMM codes every engine uses (`E_VM_STATE`);
 * a test checks it against both.
 */
export const SANDBOX_ERROR_CODES = [
  'E_GUEST_IMAGE_MISSING',
  'E_QEMU_NOT_FOUND',
  'E_NO_KVM',
  'E_ENGINE_UNAVAILABLE',
  'E_ENGINE_START',
  'E_HOST_IO',
  'E_CONSOLE_OUTPUT',
  'E_THREAD',
  'E_BOOT_TIMEOUT',
  'E_AGENT_EXITED',
  'E_PROTOCOL',
  'E_AGENT_ERROR',
  'E_CHANNEL_CLOSED',
  'E_AGENT_TIMEOUT',
  'E_VM_STATE',
  'E_OUTPUT_LIMIT',
  'E_SNAPSHOT',
  'E_INVALID_ARGUMENT',
  'E_HOST_FILE',
] as const

export type SandboxErrorCode = (typeof SANDBOX_ERROR_CODES)[number]

/**
 * The built-in VMM's own codes (`MicroVm` on any kernel, and sandboxes on engine `kvm`):
 * `E_NO_KVM`, `E_CONFIG` (a VM configuration the VMM cannot run), `E_KERNEL_NOT_FOUND`,
 * `E_KERNEL_FORMAT`, `E_INITRD`, `E_UNSUPPORTED_GUEST` (a Linux kernel where KVM cannot boot
 * one), `E_MEMORY`, `E_KVM` (a KVM ioctl failed), `E_THREAD`, snapshots (`E_SNAPSHOT_CORRUPT`,
 * `E_SNAPSHOT_VERSION`, `E_SNAPSHOT_HOST`, `E_SNAPSHOT_IO`, `E_SNAPSHOT`) and `E_VM_STATE`.
 * The Rust list is `vmm::Error::CODES`; a test checks that the two agree.
 */
export const VMM_ERROR_CODES = [
  'E_NO_KVM',
  'E_CONFIG',
  'E_KERNEL_NOT_FOUND',
  'E_KERNEL_FORMAT',
  'E_INITRD',
  'E_UNSUPPORTED_GUEST',
  'E_MEMORY',
  'E_KVM',
  'E_THREAD',
  'E_SNAPSHOT_CORRUPT',
  'E_SNAPSHOT_VERSION',
  'E_SNAPSHOT_HOST',
  'E_SNAPSHOT_IO',
  'E_SNAPSHOT',
  'E_VM_STATE',
] as const

export type VmmErrorCode = (typeof VMM_ERROR_CODES)[number]

