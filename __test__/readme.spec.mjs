// Every fenced code block of README.md and of the docs its examples and reference moved to
// (DOCS below) is checked, so that none of them can drift from the code:
// - ```js blocks are the examples: each runs as written (an ES module importing the built
//   package, on this Node) and must exit 0 — T2, they boot the default guest;
// - ```ts blocks are the API reference (placeholder paths, fragments that use a sandbox `sb`
//   from before): each type-checks against index.d.ts as a module of its own, with a `declare`
//   for each name it uses from an earlier block and does not declare itself;
// - any other block needs `<!-- readme-test: skip: WHY -->` on the line before it (the set-up
//   commands, sample output), and says there why it is not run.
import { execFileSync, spawn } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import test from 'ava'

import { CONFIG_ERROR_CODES, SANDBOX_ERROR_CODES, VMM_ERROR_CODES, guestImages, hostInfo } from 'microcell'

import { root } from './helpers.mjs'

// The README (what it is, install, the two examples) and the files it points to for the rest.
const DOCS = ['README.md', 'docs/api.md', 'docs/development.md']
const blocks = []
for (const file of DOCS) {
  const lines = fs.readFileSync(path.join(root, file), 'utf8').split('\n')
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w*)\s*$/.exec(lines[i])
    if (!open) continue
    const start = i
    let end = i + 1
    while (end < lines.length && lines[end] !== '```') end++
    const skip = /^<!-- readme-test: skip: (.+) -->$/.exec(lines[start - 1] ?? '')
    blocks.push({ file, lang: open[1], line: start + 1, code: lines.slice(start + 1, end).join('\n'), skip: skip?.[1] ?? null })
    i = end
  }
}
const where = (b) => `${b.file}:${b.line}`
const of = (file, lang) => blocks.filter((b) => b.file === file && b.lang === lang && b.skip === null).length

// Names the reference blocks use from blocks before them, and their types.
const PRELUDE = {
  sb: "import('microcell').Sandbox",
  vm: "import('microcell').MicroVm",
  config: "import('microcell').BuiltMicroVmConfig",
  cfg: 'unknown',
  snap: "import('microcell').Snapshot",
  sandbox: "import('microcell').Sandbox",
  nextPort: 'number',
  pipeline: "typeof import('node:stream/promises').pipeline",
  fs: "typeof import('node:fs')",
}

function prelude(code) {
  const declared = (name) =>
    new RegExp(`\\b(const|let|var|function|class)\\s+${name}\\b|import\\s*\\{[^}]*\\b${name}\\b[^}]*\\}|import\\s+(\\* as\\s+)?${name}\\b`).test(code)
  const used = (name) => new RegExp(`(^|[^.\\w'])${name}\\b`, 'm').test(code)
  return Object.entries(PRELUDE)
    .filter(([name]) => used(name) && !declared(name))
    .map(([name, type]) => `declare const ${name}: ${type}`)
    .join('\n')
}

test('README.md and docs/api.md have their code blocks, and every block that is not run says why', (t) => {
  t.is(of('README.md', 'js'), 2, 'README.md: the two examples')
  t.true(of('docs/api.md', 'js') >= 1, 'docs/api.md: the smallest form')
  t.true(of('docs/api.md', 'ts') >= 6, 'docs/api.md: the API reference, one block per area')
  for (const b of blocks) {
    if (b.lang !== 'js' && b.lang !== 'ts') t.truthy(b.skip, `${where(b)}: a \`\`\`${b.lang} block with no <!-- readme-test: skip: WHY --> line before it`)
  }
})

test('README.md stays under 10 KB and keeps the two quick-start commands that .ci/run relies on', (t) => {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8')
  t.true(Buffer.byteLength(readme) <= 10_240, `README.md is ${Buffer.byteLength(readme)} bytes: move detail to docs/`)
  const quick = blocks.find((b) => b.file === 'README.md' && b.code.includes('./scripts/test.sh'))
  t.is(quick?.code, './scripts/setup.sh && npm start\n./scripts/test.sh')
  t.regex(fs.readFileSync(path.join(root, '.ci', 'run'), 'utf8'), /^exec \.\/scripts\/test\.sh$/m)
})

