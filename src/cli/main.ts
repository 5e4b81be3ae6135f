#!/usr/bin/env node
/**
 * `microcell`: run commands in a fresh microVM sandbox from the shell.
 *
 *   microcell run [options] -- CMD [ARGS...]   boot a sandbox, run CMD, stream its output, exit with its status
 *   microcell exec [options] SCRIPT            the same with `/bin/sh -c SCRIPT`
 *   microcell info [--json]                    this host's KVM, the engines, the guest images
 *   microcell doctor [--json]                  can a sandbox start here; what to install if not
 *
 * Exit status: the command's exit code (128 + signal number when a signal ended it, e.g. 137 for
 * SIGKILL after --timeout); 126 / 127 when it cannot run / does not exist; 1 when the sandbox
 * could not be made or ended under it; 2 for a usage error. `doctor`: 0 when a sandbox can start, else 1.
 */
import fs from 'node:fs'
import path from 'node:path'

import { UsageError, optionsHelp, parse, type OptionSpec } from './args.js'
import { runCommand, RUN_OPTIONS } from './run.js'
import { infoCommand } from './info.js'
import { doctorCommand } from './doctor.js'

function version(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }
    return pkg.version
  } catch {
    return 'unknown'
  }
}

const HELP_OPTION: OptionSpec = { name: 'help', short: 'h', kind: 'flag', help: 'show this help' }

const MAIN_HELP = `microcell ${version()}: run commands in microVM sandboxes

Usage:
  microcell run [options] -- CMD [ARGS...]   boot a sandbox, run CMD in it (streaming its output), stop it
  microcell exec [options] SCRIPT            the same with /bin/sh -c SCRIPT (words after SCRIPT are joined with spaces)
  microcell info [--json]                    this host's KVM, which engine 'auto' picks and why, the guest images
  microcell doctor [--json]                  whether a sandbox can start here (exit 0) or not (exit 1), and what to install
  microcell COMMAND --help                   the options of a command
  microcell --version

The exit status is the command's (128 + the signal's number when a signal ended it; 126 when it
cannot be run, 127 when it does not exist), 1 when the sandbox failed, 2 for a usage error.
`

function runHelp(name: 'run' | 'exec'): string {
  const usage =
    name === 'run'
      ? `Usage: microcell run [options] [--] CMD [ARGS...]

Boots a sandbox (the default guest: Linux with the microcell agent), runs CMD with ARGS (no
shell; CMD is a path or a name looked up in PATH), streams its stdout and stderr to ours, stops
the sandbox and exits with the command's status. Options end at '--' or at CMD.`
      : `Usage: microcell exec [options] [--] SCRIPT

Like 'microcell run -- /bin/sh -c SCRIPT': boots a sandbox, runs the shell script SCRIPT (more
words after it are joined with spaces, as ssh does), streams its output and exits with its status.`
  return `${usage}

Options:
${optionsHelp([...RUN_OPTIONS, HELP_OPTION])}

Progress (boot, stop) goes to stderr when stderr is a terminal or with --verbose. With --json the
output is collected and one JSON object is printed on stdout at the end:
  { "exitCode", "signal", "timedOut", "durationMs", "stdout", "stderr", "status", "sandbox": { "engine", "bootMs", ... } }
`
}

const INFO_OPTIONS: OptionSpec[] = [{ name: 'json', kind: 'flag', help: 'print one JSON object' }, HELP_OPTION]

function infoHelp(): string {
  return `Usage: microcell info [--json]

Says what this host can run: the KVM flavour (hardware, PVM, none) and whether the built-in VMM
boots Linux, which engine 'auto' picks and why, whether QEMU is there, and where the default guest
images are (and whether they were built: ./scripts/setup.sh).

Options:
${optionsHelp(INFO_OPTIONS)}
`
}

function doctorHelp(): string {
  return `Usage: microcell doctor [--json]

Says whether a default sandbox can start on this host: which engine 'auto' would run and why,
where the guest kernel and root disk were found (lookup order: the kernel/rootfs option,
MICROCELL_KERNEL / MICROCELL_ROOTFS, the installed microcell-guest-linux-x64 package, the cache
./scripts/setup.sh builds), and for whatever is missing what to install. Exits 0 when a sandbox
can start, 1 when it cannot.

Options:
${optionsHelp(INFO_OPTIONS)}
`
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(MAIN_HELP)
    return command === undefined ? 2 : 0
  }
  if (command === '--version' || command === '-V') {
    process.stdout.write(`${version()}\n`)
    return 0
  }
  try {
    switch (command) {
      case 'run':
      case 'exec': {
        const p = parse(rest, [...RUN_OPTIONS, HELP_OPTION])
        if (p.options.get('help') === true) {
          process.stdout.write(runHelp(command))
          return 0
        }
        return await runCommand(command, p)
      }
      case 'info': {
        const p = parse(rest, INFO_OPTIONS)
        if (p.options.get('help') === true) {
          process.stdout.write(infoHelp())
          return 0
        }
        if (p.rest.length > 0) throw new UsageError(`info takes no arguments (got ${JSON.stringify(p.rest[0])})`)
        return infoCommand(p.options.get('json') === true)
      }
      case 'doctor': {
        const p = parse(rest, INFO_OPTIONS)
        if (p.options.get('help') === true) {
          process.stdout.write(doctorHelp())
          return 0
        }
        if (p.rest.length > 0) throw new UsageError(`doctor takes no arguments (got ${JSON.stringify(p.rest[0])})`)
        return doctorCommand(p.options.get('json') === true)
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`)
    }
  } catch (err) {
    if (err instanceof UsageError) {
      const known = command === 'run' || command === 'exec' || command === 'info' || command === 'doctor'
      process.stderr.write(`microcell${known ? ` ${command}` : ''}: ${err.message}\nTry 'microcell ${known ? `${command} ` : ''}--help'.\n`)
      return 2
    }
    throw err
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err: unknown) => {
    const e = err as { code?: string; message?: string }
    process.stderr.write(`microcell: ${e.code ? `${e.code}: ` : ''}${e.message ?? String(err)}\n`)
    process.exitCode = 1
  },
)
