// T2 (the guest on engine auto: qemu here): microcell installed as a user installs it. Packs every
// package (scripts/pack.mjs --no-build: what native/ and dist/ hold), `npm install`s the tarballs
// into an empty directory with an empty HOME and none of the checkout's environment (no
// MICROCELL_*, no npm_* from a surrounding `npm run`, no node_modules/.bin of the checkout on
// PATH), then uses it from there: ESM import, CJS require, tsc of a typed program, a sandbox
// that says its kernel release, the CLI. Run with node's test runner (`npm run test:install`);
// scripts/test.sh runs it as a step of its own. MICROCELL_INSTALL_KEEP=1 keeps the directory.
import { execFileSync, spawn } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { fileURLToPath } from 'node:url'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-install-'))
const home = path.join(work, 'home')
const app = path.join(work, 'app')
// npm's download cache (not microcell's): typescript and @types/node come from the registry
// through it, as for any user; it holds nothing of this checkout.
const npmCache = execFileSync('npm', ['config', 'get', 'cache'], { encoding: 'utf8' }).trim()

/** The environment of a user who never saw the checkout. */
function userEnv(extra = {}) {
  const env = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(MICROCELL_|NAPI_RS_|npm_|NODE_OPTIONS$|NODE_PATH$|INIT_CWD$)/i.test(k)) continue
    env[k] = v
  }
  env.PATH = (process.env.PATH ?? '').split(':').filter((p) => p !== '' && !p.startsWith(root)).join(':')
  env.HOME = home
  env.npm_config_cache = npmCache
  env.npm_config_update_notifier = 'false'
  return { ...env, ...extra }
}

/** Runs a command in the app directory as that user: { code, stdout, stderr, ms }. */
function sh(cmd, args, { env = {}, timeoutMs = 300_000, cwd = app } = {}) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now()
    const child = spawn(cmd, args, { cwd, env: userEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      resolve({ code: code ?? signal, stdout, stderr, ms: performance.now() - t0 })
    })
  })
}
const ok = (r, what) => assert.equal(r.code, 0, `${what} exited ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`)

let packs
let manifest
let canBoot = null // null: yes; else why not

before(async () => {
  fs.mkdirSync(home)
  fs.mkdirSync(app)
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'user-app', version: '1.0.0', private: true }))
  const p = await sh(process.execPath, [path.join(root, 'scripts', 'pack.mjs'), '--no-build'], { cwd: root, env: { HOME: process.env.HOME } })
  ok(p, 'scripts/pack.mjs')
  ;({ packs, manifest } = JSON.parse(fs.readFileSync(path.join(root, 'build', 'pack', 'packs.json'), 'utf8')))
  const install = await sh('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', ...packs.map((x) => x.file)])
  ok(install, 'npm install of the tarballs')
  console.log(`# npm install of ${packs.length} tarballs: ${Math.round(install.ms)} ms`)
})

after(() => {
  if (process.env.MICROCELL_INSTALL_KEEP === '1') console.log(`# kept ${work}`)
  else fs.rmSync(work, { recursive: true, force: true })
})

test('every tarball ships LICENSE; microcell declares the addon and guest packages at its version', () => {
  assert.equal(packs.length, 3)
  for (const p of packs) assert.ok(p.files.includes('LICENSE'), `${p.name}: ${p.files.join(', ')}`)
  const main = JSON.parse(fs.readFileSync(path.join(app, 'node_modules', 'microcell', 'package.json'), 'utf8'))
  assert.deepEqual(main.optionalDependencies, { 'microcell-guest-linux-x64': main.version, 'microcell-linux-x64-gnu': main.version })
  const guest = packs.find((p) => p.name === 'microcell-guest-linux-x64')
  assert.deepEqual(guest.files, ['LICENSE', 'README.md', 'manifest.json', 'package.json', 'rootfs.ext4.br', 'vmlinux.br'])
  assert.match(manifest.kernel.sha256, /^[0-9a-f]{64}$/)
  assert.match(manifest.kernel.inputHash, /^[0-9a-f]{16}$/)
  assert.match(manifest.rootfs.inputHash, /^[0-9a-f]{16}$/)
  for (const p of packs) assert.ok(p.bytes < 8 * 2 ** 20, `${p.name} is ${p.bytes} bytes`)
})

