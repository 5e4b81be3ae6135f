// T0: the package's types (index.d.ts, what package.json "types" points to) compile for a
// TypeScript user, and the CommonJS entry works with require() as well as import.
import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'

import test from 'ava'

import * as esm from 'microcell'

import { root } from './helpers.mjs'

test('a TypeScript program using the public API type-checks against index.d.ts', (t) => {
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  try {
    execFileSync(process.execPath, [tsc, '-p', path.join(root, '__test__', 'typecheck', 'tsconfig.json')], {
      cwd: root,
      encoding: 'utf8',
      stdio: 'pipe',
    })
    t.pass()
  } catch (err) {
    t.fail(`tsc failed:\n${err.stdout}${err.stderr}`)
  }
})

test('require("microcell") gives the same API as import', (t) => {
  const require = createRequire(import.meta.url)
  const cjs = require('microcell')
  t.is(cjs.MicroVm, esm.MicroVm)
  t.is(cjs.hostInfo, esm.hostInfo)
  t.is(cjs.MicrocellError, esm.MicrocellError)
  t.is(require.resolve('microcell'), path.join(root, 'dist', 'index.js'))
})

// The TS lists and mirrors are written out (for their literal types), so this checks them
// against the Rust ones the addon exports.
test('the TS error-code lists and limits are the Rust ones', (t) => {
  const require = createRequire(import.meta.url)
  const native = require(path.join(root, 'native', 'index.js'))
  const rust = native.errorCodes()
  t.deepEqual([...esm.CONFIG_ERROR_CODES].sort(), [...rust.config].sort(), 'CONFIG_ERROR_CODES vs ConfigError::CODES')
  // SANDBOX_ERROR_CODES = SandboxError::CODES + the VMM codes every engine uses (vmm::Error).
  const vmmOnly = ['E_VM_STATE']
  t.deepEqual([...esm.SANDBOX_ERROR_CODES].sort(), [...rust.sandbox, ...vmmOnly].sort(), 'SANDBOX_ERROR_CODES vs SandboxError::CODES')
  for (const code of vmmOnly) t.true(rust.vmm.includes(code), `${code} is a vmm::Error code`)
  t.deepEqual([...esm.VMM_ERROR_CODES], rust.vmm, 'VMM_ERROR_CODES vs vmm::Error::CODES')
  const { LIMITS } = require(path.join(root, 'dist', 'limits.js'))
  t.deepEqual(LIMITS, native.limits())
})

/** The runtime imports among the files of `dir` (`import type` and all-`type` lists are erased by tsc, so they are left out). */
function importGraph(dir) {
  const graph = new Map()
  for (const file of fs.readdirSync(dir, { recursive: true })) {
    if (!file.endsWith('.ts')) continue
    const from = path.join(dir, file)
    const deps = new Set()
    const text = fs.readFileSync(from, 'utf8')
    for (const m of text.matchAll(/^(?:import|export)\s+(type\s+)?(?:\{([^}]*)\}|[^'"]*?)\s*from\s+'(\.[^']+)'/gm)) {
      const [, typeOnly, names, spec] = m
      if (typeOnly || (names && names.split(',').every((n) => !n.trim() || n.trim().startsWith('type ')))) continue
      deps.add(path.join(path.dirname(from), spec.replace(/\.js$/, '.ts')))
    }
    graph.set(from, deps)
  }
  return graph
}

/** Every cycle's files (one entry per cycle, found from each file in turn by a depth-first walk). */
function cycles(graph) {
  const found = new Set()
  const walk = (node, trail) => {
    if (trail.includes(node)) {
      found.add(trail.slice(trail.indexOf(node)).map((f) => path.relative(root, f)).sort().join(' <-> '))
      return
    }
    for (const next of graph.get(node) ?? []) walk(next, [...trail, node])
  }
  for (const node of graph.keys()) walk(node, [])
  return [...found]
}

test('src/ has no import cycles (module A imports B and B imports A, directly or around)', (t) => {
  const graph = importGraph(path.join(root, 'src'))
  t.true(graph.size > 10 && [...graph.values()].some((d) => d.size > 0), 'the import scan found the files and their imports')
  t.deepEqual(cycles(graph), [])
  // The scan sees a cycle when there is one.
  t.deepEqual(cycles(new Map([['/a.ts', new Set(['/b.ts'])], ['/b.ts', new Set(['/a.ts'])]])), [path.relative(root, '/a.ts') + ' <-> ' + path.relative(root, '/b.ts')])
})

test("the TS config interfaces have exactly the Rust structs' JSON keys", (t) => {
  const require = createRequire(import.meta.url)
  const ts = require('typescript')
  const rust = require(path.join(root, 'native', 'index.js')).configFields()
  const interfaces = {}
  for (const file of ['config.ts', 'sandbox.ts']) {
    const source = ts.createSourceFile(file, fs.readFileSync(path.join(root, 'src', file), 'utf8'), ts.ScriptTarget.Latest)
    for (const s of source.statements) {
      if (ts.isInterfaceDeclaration(s)) interfaces[s.name.text] = s.members.map((m) => m.name.getText(source))
    }
  }
  t.deepEqual(Object.keys(rust).sort(), ['MicroVmConfig', 'NetworkConfig', 'NetworkUpdate', 'SandboxConfig', 'Volume'])
  for (const [name, keys] of Object.entries(rust)) {
    t.deepEqual([...(interfaces[name] ?? [])].sort(), [...keys].sort(), `${name}: src/ vs the Rust struct`)
  }
})
