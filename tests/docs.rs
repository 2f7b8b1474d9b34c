//! The documentation's code blocks are run: shell samples against a real etcd server with the
//! `coordkit` binary on `PATH`, TOML samples parsed and resolved as configuration files. (Rust
//! samples are doctests: see the `*DocDoctests` items in `src/lib.rs`.)

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use coordkit::config_file::{ConfigFile, Env, Resolved};

const DOCS: &[&str] = &[
    "docs/locking.md",
    "docs/configuration.md",
    "docs/cli.md",
    "compose/README.md",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced code blocks of a markdown file: (language, first line number, text).
fn blocks(path: &Path) -> Vec<(String, usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut current: Option<(String, usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), i + 2, String::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, _, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "{}: unclosed code block", path.display());
    out
}

/// Variables the TOML samples read with `X_env`.
fn sample_env() -> Env {
    [
        ("ETCD_PASSWORD", "etcd-secret"),
        ("ZK_DIGEST", "app:zk-secret"),
        ("CONSUL_HTTP_TOKEN", "consul-secret"),
        ("WEST_SHARD_URL", "memory://"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn resolve_toml(what: &str, text: &str) -> Resolved {
    let resolved = ConfigFile::parse(text)
        .and_then(|f| f.resolve(&sample_env()))
        .unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
    let shown = format!("{resolved:?}");
    for secret in ["etcd-secret", "zk-secret", "consul-secret"] {
        assert!(
            !shown.contains(secret),
            "{what}: Debug shows a secret: {shown}"
        );
    }
    resolved
}

/// Every block is Rust (a doctest), shell (run below) or TOML (resolved below).
#[test]
fn every_block_is_checked() {
    for doc in DOCS {
        for (lang, line, _) in blocks(&root().join(doc)) {
            assert!(
                matches!(lang.as_str(), "rust" | "" | "sh" | "toml"),
                "{doc}:{line}: a ```{lang} block is neither compiled nor run by a test"
            );
        }
    }
}

#[test]
fn toml_samples_resolve() {
    let mut n = 0;
    for doc in DOCS {
        for (lang, line, text) in blocks(&root().join(doc)) {
            if lang == "toml" {
                resolve_toml(&format!("{doc}:{line}"), &text);
                n += 1;
            }
        }
    }
    assert!(n >= 6, "only {n} TOML samples found");
}

/// The example file resolves as it is, and each commented-out backend section resolves when
/// uncommented.
#[test]
fn example_file_resolves_with_every_section() {
    let text = std::fs::read_to_string(root().join("docs/coordkit.example.toml")).unwrap();
    let resolved = resolve_toml("coordkit.example.toml", &text);
    #[cfg(feature = "etcd")]
    assert!(
        resolved
            .config::<coordkit::backend::etcd::EtcdConfig>()
            .is_some(),
        "{resolved:?}"
    );
    let _ = resolved;
    let mut sections = 0;
    for section in text.split("\n# --- ").skip(1) {
        let title = section.lines().next().unwrap_or_default().to_string();
        if title.starts_with("One backend by URL") || title.starts_with("etcd") {
            continue;
        }
        let body: String = section
            .lines()
            .skip(1)
            .filter_map(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = resolve_toml(&format!("example section {title:?}"), &body);
        let expected = if title.starts_with("ZooKeeper") {
            "ZkConfig"
        } else if title.starts_with("Consul") {
            "ConsulConfig"
        } else {
            "ShardedConfig"
        };
        assert!(
            format!("{r:?}").starts_with(&format!("Config({expected}")),
            "{title}: {r:?}"
        );
        sections += 1;
    }
    assert_eq!(sections, 3);
}

/// Runs every ```sh block of the docs (except compose/README.md, whose blocks need Docker)
/// with bash -euo pipefail, `coordkit` first on PATH and COORDKIT_URL set to a real etcd,
/// each block in its own etcd namespace and temporary directory.
#[cfg(feature = "etcd")]
#[test]
fn shell_samples_run_against_etcd() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_coordkit"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let etcd_url = support::etcd::shared_url();
    let mut n = 0;
    for doc in DOCS.iter().filter(|d| d.starts_with("docs/")) {
        for (lang, line, text) in blocks(&root().join(doc)) {
            if lang != "sh" {
                continue;
            }
            n += 1;
            let dir = support::fresh_dir("docs-sh");
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &text])
                .current_dir(&dir)
                .env("PATH", &path)
                .env("COORDKIT_URL", format!("{etcd_url}?namespace=doc{n}/"))
                .env_remove("COORDKIT_CONFIG")
                .env_remove("COORDKIT_LOG")
                .output()
                .expect("run bash");
            assert!(
                out.status.success(),
                "{doc}:{line}: exit {:?}\nstdout: {}\nstderr: {}\n{text}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(n >= 6, "only {n} shell samples found");
}

/// compose/README.md's shell blocks: the validator block is run; the blocks that start Docker
/// containers cannot run here (no Docker engine on these machines), so they are checked
/// instead — every compose file they name exists, and every `127.0.0.1:PORT` they point
/// coordkit at is a port that file publishes.
#[test]
fn compose_readme_blocks() {
    let mut docker_blocks = 0;
    for (lang, line, text) in blocks(&root().join("compose/README.md")) {
        if lang != "sh" {
            continue;
        }
        if !text.contains("docker compose") {
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &text])
                .current_dir(root())
                .output()
                .expect("run bash");
            assert!(
                out.status.success(),
                "compose/README.md:{line}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        docker_blocks += 1;
        let file = text
            .split_whitespace()
            .find(|w| w.starts_with("compose/") && w.ends_with(".yaml"))
            .unwrap_or_else(|| panic!("compose/README.md:{line}: no compose file named"));
        let yaml = std::fs::read_to_string(root().join(file))
            .unwrap_or_else(|e| panic!("compose/README.md:{line}: {file}: {e}"));
        let mut ports = 0;
        for part in text.split("127.0.0.1:").skip(1) {
            let port: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
            assert!(
                yaml.contains(&format!("\"127.0.0.1:{port}:")),
                "compose/README.md:{line}: {file} does not publish port {port}"
            );
            ports += 1;
        }
        assert!(ports > 0, "compose/README.md:{line}: no URL");
    }
    assert_eq!(docker_blocks, 3);
}

/// The README's command-line quick start runs as written with no server at all, on the two
/// URLs it names for that (`sqlite://` and `file://` on local paths): its commands after the
/// install and `export` lines, with the programs it names (`-- ./name`) to run under a lock or a
/// leadership.
#[cfg(all(feature = "sqlite", feature = "file", feature = "cli"))]
#[test]
fn readme_quick_start_runs_with_no_server() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_coordkit"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = &readme[readme
        .find("## On the command line")
        .expect("the README's command-line section")..];
    let block = blocks_of(section)
        .into_iter()
        .find(|(lang, _)| lang == "sh")
        .expect("a sh block")
        .1;
    // `coordkit leader` exits 3 when nobody leads, as its comment says: after the `elect`
    // line has finished, nobody does.
    let commands: String = block
        .lines()
        .filter(|l| !l.starts_with("cargo install") && !l.starts_with("export COORDKIT_URL"))
        .map(|l| match l.strip_prefix("coordkit leader ") {
            Some(rest) => {
                let args = rest.split('#').next().unwrap_or("").trim();
                format!("coordkit leader {args} || test $? -eq 3\n")
            }
            None => format!("{l}\n"),
        })
        .collect();
    assert!(commands.contains("coordkit lock"), "{commands}");
    // The programs the sample runs under a lock or a leadership (`-- ./name`).
    let programs: Vec<String> = commands
        .split("-- ./")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect();
    assert!(!programs.is_empty(), "{commands}");
    for scheme in ["sqlite", "file"] {
        let dir = support::fresh_dir("readme-sh");
        for p in &programs {
            let path = dir.join(p);
            let body =
                format!("#!/bin/sh\ntest -n \"$COORDKIT_FENCING_TOKEN\"\necho ran > {p}.out\n");
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let url = match scheme {
            "sqlite" => format!("sqlite://{}", dir.join("coordkit.db").display()),
            _ => format!("file://{}", dir.join("coordkit.d").display()),
        };
        // The background `watch` is stopped when the script ends.
        let script = format!("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{commands}");
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(&dir)
            .env("PATH", &path)
            .env("COORDKIT_URL", &url)
            .env_remove("COORDKIT_CONFIG")
            .env_remove("COORDKIT_LOG")
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{scheme}: exit {:?}\nstdout: {}\nstderr: {}\n{script}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("postgres://db1/app"), "{scheme}: {stdout}");
        for p in &programs {
            assert_eq!(
                std::fs::read_to_string(dir.join(format!("{p}.out"))).unwrap_or_default(),
                "ran\n",
                "{scheme}: {p} ran, with a fencing token"
            );
        }
    }
}

/// The fenced blocks of a markdown text: (language, text).
fn blocks_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}
