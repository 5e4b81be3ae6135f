// T2 / T3: the files of a sandbox through sandbox.fs. One sandbox per tier serves the tests of
// this file; T2 runs on engine 'qemu', T3 on 'kvm' (skipped, saying why, where the built-in VMM
// cannot boot Linux).
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { pipeline } from 'node:stream/promises'

import test from 'ava'

import { MicrocellError, Sandbox, SandboxFs } from 'microcell'

import { tempDir } from './helpers.mjs'
import { perTier, requireGuestImages, sharedSandbox } from './guest.mjs'

async function rejectsWith(t, promise, code) {
  const err = await t.throwsAsync(promise, { instanceOf: MicrocellError })
  t.is(err?.code, code, err?.message)
  return err
}

const sha = (buf) => crypto.createHash('sha256').update(buf).digest('hex')

/** 16 MiB that compress badly and differ in every block. */
function bigData() {
  return crypto.randomBytes(16 << 20)
}

/** A host tree with modes, nested and empty directories, symlinks (relative, absolute, dangling). */
function makeTree(root) {
  fs.mkdirSync(path.join(root, 'bin'))
  fs.mkdirSync(path.join(root, 'deep/er/est'), { recursive: true })
  fs.mkdirSync(path.join(root, 'empty'))
  fs.mkdirSync(path.join(root, 'private'))
  fs.writeFileSync(path.join(root, 'bin/run.sh'), '#!/bin/sh\necho ran "$@"\n')
  fs.writeFileSync(path.join(root, 'readme.txt'), 'hello tree\n')
  fs.writeFileSync(path.join(root, 'private/secret'), 'shh')
  fs.writeFileSync(path.join(root, 'deep/er/est/data.bin'), crypto.randomBytes(300_000))
  fs.writeFileSync(path.join(root, 'empty-file'), '')
  fs.symlinkSync('../readme.txt', path.join(root, 'bin/readme-link'))
  fs.symlinkSync('/etc/hostname', path.join(root, 'abs-link'))
  fs.symlinkSync('does/not/exist', path.join(root, 'dangling'))
  fs.symlinkSync('deep/er', path.join(root, 'dir-link'))
  fs.chmodSync(path.join(root, 'bin/run.sh'), 0o755)
  fs.chmodSync(path.join(root, 'readme.txt'), 0o644)
  fs.chmodSync(path.join(root, 'private/secret'), 0o600)
  fs.chmodSync(path.join(root, 'private'), 0o700)
  fs.chmodSync(path.join(root, 'deep/er/est/data.bin'), 0o640)
  fs.chmodSync(path.join(root, 'empty'), 0o750)
}

/** Every entry of a host tree: relative path → type, mode, size/content hash or link target. */
function describe(root) {
  const out = {}
  const walk = (rel) => {
    const abs = path.join(root, rel)
    for (const name of fs.readdirSync(abs).sort()) {
      const r = path.join(rel, name)
      const st = fs.lstatSync(path.join(root, r))
      const mode = st.mode & 0o7777
      if (st.isSymbolicLink()) out[r] = { type: 'symlink', target: fs.readlinkSync(path.join(root, r)) }
      else if (st.isDirectory()) {
        out[r] = { type: 'dir', mode }
        walk(r)
      } else out[r] = { type: 'file', mode, sha: sha(fs.readFileSync(path.join(root, r))) }
    }
  }
  walk('')
  return out
}

