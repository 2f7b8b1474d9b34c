//! The same operations as plain HTTP calls (reqwest) against the Consul KV, session and txn API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;

use crate::harness::{err, Contender, Held, Op, Target, R};

const KEY: &str = "rawbench/key";
const CAS_KEY: &str = "rawbench/cas";
const LOCK: &str = "rawbench/locks/uncontended";

pub struct ConsulRaw {
    http: reqwest::Client,
    base: String,
    session: String,
    version: AtomicU64,
    value: Vec<u8>,
}

fn client() -> R<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?)
}

async fn ok_true(resp: reqwest::Response) -> R<bool> {
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        return Err(err(format!("HTTP {status}: {body}")));
    }
    Ok(body.trim() == "true")
}

/// The simulator's request counts by kind (`GET /_sim/requests`, see
/// `tests/support/consul_sim`).
pub async fn request_counts(
    http: &reqwest::Client,
    base: &str,
) -> R<std::collections::BTreeMap<String, f64>> {
    let r = http
        .get(format!("{base}/_sim/requests"))
        .send()
        .await?
        .error_for_status()?;
    let v: std::collections::BTreeMap<String, u64> = serde_json::from_slice(&r.bytes().await?)?;
    Ok(v.into_iter().map(|(k, n)| (k, n as f64)).collect())
}

/// A session for locks: release behaviour, no lock-delay, 60 s TTL (not renewed during a run).
pub async fn create_session(http: &reqwest::Client, base: &str) -> R<String> {
    let resp = http
        .put(format!("{base}/v1/session/create"))
        .body(r#"{"Name":"rawbench","TTL":"60s","Behavior":"release","LockDelay":"0s"}"#)
        .send()
        .await?
        .error_for_status()?;
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
    v["ID"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err("no session ID"))
}

impl ConsulRaw {
    pub async fn new(base: &str, value_size: usize) -> R<Self> {
        let http = client()?;
        let session = create_session(&http, base).await?;
        Ok(ConsulRaw {
            http,
            base: base.to_string(),
            session,
            version: AtomicU64::new(0),
            value: vec![b'v'; value_size],
        })
    }

    async fn put(&self, key: &str) -> R<()> {
        let r = self
            .http
            .put(format!("{}/v1/kv/{key}", self.base))
            .body(self.value.clone())
            .send()
            .await?;
        if !ok_true(r).await? {
            return Err(err("put returned false"));
        }
        Ok(())
    }

    async fn modify_index(&self, key: &str) -> R<u64> {
        let r = self
            .http
            .get(format!("{}/v1/kv/{key}", self.base))
            .send()
            .await?
            .error_for_status()?;
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        v[0]["ModifyIndex"]
            .as_u64()
            .ok_or_else(|| err("no ModifyIndex"))
    }
}

#[async_trait]
impl Target for ConsulRaw {
    fn name(&self) -> String {
        "reqwest HTTP".into()
    }

    fn supports(&self, op: Op) -> bool {
        !op.is_recipe()
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => self.put(KEY).await?,
            Op::Cas => {
                self.put(CAS_KEY).await?;
                self.version
                    .store(self.modify_index(CAS_KEY).await?, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }

    async fn run(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                let q = if op == Op::GetStrong {
                    "consistent"
                } else {
                    "stale"
                };
                let r = self
                    .http
                    .get(format!("{}/v1/kv/{KEY}?{q}", self.base))
                    .send()
                    .await?
                    .error_for_status()?;
                let _ = r.bytes().await?;
            }
            Op::Put => self.put(KEY).await?,
            Op::Cas => {
                let idx = self.version.load(Ordering::SeqCst);
                let body = serde_json::json!([{"KV": {
                    "Verb": "cas",
                    "Key": CAS_KEY,
                    "Value": base64::engine::general_purpose::STANDARD.encode(&self.value),
                    "Index": idx,
                }}]);
                let r = self
                    .http
                    .put(format!("{}/v1/txn", self.base))
                    .body(serde_json::to_vec(&body)?)
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(err(format!("raw CAS failed: HTTP {}", r.status())));
                }
                let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
                let new = v["Results"][0]["KV"]["ModifyIndex"]
                    .as_u64()
                    .ok_or_else(|| err("no ModifyIndex in txn result"))?;
                self.version.store(new, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let h = acquire(&self.http, &self.base, &self.session, LOCK).await?;
                h.release().await?;
            }
        }
        Ok(())
    }
}

struct ConsulHeld {
    http: reqwest::Client,
    url: String,
    session: String,
}

#[async_trait]
impl Held for ConsulHeld {
    async fn release(self: Box<Self>) -> R<()> {
        let r = self
            .http
            .put(format!("{}?release={}", self.url, self.session))
            .send()
            .await?;
        if !ok_true(r).await? {
            return Err(err("release returned false"));
        }
        Ok(())
    }
}

/// `?acquire=`; when held by another session, a blocking query on the key until its `Session`
/// is gone, then try again (the Go `api.Lock` loop, without its lock-delay sleep).
async fn acquire(http: &reqwest::Client, base: &str, session: &str, key: &str) -> R<Box<dyn Held>> {
    let url = format!("{base}/v1/kv/{key}");
    loop {
        let r = http.put(format!("{url}?acquire={session}")).send().await?;
        if ok_true(r).await? {
            return Ok(Box::new(ConsulHeld {
                http: http.clone(),
                url,
                session: session.to_string(),
            }));
        }
        let mut index = 0u64;
        loop {
            let r = http
                .get(format!("{url}?index={index}&wait=30s"))
                .send()
                .await?;
            let status = r.status();
            let next: u64 = r
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            if status == reqwest::StatusCode::NOT_FOUND {
                break;
            }
            let v: serde_json::Value =
                serde_json::from_slice(&r.error_for_status()?.bytes().await?)?;
            if v[0].get("Session").and_then(|s| s.as_str()).is_none() {
                break;
            }
            index = if next < index { 0 } else { next.max(1) };
        }
    }
}

/// One raw Consul contender: its own HTTP client and session.
pub struct ConsulContender {
    http: reqwest::Client,
    base: String,
    session: String,
}

impl ConsulContender {
    pub async fn new(base: &str) -> R<Self> {
        let http = client()?;
        let session = create_session(&http, base).await?;
        Ok(ConsulContender {
            http,
            base: base.to_string(),
            session,
        })
    }
}

#[async_trait]
impl Contender for ConsulContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        acquire(&self.http, &self.base, &self.session, name).await
    }
}
