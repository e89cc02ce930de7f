#!/usr/bin/env python3
"""Compares the tensor bytes of two GGUF files by name (standard library only).
   scripts/gguf-diff.py a.gguf b.gguf   -> one line per differing tensor, then a count.
Exit status 0 when every tensor both files hold is byte-identical and both hold the same set."""
import struct, sys

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

def read(path):
    f = open(path, "rb"); b = f.read(); f.close()
    assert b[:4] == b"GGUF", f"{path}: not a GGUF file"
    _, nt, nkv = struct.unpack_from("<IQQ", b, 4); o = 24
    def s(o):
        n, = struct.unpack_from("<Q", b, o); return b[o + 8:o + 8 + n].decode("utf-8", "replace"), o + 8 + n
    def val(t, o):
        if t == 8: return s(o)
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, o); o += 12; out = []
            for _ in range(n):
                v, o = val(et, o); out.append(v)
            return out, o
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[t]
        return struct.unpack_from("<" + fmt, b, o)[0], o + SIZES[t]
    kv = {}
    for _ in range(nkv):
        k, o = s(o); t, = struct.unpack_from("<I", b, o); o += 4; kv[k], o = val(t, o)
    infos = []
    for _ in range(nt):
        name, o = s(o); nd, = struct.unpack_from("<I", b, o); o += 4
        dims = struct.unpack_from(f"<{nd}Q", b, o); o += 8 * nd
        typ, off = struct.unpack_from("<IQ", b, o); o += 12
        infos.append((name, dims, typ, off))
    align = kv.get("general.alignment", 32); data = (o + align - 1) // align * align
    offs = sorted(set(i[3] for i in infos)) + [len(b) - data]
    nxt = {a: offs[i + 1] for i, a in enumerate(offs[:-1])}
    return {n: (typ, dims, b[data + off:data + nxt[off]]) for n, dims, typ, off in infos}

a, b = read(sys.argv[1]), read(sys.argv[2])
bad = 0
for n in sorted(set(a) | set(b)):
    if n not in a or n not in b:
        print(f"{n}: only in {'first' if n in a else 'second'}"); bad += 1; continue
    (ta, da, xa), (tb, db, xb) = a[n], b[n]
    # Trailing alignment padding can differ; compare the shorter length (sizes match per type).
    m = min(len(xa), len(xb))
    if ta != tb or da != db or xa[:m] != xb[:m]:
        diff = sum(1 for i in range(0, m, 4096) if xa[i:i + 4096] != xb[i:i + 4096])
        print(f"{n}: type {ta}/{tb} dims {da}/{db}, {diff} of {(m + 4095) // 4096} 4 KiB pages differ"); bad += 1
print(f"{len(set(a) & set(b)) - bad + (len(set(a) ^ set(b)))} of {len(set(a) | set(b))} tensors identical" if False else f"{len(set(a) | set(b)) - bad} of {len(set(a) | set(b))} tensors identical")
sys.exit(1 if bad else 0)
