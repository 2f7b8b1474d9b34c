//! Mapping ZooKeeper client errors onto [`ErrorKind`].

use zookeeper_client as zk;

use crate::error::{Error, ErrorKind};

/// The backend name used in errors.
pub const NAME: &str = "zookeeper";

/// The coordkit kind of a ZooKeeper error.
pub fn kind_of(e: &zk::Error) -> ErrorKind {
    use zk::Error as Z;
    match e {
        Z::BadVersion | Z::NodeExists => ErrorKind::Conflict,
        Z::NoAuth | Z::AuthFailed | Z::InvalidAcl => ErrorKind::PermissionDenied,
        Z::Timeout => ErrorKind::Timeout,
        Z::ConnectionLoss
        | Z::NoHosts
        | Z::SessionExpired
        | Z::SessionMoved
        | Z::ClientClosed
        | Z::NotReadOnly
        | Z::Throttled => ErrorKind::Unavailable,
        Z::Unimplemented => ErrorKind::Unsupported,
        Z::BadArguments(_) => ErrorKind::InvalidArgument,
        _ => ErrorKind::Backend,
    }
}

/// Wraps a ZooKeeper error, naming what was being done and the key.
pub fn map(e: zk::Error, what: &str, key: &str) -> Error {
    Error::new(kind_of(&e), NAME, format!("{what}: {e}"))
        .with_key(key)
        .with_source(e)
}

/// An error of `kind` about `key`.
pub fn err(kind: ErrorKind, key: &str, msg: impl Into<String>) -> Error {
    Error::new(kind, NAME, msg).with_key(key)
}
