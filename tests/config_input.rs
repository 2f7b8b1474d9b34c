//! Bad configuration input: absurd durations in every URL option and TOML setting, and secrets
//! in every URL form, which must not reach `Debug`, `Display`, error messages or logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordkit::config::{config_from_url, redact};
use coordkit::config_file::{ConfigFile, Env, RedactedUrl};
use coordkit::shard::ShardConfig;
use coordkit::ErrorKind;

/// Durations no setting may take: too large, not finite, negative, malformed.
const ABSURD: &[&str] = &[
    "1e300",
    "1e300s",
    "NaN",
    "nan",
    "inf",
    "-1s",
    "-5",
    "99999999999999999999h",
    "18446744073709551616s",
    "584942417356years",
    "20y",
    "1.7976931348623157e308",
    "0x10s",
    "10 parsecs",
];

/// (scheme and hosts, the duration options of that URL form)
#[allow(clippy::vec_init_then_push)] // the pushes depend on the features
fn duration_options() -> Vec<(&'static str, &'static [&'static str])> {
    let mut v: Vec<(&str, &[&str])> = Vec::new();
    #[cfg(feature = "etcd")]
    v.push(("etcd://127.0.0.1:1", &["timeout", "connect_timeout"]));
    #[cfg(feature = "zookeeper")]
    v.push((
        "zk://127.0.0.1:1",
        &[
            "session_timeout",
            "connect_timeout",
            "request_timeout",
            "min_session_timeout",
            "ttl_reap_interval",
        ],
    ));
    #[cfg(feature = "consul")]
    v.push((
        "consul://127.0.0.1:1",
        &["timeout", "connect_timeout", "lock_delay"],
    ));
    #[cfg(feature = "sqlite")]
    v.push(("sqlite:///tmp/x.db", &["busy_timeout", "poll_interval"]));
    #[cfg(feature = "postgres")]
    v.push((
        "postgres://127.0.0.1:1/db",
        &["connect_timeout", "request_timeout", "recheck"],
    ));
    v
}

/// Every duration option of every URL form refuses every absurd value with `InvalidConfig`,
/// without a panic and without connecting (the URLs name a closed port).
#[test]
fn absurd_durations_in_every_url_option() {
    let mut checked = 0;
    for (base, options) in duration_options() {
        for option in options {
            for value in ABSURD {
                let url = format!("{base}?{option}={}", value.replace(' ', "%20"));
                let r = std::panic::catch_unwind(|| config_from_url(&url));
                let r = r.unwrap_or_else(|_| panic!("{url}: panicked"));
                let e = r.expect_err(&url);
                assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}: {e}");
                checked += 1;
            }
        }
    }
    assert!(checked >= ABSURD.len(), "{checked}");
}

/// A bare number is refused where it is ambiguous (ZooKeeper read it as milliseconds), and
/// keeps its documented meaning, seconds, where it was one (etcd, Consul URL options).
#[test]
fn bare_numbers_keep_their_documented_meaning_or_are_refused() {
    #[cfg(feature = "zookeeper")]
    {
        let e = config_from_url("zk://h:1?session_timeout=10").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        let env: Env = [(
            "COORDKIT_ZOOKEEPER_SESSION_TIMEOUT".to_string(),
            "10".to_string(),
        )]
        .into();
        let file = ConfigFile::parse("[zookeeper]\nservers = [\"h:1\"]\n").unwrap();
        let e = file.resolve(&env).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        let env: Env = [(
            "COORDKIT_ZOOKEEPER_SESSION_TIMEOUT".to_string(),
            "10s".to_string(),
        )]
        .into();
        let r = file.resolve(&env).unwrap();
        let c: &coordkit::backend::zookeeper::ZkConfig = r.config().unwrap();
        assert_eq!(c.session_timeout, Duration::from_secs(10));
    }
    #[cfg(feature = "etcd")]
    {
        let c = config_from_url("etcd://h:1?timeout=10").unwrap();
        let c: &coordkit::backend::etcd::EtcdConfig = c.downcast_ref().unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(10));
    }
    #[cfg(feature = "consul")]
    {
        let c = config_from_url("consul://h?timeout=10").unwrap();
        let c: &coordkit::backend::consul::ConsulConfig = c.downcast_ref().unwrap();
        assert_eq!(c.timeout, Duration::from_secs(10));
    }
}

