//! The Consul simulator's own tests: each behaviour it encodes, checked with raw HTTP/1.1 over
//! a TCP socket (no Consul client library involved). The sections name the part of Consul's HTTP
//! API documentation each behaviour comes from:
//! A1 KV (<https://developer.hashicorp.com/consul/api-docs/kv>),
//! A2 blocking queries and headers (<https://developer.hashicorp.com/consul/api-docs/features/blocking>),
//! A3 sessions (<https://developer.hashicorp.com/consul/api-docs/session>),
//! A4 transactions (<https://developer.hashicorp.com/consul/api-docs/txn>),
//! A6 fencing: the lock index and ModifyIndex of an acquire
//! (<https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions>).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::consul_sim::{b64_decode, b64_encode, ConsulSim, SimOptions};

/// A raw HTTP answer.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn index(&self) -> u64 {
        self.header("X-Consul-Index")
            .unwrap_or_else(|| panic!("no X-Consul-Index in {:?}", self.headers))
            .parse()
            .unwrap()
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
fn http(sim: &ConsulSim, method: &str, target: &str, body: &[u8]) -> Resp {
    http_with(sim, method, target, body, &[])
}

fn http_with(
    sim: &ConsulSim,
    method: &str,
    target: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Resp {
    let mut s = TcpStream::connect(sim.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        sim.addr(),
        body.len()
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn put(sim: &ConsulSim, target: &str, body: &[u8]) -> Resp {
    http(sim, "PUT", target, body)
}

fn entry(sim: &ConsulSim, key: &str) -> Value {
    let r = http(sim, "GET", &format!("/v1/kv/{key}"), b"");
    assert_eq!(r.status, 200, "GET {key}: {}", r.text());
    r.json()[0].clone()
}

fn session(sim: &ConsulSim, body: Value) -> String {
    let r = put(sim, "/v1/session/create", body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["ID"].as_str().unwrap().to_string()
}

fn txn(sim: &ConsulSim, ops: Value) -> Resp {
    put(sim, "/v1/txn", ops.to_string().as_bytes())
}

// ---- A1: KV ----

#[test]
fn a1_missing_key_is_404_with_empty_body_and_headers() {
    let sim = ConsulSim::start();
    let r = http(&sim, "GET", "/v1/kv/nope", b"");
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert!(r.index() >= 1, "A2: never 0");
    assert_eq!(r.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(r.header("X-Consul-LastContact"), Some("0"));
    let r = http(&sim, "GET", "/v1/kv/", b"");
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
}

#[test]
fn a1_put_answers_true_without_index_and_entry_json_has_consul_shape() {
    let sim = ConsulSim::start();
    let r = put(&sim, "/v1/kv/a/b", b"hello");
    assert_eq!((r.status, r.text().as_str()), (200, "true"));
    assert!(
        r.header("X-Consul-Index").is_none(),
        "A1: PUT carries no index"
    );
    let g = http(&sim, "GET", "/v1/kv/a/b", b"");
    let text = g.text();
    // One-element array; fields in Consul's order; Session left out when unlocked.
    let arr = g.json();
    assert_eq!(arr.as_array().unwrap().len(), 1);
    let order: Vec<usize> = [
        "LockIndex",
        "Key",
        "Flags",
        "Value",
        "CreateIndex",
        "ModifyIndex",
    ]
    .iter()
    .map(|f| text.find(&format!("\"{f}\"")).unwrap())
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "field order: {text}");
    assert!(!text.contains("Session"), "{text}");
    assert_eq!(
        b64_decode(arr[0]["Value"].as_str().unwrap()).unwrap(),
        b"hello"
    );
    assert_eq!(
        g.index(),
        arr[0]["ModifyIndex"].as_u64().unwrap(),
        "A2: key's ModifyIndex"
    );
    // An empty value reads back as null.
    put(&sim, "/v1/kv/empty", b"");
    assert!(entry(&sim, "empty")["Value"].is_null());
}

#[test]
fn a1_flags_are_u64_and_default_to_zero() {
    let sim = ConsulSim::start();
    let big = 0x2ddc_cbc0_58a5_0c18u64;
    put(&sim, &format!("/v1/kv/f?flags={big}"), b"x");
    let text = http(&sim, "GET", "/v1/kv/f", b"").text();
    assert!(text.contains("\"Flags\":3304740253564472344"), "{text}");
    put(&sim, "/v1/kv/f", b"y");
    assert_eq!(
        entry(&sim, "f")["Flags"],
        0,
        "a PUT without flags resets them"
    );
}

#[test]
fn a1_cas() {
    let sim = ConsulSim::start();
    assert_eq!(put(&sim, "/v1/kv/c?cas=0", b"1").text(), "true");
    assert_eq!(
        put(&sim, "/v1/kv/c?cas=0", b"2").text(),
        "false",
        "cas=0: only if absent"
    );
    let idx = entry(&sim, "c")["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        put(&sim, &format!("/v1/kv/c?cas={}", idx + 7), b"3").text(),
        "false"
    );
    assert_eq!(
        put(&sim, &format!("/v1/kv/c?cas={idx}"), b"4").text(),
        "true"
    );
    assert_eq!(put(&sim, "/v1/kv/missing?cas=5", b"x").text(), "false");
    let r = put(&sim, "/v1/kv/c?cas=1&acquire=x", b"");
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Conflicting flags:"), "{}", r.text());
}

#[test]
fn a1_acquire_and_release() {
    let sim = ConsulSim::start();
    let s1 = session(&sim, json!({}));
    let s2 = session(&sim, json!({}));
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?acquire={s1}&flags=3"), b"v1").text(),
        "true"
    );
    let e = entry(&sim, "l");
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].as_str()),
        (Some(1), Some(s1.as_str()))
    );
    let m1 = e["ModifyIndex"].as_u64().unwrap();
    // Same session again: value written, LockIndex kept, ModifyIndex bumped.
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?acquire={s1}"), b"v2").text(),
        "true"
    );
    let e = entry(&sim, "l");
    assert_eq!(e["LockIndex"], 1);
    assert!(e["ModifyIndex"].as_u64().unwrap() > m1);
    // Another session: false.
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?acquire={s2}"), b"x").text(),
        "false"
    );
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?release={s2}"), b"x").text(),
        "false"
    );
    // Unknown or empty session: 500.
    let r = put(&sim, "/v1/kv/l?acquire=no-such", b"");
    assert_eq!(
        (r.status, r.text()),
        (500, "invalid session \"no-such\"".to_string())
    );
    let r = put(&sim, "/v1/kv/l?acquire=", b"");
    assert_eq!((r.status, r.text().as_str()), (500, "missing session"));
    // A plain PUT does not need the lock, keeps Session, resets LockIndex to 0 [code].
    assert_eq!(put(&sim, "/v1/kv/l?flags=3", b"plain").text(), "true");
    let e = entry(&sim, "l");
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].as_str()),
        (Some(0), Some(s1.as_str()))
    );
    // Release overwrites value and flags with the request's (an empty body wipes the value).
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?release={s1}"), b"").text(),
        "true"
    );
    let e = entry(&sim, "l");
    assert!(e.get("Session").is_none());
    assert!(e["Value"].is_null());
    assert_eq!(e["Flags"], 0);
    assert_eq!(e["LockIndex"], 0, "release keeps LockIndex");
    // Re-acquire by another session increments LockIndex.
    assert_eq!(
        put(&sim, &format!("/v1/kv/l?acquire={s2}"), b"").text(),
        "true"
    );
    assert_eq!(entry(&sim, "l")["LockIndex"], 1);
}

