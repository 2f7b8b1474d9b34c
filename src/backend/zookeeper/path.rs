//! The reversible mapping between coordkit keys / lock names and znode paths.
//!
//! - key `s1/s2/…/sn` ↦ `<root>/kv/e(s1)~/e(s2)~/…/e(sn)`: every segment but the last becomes a
//!   *directory* znode whose name ends in `~`; the last becomes the *key* znode (no `~`). A key
//!   and a "directory" of other keys therefore never share a znode (`a/b` is `…/a~/b`, while
//!   `a/b/c` lives under `…/a~/b~/`), so key znodes never have key children and directories never
//!   hold data.
//! - `e(s)` escapes every byte outside `[A-Za-z0-9_.-]` as `%XX`, and a whole segment `.` or `..`
//!   as `%2E` / `%2E%2E`. Keys that follow the portable grammar contain no such bytes, so for
//!   them `e(s) = s`; the escaping keeps the mapping total and reversible anyway.
//! - Names starting with `~` are internal (the `~keep` and `~ttl` children of a key znode, the
//!   `~clock` znode, see `kv.rs`) and never map to a key.
//! - lock `n1/…/nk` ↦ `<root>/locks/n1/…/nk`, the directory whose children are the lock's
//!   contender nodes (Apache Curator's `InterProcessMutex` layout, so Curator's
//!   `InterProcessMutex(client, "/locks/NAME")` contends for the same lock).
//!
//! ZooKeeper reserves `/zookeeper`; keys and locks always live below `<root>/kv` and
//! `<root>/locks`, and the root (chroot) may not be `/zookeeper` or below it, so no key or lock
//! name can reach the reserved tree.

/// The suffix that marks a directory znode.
pub const DIR_SUFFIX: char = '~';
/// The name of the child that pins a key that was made permanent after having a TTL.
pub const PIN: &str = "~keep";
/// The name of the child that marks a TTL key and holds its TTL (see `kv.rs`).
pub const TTL_MARK: &str = "~ttl";
/// The znode under `<root>/kv` whose writes sample the server's clock (see `kv.rs`).
pub const CLOCK: &str = "~clock";

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Escapes one key segment into a znode name (without the directory suffix).
pub fn escape_segment(seg: &str) -> String {
    if seg == "." || seg == ".." {
        return "%2E".repeat(seg.len());
    }
    let mut out = String::with_capacity(seg.len());
    for &b in seg.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`escape_segment`]; `None` if `name` is not an escaped segment.
pub fn unescape_segment(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

/// The znode that holds data key `key` under `root` (`""` or `/chroot`).
pub fn key_path(root: &str, key: &str) -> String {
    let mut path = format!("{root}/kv");
    let segments: Vec<&str> = key.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        path.push('/');
        path.push_str(&escape_segment(seg));
        if i + 1 < segments.len() {
            path.push(DIR_SUFFIX);
        }
    }
    path
}

/// The directory znode for the complete segments `dir` (a key prefix ending in `/`, or empty).
pub fn dir_path(root: &str, dir: &str) -> String {
    let mut path = format!("{root}/kv");
    for seg in dir.split('/').filter(|s| !s.is_empty()) {
        path.push('/');
        path.push_str(&escape_segment(seg));
        path.push(DIR_SUFFIX);
    }
    path
}

/// The key a znode path stands for, or `None` for directories, internal nodes and anything
/// outside `<root>/kv`.
pub fn path_to_key(root: &str, path: &str) -> Option<String> {
    let rest = path.strip_prefix(root)?.strip_prefix("/kv/")?;
    let names: Vec<&str> = rest.split('/').collect();
    let mut key = String::new();
    for (i, name) in names.iter().enumerate() {
        if i + 1 < names.len() {
            let seg = name.strip_suffix(DIR_SUFFIX)?;
            key.push_str(&unescape_segment(seg)?);
            key.push('/');
        } else {
            if name.starts_with(DIR_SUFFIX) || name.ends_with(DIR_SUFFIX) {
                return None;
            }
            key.push_str(&unescape_segment(name)?);
        }
    }
    Some(key)
}

/// Splits a prefix into its complete directory part (ending in `/` or empty) and the partial
/// last segment: `a/b/c` ↦ (`a/b/`, `c`).
pub fn split_prefix(prefix: &str) -> (&str, &str) {
    match prefix.rfind('/') {
        Some(i) => (&prefix[..=i], &prefix[i + 1..]),
        None => ("", prefix),
    }
}

/// The directory znode of lock `name`: its children are the contenders.
pub fn lock_dir(root: &str, name: &str) -> String {
    format!("{root}/locks/{name}")
}

/// The directory znode of election `name` (Curator `LeaderLatch`'s latch path): its
/// children are the contenders.
pub fn election_dir(root: &str, name: &str) -> String {
    format!("{root}/elections/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for root in ["", "/app", "/a/b"] {
            for key in [
                "a",
                "a/b",
                "a/b/c",
                "x.y/z-1/_q",
                "zookeeper",
                "kv/locks",
                "a..b/.x",
            ] {
                let p = key_path(root, key);
                assert_eq!(path_to_key(root, &p).as_deref(), Some(key), "{p}");
            }
        }
        assert_eq!(key_path("", "a/b/c"), "/kv/a~/b~/c");
        assert_eq!(key_path("/app", "zookeeper"), "/app/kv/zookeeper");
        assert_eq!(dir_path("", "a/b/"), "/kv/a~/b~");
        assert_eq!(dir_path("/r", ""), "/r/kv");
    }

    #[test]
    fn escaping_is_reversible_for_any_segment() {
        for seg in [".", "..", "a b", "ü", "a%b", "x~", "~y", "a/b"] {
            let e = escape_segment(seg);
            assert!(e.bytes().all(|b| plain(b) || b == b'%'), "{e}");
            assert_eq!(unescape_segment(&e).as_deref(), Some(seg));
        }
    }

    #[test]
    fn directories_and_internal_nodes_are_not_keys() {
        assert_eq!(path_to_key("", "/kv/a~"), None);
        assert_eq!(path_to_key("", "/kv/a~/b~"), None);
        assert_eq!(path_to_key("", "/kv/a~/b/~keep"), None);
        assert_eq!(path_to_key("", "/kv"), None);
        assert_eq!(path_to_key("", "/locks/a"), None);
        assert_eq!(path_to_key("/app", "/kv/a"), None);
        assert_eq!(path_to_key("", "/kv/a b"), None);
    }

    #[test]
    fn prefixes_split() {
        assert_eq!(split_prefix("a/b/c"), ("a/b/", "c"));
        assert_eq!(split_prefix("a/"), ("a/", ""));
        assert_eq!(split_prefix("ab"), ("", "ab"));
        assert_eq!(split_prefix(""), ("", ""));
    }
}