test('relative links in README.md and docs/*.md name files that exist in the repo', (t) => {
  const files = ['README.md', ...fs.readdirSync(path.join(root, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)]
  const broken = []
  for (const file of files) {
    const text = fs.readFileSync(path.join(root, file), 'utf8')
    for (const [, target] of text.matchAll(/\]\(([^)#\s]+)(#[^)]*)?\)/g)) {
      if (/^[a-z]+:/.test(target)) continue
      const resolved = path.resolve(root, path.dirname(file), target)
      // Inside the repo: a link out of it (../shared/...) is a fact the repo does not keep.
      if (!resolved.startsWith(root + path.sep) || !fs.existsSync(resolved)) broken.push(`${file}: ${target}`)
    }
  }
  t.true(files.length >= 7)
  t.deepEqual(broken, [])
})

test('host facts are cited from docs/host.md, not from outside the repo (../shared/)', (t) => {
  const cites = []
  const walk = (dir) => {
    for (const e of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
      const rel = path.join(dir, e.name)
      if (e.isDirectory()) {
        if (!['node_modules', 'target', 'build', 'dist', '.git'].includes(e.name)) walk(rel)
      } else if (/\.(md|rs|ts|mjs|js|sh|c|h|S|toml|yml)$/.test(e.name)) {
        const text = fs.readFileSync(path.join(root, rel), 'utf8')
        if (/\.\.\/shared\/|\/work\/shared\/|shared\/HOST\.md/.test(text)) cites.push(rel)
      }
    }
  }
  for (const dir of ['docs', 'crates', 'src', 'scripts', 'bench', 'examples', '.ci']) if (fs.existsSync(path.join(root, dir))) walk(dir)
  for (const f of ['README.md', 'index.d.ts']) if (/\.\.\/shared\/|shared\/HOST\.md/.test(fs.readFileSync(path.join(root, f), 'utf8'))) cites.push(f)
  t.true(fs.existsSync(path.join(root, 'docs', 'host.md')))
  t.deepEqual(cites, [], 'cite docs/host.md (copy the fact there) instead')
})

test('docs/api.md names every error code the package exports', (t) => {
  const api = fs.readFileSync(path.join(root, 'docs', 'api.md'), 'utf8')
  const missing = [...CONFIG_ERROR_CODES, ...SANDBOX_ERROR_CODES, ...VMM_ERROR_CODES].filter((code) => !new RegExp(`\\b${code}\\b`).test(api))
  t.true(CONFIG_ERROR_CODES.length > 0 && SANDBOX_ERROR_CODES.length > 0 && VMM_ERROR_CODES.length > 0)
  t.deepEqual(missing, [], 'add them to the Errors section of docs/api.md')
})

test('README and docs ts blocks (the API reference) type-check against index.d.ts', (t) => {
  const dir = path.join(root, 'build', 'readme-typecheck')
  fs.rmSync(dir, { recursive: true, force: true })
  fs.mkdirSync(dir, { recursive: true })
  const files = []
  for (const b of blocks.filter((x) => x.lang === 'ts' && x.skip === null)) {
    const name = `${b.file.replace(/\W+/g, '-')}-${b.line}.mts`
    // `export {}`: a module of its own even when the block imports nothing.
    fs.writeFileSync(path.join(dir, name), `${prelude(b.code)}\nexport {}\n${b.code}\n`)
    files.push(name)
  }
  const base = JSON.parse(fs.readFileSync(path.join(root, '__test__', 'typecheck', 'tsconfig.json'), 'utf8'))
  // Fragments: a value left unused or a statement with no effect is the README's point.
  const compilerOptions = { ...base.compilerOptions, noUnusedLocals: false, allowUnreachableCode: true }
  fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({ compilerOptions, files }))
  try {
    execFileSync(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', dir], { cwd: root, encoding: 'utf8', stdio: 'pipe' })
    t.pass()
  } catch (err) {
    // Errors name <file>-<line>.mts (docs-api-md-40.mts): the block that starts at docs/api.md:40.
    t.fail(`tsc found blocks that do not match the API:\n${err.stdout}${err.stderr}`)
  }
})

const host = hostInfo()
const noGuest = !guestImages().present && guestImages().package === null
const noEngine = host.autoEngine === 'qemu' && host.qemu === null
const why = noGuest
  ? 'T2: the guest images are missing (npm install microcell-guest-linux-x64, or ./scripts/setup.sh)'
  : noEngine
    ? `T2: no engine here (QEMU: ${host.qemuUnavailable})`
    : null

for (const b of blocks.filter((x) => x.lang === 'js' && x.skip === null)) {
  const title = `T2: ${where(b)} (js) runs as written and exits 0`
  if (why !== null) {
    test.skip(`${title} — skipped: ${why}`, () => {})
    continue
  }
  test.serial(title, async (t) => {
    t.timeout(120_000)
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-readme-'))
    try {
      // `import 'microcell'` as in a user's project: node_modules/microcell is this package.
      fs.mkdirSync(path.join(dir, 'node_modules'))
      fs.symlinkSync(root, path.join(dir, 'node_modules', 'microcell'))
      fs.writeFileSync(path.join(dir, 'example.mjs'), `${b.code}\n`)
      const r = await new Promise((resolve, reject) => {
        const child = spawn(process.execPath, ['example.mjs'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
        let out = ''
        child.stdout.on('data', (d) => (out += d))
        child.stderr.on('data', (d) => (out += d))
        child.on('error', reject)
        child.on('close', (code) => resolve({ code, out }))
      })
      t.is(r.code, 0, `${where(b)}:\n${r.out}`)
      t.log(r.out.trim().split('\n').slice(-3).join(' | '))
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })
}
