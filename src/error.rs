//! The one error type of coordkit.
//!
//! Every failure, whatever the backend, is an [`Error`] with an [`ErrorKind`] that says what it
//! means to the caller. The message names the backend and, where there is one, the key or lock.

use std::fmt;

/// What went wrong, by meaning rather than by backend.
///
/// Match on this to decide what to do: retry on [`ErrorKind::Conflict`] or
/// [`ErrorKind::Unavailable`], fix the input on [`ErrorKind::InvalidKey`], and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A compare-and-swap precondition did not hold: the key's version differs from the one
    /// expected, or the key exists when it was expected to be absent (or the other way round).
    Conflict,
    /// An operation did not finish within its bound: a lock wait (`LockOptions::wait`) ran out,
    /// or a request exceeded the configured request timeout.
    Timeout,
    /// The lock is no longer held: its lease or session expired, or it was taken away.
    LockLost,
    /// A key, prefix or lock name does not follow the portable key grammar (see [`crate::key`]).
    InvalidKey,
    /// A value is larger than the backend accepts ([`crate::Capabilities::max_value_size`]).
    ValueTooLarge,
    /// An argument other than a key is out of range (for example a zero TTL).
    InvalidArgument,
    /// The backend could not be reached, or it is not serving (no leader, connection refused).
    Unavailable,
    /// The backend refused the credentials, or they do not allow this operation.
    PermissionDenied,
    /// A URL, configuration file or option is malformed or names something unknown.
    InvalidConfig,
    /// The backend cannot do this operation (see [`crate::Capabilities`]).
    Unsupported,
    /// A watch can no longer deliver every event in order (history was compacted, or events were
    /// missed while reconnecting). The stream ends after this error; start a new watch and re-read.
    WatchGap,
    /// Any other error reported by the backend.
    Backend,
}

impl ErrorKind {
    /// A short lower-case name, stable across releases (used in messages and JSON output).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::LockLost => "lock lost",
            ErrorKind::InvalidKey => "invalid key",
            ErrorKind::ValueTooLarge => "value too large",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::InvalidConfig => "invalid config",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::WatchGap => "watch gap",
            ErrorKind::Backend => "backend error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned by every coordkit operation.
///
/// Displayed as `<backend>: <kind>: <message> (key "<key>")`, for example
/// `etcd: value too large: 2000000 bytes exceeds the limit of 1572864 bytes (key "jobs/a")`.
pub struct Error {
    kind: ErrorKind,
    backend: &'static str,
    key: Option<String>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result<T, coordkit::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` from `backend` (`"memory"`, `"etcd"`, `"zookeeper"`, `"consul"`,
    /// `"sharded"`, or `"coordkit"` when no backend is involved).
    pub fn new(kind: ErrorKind, backend: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind,
            backend,
            key: None,
            message: message.into(),
            source: None,
        }
    }

    /// Names the key, prefix or lock the error is about.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with more context (for example the shard that failed).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The backend that reported it.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The key, prefix or lock name involved, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The message, without backend, kind or key.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Shorthand for `self.kind() == kind`.
    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }

    /// An [`ErrorKind::InvalidConfig`] error not tied to a backend.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, "coordkit", message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.backend, self.kind, self.message)?;
        if let Some(key) = &self.key {
            write!(f, " (key {key:?})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("backend", &self.backend)
            .field("key", &self.key)
            .field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", &format_args!("{source}"));
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_backend_kind_and_key() {
        let e = Error::new(ErrorKind::ValueTooLarge, "etcd", "2 bytes over").with_key("a/b");
        assert_eq!(
            e.to_string(),
            "etcd: value too large: 2 bytes over (key \"a/b\")"
        );
        assert!(e.is(ErrorKind::ValueTooLarge));
        assert_eq!(e.key(), Some("a/b"));
    }

    #[test]
    fn context_prefixes_message() {
        let e = Error::new(ErrorKind::Unavailable, "sharded", "refused").context("shard 2");
        assert_eq!(e.message(), "shard 2: refused");
    }
}
