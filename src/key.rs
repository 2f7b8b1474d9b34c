//! The portable key grammar, checked in one place for every backend.
//!
//! A key that is valid here is stored the same way on every backend, so switching the backend
//! in the configuration never turns a working key into an error. The grammar is the intersection
//! of what etcd, ZooKeeper znode paths and Consul's KV HTTP API all accept without escaping
//! surprises:
//!
//! - a key is one or more **segments** joined by a single `/`;
//! - a segment is one or more of `A–Z a–z 0–9 _ - .`, and is not `.` or `..`;
//! - no leading `/`, no trailing `/`, no empty segment (`//`);
//! - at most [`MAX_KEY_LEN`] bytes in all.
//!
//! Examples: `jobs/nightly-report`, `config/v2/db.primary`, `a`. Not keys: `""`, `/a`, `a/`,
//! `a//b`, `a/../b`, `a b`, `a:b`, `ü`.
//!
//! A **prefix** (for [`crate::KvStore::list`] and [`crate::KvStore::watch`]) is empty (everything)
//! or a string of the same characters, not starting with `/` and without `//`; it matches keys
//! by plain string prefix, so `a/` matches `a/b` but not `ab`, and `a/b` matches `a/b` and
//! `a/bc`. End a prefix with `/` to select one "directory".
//!
//! **Lock names** follow the key grammar too, and live in a namespace of their own: taking the
//! lock `a` never creates, changes or lists a key.

use crate::error::{Error, ErrorKind, Result};

/// The longest key, prefix or lock name, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// What a byte is to the grammar: not allowed, a segment byte other than a dot, a dot, or the
/// separator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Not,
    Plain,
    Dot,
    Slash,
}

/// The [`Class`] of every byte.
static CLASSES: [Class; 256] = classes();

const fn classes() -> [Class; 256] {
    let mut table = [Class::Not; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = match b {
            b'/' => Class::Slash,
            b'.' => Class::Dot,
            b'_' | b'-' => Class::Plain,
            _ if b.is_ascii_alphanumeric() => Class::Plain,
            _ => Class::Not,
        };
        i += 1;
    }
    table
}

fn allowed(b: u8) -> bool {
    matches!(CLASSES[usize::from(b)], Class::Plain | Class::Dot)
}

fn invalid(what: &str, input: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidKey,
        "coordkit",
        format!("{what} {why}; keys are segments of [A-Za-z0-9_.-] joined by '/'"),
    )
    .with_key(input.chars().take(80).collect::<String>())
}

fn check_segments<'a>(
    what: &str,
    input: &str,
    segments: impl Iterator<Item = &'a str>,
) -> Result<()> {
    for seg in segments {
        if seg.is_empty() {
            return Err(invalid(
                what,
                input,
                "has an empty segment (leading, trailing or double '/')",
            ));
        }
        if seg == "." || seg == ".." {
            return Err(invalid(what, input, "has a '.' or '..' segment"));
        }
    }
    Ok(())
}

fn check_chars(what: &str, input: &str) -> Result<()> {
    if input.len() > MAX_KEY_LEN {
        return Err(invalid(
            what,
            input,
            &format!("is {} bytes, longer than {MAX_KEY_LEN}", input.len()),
        ));
    }
    if input.bytes().all(|b| b == b'/' || allowed(b)) {
        return Ok(());
    }
    if let Some(c) = input
        .chars()
        .find(|&c| c != '/' && !(c.is_ascii() && allowed(c as u8)))
    {
        return Err(invalid(what, input, &format!("contains {c:?}")));
    }
    Ok(())
}

/// Checks that `key` is a valid key (see the [module docs](self)).
///
/// # Errors
/// [`ErrorKind::InvalidKey`], with the offending key in the error.
pub fn validate_key(key: &str) -> Result<()> {
    validate_named("key", key)
}

/// Checks that `name` is a valid lock name (same grammar as keys).
///
/// # Errors
/// [`ErrorKind::InvalidKey`], naming the lock.
pub fn validate_lock_name(name: &str) -> Result<()> {
    validate_named("lock name", name)
}

fn validate_named(what: &str, key: &str) -> Result<()> {
    if well_formed(key.as_bytes(), true) {
        return Ok(());
    }
    if key.is_empty() {
        return Err(invalid(what, key, "is empty"));
    }
    check_chars(what, key)?;
    check_segments(what, key, key.split('/'))
}

