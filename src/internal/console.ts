// The guest console as a Node Readable over the addon's console queue, and the order of its end
// against the VM's: `wait()` resolves only after the console has delivered its last byte, as a
// child process's 'close' comes after its stdio streams (docs/security.md).
import { Readable } from 'node:stream'

import { MicrocellError } from '../errors.js'
import { LIMITS } from '../limits.js'

/** The addon's side of a console: `null` once the VM has ended and every byte was read. */
export interface ConsoleSource {
  readConsole(maxBytes?: number): Promise<Buffer | null>
}

/** Resolves once a console's stream has delivered its last byte (see `consoleDelivered`). */
const delivered = new WeakMap<Readable, () => Promise<void>>()

/** A Readable of the console: each `_read` pulls one chunk from the addon (one pull at a time). */
export function consoleReadable(source: ConsoleSource): Readable {
  let pulling: Promise<void> | null = null
  let done = false
  const pull = (size: number): Promise<void> => {
    pulling ??= source.readConsole(Math.max(size, 4096)).then(
      (chunk) => {
        pulling = null
        if (chunk === null) done = true
        stream.push(chunk)
      },
      (err: unknown) => {
        pulling = null
        done = true
        stream.destroy(err as Error)
      },
    )
    return pulling
  }
  const stream = new Readable({
    read(size: number) {
      void pull(size)
    },
  })
  delivered.set(stream, async () => {
    if (stream.readableEnded || stream.destroyed) return
    // A flowing reader (a 'data' consumer, a pipe) gets every byte before wait() resolves.
    // A paused one (an async iterator between next() calls, a 'readable' listener) is not
    // waited for: it may be awaiting this very wait() before it reads on, so the rest goes
    // into the stream's buffer below, where its next read finds it.
    if (stream.readableFlowing === true) {
      await new Promise<void>((resolve) => {
        const settle = (): void => {
          for (const e of ['end', 'close', 'error']) stream.off(e, settle)
          resolve()
        }
        for (const e of ['end', 'close', 'error']) stream.once(e, settle)
        if (stream.readableEnded || stream.destroyed) settle()
      })
      return
    }
    // Not being read now: take the rest into its buffer, for whoever reads later. Bounded: the
    // VM has ended, so what is left is at most the console queue.
    while (!done && !stream.destroyed) await pull(64 << 10)
  })
  return stream
}

/**
 * Call once the VM has ended: resolves when `stream` (if one was made) has delivered its last
 * byte: after its 'end' when it flows, else once all of it is in its buffer.
 */
export function consoleDelivered(stream: Readable | undefined): Promise<void> {
  const f = stream === undefined ? undefined : delivered.get(stream)
  return f === undefined ? Promise.resolve() : f()
}

/** Checks `consoleQueueBytes` and returns the console options the addon takes. */
export function nativeConsoleOptions(options: {
  consoleStream?: boolean
  consoleQueueBytes?: number
}): { consoleStream: boolean; consoleQueueBytes?: number } {
  const nativeOptions: { consoleStream: boolean; consoleQueueBytes?: number } = {
    consoleStream: options.consoleStream === true,
  }
  const queue = options.consoleQueueBytes
  if (queue !== undefined) {
    if (!Number.isInteger(queue) || queue < 1 || queue > LIMITS.MAX_CONSOLE_QUEUE_BYTES) {
      throw new MicrocellError(
        'E_INVALID_ARGUMENT',
        `consoleQueueBytes is ${String(queue)}: give a whole number of bytes from 1 to ${LIMITS.MAX_CONSOLE_QUEUE_BYTES} (default 1 MiB)`,
      )
    }
    nativeOptions.consoleQueueBytes = queue
  }
  return nativeOptions
}
