#!/usr/bin/env python3
"""Rewrite an ELF64 kernel image with its PT_LOAD segments packed at 4 KiB alignment.

vmlinux is linked with -z max-page-size=0x200000, so its file offsets mirror the 2 MiB
aligned physical layout and ~5 MiB of the 15 MiB file is zero padding. Loaders (QEMU,
linux-loader) copy each PT_LOAD from p_offset to p_paddr: packing the segments keeps
every load address, entry point and note (the PVH entry) and leaves a 10 MiB file.
Section headers are dropped (a stripped kernel needs none; loaders read program headers).

usage: compact-elf.py IN OUT
"""
import struct, sys
src, dst = sys.argv[1], sys.argv[2]
b = open(src, 'rb').read()
assert b[:4] == b'\x7fELF' and b[4] == 2 and b[5] == 1, "not an ELF64 LE file"
ehdr = list(struct.unpack_from('<16sHHIQQQIHHHHHH', b, 0))
phoff, phentsize, phnum = ehdr[5], ehdr[9], ehdr[10]
phdrs = [list(struct.unpack_from('<IIQQQQQQ', b, phoff + i * phentsize)) for i in range(phnum)]
PT_LOAD, PAGE = 1, 4096
out = bytearray(b[:64 + phnum * phentsize])
moves = []  # (old_off, old_end, new_off)
for p in phdrs:
    if p[0] != PT_LOAD:
        continue
    off, vaddr, filesz = p[2], p[3], p[5]
    new = (len(out) + PAGE - 1) // PAGE * PAGE + (vaddr % PAGE)
    if new < len(out):
        new += PAGE
    out += bytes(new - len(out)) + b[off:off + filesz]
    moves.append((off, off + filesz, new))
    p[2], p[7] = new, PAGE
for p in phdrs:
    if p[0] == PT_LOAD:
        continue
    for old, end, new in moves:
        if old <= p[2] and p[2] + p[5] <= end:
            p[2] = new + (p[2] - old)
            break
    else:
        sys.exit("segment type %d at 0x%x lies outside every PT_LOAD" % (p[0], p[2]))
ehdr[6] = 0; ehdr[12] = 0; ehdr[13] = 0  # no section headers
struct.pack_into('<16sHHIQQQIHHHHHH', out, 0, *ehdr)
for i, p in enumerate(phdrs):
    struct.pack_into('<IIQQQQQQ', out, phoff + i * phentsize, *p)
open(dst, 'wb').write(out)