#[test]
fn a1_delete() {
    let sim = ConsulSim::start();
    assert_eq!(http(&sim, "DELETE", "/v1/kv/none", b"").text(), "true");
    assert_eq!(
        http(&sim, "DELETE", "/v1/kv/none?cas=9", b"").text(),
        "true",
        "[code] missing key + cas"
    );
    put(&sim, "/v1/kv/d", b"x");
    let idx = entry(&sim, "d")["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        http(&sim, "DELETE", &format!("/v1/kv/d?cas={}", idx + 1), b"").text(),
        "false"
    );
    assert_eq!(
        http(&sim, "DELETE", "/v1/kv/d?cas=0", b"").text(),
        "false",
        "cas=0 never deletes"
    );
    assert_eq!(
        http(&sim, "DELETE", &format!("/v1/kv/d?cas={idx}"), b"").text(),
        "true"
    );
    assert_eq!(http(&sim, "GET", "/v1/kv/d", b"").status, 404);
    assert_eq!(
        http(&sim, "DELETE", "/v1/kv/d?recurse&cas=1", b"").status,
        400
    );
    for k in ["t/a", "t/b", "u"] {
        put(&sim, &format!("/v1/kv/{k}"), b"x");
    }
    assert_eq!(
        http(&sim, "DELETE", "/v1/kv/t/?recurse", b"").text(),
        "true"
    );
    assert_eq!(sim.keys(), vec!["u".to_string()]);
    http(&sim, "DELETE", "/v1/kv/?recurse", b"");
    assert!(sim.keys().is_empty(), "empty key + recurse deletes all");
}

