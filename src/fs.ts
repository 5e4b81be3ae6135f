import path from 'node:path'
import { Readable, Writable } from 'node:stream'

import { MicrocellError } from './errors.js'
import type * as native from './internal/native.js'

/** `stat` of a guest path. */
export interface GuestStat {
  type: 'file' | 'dir' | 'symlink' | 'other'
  size: number
  /** Permission bits (`st_mode & 0o7777`), e.g. `0o644`. */
  mode: number
  uid: number
  gid: number
  /** Modification time, milliseconds since the epoch. */
  mtimeMs: number
  /** Where a symlink points (`lstat`). */
  linkTarget?: string
}

/** One entry of `fs.list()` (as `lstat` sees it: a symlink is `symlink`). */
export interface GuestDirEntry {
  name: string
  type: 'file' | 'dir' | 'symlink' | 'other'
  size: number
  mode: number
  mtimeMs: number
}

/** What a copy moved. */
export interface CopyStats {
  /** Files, directories and symlinks. */
  entries: number
  /** File content bytes. */
  bytes: number
}

export interface WriteFileOptions {
  /** Permission bits, set exactly (default: 0o644 for a new file; an existing file keeps its own). */
  mode?: number
  /** Append instead of replacing. */
  append?: boolean
  /** Create missing parent directories. */
  parents?: boolean
}

export interface ReadFileOptions {
  /**
   * The most bytes to collect (default 64 MiB, as exec's `maxOutputBytes`). A longer file, or an
   * endless one such as `/dev/zero`, rejects with `E_OUTPUT_LIMIT` as soon as it passes the
   * limit (the guest is asked for one byte more and sends no more). Use `readStream()` for
   * large files.
   */
  maxBytes?: number
}

export interface CopyToHostOptions {
  /** Keep setuid and setgid bits (default false: they are dropped, the guest's files are untrusted). */
  keepSetuid?: boolean
  /**
   * The most file data to write on the host (default 1 GiB; holes in sparse files stay holes
   * and do not count; each file, directory or symlink counts 512 bytes more). Beyond it the
   * copy stops with `E_OUTPUT_LIMIT`; the file it was writing is removed (the files finished
   * before it stay).
   */
  maxBytes?: number
}

export interface ReadStreamOptions {
  /** First byte to read (default 0). */
  start?: number
  /** Last byte to read, inclusive (as `fs.createReadStream`); default: to the end. */
  end?: number
}

function invalid(message: string): MicrocellError {
  return new MicrocellError('E_INVALID_ARGUMENT', message)
}

function guestPath(p: unknown, what = 'path'): string {
  if (typeof p !== 'string' || !p.startsWith('/')) throw invalid(`${what} ${JSON.stringify(p)} is not an absolute guest path: start it with '/'`)
  return p
}

function hostPath(p: unknown, what: string): string {
  if (typeof p !== 'string' || p.length === 0) throw invalid(`${what} must be a host path (a non-empty string)`)
  return path.resolve(p)
}

function bytes(data: unknown): Buffer {
  if (typeof data === 'string') return Buffer.from(data, 'utf8')
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength)
  throw invalid('data must be a string (written as UTF-8) or a Buffer/Uint8Array')
}

function maxBytes(n: unknown, fallback: string): number | undefined {
  if (n === undefined) return undefined
  if (!Number.isSafeInteger(n) || (n as number) < 0) throw invalid(`maxBytes is ${String(n)}: give a whole number of bytes ≥ 0 (default ${fallback})`)
  return n as number
}

function mode(m: unknown, fallback?: number): number | undefined {
  if (m === undefined) return fallback
  if (!Number.isInteger(m) || (m as number) < 0 || (m as number) > 0o7777) throw invalid(`mode ${String(m)}: give permission bits from 0 to 0o7777`)
  return m as number
}

/** Runs `f`, turning a synchronous argument error into a rejection. */
function reject<T>(f: () => Promise<T>): Promise<T> {
  try {
    return f()
  } catch (err) {
    return Promise.reject(err)
  }
}

