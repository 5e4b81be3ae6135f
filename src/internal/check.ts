// Argument checks of the config builders: a wrong type is a MicrocellError (E_CONFIG_JSON, the
// code the native validation gives a wrong type too) naming the option and what it takes,
// never a bare TypeError from spreading it, nor a value dropped without a word.
import { MicrocellError } from '../errors.js'

function shown(value: unknown): string {
  if (value === null) return 'null'
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value)
  if (typeof value === 'object') return Array.isArray(value) ? 'an array' : 'an object'
  return `${typeof value} ${String(value)}`
}

/** The error for `option` given `value` where it takes `expected`. */
export function configTypeError(option: string, expected: string, value: unknown): MicrocellError {
  return new MicrocellError('E_CONFIG_JSON', `${option} is ${shown(value)}: give ${expected}`)
}

/** An iterable of strings (not a string: its characters are not a list), as an array. */
export function stringList(option: string, value: unknown): string[] {
  const expected = 'an array (or other iterable) of strings'
  if (
    value === null ||
    typeof value !== 'object' ||
    typeof (value as Partial<Iterable<unknown>>)[Symbol.iterator] !== 'function'
  ) {
    throw configTypeError(option, expected, value)
  }
  const list = [...(value as Iterable<unknown>)]
  const bad = list.find((v) => typeof v !== 'string')
  if (bad !== undefined) throw configTypeError(`an entry of ${option}`, 'a string', bad)
  return list as string[]
}

/** A plain object (not null, not an array). */
export function plainObject(option: string, value: unknown, expected = 'an object'): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw configTypeError(option, expected, value)
  return value as Record<string, unknown>
}

/** `{ KEY: 'value' }` with string values. */
export function stringRecord(option: string, value: unknown): Record<string, string> {
  const record = plainObject(option, value, 'an object of string values')
  for (const [key, v] of Object.entries(record)) {
    if (typeof v !== 'string') throw configTypeError(`${option}.${key}`, 'a string', v)
  }
  return record as Record<string, string>
}

/** A string, for `option`. */
export function string(option: string, value: unknown): string {
  if (typeof value !== 'string') throw configTypeError(option, 'a string', value)
  return value
}