#[test]
fn a1_recurse_keys_separator_raw() {
    let sim = ConsulSim::start();
    let r = http(&sim, "GET", "/v1/kv/?keys", b"");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "[]"),
        "root with no keys"
    );
    assert_eq!(
        http(&sim, "GET", "/v1/kv/?recurse", b"").status,
        404,
        "empty recurse, even at the root"
    );
    for k in ["p/z", "p/a/1", "p/a/2", "p/b", "q"] {
        put(&sim, &format!("/v1/kv/{k}"), k.as_bytes());
    }
    let keys: Vec<String> = http(&sim, "GET", "/v1/kv/p/?recurse", b"")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["p/a/1", "p/a/2", "p/b", "p/z"]);
    let r = http(&sim, "GET", "/v1/kv/p/?keys&separator=/", b"");
    assert_eq!(r.json(), json!(["p/a/", "p/b", "p/z"]));
    let r = http(&sim, "GET", "/v1/kv/p/?keys&seperator=/", b"");
    assert_eq!(
        r.json(),
        json!(["p/a/", "p/b", "p/z"]),
        "the misspelling works too"
    );
    assert_eq!(http(&sim, "GET", "/v1/kv/nothing/?keys", b"").status, 404);
    let r = http(&sim, "GET", "/v1/kv/p/b?raw", b"");
    assert_eq!(r.body, b"p/b");
    assert!(r.header("Content-Type").unwrap().starts_with("text/plain"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    let r = http(&sim, "GET", "/v1/kv/p/b?stale&consistent", b"");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Cannot specify ?stale with ?consistent"));
    let r = http(&sim, "GET", "/v1/kv/p/b?stale", b"");
    assert_eq!(r.header("X-Consul-Effective-Consistency"), Some("stale"));
}

#[test]
fn a1_value_limit_is_512_kib_by_content_length() {
    let sim = ConsulSim::start();
    let exact = vec![b'x'; 524_288];
    assert_eq!(put(&sim, "/v1/kv/big", &exact).text(), "true");
    let r = put(&sim, "/v1/kv/big", &vec![b'y'; 524_289]);
    assert_eq!(r.status, 413);
    assert!(
        r.text().contains("too large, max size: 524288"),
        "{}",
        r.text()
    );
    assert_eq!(
        http(&sim, "GET", "/v1/kv/big?raw", b"").body,
        exact,
        "413 changed nothing"
    );
}

// ---- A2: blocking queries ----

#[test]
fn a2_blocking_query_waits_for_a_higher_index() {
    let sim = std::sync::Arc::new(ConsulSim::start());
    put(&sim, "/v1/kv/w/a", b"1");
    let idx = http(&sim, "GET", "/v1/kv/w/?recurse", b"").index();
    // Nothing changes: returns after the wait (plus at most wait/16 jitter) with 200.
    let t = Instant::now();
    let r = http(
        &sim,
        "GET",
        &format!("/v1/kv/w/?recurse&index={idx}&wait=400ms"),
        b"",
    );
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(r.index(), idx);
    // A write under the prefix wakes it; a write elsewhere does not.
    let sim2 = sim.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        put(&sim2, "/v1/kv/elsewhere", b"x");
        std::thread::sleep(Duration::from_millis(200));
        put(&sim2, "/v1/kv/w/b", b"2");
    });
    let t = Instant::now();
    let r = http(
        &sim,
        "GET",
        &format!("/v1/kv/w/?recurse&index={idx}&wait=10s"),
        b"",
    );
    let took = t.elapsed();
    writer.join().unwrap();
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    // index=0 never blocks; bad parameters are 400.
    let t = Instant::now();
    http(&sim, "GET", "/v1/kv/w/?recurse&index=0&wait=5s", b"");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(
        http(&sim, "GET", "/v1/kv/w/a?index=x", b"").text(),
        "Invalid index"
    );
    assert_eq!(
        http(&sim, "GET", "/v1/kv/w/a?index=1&wait=soon", b"").text(),
        "Invalid wait time"
    );
}

