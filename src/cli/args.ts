/** Command-line parsing for `microcell`: options before the command, `--` or the first word ends them. */

/** A usage error: the CLI prints it with a pointer to `--help` and exits with status 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message)
    this.name = 'UsageError'
  }
}

export interface OptionSpec {
  /** `--name`; `short`: `-x`. */
  name: string
  short?: string
  /** `string`: takes a value (`--name V` or `--name=V`); `list`: repeatable; `flag`: none. */
  kind: 'string' | 'list' | 'flag'
  /** For `--help`: `N`, `K=V`, ... */
  value?: string
  help: string
}

export interface Parsed {
  options: Map<string, string | string[] | boolean>
  /** Words after the options (the command and its arguments). */
  rest: string[]
}

/**
 * Parses `argv` (without the command name): options until `--` or the first word that is not
 * an option; everything after that is `rest`, untouched (so `microcell run ls -l` passes `-l`
 * to `ls`).
 */
export function parse(argv: readonly string[], specs: readonly OptionSpec[]): Parsed {
  const options = new Map<string, string | string[] | boolean>()
  let i = 0
  while (i < argv.length) {
    const word = argv[i]!
    if (word === '--') {
      i += 1
      break
    }
    if (!word.startsWith('-') || word === '-') break
    let name: string
    let inline: string | undefined
    if (word.startsWith('--')) {
      const eq = word.indexOf('=')
      name = eq === -1 ? word.slice(2) : word.slice(2, eq)
      inline = eq === -1 ? undefined : word.slice(eq + 1)
    } else {
      const spec = specs.find((s) => s.short === word.slice(1))
      if (spec === undefined) throw new UsageError(`unknown option ${word}`)
      name = spec.name
    }
    const spec = specs.find((s) => s.name === name)
    if (spec === undefined) throw new UsageError(`unknown option --${name}`)
    i += 1
    if (spec.kind === 'flag') {
      if (inline !== undefined) throw new UsageError(`--${name} takes no value`)
      options.set(name, true)
      continue
    }
    let value = inline
    if (value === undefined) {
      if (i >= argv.length) throw new UsageError(`--${name} needs a value (${spec.value ?? 'VALUE'})`)
      value = argv[i]!
      i += 1
    }
    if (spec.kind === 'list') {
      const list = (options.get(name) as string[] | undefined) ?? []
      list.push(value)
      options.set(name, list)
    } else {
      options.set(name, value)
    }
  }
  return { options, rest: argv.slice(i) }
}

/** A whole number option in [min, max], or undefined when not given. */
export function intOption(p: Parsed, name: string, min: number, max: number): number | undefined {
  const v = p.options.get(name)
  if (v === undefined) return undefined
  const s = String(v)
  if (!/^\d+$/.test(s) || Number(s) < min || Number(s) > max) {
    throw new UsageError(`--${name} ${JSON.stringify(s)}: give a whole number from ${min} to ${max}`)
  }
  return Number(s)
}

export function stringOption(p: Parsed, name: string): string | undefined {
  const v = p.options.get(name)
  return v === undefined ? undefined : String(v)
}

export function flag(p: Parsed, name: string): boolean {
  return p.options.get(name) === true
}

export function listOption(p: Parsed, name: string): string[] {
  return (p.options.get(name) as string[] | undefined) ?? []
}

/** The options part of a command's `--help`. */
export function optionsHelp(specs: readonly OptionSpec[]): string {
  const rows = specs.map((s) => {
    const left = `${s.short ? `-${s.short}, ` : '    '}--${s.name}${s.kind === 'flag' ? '' : ` ${s.value ?? 'VALUE'}`}`
    return [left, s.help] as const
  })
  const width = Math.max(...rows.map(([l]) => l.length)) + 2
  return rows.map(([l, h]) => `  ${l.padEnd(width)}${h}`).join('\n')
}