/// The grammar in one pass over the bytes, for the common case of valid input: at most
/// [`MAX_KEY_LEN`] bytes, only allowed bytes and `/`, and no empty, `.` or `..` segment. With
/// `last_segment` false (a prefix), the piece after the last `/` is not checked as a segment.
/// The checks that say what is wrong run only when this returns false.
fn well_formed(input: &[u8], last_segment: bool) -> bool {
    if input.len() > MAX_KEY_LEN {
        return false;
    }
    // The length of the current segment, and how many of its bytes are dots.
    let (mut len, mut dots) = (0usize, 0usize);
    for &b in input {
        match CLASSES[usize::from(b)] {
            Class::Plain => len += 1,
            Class::Dot => (len, dots) = (len + 1, dots + 1),
            Class::Slash if len == dots && len <= 2 => return false,
            Class::Slash => (len, dots) = (0, 0),
            Class::Not => return false,
        }
    }
    !last_segment || len != dots || len > 2
}

/// Checks that `prefix` is a valid prefix: empty, or key characters without a leading `/` or
/// `//`; every complete segment (one followed by `/`) must be a valid segment.
///
/// # Errors
/// [`ErrorKind::InvalidKey`], naming the prefix.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if well_formed(prefix.as_bytes(), false) {
        return Ok(());
    }
    check_chars("prefix", prefix)?;
    // The piece after the last '/' is either empty (the prefix ends with '/') or a partial
    // segment: only the complete segments before it are checked.
    match prefix.rsplit_once('/') {
        Some((complete, _partial)) => check_segments("prefix", prefix, complete.split('/')),
        None => Ok(()),
    }
}

/// Whether `key` is selected by `prefix` (plain string prefix).
pub fn matches_prefix(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_portable_keys() {
        for k in [
            "a",
            "jobs/nightly-report",
            "config/v2/db.primary",
            "A_b-9",
            ".hidden/x",
            "a..b",
        ] {
            assert!(validate_key(k).is_ok(), "{k}");
        }
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for k in [
            "", "/a", "a/", "a//b", "a/../b", "..", ".", "a/./b", "a b", "a:b", "ü", "a\0b",
            "a\nb", "a\\b", "a?b", "a%2Fb", &long,
        ] {
            let e = validate_key(k).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidKey, "{k:?}");
        }
    }

    /// The one-pass check gives the same verdict as the descriptive checks, on every string
    /// of up to six characters over an alphabet that reaches each rule.
    #[test]
    fn the_one_pass_check_agrees_with_the_descriptive_checks() {
        let slow_key = |k: &str| {
            !k.is_empty()
                && check_chars("key", k).is_ok()
                && check_segments("key", k, k.split('/')).is_ok()
        };
        let slow_prefix = |p: &str| {
            p.is_empty()
                || (check_chars("prefix", p).is_ok()
                    && p.rsplit_once('/').is_none_or(|(complete, _)| {
                        check_segments("prefix", p, complete.split('/')).is_ok()
                    }))
        };
        let alphabet = ['a', '.', '/', '-', ' '];
        let mut words = vec![String::new()];
        let mut checked = 0;
        for _ in 0..=6 {
            for w in &words {
                assert_eq!(well_formed(w.as_bytes(), true), slow_key(w), "key {w:?}");
                assert_eq!(validate_key(w).is_ok(), slow_key(w), "key {w:?}");
                assert_eq!(validate_prefix(w).is_ok(), slow_prefix(w), "prefix {w:?}");
                checked += 1;
            }
            words = words
                .iter()
                .flat_map(|w| alphabet.map(|c| format!("{w}{c}")))
                .collect();
        }
        assert_eq!(checked, (0..=6).map(|n| 5usize.pow(n)).sum::<usize>());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(!well_formed(long.as_bytes(), true));
        assert!(!well_formed(long.as_bytes(), false));
        assert!(well_formed("k".repeat(MAX_KEY_LEN).as_bytes(), true));
    }

    #[test]
    fn prefixes() {
        for p in ["", "a", "a/", "a/b", "a/b/", "a/."] {
            assert!(validate_prefix(p).is_ok(), "{p}");
        }
        for p in ["/", "/a", "a//", "a//b", "../", "a/../", "a b"] {
            assert!(validate_prefix(p).is_err(), "{p}");
        }
        assert!(matches_prefix("a/b", "a/"));
        assert!(!matches_prefix("ab", "a/"));
        assert!(matches_prefix("a/bc", "a/b"));
    }
}