/// (table, a minimal valid body, its duration settings)
#[allow(clippy::vec_init_then_push)] // the pushes depend on the features
fn duration_settings() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    let mut v: Vec<(&str, &str, &[&str])> = Vec::new();
    #[cfg(feature = "etcd")]
    v.push((
        "etcd",
        "endpoints = [\"h:1\"]\n",
        &["request_timeout", "connect_timeout"],
    ));
    #[cfg(feature = "zookeeper")]
    v.push((
        "zookeeper",
        "servers = [\"h:1\"]\n",
        &[
            "session_timeout",
            "connect_timeout",
            "request_timeout",
            "min_session_timeout",
            "ttl_reap_interval",
        ],
    ));
    #[cfg(feature = "consul")]
    v.push((
        "consul",
        "",
        &[
            "timeout",
            "connect_timeout",
            "lock_delay",
            "timeout_ms",
            "connect_timeout_ms",
            "lock_delay_ms",
        ],
    ));
    #[cfg(feature = "sqlite")]
    v.push((
        "sqlite",
        "path = \"/tmp/x.db\"\n",
        &["busy_timeout", "poll_interval"],
    ));
    #[cfg(feature = "postgres")]
    v.push((
        "postgres",
        "host = \"127.0.0.1\"\nport = 1\n",
        &["connect_timeout", "request_timeout", "recheck"],
    ));
    v
}

/// Every duration setting of every TOML table refuses absurd values, as strings and as TOML
/// numbers (including `nan` and `inf`), with `InvalidConfig` naming the table.
#[test]
fn absurd_durations_in_every_toml_setting() {
    let numbers = [
        "1e300",
        "nan",
        "inf",
        "-inf",
        "-1",
        "-1.5",
        "18446744073709551616",
    ];
    for (table, body, settings) in duration_settings() {
        for setting in settings {
            let strings = ABSURD.iter().map(|v| format!("{v:?}"));
            for value in strings.chain(numbers.iter().map(|n| n.to_string())) {
                let text = format!("[{table}]\n{body}{setting} = {value}\n");
                let r = std::panic::catch_unwind(|| {
                    ConfigFile::parse(&text).and_then(|f| f.resolve(&Env::new()))
                });
                let r = r.unwrap_or_else(|_| panic!("{text}: panicked"));
                let e = r.expect_err(&text);
                assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{text}: {e}");
            }
        }
    }
}

/// Secret-bearing URLs in every form: (URL, the secrets in it).
#[allow(clippy::vec_init_then_push)] // the pushes depend on the features
fn secret_urls() -> Vec<(String, Vec<&'static str>)> {
    let nested = |u: &str| coordkit::config::url::percent_encode(u);
    let mut v = vec![(
        format!(
            "sharded+ring://?shard={}&shard={}",
            nested("memory://?token=MemTok3n"),
            nested("memory://?x=1&password=MemPassw0rd")
        ),
        vec!["MemTok3n", "MemPassw0rd"],
    )];
    #[cfg(feature = "etcd")]
    {
        v.push((
            "etcd://app:Hunter2pw@127.0.0.1:1?connect_timeout=200ms".into(),
            vec!["Hunter2pw"],
        ));
        v.push((
            "etcd://app:Multi%40Host@127.0.0.1:1,127.0.0.1:2?connect_timeout=200ms".into(),
            vec!["Multi%40Host", "Multi@Host"],
        ));
        v.push((
            "etcd://127.0.0.1:1?user=app&password=QueryPw9&connect_timeout=200ms".into(),
            vec!["QueryPw9"],
        ));
        v.push((
            format!(
                "sharded+ring://?shard={}&shard={}",
                nested("etcd://app:ShardPw1@127.0.0.1:1,127.0.0.1:2?connect_timeout=200ms"),
                nested("memory://")
            ),
            vec!["ShardPw1"],
        ));
    }
    #[cfg(feature = "zookeeper")]
    v.push((
        "zk://dig:ZkSecret5@127.0.0.1:1,127.0.0.1:2/app?connect_timeout=200ms".into(),
        vec!["ZkSecret5"],
    ));
    #[cfg(feature = "consul")]
    v.push((
        "consul://127.0.0.1:1?token=ConsulT0ken&connect_timeout=200ms&timeout=300ms".into(),
        vec!["ConsulT0ken"],
    ));
    v
}