/**
 * The files of a sandbox (`sandbox.fs`). Guest paths are absolute. A guest OS error rejects
 * with a `MicrocellError` whose code is the errno's name (`ENOENT`, `EACCES`, `EISDIR`,
 * `ENOTDIR`, `EEXIST`, `ENOTEMPTY`, ...) and whose message names the guest path.
 */
/** A change under a watched guest directory (`sandbox.fs.watch()`). */
export interface WatchChange {
  /** `overflow`: changes were lost (the guest's queue overflowed while this side read slowly). */
  type: 'create' | 'write' | 'remove' | 'rename' | 'chmod' | 'overflow'
  /** The guest path (for `rename`, one change for the old name and one for the new). */
  path: string
}

/**
 * Changes under a guest directory, in order, from when `watch()` resolved: an async iterable
 * (`for await (const c of watcher)`) that ends after `close()` (or `await using`).
 */
export class FsWatcher implements AsyncIterable<WatchChange>, AsyncDisposable {
  readonly #native: native.NativeWatchHandle

  /** @internal Made by `sandbox.fs.watch()`. */
  constructor(handle: native.NativeWatchHandle) {
    this.#native = handle
  }

  /** The next change, or null once closed. */
  async next(): Promise<WatchChange | null> {
    const c = await this.#native.next()
    return c === null ? null : { type: c.kind as WatchChange['type'], path: c.path }
  }

  /** Stops watching: the changes already sent are still given, then the iteration ends. */
  close(): void {
    this.#native.close()
  }

  async *[Symbol.asyncIterator](): AsyncIterator<WatchChange> {
    for (let c = await this.next(); c !== null; c = await this.next()) yield c
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close()
  }
}

export class SandboxFs {
  readonly #ops: native.NativeSandboxOps

  /** @internal Made by `sandbox.fs`. */
  constructor(ops: native.NativeSandboxOps) {
    this.#ops = ops
  }

