//! Choosing the backend, and the key-value subcommands with their output.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coordkit::config_file::{process_env, ConfigFile, Env, RedactedUrl, Resolved};
use coordkit::{Backend, Consistency, Entry, Leader, PutOptions, WatchEvent};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::exit::{CliError, FAILED, NOT_FOUND, OK};

/// Where the backend comes from.
///
/// `--url` wins; else `--config` (or `COORDKIT_CONFIG`), with environment overrides; else
/// `COORDKIT_URL`.
///
/// # Errors
/// A usage error when both `--url` and `--config` are given or nothing names a backend; the
/// configuration's error when the file is invalid.
pub fn choose_backend(
    url: Option<&str>,
    config: Option<&Path>,
    env: &Env,
) -> Result<Resolved, CliError> {
    match (url, config) {
        (Some(_), Some(_)) => Err(CliError::usage(
            "give either --url or --config (COORDKIT_CONFIG), not both",
        )),
        (Some(url), None) => Ok(Resolved::Url(RedactedUrl::new(url))),
        (None, Some(path)) => Ok(ConfigFile::load(path)?
            .resolve(env)
            .map_err(|e| e.context(path.display()))?),
        (None, None) => match env.get("COORDKIT_URL").filter(|u| !u.is_empty()) {
            Some(url) => Ok(Resolved::Url(RedactedUrl::new(url.clone()))),
            None => Err(CliError::usage(
                "no backend given: use --url URL (e.g. --url etcd://127.0.0.1:2379), \
                 --config FILE, or set COORDKIT_URL",
            )),
        },
    }
}

/// Connects within `timeout`.
pub async fn connect(target: &Resolved, timeout: Duration) -> Result<Arc<dyn Backend>, CliError> {
    bounded(timeout, "connecting", target.connect()).await
}

/// Runs `fut`, failing with a timeout error (exit 1) after `timeout`.
pub async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = coordkit::Result<T>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(CliError::from),
        Err(_) => Err(CliError::new(
            FAILED,
            "timeout",
            format!(
                "{what} did not finish within {} (raise --timeout)",
                coordkit::config_file::format_duration(timeout)
            ),
        )),
    }
}

/// [`choose_backend`] with the process environment.
pub fn process_backend(url: Option<&str>, config: Option<&Path>) -> Result<Resolved, CliError> {
    choose_backend(url, config, &process_env())
}

/// The JSON form of an entry: `value` when it is UTF-8, else `value_base64`.
pub fn entry_json(e: &Entry) -> Value {
    let mut v = json!({ "key": e.key, "version": e.version.as_raw() });
    match std::str::from_utf8(&e.value) {
        Ok(s) => v["value"] = json!(s),
        Err(_) => v["value_base64"] = json!(base64(&e.value)),
    }
    v
}

/// Standard base64 with padding (RFC 4648), by the `base64` crate.
pub fn base64(bytes: &[u8]) -> String {
    use ::base64::Engine as _;
    ::base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One watch event as a human line.
pub fn event_line(ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Put(e) => format!(
            "PUT {} {}",
            e.key,
            String::from_utf8_lossy(&e.value).escape_debug()
        ),
        WatchEvent::Delete { key } => format!("DELETE {key}"),
        WatchEvent::Coalesced { key } => format!("COALESCED {key}"),
    }
}

/// One watch event as JSON.
pub fn event_json(ev: &WatchEvent) -> Value {
    match ev {
        WatchEvent::Put(e) => {
            let mut v = entry_json(e);
            v["event"] = json!("put");
            v
        }
        WatchEvent::Delete { key } => json!({ "event": "delete", "key": key }),
        WatchEvent::Coalesced { key } => json!({ "event": "coalesced", "key": key }),
    }
}

fn write_out(out: &mut dyn Write, bytes: &[u8]) -> Result<(), CliError> {
    out.write_all(bytes)
        .and_then(|_| out.flush())
        .map_err(|e| CliError::new(FAILED, "io", format!("cannot write output: {e}")))
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Strong
    }
}

/// `get`: the value and a newline (or JSON); exit 3 when absent.
pub async fn get(
    b: &dyn Backend,
    key: &str,
    stale: bool,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    let entry = bounded(timeout, "get", b.get(key, consistency(stale))).await?;
    match entry {
        None => Err(CliError::new(
            NOT_FOUND,
            "not found",
            format!("key {key:?} not found"),
        )),
        Some(e) if json => {
            write_out(out, format!("{}\n", entry_json(&e)).as_bytes())?;
            Ok(OK)
        }
        Some(mut e) => {
            e.value.push(b'\n');
            write_out(out, &e.value)?;
            Ok(OK)
        }
    }
}