fn assert_hidden(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{what} shows the secret {s:?}: {text}");
    }
}

/// Secrets are absent from `redact`, `RedactedUrl`'s `Debug` and `Display`, the parsed
/// configuration's `Debug`, and the error of a malformed variant of the URL.
#[test]
fn secrets_stay_out_of_debug_display_and_errors() {
    for (url, secrets) in secret_urls() {
        assert_hidden("redact", &redact(&url), &secrets);
        let r = RedactedUrl::new(url.clone());
        assert_hidden("RedactedUrl Debug", &format!("{r:?}"), &secrets);
        assert_hidden("RedactedUrl Display", &format!("{r}"), &secrets);
        let cfg = config_from_url(&url).unwrap_or_else(|e| panic!("{}: {e}", redact(&url)));
        assert_hidden("config Debug", &format!("{cfg:?}"), &secrets);
        for broken in [
            format!("{url}&nosuch=1"),
            format!("{url}&timeout=forever"),
            url.replacen("127.0.0.1:1", "127.0.0.1:99999", 1),
            format!("{url}#frag"),
            format!("{url} x"),
        ] {
            if let Err(e) = config_from_url(&broken) {
                assert_hidden("error", &e.to_string(), &secrets);
                assert_hidden("error Debug", &format!("{e:?}"), &secrets);
            }
        }
        let file = ConfigFile::parse(&format!("url = {url:?}\n")).unwrap();
        assert_hidden("ConfigFile Debug", &format!("{file:?}"), &secrets);
        let resolved = file.resolve(&Env::new()).unwrap();
        assert_hidden("Resolved Debug", &format!("{resolved:?}"), &secrets);
    }
}

/// A shard's identity (what the ring hashes) holds no credential: changing the password or
/// token of a shard URL leaves it, and so every key's placement, unchanged.
#[test]
fn shard_identity_has_no_credentials() {
    let pairs = [
        (
            "etcd://app:OldPw@h1:2379,h2:2379?namespace=a/",
            "etcd://app:NewPw@h1:2379,h2:2379?namespace=a/",
        ),
        (
            "consul://h:8500?token=OldTok",
            "consul://h:8500?token=NewTok",
        ),
        ("zk://u:OldPw@a:1,b:2/app", "zk://u:NewPw@a:1,b:2/app"),
        ("etcd://app:OldPw@h:1", "etcd://app:NewPw@h:1"),
    ];
    for (old, new) in pairs {
        let a = ShardConfig::new(old).effective_name();
        let b = ShardConfig::new(new).effective_name();
        assert_eq!(a, b, "{a} vs {b}");
        assert_hidden("shard identity", &a, &["OldPw", "OldTok"]);
    }
    // A URL without secrets is its own identity, as it always was.
    let plain = "etcd://h1:2379,h2:2379?namespace=a/";
    assert_eq!(ShardConfig::new(plain).effective_name(), plain);
}

/// A writer into a shared buffer, for capturing log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connecting with each secret-bearing URL to a closed port fails within a bounded time with
/// an error that hides the secret, and nothing logged at any level (spans included) shows it.
#[tokio::test]
async fn secrets_stay_out_of_logs_and_connect_errors() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for (url, secrets) in secret_urls() {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(20), coordkit::connect(&url))
            .await
            .unwrap_or_else(|_| panic!("{}: connect hangs", redact(&url)));
        match r {
            Ok(store) => {
                // Only memory shards connect; use them, so their spans are logged too.
                let _ = store.get("k", coordkit::Consistency::Strong).await;
            }
            Err(e) => {
                assert_hidden("connect error", &e.to_string(), &secrets);
                assert_hidden("connect error Debug", &format!("{e:?}"), &secrets);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert_hidden("logs", &text, &secrets);
    }
}
