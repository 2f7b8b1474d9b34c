//! Mapping `etcd_client::Error` (gRPC status codes and etcd's messages) to [`ErrorKind`].

use etcd_client::Error as EtcdError;

use super::NAME;
use crate::error::{Error, ErrorKind};

// gRPC status codes (the numbering is fixed by the gRPC specification).
const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;
const INVALID_ARGUMENT: i32 = 3;
const DEADLINE_EXCEEDED: i32 = 4;
const NOT_FOUND: i32 = 5;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const FAILED_PRECONDITION: i32 = 9;
const ABORTED: i32 = 10;
const OUT_OF_RANGE: i32 = 11;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// The kind a gRPC status from etcd means.
pub(crate) fn kind_of_status(code: i32, msg: &str) -> ErrorKind {
    match code {
        UNAVAILABLE | CANCELLED | ABORTED => ErrorKind::Unavailable,
        DEADLINE_EXCEEDED => ErrorKind::Timeout,
        UNAUTHENTICATED | PERMISSION_DENIED => ErrorKind::PermissionDenied,
        INVALID_ARGUMENT if msg.contains("request is too large") => ErrorKind::ValueTooLarge,
        INVALID_ARGUMENT | FAILED_PRECONDITION
            if msg.contains("authentication failed")
                || msg.contains("user name is empty")
                || msg.contains("authentication is not enabled") =>
        {
            ErrorKind::PermissionDenied
        }
        RESOURCE_EXHAUSTED if msg.contains("larger than max") => ErrorKind::ValueTooLarge,
        INVALID_ARGUMENT | OUT_OF_RANGE => ErrorKind::InvalidArgument,
        NOT_FOUND if msg.contains("lease not found") => ErrorKind::LockLost,
        UNKNOWN
            if msg.contains("no leader")
                || msg.contains("leader changed")
                || msg.contains("timed out")
                || msg.contains("transport") =>
        {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Backend,
    }
}

/// Whether the error shows that the request never reached a server (the connection to the
/// chosen endpoint could not be made), so that sending it again cannot apply it twice.
pub(crate) fn never_sent(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) if s.code() as i32 == UNAVAILABLE => {
            let m = s.message();
            m.contains("tcp connect error") || m.contains("error trying to connect")
        }
        _ => false,
    }
}

/// The kind an etcd client error means.
pub(crate) fn kind_of(e: &EtcdError) -> ErrorKind {
    match e {
        EtcdError::GRpcStatus(s) => kind_of_status(s.code() as i32, s.message()),
        EtcdError::TransportError(_) | EtcdError::IoError(_) | EtcdError::EndpointError(_) => {
            ErrorKind::Unavailable
        }
        EtcdError::InvalidArgs(_) | EtcdError::InvalidUri(_) | EtcdError::EndpointsNotManaged => {
            ErrorKind::InvalidConfig
        }
        _ => ErrorKind::Backend,
    }
}

/// A coordkit error for an etcd client error that happened while doing `what`.
pub(crate) fn map(e: EtcdError, what: &str) -> Error {
    let kind = kind_of(&e);
    let detail = match &e {
        EtcdError::GRpcStatus(s) => format!("{}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    Error::new(kind, NAME, format!("{what}: {detail}")).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_status_codes() {
        let cases = [
            (UNAVAILABLE, "etcdserver: no leader", ErrorKind::Unavailable),
            (
                INVALID_ARGUMENT,
                "etcdserver: request is too large",
                ErrorKind::ValueTooLarge,
            ),
            (
                RESOURCE_EXHAUSTED,
                "grpc: received message larger than max (5 vs. 4)",
                ErrorKind::ValueTooLarge,
            ),
            (PERMISSION_DENIED, "no", ErrorKind::PermissionDenied),
            (UNAUTHENTICATED, "bad token", ErrorKind::PermissionDenied),
            (
                INVALID_ARGUMENT,
                "etcdserver: authentication failed, invalid user ID or password",
                ErrorKind::PermissionDenied,
            ),
            (DEADLINE_EXCEEDED, "slow", ErrorKind::Timeout),
            (13, "boom", ErrorKind::Backend),
        ];
        for (code, msg, kind) in cases {
            assert_eq!(kind_of_status(code, msg), kind, "{code} {msg}");
        }
        let e = map(
            EtcdError::InvalidArgs("empty endpoints".into()),
            "connecting",
        );
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("connecting"));
    }
}
