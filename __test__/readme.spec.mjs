// Every fenced code block of README.md is checked, so that the README cannot drift from the code:
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

import { guestImages, hostInfo } from 'microcell'

import { root } from './helpers.mjs'

const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8').split('\n')
const blocks = []
for (let i = 0; i < readme.length; i++) {
  const open = /^```(\w*)\s*$/.exec(readme[i])
  if (!open) continue
  const start = i
  let end = i + 1
  while (end < readme.length && readme[end] !== '```') end++
  const skip = /^<!-- readme-test: skip: (.+) -->$/.exec(readme[start - 1] ?? '')
  blocks.push({ lang: open[1], line: start + 1, code: readme.slice(start + 1, end).join('\n'), skip: skip?.[1] ?? null })
  i = end
}

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

test('README.md has code blocks, and every block that is not run says why', (t) => {
  t.true(blocks.filter((b) => b.lang === 'js').length >= 3, 'the examples')
  t.true(blocks.filter((b) => b.lang === 'ts').length >= 5, 'the API reference')
  for (const b of blocks) {
    if (b.lang !== 'js' && b.lang !== 'ts') t.truthy(b.skip, `README.md:${b.line}: a \`\`\`${b.lang} block with no <!-- readme-test: skip: WHY --> line before it`)
  }
})

test('README ts blocks (the API reference) type-check against index.d.ts', (t) => {
  const dir = path.join(root, 'build', 'readme-typecheck')
  fs.rmSync(dir, { recursive: true, force: true })
  fs.mkdirSync(dir, { recursive: true })
  const files = []
  for (const b of blocks.filter((x) => x.lang === 'ts' && x.skip === null)) {
    const name = `readme-${b.line}.mts`
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
    // Errors name readme-<line>.mts: the block that starts at README.md:<line>.
    t.fail(`tsc found README blocks that do not match the API:\n${err.stdout}${err.stderr}`)
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
  const title = `T2: README.md:${b.line} (js) runs as written and exits 0`
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
      t.is(r.code, 0, `README.md:${b.line}:\n${r.out}`)
      t.log(r.out.trim().split('\n').slice(-3).join(' | '))
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })
}