perTier(test, 'files', (tier, engine) => {
  const sandbox = sharedSandbox(test, engine, (b) => b.memory(512))

  test(`${tier}: write / read / readText / stat / exists / append / parents / mode`, async (t) => {
    const sb = await sandbox()
    t.true(sb.fs instanceof SandboxFs)
    await sb.fs.write('/tmp/f1/a.txt', 'héllo\n', { parents: true })
    t.is(await sb.fs.readText('/tmp/f1/a.txt'), 'héllo\n')
    t.true((await sb.fs.read('/tmp/f1/a.txt')).equals(Buffer.from('héllo\n')))
    const st = await sb.fs.stat('/tmp/f1/a.txt')
    t.like(st, { type: 'file', size: Buffer.byteLength('héllo\n'), mode: 0o644, uid: 0, gid: 0 })
    t.true(st.mtimeMs > 0)
    await sb.fs.write('/tmp/f1/a.txt', 'more', { append: true })
    t.is(await sb.fs.readText('/tmp/f1/a.txt'), 'héllo\nmore')
    await sb.fs.write('/tmp/f1/x.sh', '#!/bin/sh\necho x\n', { mode: 0o750 })
    t.is((await sb.fs.stat('/tmp/f1/x.sh')).mode, 0o750)
    t.is((await sb.exec('/tmp/f1/x.sh')).stdoutText(), 'x\n')
    t.true(await sb.fs.exists('/tmp/f1/a.txt'))
    t.false(await sb.fs.exists('/tmp/f1/nope'))
    t.false(await sb.fs.exists('/tmp/f1/a.txt/below-a-file'))
    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i))
    await sb.fs.write('/tmp/f1/bytes', bytes)
    t.true((await sb.fs.read('/tmp/f1/bytes')).equals(bytes))
    await sb.fs.write('/tmp/f1/empty', '')
    t.is((await sb.fs.read('/tmp/f1/empty')).length, 0)
  })

  test(`${tier}: watch() reports creates, writes, renames, mode changes and removals in order, also in new subdirectories`, async (t) => {
    const sb = await sandbox()
    await sb.exec('mkdir', ['-p', '/tmp/watched'])
    await rejectsWith(t, sb.fs.watch('/tmp/no-such-dir'), 'ENOENT')
    const watcher = await sb.fs.watch('/tmp/watched', { recursive: true })
    await sb.shell('echo a > /tmp/watched/f; mkdir /tmp/watched/sub; echo b > /tmp/watched/sub/g; mv /tmp/watched/f /tmp/watched/h; chmod 600 /tmp/watched/h; rm /tmp/watched/h')
    const seen = []
    for await (const c of watcher) {
      const item = `${c.type} ${c.path}`
      if (seen.at(-1) !== item) seen.push(item)
      if (c.type === 'remove') watcher.close()
    }
    const expected = ['create /tmp/watched/f', 'write /tmp/watched/f', 'create /tmp/watched/sub', 'create /tmp/watched/sub/g', 'rename /tmp/watched/f', 'rename /tmp/watched/h', 'chmod /tmp/watched/h', 'remove /tmp/watched/h']
    let at = 0
    for (const e of seen) if (e === expected[at]) at++
    t.is(at, expected.length, `in order ${JSON.stringify(expected)}, seen ${JSON.stringify(seen)}`)
    t.is(await watcher.next(), null, 'closed')
  })

  test(`${tier}: mkdir / list / rename / remove (recursive, force) / lstat of a symlink`, async (t) => {
    const sb = await sandbox()
    await sb.fs.mkdir('/tmp/d1/a/b', { recursive: true })
    await sb.fs.mkdir('/tmp/d1/a/b', { recursive: true }) // an existing directory is fine then
    await sb.fs.mkdir('/tmp/d1/m', { mode: 0o711 })
    t.is((await sb.fs.stat('/tmp/d1/m')).mode, 0o711)
    await sb.fs.write('/tmp/d1/a/b/f', '12345')
    await sb.shell('ln -s a/b/f /tmp/d1/link')
    const list = await sb.fs.list('/tmp/d1')
    t.deepEqual(
      list.map((e) => [e.name, e.type]),
      [
        ['a', 'dir'],
        ['link', 'symlink'],
        ['m', 'dir'],
      ],
    )
    t.like(await sb.fs.lstat('/tmp/d1/link'), { type: 'symlink', linkTarget: 'a/b/f' })
    t.like(await sb.fs.stat('/tmp/d1/link'), { type: 'file', size: 5 })
    await sb.fs.rename('/tmp/d1/a/b/f', '/tmp/d1/g')
    t.is(await sb.fs.readText('/tmp/d1/g'), '12345')
    t.false(await sb.fs.exists('/tmp/d1/a/b/f'))
    await rejectsWith(t, sb.fs.remove('/tmp/d1/a'), 'ENOTEMPTY')
    await sb.fs.remove('/tmp/d1/a', { recursive: true })
    t.false(await sb.fs.exists('/tmp/d1/a'))
    await sb.fs.remove('/tmp/d1/g')
    await rejectsWith(t, sb.fs.remove('/tmp/d1/g'), 'ENOENT')
    await sb.fs.remove('/tmp/d1/g', { force: true })
    await sb.fs.remove('/tmp/d1', { recursive: true })
    t.false(await sb.fs.exists('/tmp/d1'))
  })

  test(`${tier}: a 16 MiB file both ways: write/read, streams, host copies`, async (t) => {
    const sb = await sandbox()
    const data = bigData()
    const want = sha(data)
    let t0 = performance.now()
    await sb.fs.write('/tmp/big1', data)
    const wrote = performance.now() - t0
    t0 = performance.now()
    const back = await sb.fs.read('/tmp/big1')
    const read = performance.now() - t0
    t.is(back.length, data.length)
    t.is(sha(back), want)
    t.is((await sb.exec('sha256sum', ['/tmp/big1'])).stdoutText().split(' ')[0], want)

    // Streams: pipe 16 MiB in through a Writable, out through a Readable.
    const dir = tempDir()
    const src = path.join(dir, 'big.src')
    fs.writeFileSync(src, data)
    await pipeline(fs.createReadStream(src), sb.fs.writeStream('/tmp/big2', { mode: 0o600 }))
    t.is((await sb.fs.stat('/tmp/big2')).mode, 0o600)
    const dst = path.join(dir, 'big.dst')
    await pipeline(sb.fs.readStream('/tmp/big2'), fs.createWriteStream(dst))
    t.is(sha(fs.readFileSync(dst)), want)
    // A range: bytes 1000..1999.
    const chunks = []
    for await (const c of sb.fs.readStream('/tmp/big2', { start: 1000, end: 1999 })) chunks.push(c)
    t.true(Buffer.concat(chunks).equals(data.subarray(1000, 2000)))

    // Host copies of a file.
    const c1 = await sb.fs.copyFromHost(src, '/tmp/big3')
    t.deepEqual(c1, { entries: 1, bytes: data.length })
    const out = path.join(dir, 'copied-back')
    await sb.fs.copyToHost('/tmp/big3', out)
    t.is(sha(fs.readFileSync(out)), want)
    t.log(`16 MiB: fs.write ${wrote.toFixed(0)} ms, fs.read ${read.toFixed(0)} ms`)
    await sb.shell('rm -f /tmp/big1 /tmp/big2 /tmp/big3')
  })

  test(`${tier}: a directory tree both ways keeps modes, symlinks, empty directories and contents`, async (t) => {
    const sb = await sandbox()
    const host = tempDir()
    const src = path.join(host, 'tree')
    fs.mkdirSync(src)
    makeTree(src)
    const stats = await sb.fs.copyFromHost(src, '/srv/tree')
    t.true(stats.entries >= 14, JSON.stringify(stats))
    // Seen from inside the guest.
    const ls = await sb.shell('cd /srv/tree && find . | sort && stat -c "%n %a %F" bin/run.sh private private/secret empty readme.txt')
    t.regex(ls.stdoutText(), /bin\/run\.sh 755 regular file/)
    t.regex(ls.stdoutText(), /private 700 directory/)
    t.regex(ls.stdoutText(), /private\/secret 600 regular file/)
    t.regex(ls.stdoutText(), /empty 750 directory/)
    t.is((await sb.exec('/srv/tree/bin/run.sh', ['ok'])).stdoutText(), 'ran ok\n')
    t.like(await sb.fs.lstat('/srv/tree/bin/readme-link'), { type: 'symlink', linkTarget: '../readme.txt' })
    t.is(await sb.fs.readText('/srv/tree/bin/readme-link'), 'hello tree\n')
    t.like(await sb.fs.lstat('/srv/tree/dangling'), { type: 'symlink', linkTarget: 'does/not/exist' })
    t.like(await sb.fs.lstat('/srv/tree/abs-link'), { type: 'symlink', linkTarget: '/etc/hostname' })
    // And back to the host: the same tree.
    const back = path.join(host, 'back')
    const stats2 = await sb.fs.copyToHost('/srv/tree', back)
    t.is(stats2.entries, stats.entries)
    t.is(stats2.bytes, stats.bytes)
    t.deepEqual(describe(back), describe(src))
    // A symlink copied to the host stays a link: nothing is written through it.
    t.true(fs.lstatSync(path.join(back, 'abs-link')).isSymbolicLink())
    await sb.fs.remove('/srv/tree', { recursive: true })
  })

  test(`${tier}: bad paths are coded errors with the guest path`, async (t) => {
    const sb = await sandbox()
    const missing = await rejectsWith(t, sb.fs.read('/no/such/file'), 'ENOENT')
    t.regex(missing.message, /\/no\/such\/file/)
    await rejectsWith(t, sb.fs.readText('/etc'), 'EISDIR')
    const notDir = await rejectsWith(t, sb.fs.list('/etc/hostname'), 'ENOTDIR')
    t.regex(notDir.message, /\/etc\/hostname/)
    await rejectsWith(t, sb.fs.write('/etc/hostname/x', 'x'), 'ENOTDIR')
    await rejectsWith(t, sb.fs.write('/no/such/dir/f', 'x'), 'ENOENT')
    await rejectsWith(t, sb.fs.mkdir('/tmp'), 'EEXIST')
    await rejectsWith(t, sb.fs.mkdir('/no/such/parent/d'), 'ENOENT')
    await rejectsWith(t, sb.fs.stat('/no/such'), 'ENOENT')
    await rejectsWith(t, sb.fs.rename('/no/such', '/tmp/x'), 'ENOENT')
    await rejectsWith(t, sb.fs.remove('/no/such'), 'ENOENT')
    await rejectsWith(t, sb.fs.copyToHost('/no/such', path.join(tempDir(), 'x')), 'ENOENT')
    await rejectsWith(t, sb.fs.read('relative/path'), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.fs.write('/tmp/m', 'x', { mode: 0o10000 }), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.fs.copyFromHost(path.join(tempDir(), 'not-there'), '/tmp/x'), 'E_HOST_FILE')
    // As a non-root user, the guest's permissions apply (through exec).
    await sb.fs.write('/tmp/root-only', 'x', { mode: 0o600 })
    const denied = await sb.exec('cat', ['/tmp/root-only'], { user: 'nobody' })
    t.not(denied.exitCode, 0)
    // A stream's errors are its 'error' event.
    const err = await t.throwsAsync(async () => {
      for await (const _ of sb.fs.readStream('/no/such/file')) t.fail('no data')
    })
    t.is(err.code, 'ENOENT')
    const werr = await t.throwsAsync(pipeline(async function* () { yield Buffer.from('x') }, sb.fs.writeStream('/no/such/dir/f')))
    t.is(werr.code, 'ENOENT')
  })

  test(`${tier}: read() of an endless file stops at maxBytes with E_OUTPUT_LIMIT, in bounded host memory`, async (t) => {
    const sb = await sandbox()
    const rss0 = process.memoryUsage().rss
    const t0 = performance.now()
    const err = await rejectsWith(t, sb.fs.read('/dev/zero', { maxBytes: 1 << 20 }), 'E_OUTPUT_LIMIT')
    const smallMs = performance.now() - t0
    t.regex(err.message, /maxBytes/)
    await rejectsWith(t, sb.fs.readText('/dev/zero', 'utf8', { maxBytes: 1000 }), 'E_OUTPUT_LIMIT')
    // The default (64 MiB) holds too: before it, this read grew Node past 4 GiB.
    const t1 = performance.now()
    await rejectsWith(t, sb.fs.read('/dev/zero'), 'E_OUTPUT_LIMIT')
    const defaultMs = performance.now() - t1
    const grewMiB = (process.memoryUsage().rss - rss0) / 2 ** 20
    t.true(grewMiB < 512, `Node's RSS grew by ${grewMiB.toFixed(0)} MiB`)
    t.true(smallMs < 10_000, `maxBytes 1 MiB took ${smallMs.toFixed(0)} ms`)
    // Exactly the limit is fine; a bad limit is an argument error.
    await sb.fs.write('/tmp/ten', '0123456789')
    t.is((await sb.fs.read('/tmp/ten', { maxBytes: 10 })).length, 10)
    await rejectsWith(t, sb.fs.read('/tmp/ten', { maxBytes: 9 }), 'E_OUTPUT_LIMIT')
    await rejectsWith(t, sb.fs.read('/tmp/ten', { maxBytes: -1 }), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.fs.copyToHost('/tmp/ten', path.join(tempDir(), 'x'), { maxBytes: 1.5 }), 'E_INVALID_ARGUMENT')
    t.log(`read('/dev/zero'): maxBytes 1 MiB → E_OUTPUT_LIMIT in ${smallMs.toFixed(0)} ms; default 64 MiB in ${defaultMs.toFixed(0)} ms; RSS +${grewMiB.toFixed(0)} MiB`)
  })

  test(`${tier}: copyToHost keeps holes, bounds the data written (maxBytes) and drops setuid unless keepSetuid`, async (t) => {
    const sb = await sandbox()
    const dir = tempDir()
    // 64 MiB, 8 KiB of it data (at the start and the end).
    await sb.shell('truncate -s 64M /tmp/sparse && printf head | dd of=/tmp/sparse conv=notrunc 2>/dev/null && printf tail | dd of=/tmp/sparse bs=1 seek=67108860 conv=notrunc 2>/dev/null')
    const out = path.join(dir, 'sparse')
    const t0 = performance.now()
    t.like(await sb.fs.copyToHost('/tmp/sparse', out, { maxBytes: 1 << 20 }), { entries: 1, bytes: 64 << 20 })
    const ms = performance.now() - t0
    const st = fs.statSync(out)
    t.is(st.size, 64 << 20)
    t.true(st.blocks * 512 <= 1 << 20, `${st.blocks} blocks allocated for 8 bytes of data`)
    const fd = fs.openSync(out, 'r')
    const b = Buffer.alloc(4)
    fs.readSync(fd, b, 0, 4, (64 << 20) - 4)
    fs.closeSync(fd)
    t.is(b.toString(), 'tail')
    // 2 MiB of data with maxBytes 1 MiB: stopped, and no file that looks whole.
    await sb.shell('head -c 2097152 /dev/urandom > /tmp/rand2m')
    const over = path.join(dir, 'rand2m')
    const err = await rejectsWith(t, sb.fs.copyToHost('/tmp/rand2m', over, { maxBytes: 1 << 20 }), 'E_OUTPUT_LIMIT')
    t.regex(err.message, /maxBytes/)
    t.false(fs.existsSync(over), 'a partial file was left')
    // 8 MiB, more than the 4 MiB window: the agent still had the file open when the host gave up
    // at 1 MiB; the host's Cancel closes it there (it stayed open until the channel closed).
    const agentFds = async () => Number((await sb.shell('ls /proc/1/fd | wc -l')).stdoutText())
    await sb.shell('head -c 8388608 /dev/urandom > /tmp/rand8m')
    const fdsBefore = await agentFds()
    await rejectsWith(t, sb.fs.copyToHost('/tmp/rand8m', path.join(dir, 'rand8m'), { maxBytes: 1 << 20 }), 'E_OUTPUT_LIMIT')
    t.is(await agentFds(), fdsBefore, 'the abandoned copy left a descriptor open in the agent')
    // setuid/setgid dropped by default, kept on request.
    await sb.shell('printf x > /tmp/suid && chmod 6755 /tmp/suid')
    await sb.fs.copyToHost('/tmp/suid', path.join(dir, 'suid'))
    t.is(fs.statSync(path.join(dir, 'suid')).mode & 0o7777, 0o755)
    await sb.fs.copyToHost('/tmp/suid', path.join(dir, 'suid-kept'), { keepSetuid: true })
    t.is(fs.statSync(path.join(dir, 'suid-kept')).mode & 0o7777, 0o6755)
    t.log(`sparse 64 MiB copyToHost: ${ms.toFixed(0)} ms, ${st.blocks / 2} KiB allocated on the host`)
    await sb.shell('rm -f /tmp/sparse /tmp/rand2m /tmp/rand8m /tmp/suid')
  })

  test.serial(`${tier}: a read pending when the VM is killed fails with E_CHANNEL_CLOSED, not E_PROTOCOL`, async (t) => {
    requireGuestImages()
    const sb = await Sandbox.builder('fs-killed').engine(engine).memory(256).create()
    try {
      const reading = sb.fs.read('/dev/zero', { maxBytes: 2 ** 40 })
      reading.catch(() => {})
      await new Promise((r) => setTimeout(r, 1500))
      await sb.kill()
      const err = await rejectsWith(t, reading, 'E_CHANNEL_CLOSED')
      t.notRegex(err.message, /protocol error/)
    } finally {
      await sb.kill()
    }
  })
})
