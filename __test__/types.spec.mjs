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
  const vmmSource = fs.readFileSync(path.join(root, 'crates', 'vmm', 'src', 'error.rs'), 'utf8')
  for (const code of vmmOnly) t.true(vmmSource.includes(`"${code}"`), `${code} is a vmm::Error code`)
  const { LIMITS } = require(path.join(root, 'dist', 'limits.js'))
  t.deepEqual(LIMITS, native.limits())
})
