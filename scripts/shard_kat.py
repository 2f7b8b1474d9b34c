#!/usr/bin/env python3
"""Independent implementation of coordkit's hash strategies, used to produce the known-answer
table in tests/shard_kat.rs (run: python3 scripts/shard_kat.py)."""
import bisect
import hashlib

M64 = (1 << 64) - 1


def key_hash(key):
    return int(hashlib.md5(key.encode()).hexdigest()[:16], 16)


def modulo(key, n):
    return key_hash(key) % n


def ring_points(names, vnodes):
    pts = []
    for idx, name in enumerate(names):
        made, i = 0, 0
        while made < vnodes:
            d = hashlib.md5(f"{name}-{i}".encode()).digest()
            for half in (d[0:8], d[8:16]):
                if made < vnodes:
                    pts.append((int.from_bytes(half, "big"), idx))
                    made += 1
            i += 1
    pts.sort()
    out = []
    for p in pts:
        if not out or out[-1][0] != p[0]:
            out.append(p)
    return out


def ring(key, pts):
    h = key_hash(key)
    i = bisect.bisect_left([p[0] for p in pts], h)
    if i == len(pts):
        i = 0
    return pts[i][1]


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rendezvous(key, names):
    h = key_hash(key)
    best, best_score = 0, None
    for i, n in enumerate(names):
        s = mix64(h ^ key_hash(n))
        if best_score is None or s > best_score:
            best, best_score = i, s
    return best


def jump(key, buckets):
    k = key_hash(key)
    b, j = -1, 0
    while j < buckets:
        b = j
        k = (k * 2862933555777941757 + 1) & M64
        j = int(float(b + 1) * (float(1 << 31) / float((k >> 33) + 1)))
    return b


KEYS = ["", "a", "users/42", "config/v2/db.primary", "jobs/nightly-report", "k" * 100,
        "ct-1/x", "shard-key-7", "Z", "a/b/c/d/e/f"]
NAMES = [f"shard-{i}" for i in range(5)]

if __name__ == "__main__":
    pts = ring_points(NAMES, 16)
    pts_default = ring_points(NAMES, 1024)
    print("// key, key_hash, modulo(5), ring(5 shards, 16 vnodes), ring(5, 1024), rendezvous(5), jump(7)")
    for k in KEYS:
        print(f'    ({k!r}, 0x{key_hash(k):016x}, {modulo(k, 5)}, {ring(k, pts)}, '
              f'{ring(k, pts_default)}, {rendezvous(k, NAMES)}, {jump(k, 7)}),'
              .replace("'", '"'))
    # Aggregate check over many keys: a digest of the owners.
    agg = hashlib.md5()
    for i in range(20000):
        k = f"key-{i}"
        agg.update(bytes([modulo(k, 5), ring(k, pts), rendezvous(k, NAMES), jump(k, 7)]))
    print("// owners digest over key-0..key-19999:", agg.hexdigest())