#[test]
fn a2_prefix_index_counts_tombstones_and_can_go_backwards_after_reaping() {
    let sim = ConsulSim::start();
    put(&sim, "/v1/kv/t/a", b"1");
    put(&sim, "/v1/kv/t/b", b"2");
    let before = http(&sim, "GET", "/v1/kv/t/?recurse", b"").index();
    http(&sim, "DELETE", "/v1/kv/t/b", b"");
    let after_delete = http(&sim, "GET", "/v1/kv/t/?recurse", b"").index();
    assert!(
        after_delete > before,
        "the tombstone raises the prefix index"
    );
    // The index of a recurse query on the deleted key itself is its tombstone's.
    let r = http(&sim, "GET", "/v1/kv/t/b?recurse", b"");
    assert_eq!((r.status, r.index()), (404, after_delete));
    sim.reap_tombstones();
    let reaped = http(&sim, "GET", "/v1/kv/t/?recurse", b"").index();
    assert!(
        reaped < after_delete,
        "index went backwards after tombstone GC"
    );
}

// ---- A3: sessions ----

#[test]
fn a3_session_create_info_renew_destroy() {
    let sim = ConsulSim::start();
    let id = session(&sim, json!({"Name": "n"}));
    let r = http(&sim, "GET", &format!("/v1/session/info/{id}"), b"");
    assert!(r.index() >= 1);
    let s = &r.json()[0];
    assert_eq!(
        s["LockDelay"], 15_000_000_000u64,
        "default lock-delay 15 s, in ns"
    );
    assert_eq!(s["Behavior"], "release");
    assert_eq!(s["NodeChecks"], json!(["serfHealth"]));
    assert_eq!(s["Name"], "n");
    assert_eq!(
        http(&sim, "GET", "/v1/session/info/unknown", b"").text(),
        "[]"
    );
    // LockDelay under 1000 means seconds; above 60 s is capped.
    let id2 = session(&sim, json!({"LockDelay": 5, "TTL": "10s", "Checks": []}));
    let s = &http(&sim, "GET", &format!("/v1/session/info/{id2}"), b"").json()[0];
    assert_eq!(s["LockDelay"], 5_000_000_000u64);
    assert_eq!(s["TTL"], "10s");
    assert_eq!(s["NodeChecks"], json!([]), "Checks replaces the default");
    let id3 = session(&sim, json!({"LockDelay": "2m"}));
    let s = &http(&sim, "GET", &format!("/v1/session/info/{id3}"), b"").json()[0];
    assert_eq!(s["LockDelay"], 60_000_000_000u64);
    // Bad TTLs and Behaviors are 500s.
    let r = put(&sim, "/v1/session/create", br#"{"TTL":"5s"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.text(),
        "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"
    );
    assert_eq!(
        put(&sim, "/v1/session/create", br#"{"TTL":"86401s"}"#).status,
        500
    );
    let r = put(&sim, "/v1/session/create", br#"{"Behavior":"explode"}"#);
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "Invalid Behavior setting")
    );
    // Renew returns the session in an array; unknown is 404.
    let r = put(&sim, &format!("/v1/session/renew/{id2}"), b"");
    assert_eq!(r.json()[0]["TTL"], "10s");
    let r = put(&sim, "/v1/session/renew/gone", b"");
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "Session id 'gone' not found")
    );
    // Destroy is idempotent.
    assert_eq!(
        put(&sim, &format!("/v1/session/destroy/{id}"), b"").text(),
        "true"
    );
    assert_eq!(
        put(&sim, &format!("/v1/session/destroy/{id}"), b"").text(),
        "true"
    );
    assert_eq!(
        http(&sim, "GET", &format!("/v1/session/info/{id}"), b"").text(),
        "[]"
    );
}

