"""Peer libraries on the same servers, with the same operation counts as the Rust side.

Usage: peers.py MODE ADDR N_KV N_LOCK ROUNDS CONTENDERS
MODE: kazoo | tooz-zk | tooz-etcd | filelock (ADDR: a directory) | psycopg (ADDR: a conninfo). Prints one JSON object: {"rows": [...], "handoff": {...}}.
Latencies are in microseconds; "busy_s" is the wall time of the measured operations.
"""
import json
import sys
import threading
import time

mode, addr = sys.argv[1], sys.argv[2]
n_kv, n_lock, rounds, contenders = (int(x) for x in sys.argv[3:7])


def timed(fn, n):
    for _ in range(max(20, min(200, n // 10))):
        fn()
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1e6)
    return {"lat_us": lat, "busy_s": time.perf_counter() - start, "ops": n}


HANDOFF_LIMIT_S = 60.0


def handoff(make_lock, n_rounds, n_contenders):
    """Each contender loops acquire -> note time -> release; a sample is the time from a
    holder starting its release to the next holder's acquire returning. Stops after n_rounds
    handoffs or HANDOFF_LIMIT_S seconds, whichever comes first (slow peers)."""
    state = {"last": None, "count": 0, "samples": [], "error": None, "deadline": time.perf_counter() + HANDOFF_LIMIT_S}
    guard = threading.Lock()
    locks = [make_lock(i) for i in range(n_contenders)]

    def run(lock):
        try:
            while True:
                lock.acquire()
                now = time.perf_counter()
                with guard:
                    prev, state["last"] = state["last"], None
                    n = state["count"]
                    state["count"] += 1
                    if n > n_rounds or now > state["deadline"]:
                        state["count"] = n_rounds + 2
                        lock.release()
                        return
                    if prev is not None:
                        state["samples"].append((now - prev) * 1e6)
                    state["last"] = time.perf_counter()
                lock.release()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            state["error"] = repr(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(lk,), daemon=True) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if state["error"]:
        raise RuntimeError(state["error"])
    return {"lat_us": state["samples"], "busy_s": time.perf_counter() - start, "ops": len(state["samples"])}


rows = []
result = {"rows": rows}
value = b"v" * 100

if mode == "kazoo":
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=addr)
    zk.start(timeout=15)
    zk.ensure_path("/kazoobench/key")
    zk.ensure_path("/kazoobench/cas")
    zk.set("/kazoobench/key", value)
    rows.append(("get (strong)", timed(lambda: (zk.sync("/kazoobench/key"), zk.get("/kazoobench/key")), n_kv)))
    rows.append(("get (stale)", timed(lambda: zk.get("/kazoobench/key"), n_kv)))
    rows.append(("put", timed(lambda: zk.set("/kazoobench/key", value), n_kv)))
    ver = [zk.set("/kazoobench/cas", value).version]

    def cas():
        ver[0] = zk.set("/kazoobench/cas", value, version=ver[0]).version

    rows.append(("CAS", timed(cas, n_kv)))
    lock = zk.Lock("/kazoobench/locks/uncontended", "bench")
    rows.append(("lock+unlock", timed(lambda: (lock.acquire(), lock.release()), n_lock)))
    clients = []

    def make(i):
        c = KazooClient(hosts=addr)
        c.start(timeout=15)
        clients.append(c)
        return c.Lock("/kazoobench/locks/contended", "c%d" % i)

    result["handoff"] = handoff(make, rounds, contenders)
    for c in clients + [zk]:
        c.stop()
        c.close()
elif mode in ("tooz-zk", "tooz-etcd"):
    from tooz import coordination

    url = ("kazoo://%s" if mode == "tooz-zk" else "etcd3+http://%s") % addr
    coord = coordination.get_coordinator(url, b"bench-0")
    coord.start()
    lock = coord.get_lock(b"uncontended")
    rows.append(("lock+unlock", timed(lambda: (lock.acquire(blocking=True), lock.release()), n_lock)))
    coords = []

    class L:
        def __init__(self, lk):
            self.lk = lk

        def acquire(self):
            if not self.lk.acquire(blocking=True):
                raise RuntimeError("tooz acquire returned False")

        def release(self):
            self.lk.release()

    def make(i):
        c = coordination.get_coordinator(url, ("bench-c%d" % i).encode())
        c.start()
        coords.append(c)
        return L(c.get_lock(b"contended"))

    result["handoff"] = handoff(make, rounds, contenders)
    for c in coords + [coord]:
        c.stop()
elif mode == "filelock":
    import os

    from filelock import FileLock

    path = os.path.join(addr, "uncontended.lock")
    lock = FileLock(path, thread_local=False)
    rows.append(("lock+unlock", timed(lambda: (lock.acquire(), lock.release()), n_lock)))

    def make(i):
        # An instance (and so a file descriptor and an flock) per contender.
        return FileLock(os.path.join(addr, "contended.lock"), thread_local=False, is_singleton=False)

    result["handoff"] = handoff(make, rounds, contenders)
elif mode == "psycopg":
    import psycopg

    conn = psycopg.connect(addr, autocommit=True)
    rows.append(("lock+unlock", timed(lambda: (conn.execute("SELECT pg_advisory_lock(5151)"), conn.execute("SELECT pg_advisory_unlock(5151)")), n_lock)))
    conns = []

    class A:
        def __init__(self, c):
            self.c = c

        def acquire(self):
            self.c.execute("SELECT pg_advisory_lock(5252)")

        def release(self):
            self.c.execute("SELECT pg_advisory_unlock(5252)")

    def make(i):
        c = psycopg.connect(addr, autocommit=True)
        conns.append(c)
        return A(c)

    result["handoff"] = handoff(make, rounds, contenders)
    for c in conns + [conn]:
        c.close()
else:
    raise SystemExit("unknown mode " + mode)

result["rows"] = [dict(op=op, **r) for op, r in rows]
print(json.dumps(result))