  /**
   * Watches a guest directory (`recursive`: its subdirectories too, also ones made later);
   * resolves once the guest watches it. Rejects with `ENOENT` / `ENOTDIR` (with the path).
   */
  watch(dir: string, options: { recursive?: boolean } = {}): Promise<FsWatcher> {
    return reject(async () => new FsWatcher(await this.#ops.watch(guestPath(dir), options.recursive === true)))
  }

  /** A whole file, at most `maxBytes` (default 64 MiB; beyond it `E_OUTPUT_LIMIT`). */
  read(file: string, options: ReadFileOptions = {}): Promise<Buffer> {
    return reject(() => this.#ops.read(guestPath(file), maxBytes(options.maxBytes, '64 MiB')))
  }

  /** A whole file, decoded (UTF-8 by default); `maxBytes` as for `read()`. */
  async readText(file: string, encoding: BufferEncoding = 'utf8', options: ReadFileOptions = {}): Promise<string> {
    return (await this.read(file, options)).toString(encoding)
  }

  /** Writes a whole file (a string as UTF-8). */
  write(file: string, data: string | Uint8Array, options: WriteFileOptions = {}): Promise<void> {
    return reject(() =>
      this.#ops.write(guestPath(file), bytes(data), {
        mode: mode(options.mode),
        append: options.append === true,
        parents: options.parents === true,
      }),
    )
  }

  /** The entries of a directory, sorted by name. */
  list(dir: string): Promise<GuestDirEntry[]> {
    return reject(() => this.#ops.list(guestPath(dir))) as Promise<GuestDirEntry[]>
  }

  /** Makes a directory (`recursive`: with its parents, and an existing one is fine; `mode` default 0o755). */
  mkdir(dir: string, options: { recursive?: boolean; mode?: number } = {}): Promise<void> {
    return reject(() => this.#ops.mkdir(guestPath(dir), mode(options.mode, 0o755)!, options.recursive === true))
  }

  /**
   * Removes a file, symlink or empty directory; `recursive`: a whole tree. `force`: nothing
   * there is no error.
   */
  async remove(target: string, options: { recursive?: boolean; force?: boolean } = {}): Promise<void> {
    try {
      await this.#ops.remove(guestPath(target), options.recursive === true)
    } catch (err) {
      if (options.force === true && (err as MicrocellError).code === 'ENOENT') return
      throw err
    }
  }

  /** Renames (moves) within the guest. */
  rename(from: string, to: string): Promise<void> {
    return reject(() => this.#ops.rename(guestPath(from, 'from'), guestPath(to, 'to')))
  }

  /** `stat`, through symlinks. */
  stat(target: string): Promise<GuestStat> {
    return reject(() => this.#ops.stat(guestPath(target), true)) as Promise<GuestStat>
  }

  /** `lstat`: a symlink itself (with `linkTarget`). */
  lstat(target: string): Promise<GuestStat> {
    return reject(() => this.#ops.stat(guestPath(target), false)) as Promise<GuestStat>
  }

  /** Whether something (a dangling symlink included) is at the path. */
  exists(target: string): Promise<boolean> {
    return reject(() => this.#ops.exists(guestPath(target)))
  }

  /**
   * A file as a Node Readable. Chunks are pulled from the guest as they are read: a reader that
   * stops stops the transfer. Errors (`ENOENT`, ...) are the stream's `error` event.
   */
  readStream(file: string, options: ReadStreamOptions = {}): Readable {
    const p = guestPath(file)
    const start = options.start ?? 0
    if (!Number.isSafeInteger(start) || start < 0) throw invalid(`start is ${String(start)}: give a byte offset ≥ 0`)
    let length: number | undefined
    if (options.end !== undefined) {
      if (!Number.isSafeInteger(options.end) || options.end < start - 1) throw invalid(`end is ${String(options.end)}: give the last byte's offset (≥ start - 1)`)
      length = options.end - start + 1
    }
    let reader: native.NativeFileReaderHandle | undefined
    const ops = this.#ops
    return new Readable({
      construct(cb) {
        ops.openRead(p, start, length).then(
          (r) => {
            reader = r
            cb()
          },
          (err: Error) => cb(err),
        )
      },
      read() {
        reader!.readChunk().then(
          (chunk) => this.push(chunk),
          (err: Error) => this.destroy(err),
        )
      },
    })
  }

  /**
   * A file as a Node Writable (created or replaced, or appended to); `finish` is emitted once
   * the guest has closed the file. Writes wait for the guest's window (back-pressure).
   */
  writeStream(file: string, options: WriteFileOptions = {}): Writable {
    const p = guestPath(file)
    const o = { mode: mode(options.mode), append: options.append === true, parents: options.parents === true }
    let writer: native.NativeFileWriterHandle | undefined
    const ops = this.#ops
    return new Writable({
      construct(cb) {
        ops.openWrite(p, o).then(
          (w) => {
            writer = w
            cb()
          },
          (err: Error) => cb(err),
        )
      },
      write(chunk: Buffer, _encoding, cb) {
        writer!.write(chunk).then(() => cb(), cb)
      },
      final(cb) {
        writer!.finish().then(() => cb(), cb)
      },
    })
  }

  /**
   * Copies a host file, directory tree or symlink to `guestPath`, which becomes it (a
   * directory's contents are merged into what is there). Modes, mtimes and symlinks are kept;
   * owners, hard links and special files are not. Missing parents are created.
   */
  copyFromHost(hostSource: string, guestTarget: string): Promise<CopyStats> {
    return reject(() => this.#ops.copyFromHost(hostPath(hostSource, 'the host path'), guestPath(guestTarget)))
  }

  /**
   * Copies a guest file, directory tree or symlink to `hostPath`, which becomes it (modes
   * without setuid/setgid unless `keepSetuid`, mtimes, symlinks and holes kept). The guest is
   * untrusted: nothing is written outside `hostPath`, through a symlink or otherwise, no
   * device or FIFO is made, and at most `maxBytes` of data (default 1 GiB) is written, else
   * `E_OUTPUT_LIMIT`.
   */
  copyToHost(guestSource: string, hostTarget: string, options: CopyToHostOptions = {}): Promise<CopyStats> {
    return reject(() =>
      this.#ops.copyToHost(guestPath(guestSource), hostPath(hostTarget, 'the host path'), {
        keepSetuid: options.keepSetuid === true,
        maxBytes: maxBytes(options.maxBytes, '1 GiB'),
      }),
    )
  }
}