#[test]
fn a3_ttl_invalidates_at_twice_the_ttl_then_lock_delay_applies() {
    let sim = ConsulSim::start();
    let id = session(&sim, json!({"TTL": "10s", "LockDelay": "3s"}));
    let start = Instant::now();
    assert_eq!(
        put(&sim, &format!("/v1/kv/k?acquire={id}"), b"v").text(),
        "true"
    );
    // Past the TTL but before 2 × TTL the session still holds the key.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(entry(&sim, "k")["Session"].as_str(), Some(id.as_str()));
    while entry(&sim, "k").get("Session").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "not invalidated by 2 × TTL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lived = start.elapsed();
    assert!(
        lived >= Duration::from_secs(20),
        "invalidated after {lived:?}, before 2 × TTL"
    );
    // Behavior release: the value stays; lock-delay: acquire is refused, key shows no Session.
    let e = entry(&sim, "k");
    assert_eq!(b64_decode(e["Value"].as_str().unwrap()).unwrap(), b"v");
    let other = session(&sim, json!({}));
    assert_eq!(
        put(&sim, &format!("/v1/kv/k?acquire={other}"), b"").text(),
        "false"
    );
    let r = txn(
        &sim,
        json!([{"KV": {"Verb": "lock", "Key": "k", "Session": other}}]),
    );
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to lock key \"k\" due to lock delay"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        put(&sim, &format!("/v1/kv/k?acquire={other}"), b"").text(),
        "true"
    );
}