/// `put`.
pub async fn put(
    b: &dyn Backend,
    key: &str,
    value: Vec<u8>,
    ttl: Option<Duration>,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    let opts = match ttl {
        Some(t) => PutOptions::ttl(t),
        None => PutOptions::default(),
    };
    let version = bounded(timeout, "put", b.put(key, value, opts)).await?;
    let line = if json {
        json!({ "key": key, "version": version.as_raw() }).to_string()
    } else {
        format!("OK version {version}")
    };
    write_out(out, format!("{line}\n").as_bytes())?;
    Ok(OK)
}

/// `del`.
pub async fn del(
    b: &dyn Backend,
    key: &str,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    bounded(timeout, "del", b.delete(key)).await?;
    let line = if json {
        json!({ "key": key, "deleted": true }).to_string()
    } else {
        "OK".to_string()
    };
    write_out(out, format!("{line}\n").as_bytes())?;
    Ok(OK)
}

/// `ls`: keys one a line; with `long`, `KEY VERSION VALUE`; with `json`, one JSON array.
pub async fn ls(
    b: &dyn Backend,
    prefix: &str,
    long: bool,
    stale: bool,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    let entries = bounded(timeout, "ls", b.list(prefix, consistency(stale))).await?;
    let mut text = String::new();
    if json {
        let arr: Vec<Value> = entries.iter().map(entry_json).collect();
        text.push_str(&Value::Array(arr).to_string());
        text.push('\n');
    } else {
        for e in &entries {
            if long {
                text.push_str(&format!(
                    "{}\t{}\t{}\n",
                    e.key,
                    e.version,
                    String::from_utf8_lossy(&e.value).escape_debug()
                ));
            } else {
                text.push_str(&e.key);
                text.push('\n');
            }
        }
    }
    write_out(out, text.as_bytes())?;
    Ok(OK)
}

/// `watch`: prints events until `stop` resolves (exit 0) or the watch fails (exit 1).
pub async fn watch(
    b: &dyn Backend,
    prefix: &str,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<i32, CliError> {
    let mut stream = bounded(timeout, "watch", b.watch(prefix)).await?;
    crate::exit::note!(
        "coordkit: watching {:?} (Ctrl-C to stop)",
        if prefix.is_empty() { "" } else { prefix }
    );
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(OK),
            next = stream.next() => match next {
                None => return Err(CliError::new(FAILED, "watch ended", "the watch ended")),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(ev)) => {
                    let line = if json { event_json(&ev).to_string() } else { event_line(&ev) };
                    write_out(out, format!("{line}\n").as_bytes())?;
                }
            }
        }
    }
}

/// One leader state as a human line: `TERM VALUE`, or `-` for no leader.
pub fn leader_line(l: Option<&Leader>) -> String {
    match l {
        Some(l) => format!(
            "{} {}",
            l.term,
            String::from_utf8_lossy(&l.value).escape_debug()
        ),
        None => "-".to_string(),
    }
}

/// One leader state as JSON: `{"term": N, "value": "…"}` (`value_base64` for binary values),
/// or `{"leader": null}`.
pub fn leader_json(l: Option<&Leader>) -> Value {
    match l {
        Some(l) => {
            let mut v = json!({ "term": l.term.get() });
            match std::str::from_utf8(&l.value) {
                Ok(s) => v["value"] = json!(s),
                Err(_) => v["value_base64"] = json!(base64(&l.value)),
            }
            v
        }
        None => json!({ "leader": null }),
    }
}

