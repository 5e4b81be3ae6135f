#!/usr/bin/env python3
"""Writes the seed inputs of the virtio_mmio and tree_writer fuzz targets (corpus/virtio_mmio/seed-*): a driver
that negotiates VERSION_1, sets up queues at fixed addresses and notifies one request per
device — what a guest would do first — so the fuzzer starts past the handshake."""
import os
import struct

DESC, AVAIL, USED, BUF = 0x100, 0x300, 0x400, 0x800

def w(off, val):
    return bytes([0]) + struct.pack('<HI', off, val)

def setup(queues):
    ops = [w(0x70, 1), w(0x70, 3), w(0x24, 1), w(0x20, 1), w(0x24, 0), w(0x20, 0), w(0x70, 0xb)]
    for q in queues:
        base = q * 0x1000
        ops += [w(0x30, q), w(0x38, 8), w(0x80, DESC + base), w(0x84, 0), w(0x90, AVAIL + base), w(0x94, 0),
                w(0xa0, USED + base), w(0xa4, 0), w(0x44, 1)]
    ops.append(w(0x70, 0xf))
    return ops

def notify(q):
    return bytes([2]) + struct.pack('<HI', 0x50, q)

def desc(addr, length, flags, nxt):
    return struct.pack('<QIHH', addr, length, flags, nxt)

def chain(mem, q, descs):
    """Puts a descriptor chain in queue q's table and makes it available."""
    base = q * 0x1000
    for i, d in enumerate(descs):
        mem[base + DESC + 16 * i: base + DESC + 16 * (i + 1)] = d
    mem[base + AVAIL: base + AVAIL + 6] = struct.pack('<HHH', 0, 1, 0)

def seed(name, device, ops, mem):
    data = bytes([device, len(ops)]) + b''.join(ops) + bytes(mem)
    os.makedirs('corpus/virtio_mmio', exist_ok=True)
    with open(f'corpus/virtio_mmio/seed-{name}', 'wb') as f:
        f.write(data)

NEXT, WRITE = 1, 2
for name, kind in [('blk-read', 0), ('blk-write', 1), ('blk-flush', 4), ('blk-getid', 8)]:
    mem = bytearray(0x1000)
    mem[BUF:BUF + 16] = struct.pack('<IIQ', kind, 0, 1)
    data_flags = NEXT | (WRITE if kind in (0, 8) else 0)
    chain(mem, 0, [desc(BUF, 16, NEXT, 1), desc(BUF + 0x100, 512, data_flags, 2), desc(BUF + 0x400, 1, WRITE, 0)])
    for device in (0, 1):
        seed(f'{name}-{"ro" if device else "rw"}', device, setup([0]) + [notify(0)], mem)

# console: queue 1 is the port's transmit queue; net: queue 1 transmits (12-byte header + frame).
mem = bytearray(0x2000)
mem[0x1000 + BUF:0x1000 + BUF + 5] = b'hello'
chain(mem, 1, [desc(0x1000 + BUF, 5, 0, 0)])
seed('console-tx', 2, setup([0, 1]) + [notify(1)], mem)
mem = bytearray(0x2000)
frame = bytes(12) + b'\xff' * 6 + b'\x02\x00\x00\x00\x00\x01' + b'\x08\x06' + bytes(28)
mem[0x1000 + BUF:0x1000 + BUF + len(frame)] = frame
chain(mem, 1, [desc(0x1000 + BUF, len(frame), 0, 0)])
seed('net-tx', 3, setup([0, 1]) + [notify(1)], mem)

# tree_writer: streams as TreeReader makes them (crates/protocol/src/tree.rs), plus the shapes
# of the attacks the writer must refuse (a symlinked root or parent, a file over a directory).
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7f
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)

def bstr(b):
    return varint(len(b)) + b

def tdir(path, mode=0o755):
    return b'\x01' + bstr(path) + varint(mode) + varint(0)

def tfile(path, data, mode=0o644):
    return b'\x02' + bstr(path) + varint(mode) + varint(0) + varint(len(data)) + data

def tlink(path, target):
    return b'\x03' + bstr(path) + bstr(target)

END = b'\x00'
trees = {
    'tree': tdir(b'') + tdir(b'sub') + tfile(b'sub/a', b'hello') + tlink(b'sub/l', b'../a') + tfile(b'b', b'x' * 100) + END,
    'file': tfile(b'', b'just a file', 0o4755) + END,
    'root-symlink-then-child': tlink(b'', b'outside') + tfile(b'pwned', b'1') + END,
    'symlinked-parent': tdir(b'') + tlink(b'esc', b'../outside') + tfile(b'esc/pwned', b'1') + END,
    'dir-then-link-swap': tdir(b'') + tdir(b'd') + tlink(b'd', b'../outside') + tfile(b'd/pwned', b'1') + END,
    'duplicates': tdir(b'') + tfile(b'a', b'1') + tfile(b'a', b'2') + tdir(b'a') + END,
}
os.makedirs('corpus/tree_writer', exist_ok=True)
for name, data in trees.items():
    # The first byte also picks the split size the target feeds the stream in.
    with open(f'corpus/tree_writer/seed-{name}', 'wb') as f:
        f.write(data)

# snapshot_state's seeds (corpus/snapshot_state/seed-spin-*) are real state files of the spin
# test guest, taken on this project's hosts (a different CPU stops the search at the CPU check).