/// `Checks` and `NodeChecks` both default to `serfHealth`; a present key replaces its default,
/// and an empty `Checks` means "no node checks" (how servers before 1.7 are asked, and how
/// `fixupEmptySessionChecks` reads it since). A critical node check invalidates exactly the
/// sessions that list it, with release and lock-delay; sessions without checks live on.
#[test]
fn a3_node_checks_defaults_and_a_failing_check_invalidates_only_its_sessions() {
    let sim = ConsulSim::start();
    let checks_of = |id: &str| {
        http(&sim, "GET", &format!("/v1/session/info/{id}"), b"").json()[0]["NodeChecks"].clone()
    };
    let default = session(&sim, json!({"LockDelay": "2s"}));
    assert_eq!(checks_of(&default), json!(["serfHealth"]));
    let none_new = session(&sim, json!({"NodeChecks": []}));
    assert_eq!(checks_of(&none_new), json!([]));
    let none_old = session(&sim, json!({"Checks": []}));
    assert_eq!(checks_of(&none_old), json!([]));
    let both = session(&sim, json!({"NodeChecks": [], "Checks": []}));
    assert_eq!(checks_of(&both), json!([]));
    // An empty Checks wins over NodeChecks (the 1.7+ fixup).
    let quirk = session(&sim, json!({"NodeChecks": ["mine"], "Checks": []}));
    assert_eq!(checks_of(&quirk), json!([]));
    let custom = session(&sim, json!({"NodeChecks": ["mine"]}));
    assert_eq!(checks_of(&custom), json!(["mine"]));
    assert_eq!(
        put(&sim, "/v1/session/create", br#"{"Checks":"serfHealth"}"#).status,
        400
    );
    put(&sim, &format!("/v1/kv/a?acquire={default}"), b"x");
    put(&sim, &format!("/v1/kv/b?acquire={both}"), b"y");
    assert_eq!(sim.fail_node_check("serfHealth"), 1);
    assert_eq!(
        http(&sim, "GET", &format!("/v1/session/info/{default}"), b"").text(),
        "[]"
    );
    assert!(entry(&sim, "a").get("Session").is_none(), "released");
    assert_eq!(entry(&sim, "b")["Session"].as_str(), Some(both.as_str()));
    let other = session(&sim, json!({}));
    assert_eq!(
        put(&sim, &format!("/v1/kv/a?acquire={other}"), b"").text(),
        "false",
        "lock-delay after invalidation by a check"
    );
    assert_eq!(sim.fail_node_check("mine"), 1);
    assert_eq!(sim.session_count(), 5);
}

/// The TTL comes back from info and renew exactly as the create spelled it (Consul stores the
/// string), so a client parses what it sent.
#[test]
fn a3_renew_returns_the_ttl_as_created() {
    let sim = ConsulSim::start();
    for ttl in ["10s", "10000ms", "1m30s", "15s"] {
        let id = session(&sim, json!({ "TTL": ttl }));
        let r = put(&sim, &format!("/v1/session/renew/{id}"), b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()[0]["TTL"], ttl);
        assert_eq!(r.json()[0]["ID"], id.as_str());
    }
}

/// Absurd blocking-query waits and durations are refused (400/500), never a crash: the
/// simulator keeps answering.
#[test]
fn a2_a3_absurd_waits_and_durations_are_refused_without_panicking() {
    let sim = ConsulSim::start();
    put(&sim, "/v1/kv/k", b"v");
    for wait in [
        "99999999999999999999999h",
        "1e400s",
        "18446744073709551616s",
        "-1s",
        "NaNs",
        "5y",
    ] {
        let r = http(&sim, "GET", &format!("/v1/kv/k?index=1&wait={wait}"), b"");
        assert_eq!(
            (r.status, r.text().as_str()),
            (400, "Invalid wait time"),
            "{wait}"
        );
    }
    // Beyond Go's duration range (about 292 years) is invalid; the largest valid wait is
    // capped at 10 minutes (index 0: answers at once).
    let r = http(&sim, "GET", "/v1/kv/k?index=1&wait=2562048h", b"");
    assert_eq!(r.status, 400);
    let t = Instant::now();
    let r = http(&sim, "GET", "/v1/kv/k?index=0&wait=2562047h", b"");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    let r = http(
        &sim,
        "GET",
        "/v1/kv/k?index=18446744073709551615&wait=200ms",
        b"",
    );
    assert_eq!(
        r.status, 200,
        "an index above the current one blocks for the wait"
    );
    for ttl in ["99999999999999999999999h", "18446744073709551616s"] {
        let body = json!({ "TTL": ttl }).to_string();
        let r = put(&sim, "/v1/session/create", body.as_bytes());
        assert_eq!(r.status, 500, "{ttl}: {}", r.text());
    }
    let r = put(&sim, "/v1/session/create", br#"{"LockDelay": 1e300}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        put(
            &sim,
            "/v1/session/create",
            br#"{"LockDelay": "99999999999999999999999h"}"#
        )
        .status,
        400
    );
    assert_eq!(entry(&sim, "k")["Key"], "k", "still serving");
}

