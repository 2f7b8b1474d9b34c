//! The resource side of fencing: reject writes that carry a stale [`FencingToken`].
//!
//! A lock alone cannot stop a holder that was paused past its TTL from writing after the next
//! holder took over: the paused process does not know it lost the lock until it runs again.
//! The protected resource must check. [`FencedResource`] is the check in its simplest form —
//! remember the highest token seen and refuse anything lower — to embed in a service, or to copy
//! into the resource's own storage (a column `last_token` with `UPDATE … WHERE last_token <= $1`
//! does the same in SQL).

use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::lock::FencingToken;

/// A value guarded by fencing tokens: a write is applied only if its token is at least the
/// highest token any earlier write carried.
///
/// # Contract
/// - Tokens equal to the highest seen are accepted (the same holder writes several times).
/// - A lower token gives [`ErrorKind::LockLost`] and leaves the value unchanged.
#[derive(Debug, Default)]
pub struct FencedResource<T> {
    inner: Mutex<(Option<FencingToken>, T)>,
}

impl<T> FencedResource<T> {
    /// A resource holding `value`, with no token seen yet.
    pub fn new(value: T) -> Self {
        FencedResource {
            inner: Mutex::new((None, value)),
        }
    }

    /// Applies `f` to the value if `token` is not stale, and returns its result.
    ///
    /// # Errors
    /// [`ErrorKind::LockLost`] if a write with a higher token was already accepted.
    pub fn write<R>(&self, token: FencingToken, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (highest, value) = &mut *guard;
        if let Some(h) = *highest {
            if token < h {
                return Err(Error::new(
                    ErrorKind::LockLost,
                    "coordkit",
                    format!(
                        "stale fencing token {token}: a write with token {h} was already accepted"
                    ),
                ));
            }
        }
        *highest = Some(token);
        Ok(f(value))
    }

    /// Reads the value.
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&guard.1)
    }

    /// The highest token accepted so far.
    pub fn highest_token(&self) -> Option<FencingToken> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_stale_tokens_and_keeps_value() {
        let r = FencedResource::new(0u32);
        r.write(FencingToken::from_raw(5), |v| *v = 1).unwrap();
        r.write(FencingToken::from_raw(5), |v| *v += 1).unwrap();
        let e = r.write(FencingToken::from_raw(4), |v| *v = 99).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LockLost);
        assert_eq!(r.read(|v| *v), 2);
        r.write(FencingToken::from_raw(9), |v| *v = 3).unwrap();
        assert_eq!(r.highest_token(), Some(FencingToken::from_raw(9)));
    }
}
