// T0: the package's types (index.d.ts, what package.json "types" points to) compile for a
// TypeScript user, and the CommonJS entry works with require() as well as import.
import { execFileSync } from 'node:child_process'
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