test('ESM import and CJS require resolve to the installed package and load the addon', async () => {
  const esm = await sh(process.execPath, [
    '--input-type=module',
    '-e',
    `import { Sandbox, hostInfo, guestImages } from 'microcell'
     const h = hostInfo(), g = guestImages()
     console.log(JSON.stringify({ url: import.meta.resolve('microcell'), create: typeof Sandbox.create, engine: h.autoEngine, qemu: h.qemu, g }))`,
  ])
  ok(esm, 'import')
  const e = JSON.parse(esm.stdout)
  assert.ok(e.url.startsWith(`file://${app}/node_modules/microcell/`), e.url)
  assert.equal(e.create, 'function')
  // Before the first sandbox: found in the package, not unpacked, nothing in HOME's cache yet.
  assert.equal(e.g.kernelSource, 'package')
  assert.equal(e.g.rootfsSource, 'package')
  assert.equal(e.g.package.unpacked, false)
  assert.equal(e.g.present, false)
  assert.ok(e.g.kernel.startsWith(path.join(home, '.cache', 'microcell', 'guest-pkg-')), e.g.kernel)
  if (e.engine === 'qemu' && e.qemu === null) canBoot = 'QEMU is not installed and the built-in VMM cannot boot Linux here'
  const cjs = await sh(process.execPath, [
    '-e',
    `const m = require('microcell'); console.log(require.resolve('microcell'), typeof m.Sandbox.create, typeof m.MicrocellError, require.resolve('microcell-linux-x64-gnu'))`,
  ])
  ok(cjs, 'require')
  const [where, create, err, addon] = cjs.stdout.trim().split(' ')
  assert.equal(where, path.join(app, 'node_modules', 'microcell', 'dist', 'index.js'))
  assert.equal(create, 'function')
  assert.equal(err, 'function')
  assert.equal(addon, path.join(app, 'node_modules', 'microcell-linux-x64-gnu', 'microcell.linux-x64-gnu.node'))
})

