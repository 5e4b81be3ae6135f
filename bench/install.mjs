// npm run bench:install: what installing microcell costs a user. Packs every package
// (scripts/pack.mjs --no-build; `--build` builds first), then MICROCELL_BENCH_RUNS times (default
// 5), each in a fresh empty directory with a fresh empty HOME: `npm install` of the three local
// tarballs (npm's download cache warm: nothing is fetched), then one process that times its
// first Sandbox.create() (guest package unpack + boot to the agent's ready) and a second one
// (boot only), each to the resolved promise. Writes bench/results/install.{json,md}.
import { execFileSync, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { hostInfo } from 'microcell'

import { root, summary, write } from './lib.mjs'

const runs = Number(process.env.MICROCELL_BENCH_RUNS ?? 5)
const pack = spawnSync(process.execPath, [path.join(root, 'scripts', 'pack.mjs'), ...(process.argv.includes('--build') ? [] : ['--no-build'])], {
  stdio: ['ignore', 'inherit', 'inherit'],
})
if (pack.status !== 0) throw new Error('scripts/pack.mjs failed')
const { packs, manifest } = JSON.parse(fs.readFileSync(path.join(root, 'build', 'pack', 'packs.json'), 'utf8'))
const npmCache = execFileSync('npm', ['config', 'get', 'cache'], { encoding: 'utf8' }).trim()

function userEnv(home) {
  const env = {}
  for (const [k, v] of Object.entries(process.env)) if (!/^(MICROCELL_|NAPI_RS_|npm_|INIT_CWD$)/i.test(k)) env[k] = v
  env.PATH = (process.env.PATH ?? '').split(':').filter((p) => p && !p.startsWith(root)).join(':')
  return { ...env, HOME: home, npm_config_cache: npmCache, npm_config_update_notifier: 'false' }
}

const probe = `import { Sandbox } from 'microcell'
const times = []
for (let i = 0; i < 2; i++) {
  const t0 = performance.now()
  const sb = await Sandbox.create({ memoryMib: 256 })
  times.push(performance.now() - t0)
  await sb.stop()
}
console.log(JSON.stringify(times))
`

const install = []
const first = []
const second = []
const unpack = []
for (let i = 0; i < runs; i++) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-install-'))
  try {
    const home = path.join(work, 'home')
    const app = path.join(work, 'app')
    fs.mkdirSync(home)
    fs.mkdirSync(app)
    fs.writeFileSync(path.join(app, 'package.json'), '{"name":"bench-app","version":"1.0.0","private":true}')
    const env = userEnv(home)
    const t0 = performance.now()
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', ...packs.map((p) => p.file)], { cwd: app, env, stdio: 'pipe' })
    install.push(performance.now() - t0)
    fs.writeFileSync(path.join(app, 'probe.mjs'), probe)
    const r = spawnSync(process.execPath, ['probe.mjs'], { cwd: app, env, encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`probe: ${r.stdout}${r.stderr}`)
    const [a, b] = JSON.parse(r.stdout.trim().split('\n').pop())
    first.push(a)
    second.push(b)
    unpack.push([...r.stderr.matchAll(/MiB in (\d+) ms, sha256 verified/g)].reduce((s, m) => s + Number(m[1]), 0))
    console.error(`[bench:install] run ${i + 1}/${runs}: install ${Math.round(install.at(-1))} ms, first create ${Math.round(a)} ms (unpack ${unpack.at(-1)} ms), second ${Math.round(b)} ms`)
  } finally {
    fs.rmSync(work, { recursive: true, force: true })
  }
}

const engine = hostInfo().autoEngine
const results = [
  ...packs.map((p) => summary('microcell', `${path.basename(p.file)} (${p.files.length} files)`, 'tarball size', 'bytes', [p.bytes])),
  ...packs.map((p) => summary('microcell', `${p.name} unpacked in node_modules`, 'installed size', 'bytes', [p.unpackedBytes])),
  summary('microcell', 'npm install of the 3 local tarballs into an empty directory (npm cache warm, empty HOME)', 'wall time', 'ms', install),
  summary('microcell', `first Sandbox.create() after install (guest package unpack + boot, engine ${engine})`, 'create → ready', 'ms', first),
  summary('microcell', 'of which: unpacking the guest images (brotli → cache, sha256 checked)', 'unpack', 'ms', unpack),
  summary('microcell', `second Sandbox.create() in the same process (boot only, engine ${engine})`, 'create → ready', 'ms', second),
]
const mib = (b) => `${(b / 2 ** 20).toFixed(2)} MiB`
write('install', results, [
  `- Tarballs from \`scripts/pack.mjs\` (build/pack/): ${packs.map((p) => `${p.name} ${mib(p.bytes)}`).join(', ')}. The guest package holds vmlinux ${mib(manifest.kernel.bytes)} → ${mib(manifest.kernel.compressedBytes)} and rootfs.ext4 ${mib(manifest.rootfs.bytes)} (mostly empty; unpacked sparse) → ${mib(manifest.rootfs.compressedBytes)}, brotli quality 11 (node:zlib decompresses it on Node 20 without dependencies).`,
  `- ${runs} runs, each in a new empty directory with a new empty HOME (so each first create unpacks into a new cache). npm's download cache is the user's usual one; the tarballs are local files, so nothing is downloaded.`,
  `- Engine ${engine}: ${hostInfo().autoEngineReason}. Boot dominates both creates under TCG; the unpack row is what the first use adds (the sum of the two images' unpack lines on stderr).`,
])
