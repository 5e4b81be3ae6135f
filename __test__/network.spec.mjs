// Sandbox networking: none by default; `network: {}` gives the guest eth0 behind user-mode NAT
// (passt behind the VM's virtio-net, the egress policy between), `outbound: false` cuts it off,
// `deny`/`allow` pick destinations, `ports` forward host loopback ports into it. T2 on engine 'qemu', T3 on 'kvm'
// (skipped, saying why, where the built-in VMM cannot boot Linux).
// Nothing here leaves this machine: the "outside" is an HTTP server on the host's loopback,
// which the guest reaches as 10.0.2.2.
import fs from 'node:fs'
import http from 'node:http'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

import test from 'ava'

import { MicrocellError, Sandbox } from 'microcell'

import { within } from './helpers.mjs'
import { perTier, requireGuestImages } from './guest.mjs'

/** A free TCP port on the host's loopback. */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

/** GET http://127.0.0.1:port/path from the host, retried while the guest's server comes up. */
async function hostGet(port, path, deadlineMs = 30_000) {
  const end = Date.now() + deadlineMs
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        http.get({ host: '127.0.0.1', port, path, timeout: 5000 }, (res) => {
          let body = ''
          res.on('data', (c) => (body += c))
          res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}`))))
        }).on('error', reject)
      })
    } catch (err) {
      if (Date.now() > end) throw err
      await new Promise((r) => setTimeout(r, 200))
    }
  }
}

test('network configuration errors are coded at build()', (t) => {
  const code = (network) => t.throws(() => Sandbox.builder('n').network(network).build(), { instanceOf: MicrocellError }).code
  t.is(code({ ports: ['x'] }), 'E_CONFIG_NETWORK')
  t.is(code({ ports: ['80:0'] }), 'E_CONFIG_NETWORK')
  t.is(code({ ports: ['8080:80', '8080:81'] }), 'E_CONFIG_NETWORK')
  t.is(code({ bogus: true }), 'E_CONFIG_JSON')
  t.deepEqual(Sandbox.builder('n').network().build().network, { outbound: true })
  t.deepEqual(Sandbox.builder('n').network({ outbound: false, ports: ['22'] }).build().network, { outbound: false, ports: ['22'] })
  t.is(code({ deny: ['10.0.0.0/33'] }), 'E_CONFIG_NETWORK')
  t.is(code({ allow: ['example.com'] }), 'E_CONFIG_NETWORK')
  t.is(code({ outbound: false, deny: ['private'] }), 'E_CONFIG_NETWORK')
  t.deepEqual(Sandbox.builder('n').network({ deny: ['private'], allow: ['host'] }).build().network, { outbound: true, deny: ['private'], allow: ['host'] })
})

perTier(test, 'network', (tier, engine) => test.serial(`${tier}: no network unless asked for; with one, the guest reaches the host and forwarded ports reach the guest`, async (t) => {
  requireGuestImages()
  const server = http.createServer((req, res) => res.end(`hello from the host ${req.url}`))
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const hostPort = server.address().port
  const forwarded = await freePort()
  const [plain, open, closed] = await Promise.all([
    Sandbox.builder('net-none').engine(engine).memory(256).create(),
    Sandbox.builder('net-open').engine(engine).memory(256).network({}).create(),
    Sandbox.builder('net-closed').engine(engine).memory(256).network({ outbound: false, ports: [`${forwarded}:8080`] }).create(),
  ])
  try {
    // No NIC by default (loopback only, and up).
    const nics = (await plain.shell('ls /sys/class/net')).stdoutText().split(/\s+/)
    t.true(nics.includes('lo') && !nics.includes('eth0'), nics.join(' '))
    t.is((await plain.shell('wget -q -O - http://127.0.0.1:1/ 2>&1; ip addr show lo | grep -c "inet 127.0.0.1"')).stdoutText().trim().split('\n').pop(), '1')

    // Outbound: the host's loopback is 10.0.2.2 from inside.
    const addr = await open.shell('ip -4 addr show eth0')
    t.regex(addr.stdoutText(), /inet 10\.0\.2\.15\/24/)
    t.regex((await open.shell('cat /etc/resolv.conf')).stdoutText(), /nameserver 10\.0\.2\.3/)
    const got = await open.exec('wget', ['-q', '-O', '-', `http://10.0.2.2:${hostPort}/from-guest`], { timeoutMs: 20_000 })
    t.is(got.stdoutText(), 'hello from the host /from-guest', got.stderrText())
    const { network: counters } = await open.metrics()
    t.true(counters.rxBytes > 0 && counters.txBytes > 0 && counters.rxPackets > 0 && counters.txPackets > 0, JSON.stringify(counters))

    // outbound: false: the host is out of reach; a forwarded port reaches the guest's server.
    // Dropped, not refused: the connection attempt hangs until the exec's timeout.
    const blocked = await closed.exec('wget', ['-q', '-O', '-', `http://10.0.2.2:${hostPort}/`], { timeoutMs: 5000 })
    t.true(blocked.timedOut, `no way out with outbound: false: ${JSON.stringify({ code: blocked.exitCode, out: blocked.stdoutText() })}`)
    await closed.shell('mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www')
    t.is(await within(hostGet(forwarded, '/index.html'), 40_000, 'the forwarded port'), 'served-by-the-guest\n')
  } finally {
    await Promise.all([plain.kill(), open.kill(), closed.kill()])
    server.close()
  }
}))