test('a typed program type-checks (tsc --noEmit) against the installed types', async () => {
  const dev = await sh('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', '--save-dev', 'typescript@5.9.3', '@types/node@20'])
  ok(dev, 'npm install typescript @types/node')
  fs.writeFileSync(
    path.join(app, 'usage.mts'),
    `import { Sandbox, MicrocellError, guestImages, type ExecResult, type GuestImages } from 'microcell'
const images: GuestImages = guestImages()
const sb: Sandbox = await Sandbox.builder('typed').memory(256).create()
const r: ExecResult = await sb.exec('uname', ['-r'])
const release: string = r.stdoutText().trim()
console.log(release, images.kernelSource, images.package?.version)
try { await sb.stop() } catch (err) { if (err instanceof MicrocellError) console.log(err.code) }
// @ts-expect-error memory takes a number
Sandbox.builder('bad').memory('lots')
`,
  )
  fs.writeFileSync(
    path.join(app, 'tsconfig.json'),
    JSON.stringify({ compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, skipLibCheck: false }, files: ['usage.mts'] }),
  )
  const tsc = await sh(process.execPath, [path.join(app, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', app])
  ok(tsc, 'tsc --noEmit')
})

test('concurrent first uses unpack the guest package once each, whole and verified, in the cache under HOME', async (t) => {
  // A cache of their own, so that the sandbox test below still sees a first use.
  const cache = path.join(work, 'concurrent-cache')
  const script = `const { defaultGuest, guestImages } = require('microcell'); const d = defaultGuest(); console.log(JSON.stringify({ d, g: guestImages() }))`
  const runs = await Promise.all([1, 2, 3].map(() => sh(process.execPath, ['-e', script], { env: { MICROCELL_CACHE: cache } })))
  for (const r of runs) ok(r, 'defaultGuest()')
  const g = JSON.parse(runs[0].stdout).g
  assert.equal(g.present, true)
  assert.equal(g.package.unpacked, true)
  for (const r of runs) assert.equal(JSON.parse(r.stdout).d.disk, g.rootfs)
  const dir = path.dirname(g.rootfs)
  assert.deepEqual(fs.readdirSync(dir).sort(), ['rootfs.ext4', 'vmlinux'], 'no temporary file left')
  for (const [file, m] of [[g.kernel, manifest.kernel], [g.rootfs, manifest.rootfs]]) {
    const sum = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex')
    assert.equal(sum, m.sha256, file)
  }
  // The root disk is written sparse (it is mostly empty).
  const st = fs.statSync(g.rootfs)
  assert.ok(st.blocks * 512 < st.size / 4, `rootfs.ext4 uses ${st.blocks * 512} of ${st.size} bytes`)
  assert.ok(runs.some((r) => /unpacking the guest root disk/.test(r.stderr)), runs.map((r) => r.stderr).join('\n'))
  t.diagnostic(runs.map((r) => r.stderr.trim()).join(' | '))
})

test('a 5-line script creates a sandbox and prints the guest kernel release (first use unpacks; the second does not)', async (t) => {
  if (canBoot !== null) return t.skip(canBoot)
  fs.writeFileSync(
    path.join(app, 'hello.mjs'),
    `import { Sandbox } from 'microcell'
const sb = await Sandbox.create()
const r = await sb.exec('uname', ['-r'])
console.log(r.stdoutText().trim())
await sb.stop()
`,
  )
  const first = await sh(process.execPath, ['hello.mjs'])
  ok(first, 'node hello.mjs')
  assert.equal(first.stdout.trim(), manifest.kernelRelease)
  assert.match(first.stderr, /first use: unpacking the guest kernel .* sha256 verified/)
  const second = await sh(process.execPath, ['hello.mjs'])
  ok(second, 'node hello.mjs (again)')
  assert.equal(second.stdout.trim(), manifest.kernelRelease)
  assert.doesNotMatch(second.stderr, /unpacking/)
  assert.ok(fs.readdirSync(path.join(home, '.cache', 'microcell')).some((d) => d.startsWith('guest-pkg-')))
  t.diagnostic(`first run (unpack + boot) ${Math.round(first.ms)} ms, second ${Math.round(second.ms)} ms`)
})

test('npx microcell run -- echo hi prints hi; microcell doctor says the sandbox can start', async (t) => {
  if (canBoot !== null) return t.skip(canBoot)
  const r = await sh('npx', ['--no-install', 'microcell', 'run', '--', 'echo', 'hi'])
  ok(r, 'npx microcell run -- echo hi')
  assert.equal(r.stdout, 'hi\n')
  const d = await sh('npx', ['--no-install', 'microcell', 'doctor'])
  ok(d, 'npx microcell doctor')
  assert.match(d.stdout, /microcell-guest-linux-x64/)
  assert.match(d.stdout, /sandboxes can start/)
})

test('without the guest package, E_GUEST_IMAGE_MISSING names it and doctor exits non-zero', async () => {
  const pkg = path.join(app, 'node_modules', 'microcell-guest-linux-x64')
  fs.renameSync(pkg, `${pkg}.away`)
  try {
    const r = await sh(process.execPath, [
      '--input-type=module',
      '-e',
      `import { Sandbox } from 'microcell'
       try { await Sandbox.create({ bootTimeoutMs: 5000 }); console.log('created') } catch (e) { console.log(e.code, e.message) }`,
    ])
    ok(r, 'Sandbox.create without the guest package')
    assert.match(r.stdout, /^E_GUEST_IMAGE_MISSING .*npm install microcell-guest-linux-x64/)
    const d = await sh('npx', ['--no-install', 'microcell', 'doctor'])
    assert.equal(d.code, 1, d.stdout + d.stderr)
    assert.match(d.stdout, /npm install microcell-guest-linux-x64/)
  } finally {
    fs.renameSync(`${pkg}.away`, pkg)
  }
})
