//! The docker compose files in `compose/` are valid: checked against the Compose Specification
//! schema by `compose/validate.py` (no Docker engine needed), and with `docker compose config`
//! too where a Docker CLI with the compose plugin is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

const FILES: &[&str] = &["etcd.yaml", "zookeeper.yaml", "consul.yaml"];

fn compose_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compose")
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(compose_dir().join("validate.py"))
        .args(files)
        .output()
        .expect("python3 runs (scripts/test.sh installs python3-yaml and python3-jsonschema)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn compose_files_validate() {
    let files: Vec<PathBuf> = FILES.iter().map(|f| compose_dir().join(f)).collect();
    let (ok, out) = validate(&files);
    assert!(ok, "{out}");
    for f in FILES {
        assert!(out.contains(&format!("{f}: ok")), "{out}");
    }
}

/// The etcd file without its third member.
fn two_services(good: &str) -> String {
    let start = good.find("  etcd3:\n").expect("etcd3 service");
    let end = good.find("\nvolumes:").expect("volumes");
    format!("{}{}", &good[..start], &good[end..])
}

#[test]
fn validator_rejects_broken_files() {
    let dir = std::env::temp_dir().join(format!("coordkit-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(compose_dir().join("etcd.yaml")).unwrap();
    let cases = [
        (
            "unknown-key.yaml",
            good.replace("hostname: etcd2", "hostnme: etcd2"),
            "hostnme",
        ),
        (
            "no-health.yaml",
            good.replace("  healthcheck:", "  x-no-healthcheck:"),
            "no health check",
        ),
        (
            "bad-yaml.yaml",
            format!("{good}\n  : [unclosed"),
            "cannot parse",
        ),
        (
            "two-services.yaml",
            two_services(&good),
            "expected 3 services",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, out) = validate(&[path]);
        assert!(!ok, "{name} was accepted: {out}");
        assert!(out.contains(needle), "{name}: {out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where `docker compose` works without an engine (it only parses here), it must accept the
/// files as well. On machines without the compose plugin this checks nothing and says so.
#[test]
fn docker_compose_config_accepts_files_where_available() {
    let available = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !available {
        eprintln!("notice: `docker compose` is not installed; only the schema check ran");
        return;
    }
    for f in FILES {
        let out = Command::new("docker")
            .args(["compose", "-f"])
            .arg(compose_dir().join(f))
            .args(["config", "--quiet"])
            .output()
            .expect("run docker compose");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