/// `leader`: the leader's term and value (exit 3 when there is none); with `watch`, every
/// change after that too, until `stop`.
pub async fn leader(
    b: &dyn Backend,
    name: &str,
    watch: bool,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<i32, CliError> {
    let line = |l: Option<&Leader>| {
        if json {
            leader_json(l).to_string()
        } else {
            leader_line(l)
        }
    };
    if !watch {
        let l = bounded(timeout, "leader", b.leader(name)).await?;
        write_out(out, format!("{}\n", line(l.as_ref())).as_bytes())?;
        return Ok(if l.is_some() { OK } else { NOT_FOUND });
    }
    let mut stream = bounded(timeout, "observe", b.observe(name)).await?;
    crate::exit::note!("coordkit: following the leader of {name:?} (Ctrl-C to stop)");
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(OK),
            next = stream.next() => match next {
                None => return Err(CliError::new(FAILED, "watch ended", "the watch ended")),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(l)) => write_out(out, format!("{}\n", line(l.as_ref())).as_bytes())?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn url_of(r: Result<Resolved, CliError>) -> String {
        match r {
            Ok(Resolved::Url(u)) => u.expose().to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backend_precedence() {
        let env = env_of(&[("COORDKIT_URL", "memory://?from=env")]);
        assert_eq!(
            url_of(choose_backend(Some("etcd://a:1"), None, &env)),
            "etcd://a:1"
        );
        assert_eq!(
            url_of(choose_backend(None, None, &env)),
            "memory://?from=env"
        );
        let e = choose_backend(None, None, &env_of(&[])).unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE);
        assert!(e.message.contains("--url"));
        let e = choose_backend(Some("x"), Some(Path::new("f")), &env).unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE);
        let e = choose_backend(None, Some(Path::new("/nonexistent/c.toml")), &env).unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE);
        assert!(e.message.contains("/nonexistent/c.toml"), "{}", e.message);
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[tokio::test]
    async fn leader_prints_term_and_value() {
        let b = coordkit::connect("memory://").await.unwrap();
        let t = Duration::from_secs(5);
        let mut out = Vec::new();
        let e = leader(
            &*b,
            "e/x",
            false,
            false,
            t,
            &mut out,
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!((e, out.as_slice()), (NOT_FOUND, &b"-\n"[..]));
        let g = b
            .campaign("e/x", b"host:1".to_vec(), &coordkit::LockOptions::new())
            .await
            .unwrap();
        out.clear();
        leader(
            &*b,
            "e/x",
            false,
            false,
            t,
            &mut out,
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{} host:1\n", g.term())
        );
        out.clear();
        leader(&*b, "e/x", false, true, t, &mut out, std::future::pending())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["term"], g.term().get());
        assert_eq!(v["value"], "host:1");
        // --watch: the current state, then the change, until stopped.
        out.clear();
        let stop = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let proclaim = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            g.proclaim(b"host:2".to_vec()).await.unwrap();
        };
        let (code, ()) = tokio::join!(leader(&*b, "e/x", true, false, t, &mut out, stop), proclaim);
        assert_eq!(code.unwrap(), OK);
        let term = g.term();
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{term} host:1\n{term} host:2\n")
        );
        let e = leader(
            &*b,
            "/bad",
            false,
            false,
            t,
            &mut out,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE);
    }

    #[tokio::test]
    async fn kv_subcommands_on_memory() {
        let b = coordkit::connect("memory://").await.unwrap();
        let t = Duration::from_secs(5);
        let mut out = Vec::new();
        put(&*b, "a/x", b"hello".to_vec(), None, false, t, &mut out)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&out).starts_with("OK version "));
        out.clear();
        put(&*b, "a/bin", vec![0xff, 0], None, true, t, &mut out)
            .await
            .unwrap();
        out.clear();
        get(&*b, "a/x", false, false, t, &mut out).await.unwrap();
        assert_eq!(out, b"hello\n");
        out.clear();
        ls(&*b, "a/", false, false, true, t, &mut out)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["key"], "a/bin");
        assert_eq!(v[0]["value_base64"], "/wA=");
        assert_eq!(v[1]["value"], "hello");
        out.clear();
        del(&*b, "a/x", false, t, &mut out).await.unwrap();
        let e = get(&*b, "a/x", false, false, t, &mut out)
            .await
            .unwrap_err();
        assert_eq!(e.code, NOT_FOUND);
        let e = get(&*b, "/bad", false, false, t, &mut out)
            .await
            .unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE);
    }

    #[tokio::test]
    async fn watch_prints_events_until_stopped() {
        let b = coordkit::connect("memory://").await.unwrap();
        let b2 = b.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            b2.put("w/a", b"1".to_vec(), PutOptions::default())
                .await
                .unwrap();
            b2.delete("w/a").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(());
        });
        let mut out = Vec::new();
        let code = watch(&*b, "w/", false, Duration::from_secs(5), &mut out, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        writer.await.unwrap();
        assert_eq!(code, OK);
        assert_eq!(String::from_utf8(out).unwrap(), "PUT w/a 1\nDELETE w/a\n");
    }
}
