// T1: the order of a VM's end and its console. wait() resolves after the console stream has
// delivered its last byte (as a child process's 'close' after its stdio), whoever reads it.
// A short guest (hello: one line, then reset) is the fast path where a race would show.
import test from 'ava'

import { MicroVm } from 'microcell'

import { guest, kvmSkipReason, within } from './helpers.mjs'

const skipReason = kvmSkipReason()
if (skipReason) console.log(`# SKIP T1 console order: ${skipReason}`)
const kvm = skipReason ? test.skip : test.serial

const HELLO = 'Hello from a microcell test guest\n'
const RUNS = 20

const hello = () => MicroVm.builder().kernel(guest('hello.pvh.elf')).memoryMib(64).start({ consoleStream: true })

kvm(`T1: wait() resolves after a 'data' reader got the last console line (${RUNS} short guests)`, async (t) => {
  for (let i = 0; i < RUNS; i++) {
    const vm = await hello()
    let text = ''
    let ended = false
    vm.console.on('data', (c) => (text += c.toString('latin1'))).on('end', () => (ended = true))
    const exit = await within(vm.wait(), 30_000, `run ${i}`)
    // Checked in the same turn as wait() resolves: nothing may still be on the way.
    t.is(text.replace(/\r\n/g, '\n'), HELLO, `run ${i}`)
    t.true(ended, `run ${i}: the console has ended`)
    t.deepEqual(exit, { reason: 'reset' })
  }
})

kvm('T1: wait() resolves after an async iterator took the last console chunk', async (t) => {
  for (let i = 0; i < 5; i++) {
    const vm = await hello()
    let text = ''
    const reading = (async () => {
      for await (const c of vm.console) text += c.toString('latin1')
    })()
    await within(vm.wait(), 30_000, `run ${i}`)
    t.is(text.replace(/\r\n/g, '\n'), HELLO, `run ${i}`)
    await reading
  }
})

kvm('T1: a console made but not read does not hold wait() back; its bytes stay readable after', async (t) => {
  const vm = await hello()
  const stream = vm.console // made, nobody reads it yet
  t.deepEqual(await within(vm.wait(), 30_000, 'wait()'), { reason: 'reset' })
  const chunks = []
  for await (const c of stream) chunks.push(c)
  t.is(Buffer.concat(chunks).toString('latin1').replace(/\r\n/g, '\n'), HELLO)
})
