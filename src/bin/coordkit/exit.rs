//! Exit codes and the CLI's error type.

use coordkit::{Error, ErrorKind};

/// Writes one line to standard error, ignoring failures (a closed pipe must not abort).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use note;

/// Success.
pub const OK: i32 = 0;
/// The operation failed: backend unreachable, request timeout, permission denied, conflict,
/// value too large, watch gap, or any other backend error. For `lock`, this includes a backend
/// that did not answer a request while the lock was being acquired, before `--wait` ran out
/// (the message says so): that is not [`LOCK_TIMEOUT`].
pub const FAILED: i32 = 1;
/// Usage or configuration error: unknown subcommand or option, missing `--`, malformed
/// duration, malformed or unknown URL, invalid configuration file, invalid key.
pub const USAGE: i32 = 2;
/// `get`: the key does not exist.
pub const NOT_FOUND: i32 = 3;
/// `lock`: the lock was not acquired within `--wait`: the wait itself ran out.
pub const LOCK_TIMEOUT: i32 = 124;
/// `lock`: the lock was lost while the command ran (its process group was sent SIGTERM, then
/// SIGKILL after `--kill-after`; coordkit exits once the group is gone), or was lost before the
/// command could start (the command was not run).
pub const LOCK_LOST: i32 = 125;
/// `lock`: the command was found but could not be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// `lock`: the command was not found.
pub const NOT_FOUND_CMD: i32 = 127;
/// `lock`: the command was killed by signal N, or coordkit received signal N while it waited
/// for the lock (the attempt is withdrawn and the command not run): the exit code is 128 + N.
pub const SIGNAL_BASE: i32 = 128;

/// A failure that ends the command: one line on stderr and an exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit code.
    pub code: i32,
    /// A short category for `--json` output (`usage`, `timeout`, `lock lost`, …).
    pub kind: &'static str,
    /// The message: one line.
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: USAGE,
            kind: "usage",
            message: one_line(&message.into()),
        }
    }

    pub fn new(code: i32, kind: &'static str, message: impl Into<String>) -> Self {
        CliError {
            code,
            kind,
            message: one_line(&message.into()),
        }
    }

    /// The line to print on stderr.
    pub fn render(&self, json: bool) -> String {
        if json {
            serde_json::json!({
                "error": { "kind": self.kind, "message": self.message, "exit_code": self.code }
            })
            .to_string()
        } else {
            format!("coordkit: {}", self.message)
        }
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        let code = match e.kind() {
            ErrorKind::InvalidConfig | ErrorKind::InvalidKey | ErrorKind::InvalidArgument => USAGE,
            _ => FAILED,
        };
        let text = e.to_string();
        let text = text.strip_prefix("coordkit: ").unwrap_or(&text);
        CliError {
            code,
            kind: e.kind().as_str(),
            message: one_line(text),
        }
    }
}

/// Collapses a message to one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_and_one_line() {
        let e: CliError = Error::config("bad\nurl").into();
        assert_eq!((e.code, e.kind), (USAGE, "invalid config"));
        assert_eq!(e.render(false), "coordkit: invalid config: bad url");
        let e: CliError = Error::new(ErrorKind::Unavailable, "etcd", "refused").into();
        assert_eq!(e.code, FAILED);
        let v: serde_json::Value = serde_json::from_str(&e.render(true)).unwrap();
        assert_eq!(v["error"]["exit_code"], 1);
        assert_eq!(v["error"]["kind"], "unavailable");
        let codes = [
            OK,
            FAILED,
            USAGE,
            NOT_FOUND,
            LOCK_TIMEOUT,
            LOCK_LOST,
            CANNOT_EXECUTE,
            NOT_FOUND_CMD,
        ];
        let mut sorted = codes.to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len(), "exit codes must be distinct");
    }
}