perTier(test, 'network policy', (tier, engine) => test.serial(`${tier}: deny and allow pick the destinations the guest reaches`, async (t) => {
  requireGuestImages()
  const server = http.createServer((req, res) => res.end(`hello ${req.url}`))
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const url = `http://10.0.2.2:${server.address().port}/policy`
  const [publicOnly, publicAndHost] = await Promise.all([
    Sandbox.builder('net-public').engine(engine).memory(256).network({ deny: ['private'] }).create(),
    Sandbox.builder('net-host').engine(engine).memory(256).network({ deny: ['private'], allow: ['host'] }).create(),
  ])
  try {
    const wget = (sb, timeoutMs) => sb.exec('wget', ['-q', '-O', '-', url], { timeoutMs })
    const denied = await wget(publicOnly, 5000)
    t.true(denied.timedOut, `the host's loopback is private (dropped): ${denied.stdoutText()}`)
    const allowed = await wget(publicAndHost, 20_000)
    t.is(allowed.stdoutText(), 'hello /policy', allowed.stderrText())
  } finally {
    await Promise.all([publicOnly.kill(), publicAndHost.kill()])
    server.close()
  }
}))

perTier(test, 'live network policy', (tier, engine) => test.serial(`${tier}: updateNetwork() changes what the guest reaches while it runs; snapshots keep it`, async (t) => {
  requireGuestImages()
  const server = http.createServer((req, res) => res.end(`hello ${req.url}`))
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const url = `http://10.0.2.2:${server.address().port}/live`
  const sb = await Sandbox.builder('net-live').engine(engine).memory(256).network({}).create()
  const plain = await Sandbox.builder('net-live-none').engine(engine).memory(256).create()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mc-net-live-'))
  let clone = null
  try {
    const wget = (box, timeoutMs) => box.exec('wget', ['-q', '-O', '-', url], { timeoutMs })
    t.is((await wget(sb, 20_000)).stdoutText(), 'hello /live')
    t.deepEqual(await sb.updateNetwork({ deny: ['host'] }), { outbound: true, deny: ['host'] })
    t.deepEqual(sb.network, { outbound: true, deny: ['host'] })
    t.deepEqual(sb.config.network, { outbound: true }, 'config stays as made')
    t.true((await wget(sb, 5000)).timedOut, 'denied now: dropped')
    // Bad updates change nothing.
    await t.throwsAsync(sb.updateNetwork({ deny: ['nope'] }), { instanceOf: MicrocellError, code: 'E_CONFIG_NETWORK' })
    await t.throwsAsync(sb.updateNetwork({ ports: ['80'] }), { instanceOf: MicrocellError, code: 'E_CONFIG_JSON' })
    await t.throwsAsync(plain.updateNetwork({ outbound: false }), { instanceOf: MicrocellError, code: 'E_VM_STATE' })
    t.is(plain.network, null)
    t.deepEqual(sb.network, { outbound: true, deny: ['host'] })
    // A snapshot keeps the policy in force: its clone is denied too, until it allows again.
    await sb.snapshot(dir)
    clone = await Sandbox.fromSnapshot(dir)
    t.deepEqual(clone.network, { outbound: true, deny: ['host'] })
    t.true((await wget(clone, 5000)).timedOut, 'the clone inherits the denial')
    await clone.updateNetwork({ deny: [] })
    t.is((await wget(clone, 20_000)).stdoutText(), 'hello /live')
  } finally {
    await Promise.all([sb.kill(), plain.kill(), clone?.kill()])
    server.close()
    fs.rmSync(dir, { recursive: true, force: true })
  }
}))

perTier(test, 'clones with ports', (tier, engine) => test.serial(`${tier}: clones of a snapshot with forwarded ports run side by side on ports of their own`, async (t) => {
  requireGuestImages()
  const [p0, p1, p2] = [await freePort(), await freePort(), await freePort()]
  const origin = await Sandbox.builder('net-origin').engine(engine).memory(256).network({ outbound: false, ports: [`${p0}:8080`] }).create()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mc-net-clones-'))
  const clones = []
  try {
    await origin.shell('mkdir -p /tmp/www && echo origin > /tmp/www/index.html && httpd -p 8080 -h /tmp/www')
    t.is(await within(hostGet(p0, '/index.html'), 40_000, 'the origin'), 'origin\n')
    await origin.snapshot(dir)
    for (const port of [p1, p2]) clones.push(await Sandbox.fromSnapshot(dir, { ports: [`${port}:8080`] }))
    t.deepEqual(clones.map((c) => c.network.ports), [[`${p1}:8080`], [`${p2}:8080`]])
    await clones[0].shell('echo first > /tmp/www/index.html')
    await clones[1].shell('echo second > /tmp/www/index.html')
    // The server in each clone is the origin's, carried over by the snapshot.
    t.is(await within(hostGet(p1, '/index.html'), 40_000, 'the first clone'), 'first\n')
    t.is(await within(hostGet(p2, '/index.html'), 40_000, 'the second clone'), 'second\n')
    t.is(await hostGet(p0, '/index.html'), 'origin\n')
    const taken = await t.throwsAsync(Sandbox.fromSnapshot(dir), { instanceOf: MicrocellError })
    t.is(taken.code, 'E_ENGINE_START', taken.message)
    t.regex(taken.message, new RegExp(`host TCP port ${p0}`))
  } finally {
    await Promise.all([origin.kill(), ...clones.map((c) => c.kill())])
    fs.rmSync(dir, { recursive: true, force: true })
  }
}))