/// The fault hook: requests under a path prefix are held for the configured delay.
#[test]
fn fault_hook_delays_requests_by_path() {
    let sim = ConsulSim::start();
    sim.set_delay("/v1/session/create", Some(Duration::from_millis(400)));
    let t = Instant::now();
    session(&sim, json!({}));
    assert!(
        t.elapsed() >= Duration::from_millis(390),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    put(&sim, "/v1/kv/x", b"1");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "other paths are not delayed"
    );
    sim.set_delay("/v1/session/create", None);
    let t = Instant::now();
    session(&sim, json!({}));
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[test]
fn a3_destroy_applies_lock_delay_explicit_release_does_not_behavior_delete_deletes() {
    let sim = ConsulSim::start();
    let a = session(&sim, json!({"LockDelay": "10s"}));
    let b = session(&sim, json!({}));
    put(&sim, &format!("/v1/kv/r?acquire={a}"), b"");
    assert_eq!(
        put(&sim, &format!("/v1/kv/r?release={a}"), b"").text(),
        "true"
    );
    assert_eq!(
        put(&sim, &format!("/v1/kv/r?acquire={b}"), b"").text(),
        "true",
        "no delay after release"
    );
    put(&sim, &format!("/v1/kv/r?release={b}"), b"");
    put(&sim, &format!("/v1/kv/r?acquire={a}"), b"");
    put(&sim, &format!("/v1/session/destroy/{a}"), b"");
    assert!(
        entry(&sim, "r").get("Session").is_none(),
        "destroy released the key"
    );
    assert_eq!(
        put(&sim, &format!("/v1/kv/r?acquire={b}"), b"").text(),
        "false",
        "lock-delay after destroy"
    );
    let d = session(&sim, json!({"Behavior": "delete", "LockDelay": 0}));
    put(&sim, &format!("/v1/kv/gone?acquire={d}"), b"x");
    put(&sim, &format!("/v1/session/destroy/{d}"), b"");
    assert_eq!(
        http(&sim, "GET", "/v1/kv/gone", b"").status,
        404,
        "Behavior=delete deletes"
    );
}

// ---- A4: transactions ----

#[test]
fn a4_txn_results_errors_and_limits() {
    let sim = ConsulSim::start();
    let r = txn(
        &sim,
        json!([
            {"KV": {"Verb": "set", "Key": "x", "Value": b64_encode(b"1")}},
            {"KV": {"Verb": "get", "Key": "x"}},
            {"KV": {"Verb": "delete", "Key": "nothing"}},
        ]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("X-Consul-Index").is_none() && r.header("X-Consul-KnownLeader").is_none());
    let v = r.json();
    assert!(v["Errors"].is_null());
    let results = v["Results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "delete verbs give no result");
    assert!(
        results[0]["KV"]["Value"].is_null(),
        "write results carry no value"
    );
    assert_eq!(results[1]["KV"]["Value"], b64_encode(b"1"));
    assert_eq!(
        results[0]["KV"]["ModifyIndex"],
        results[1]["KV"]["ModifyIndex"]
    );
    // Every failure is listed, and nothing is applied.
    let r = txn(
        &sim,
        json!([
            {"KV": {"Verb": "set", "Key": "y", "Value": b64_encode(b"2")}},
            {"KV": {"Verb": "cas", "Key": "x", "Index": 999_999, "Value": ""}},
            {"KV": {"Verb": "get", "Key": "absent"}},
            {"KV": {"Verb": "check-not-exists", "Key": "x"}},
        ]),
    );
    assert_eq!(r.status, 409);
    let v = r.json();
    assert!(v["Results"].is_null());
    let errs: Vec<(u64, String)> = v["Errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["OpIndex"].as_u64().unwrap(),
                e["What"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        errs,
        vec![
            (1, "failed to set key \"x\", index is stale".to_string()),
            (2, "key \"absent\" doesn't exist".to_string()),
            (3, "key \"x\" exists".to_string()),
        ]
    );
    assert_eq!(
        http(&sim, "GET", "/v1/kv/y", b"").status,
        404,
        "rolled back"
    );
    // Read-only: KnownLeader but no index.
    let r = txn(&sim, json!([{"KV": {"Verb": "get-tree", "Key": ""}}]));
    assert_eq!(r.status, 200);
    assert!(r.header("X-Consul-Index").is_none());
    assert_eq!(r.header("X-Consul-KnownLeader"), Some("true"));
    // 64 ops are fine, 65 are not; bad JSON is 400; an oversized value is 413.
    let ops: Vec<Value> = (0..64)
        .map(|i| json!({"KV": {"Verb": "get-or-empty", "Key": format!("k{i}")}}))
        .collect();
    assert_eq!(txn(&sim, json!(ops)).status, 200);
    let ops: Vec<Value> = (0..65)
        .map(|i| json!({"KV": {"Verb": "get-or-empty", "Key": format!("k{i}")}}))
        .collect();
    let r = txn(&sim, json!(ops));
    assert_eq!(
        (r.status, r.text().as_str()),
        (413, "Transaction contains too many operations (65 > 64)")
    );
    assert_eq!(put(&sim, "/v1/txn", b"{not json").status, 400);
    let big = b64_encode(&vec![0u8; 400_000]);
    assert_eq!(
        txn(
            &sim,
            json!([{"KV": {"Verb": "set", "Key": "b", "Value": big}}])
        )
        .status,
        413,
        "body over 512 KiB"
    );
}

#[test]
fn a4_a6_lock_verb_returns_the_acquiring_modify_index() {
    let sim = ConsulSim::start();
    let a = session(&sim, json!({"LockDelay": 0}));
    let b = session(&sim, json!({"LockDelay": 0}));
    let lock = |s: &str| {
        txn(
            &sim,
            json!([{"KV": {"Verb": "lock", "Key": "L", "Session": s, "Flags": 7}}]),
        )
    };
    let unlock = |s: &str| {
        txn(
            &sim,
            json!([{"KV": {"Verb": "unlock", "Key": "L", "Session": s, "Flags": 7}}]),
        )
    };
    let r = lock(&a);
    assert_eq!(r.status, 200);
    let kv = &r.json()["Results"][0]["KV"];
    let t1 = kv["ModifyIndex"].as_u64().unwrap();
    assert_eq!(kv["LockIndex"], 1);
    assert_eq!(t1, entry(&sim, "L")["ModifyIndex"].as_u64().unwrap());
    let r = lock(&b);
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to lock key \"L\", lock is already held"
    );
    let r = unlock(&b);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to unlock key \"L\", lock isn't held, or is held by another session"
    );
    assert_eq!(unlock(&a).status, 200);
    let r = lock(&b);
    let t2 = r.json()["Results"][0]["KV"]["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert!(t2 > t1, "A6: acquiring ModifyIndex increases");
    let r = txn(
        &sim,
        json!([{"KV": {"Verb": "check-session", "Key": "L", "Session": a}}]),
    );
    assert_eq!(r.status, 409);
    assert!(r.json()["Errors"][0]["What"]
        .as_str()
        .unwrap()
        .starts_with("failed session check"));
    // A6: LockIndex is weak: back to 1 after delete and re-create.
    http(&sim, "DELETE", "/v1/kv/L", b"");
    let r = lock(&a);
    let kv = &r.json()["Results"][0]["KV"];
    assert_eq!(kv["LockIndex"], 1);
    assert!(kv["ModifyIndex"].as_u64().unwrap() > t2);
    let r = txn(
        &sim,
        json!([{"KV": {"Verb": "lock", "Key": "L2", "Session": "nope"}}]),
    );
    assert_eq!(r.json()["Errors"][0]["What"], "invalid session \"nope\"");
}

// ---- the simulator's own options ----

#[test]
fn acl_token_and_datacenter() {
    let sim = ConsulSim::start_with(SimOptions {
        acl_token: Some("secret".into()),
        ..SimOptions::default()
    })
    .unwrap();
    assert_eq!(http(&sim, "GET", "/v1/kv/a", b"").status, 403);
    let r = http_with(&sim, "GET", "/v1/kv/a", b"", &[("X-Consul-Token", "wrong")]);
    assert_eq!(r.status, 403);
    let r = http_with(
        &sim,
        "GET",
        "/v1/kv/a",
        b"",
        &[("X-Consul-Token", "secret")],
    );
    assert_eq!(r.status, 404);
    let r = http_with(
        &sim,
        "GET",
        "/v1/kv/a?dc=mars",
        b"",
        &[("X-Consul-Token", "secret")],
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "No path to datacenter")
    );
}

// ---- fidelity: an independent client library drives the simulator ----

/// Python's py-consul (installed by `scripts/test.sh`) runs KV put/get/cas, flags, recurse,
/// blocking gets, sessions, acquire/release, destroy and transactions against the simulator,
/// with its own expectations of a Consul server. Skipped, with a notice, only if Python cannot
/// import it.
#[test]
fn fidelity_with_py_consul() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import consul"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            use std::io::Write;
            // Straight to stderr, past the test harness's output capture.
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: fidelity_with_py_consul SKIPPED: {python} cannot import py-consul ({}); scripts/test.sh installs it",
                match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                }
            );
            return;
        }
    }
    let sim = ConsulSim::start();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/consul_fidelity.py"
    );
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(sim.addr().port().to_string())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-consul fidelity check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
    println!("{stdout}");
}
