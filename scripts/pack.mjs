#!/usr/bin/env node
// Builds and packs every npm package of microcell into build/pack/ (git-ignored):
//   microcell-<v>.tgz                  the library (dist/, index.d.ts, the addon's loader)
//   microcell-linux-x64-gnu-<v>.tgz    the addon (native/microcell.linux-x64-gnu.node)
//   microcell-guest-linux-x64-<v>.tgz  the default guest: vmlinux + rootfs.ext4, brotli-compressed,
//                                      with manifest.json (sizes, sha256, the build input hashes)
// each with LICENSE. `microcell` declares the other two as optionalDependencies of its own
// version (package.json, committed): a version that does not match stops the pack.
//
//   npm run pack:all                   build (addon release + tsc), then pack
//   node scripts/pack.mjs --no-build   pack what native/ and dist/ hold now
//
// The guest images come from scripts/guest/build-kernel.sh and build-rootfs.sh (cached by the
// hash of their inputs in ~/.cache/microcell: nothing is rebuilt when nothing changed). Their
// compressed forms are cached in build/pack/cache/ by sha256. Prints one line per tarball and
// writes build/pack/packs.json ({ name, version, file, bytes, files }).
import { execFileSync } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import zlib from 'node:zlib'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const out = path.join(root, 'build', 'pack')
const stage = path.join(out, 'stage')
const build = !process.argv.includes('--no-build')

const say = (m) => process.stderr.write(`[pack] ${m}\n`)
const readJson = (p) => JSON.parse(fs.readFileSync(p, 'utf8'))
const run = (cmd, args, opts = {}) =>
  execFileSync(cmd, args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], ...opts }).trim()
const sha256 = (buf) => crypto.createHash('sha256').update(buf).digest('hex')

const main = readJson(path.join(root, 'package.json'))
const platformDir = path.join(root, 'npm', 'linux-x64-gnu')
const guestDir = path.join(root, 'npm', 'guest-linux-x64')
const platform = readJson(path.join(platformDir, 'package.json'))
const guest = readJson(path.join(guestDir, 'package.json'))
for (const pkg of [platform, guest]) {
  const want = main.optionalDependencies?.[pkg.name]
  if (want !== main.version || pkg.version !== main.version) {
    throw new Error(`${pkg.name} is ${pkg.version} and microcell ${main.version} declares it as ${want ?? 'nothing'}: give all three the same version (npm run version does for the addon)`)
  }
}

if (build) {
  say('building the addon (release) and the TypeScript')
  run('npm', ['run', '--silent', 'build'], { stdio: ['ignore', 'inherit', 'inherit'] })
}
const addon = path.join(root, 'native', 'microcell.linux-x64-gnu.node')
for (const f of [addon, path.join(root, 'native', 'index.js'), path.join(root, 'dist', 'index.js')]) {
  if (!fs.existsSync(f)) throw new Error(`${path.relative(root, f)} is missing: run npm run pack:all without --no-build (or npm run build)`)
}

say('guest images (scripts/guest/build-kernel.sh, build-rootfs.sh; cached)')
const vmlinux = run(path.join(root, 'scripts', 'guest', 'build-kernel.sh'), []).split('\n').pop()
const rootfs = run(path.join(root, 'scripts', 'guest', 'build-rootfs.sh'), []).split('\n').pop()
// key=value lines the build scripts write beside each image
const info = (file) =>
  Object.fromEntries(
    fs.readFileSync(path.join(path.dirname(file), 'info'), 'utf8').split('\n').filter(Boolean).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  )
const kernelInfo = info(vmlinux)
const rootfsInfo = info(rootfs)

fs.rmSync(stage, { recursive: true, force: true })
fs.mkdirSync(path.join(out, 'cache'), { recursive: true })
for (const f of fs.readdirSync(out)) if (f.endsWith('.tgz')) fs.rmSync(path.join(out, f))

function stagePackage(from, name) {
  const dir = path.join(stage, name)
  fs.mkdirSync(dir, { recursive: true })
  for (const f of ['package.json', 'README.md']) fs.copyFileSync(path.join(from, f), path.join(dir, f))
  fs.copyFileSync(path.join(root, 'LICENSE'), path.join(dir, 'LICENSE'))
  return dir
}

// The addon. (Not `napi artifacts`: it also writes copies of the addon and its loader into the
// project root, which is a shared working tree here.)
const platformStage = stagePackage(platformDir, 'linux-x64-gnu')
fs.copyFileSync(addon, path.join(platformStage, platform.main))

// The guest: brotli (node:zlib decompresses it on Node 20 without dependencies).
const guestStage = stagePackage(guestDir, 'guest-linux-x64')
function compressed(file) {
  const data = fs.readFileSync(file)
  const sum = sha256(data)
  const cached = path.join(out, 'cache', `${sum}.br`)
  if (!fs.existsSync(cached)) {
    const t0 = performance.now()
    const br = zlib.brotliCompressSync(data, {
      params: {
        [zlib.constants.BROTLI_PARAM_QUALITY]: 11,
        [zlib.constants.BROTLI_PARAM_LGWIN]: 24,
        [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length,
      },
    })
    fs.writeFileSync(`${cached}.tmp`, br)
    fs.renameSync(`${cached}.tmp`, cached)
    say(`compressed ${path.basename(file)}: ${data.length} -> ${br.length} bytes in ${Math.round(performance.now() - t0)} ms`)
  }
  return { bytes: data.length, sha256: sum, br: cached }
}
const k = compressed(vmlinux)
const r = compressed(rootfs)
fs.copyFileSync(k.br, path.join(guestStage, 'vmlinux.br'))
fs.copyFileSync(r.br, path.join(guestStage, 'rootfs.ext4.br'))
const manifest = {
  name: guest.name,
  version: guest.version,
  compression: 'br',
  kernelRelease: kernelInfo.release,
  kernel: {
    file: 'vmlinux.br',
    target: 'vmlinux',
    bytes: k.bytes,
    sha256: k.sha256,
    compressedBytes: fs.statSync(k.br).size,
    inputHash: kernelInfo.hash,
    source: kernelInfo.source,
  },
  rootfs: {
    file: 'rootfs.ext4.br',
    target: 'rootfs.ext4',
    bytes: r.bytes,
    sha256: r.sha256,
    compressedBytes: fs.statSync(r.br).size,
    inputHash: rootfsInfo.hash,
    agentSha256: rootfsInfo.agent_sha256,
    busyboxStatic: rootfsInfo.busybox_static,
  },
}
fs.writeFileSync(path.join(guestStage, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`)

// npm pack prints the tarball's name last on stdout; --json gives its file list.
function pack(dir) {
  const [result] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', out, dir]))
  const file = path.join(out, result.filename)
  const files = result.files.map((f) => f.path).sort()
  if (!files.includes('LICENSE')) throw new Error(`${result.name}: LICENSE is not in the tarball`)
  return { name: result.name, version: result.version, file, bytes: fs.statSync(file).size, unpackedBytes: result.unpackedSize, files }
}
const packs = [pack(root), pack(platformStage), pack(guestStage)]
fs.writeFileSync(path.join(out, 'packs.json'), `${JSON.stringify({ manifest, packs }, null, 2)}\n`)
for (const p of packs) console.log(`${path.relative(root, p.file)}  ${(p.bytes / 2 ** 20).toFixed(2)} MiB (${p.files.length} files, ${(p.unpackedBytes / 2 ** 20).toFixed(2)} MiB unpacked)`)
