"""Fidelity check of the Consul simulator with an independent client library (py-consul).

Usage: python3 consul_fidelity.py PORT

Every check is an assert; the script exits non-zero on the first failure. It uses only
py-consul's public API, so what it checks is what that library expects of a Consul server.
"""
import base64
import sys
import threading
import time

import consul

port = int(sys.argv[1])
c = consul.Consul(host="127.0.0.1", port=port)
checks = 0


def check(cond, what):
    global checks
    assert cond, what
    checks += 1


# KV put / get (A1)
check(c.kv.put("fid/a", b"\x00\x01binary\xff") is True, "put answers true")
index, e = c.kv.get("fid/a")
check(e["Value"] == b"\x00\x01binary\xff", f"value round trip: {e!r}")
check(e["Key"] == "fid/a" and e["Flags"] == 0 and e["LockIndex"] == 0, f"entry fields: {e!r}")
check(int(index) == e["ModifyIndex"], "X-Consul-Index is the key's ModifyIndex")
check(c.kv.get("fid/missing")[1] is None, "missing key reads as None (404)")
c.kv.put("fid/empty", b"")
check(c.kv.get("fid/empty")[1]["Value"] is None, "empty value reads as null")

# flags and cas (A1)
check(c.kv.put("fid/f", "x", flags=3304740253564472344) is True, "put with u64 flags")
check(c.kv.get("fid/f")[1]["Flags"] == 3304740253564472344, "flags above 2^53 survive")
check(c.kv.put("fid/new", "1", cas=0) is True, "cas=0 creates")
check(c.kv.put("fid/new", "2", cas=0) is False, "cas=0 on an existing key fails")
_, e = c.kv.get("fid/new")
check(c.kv.put("fid/new", "3", cas=e["ModifyIndex"]) is True, "cas with the current index")
check(c.kv.put("fid/new", "4", cas=e["ModifyIndex"]) is False, "cas with a stale index")
check(c.kv.get("fid/new")[1]["Value"] == b"3", "failed cas changed nothing")

# recurse, keys, separator (A1)
_, entries = c.kv.get("fid/", recurse=True)
keys = [x["Key"] for x in entries]
check(keys == sorted(keys) and "fid/a" in keys, f"recurse is sorted: {keys}")
_, names = c.kv.get("fid/", keys=True, separator="/")
check(names == sorted(set(keys)), f"keys: {names}")
_, entries = c.kv.get("fid/", recurse=True, consistency="consistent")
check(len(entries) == len(keys), "consistent recurse")
_, entries = c.kv.get("fid/", recurse=True, consistency="stale")
check(len(entries) == len(keys), "stale recurse")

# delete (A1)
check(c.kv.delete("fid/new") is True, "delete")
check(c.kv.delete("fid/never-there") is True, "delete of a missing key is true")
check(c.kv.get("fid/new")[1] is None, "deleted")

# blocking query (A2): a write from another thread wakes a blocked get
index, _ = c.kv.get("fid/a")
def later():
    time.sleep(0.3)
    consul.Consul(host="127.0.0.1", port=port).kv.put("fid/a", "woken")
t = threading.Thread(target=later)
t.start()
started = time.time()
new_index, e = c.kv.get("fid/a", index=index, wait="10s")
t.join()
check(0.25 < time.time() - started < 5, "blocked until the write")
check(int(new_index) > int(index) and e["Value"] == b"woken", "woken with the new value")

# sessions (A3): py-consul sends lower-case JSON fields and lock_delay as "Ns"
sid = c.session.create(name="fid", ttl=10, lock_delay=1, behavior="release")
_, info = c.session.info(sid)
check(info["ID"] == sid and info["TTL"] == "10s" and info["Behavior"] == "release", f"info: {info}")
check(info["LockDelay"] == 1_000_000_000, f"lock delay: {info['LockDelay']}")
renewed = c.session.renew(sid)
check(renewed["ID"] == sid and renewed["TTL"] == "10s", f"renew: {renewed}")
_, sessions = c.session.list()
check(any(s["ID"] == sid for s in sessions), "listed")
check(c.session.info("00000000-0000-0000-0000-000000000000")[1] is None, "unknown session")

# acquire / release (A1)
other = c.session.create(name="other", lock_delay=0)
check(c.kv.put("fid/lock", "held", acquire=sid) is True, "acquire")
check(c.kv.put("fid/lock", "x", acquire=other) is False, "acquire of a held lock")
_, e = c.kv.get("fid/lock")
check(e["Session"] == sid and e["LockIndex"] == 1, f"holder: {e}")
check(c.kv.put("fid/lock", "free", release=other) is False, "release by a non-holder")
check(c.kv.put("fid/lock", "free", release=sid) is True, "release")
_, e = c.kv.get("fid/lock")
check("Session" not in e and e["Value"] == b"free" and e["LockIndex"] == 1, f"released: {e}")
check(c.kv.put("fid/lock", "mine", acquire=other) is True, "acquire after release")
check(c.kv.get("fid/lock")[1]["LockIndex"] == 2, "LockIndex increments")

# destroy invalidates: the key is released, lock-delay applies (A3)
check(c.session.destroy(sid) is True, "destroy")
check(c.session.destroy(sid) is True, "destroy is idempotent")
third = c.session.create(lock_delay=0)
c.kv.put("fid/d", "v", acquire=other)
c.session.destroy(other)
check("Session" not in c.kv.get("fid/d")[1], "destroy released the key")

# transactions (A4)
v = base64.b64encode(b"tx").decode()
r = c.txn.put([
    {"KV": {"Verb": "set", "Key": "fid/t1", "Value": v}},
    {"KV": {"Verb": "lock", "Key": "fid/t2", "Value": v, "Session": third}},
    {"KV": {"Verb": "get", "Key": "fid/t1"}},
])
check(r["Errors"] is None and len(r["Results"]) == 3, f"txn: {r}")
check(r["Results"][1]["KV"]["Session"] == third and r["Results"][1]["KV"]["LockIndex"] == 1, "lock verb")
check(r["Results"][2]["KV"]["Value"] == v, "get verb returns the value")
try:
    c.txn.put([{"KV": {"Verb": "cas", "Key": "fid/t1", "Value": v, "Index": 1}}])
    check(False, "a failing txn must raise")
except consul.ConsulException as e:
    check("409" in str(e) and "index is stale" in str(e), f"409 with Errors: {e}")

print(f"py-consul fidelity: {checks} checks passed")
