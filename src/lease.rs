//! The lease clock: one mechanism, used by every backend, that decides when a held lock may no
//! longer be held and fires its lost signal **before** the server can hand the lock to anyone
//! else.
//!
//! # The deadline
//! A server that grants or renews a lease promises not to expire it before `ttl` has passed
//! since it *received* the request. The client cannot know when the server received it, but it
//! knows when it **sent** it, which is no later. So after every renewal that the server
//! confirmed, the deadline is
//!
//! ```text
//! deadline = sent + ttl_confirmed − margin(ttl_confirmed)
//! margin(ttl) = min(ttl / 50 + 100 ms, ttl / 4)
//! ```
//!
//! where `sent` is the moment the confirmed request left this process (not when its answer
//! came back), and `ttl_confirmed` is the TTL the server said it applied. The margin covers a
//! clock-rate difference of up to 2 % between client and server (real clocks drift by well
//! under 0.1 %) plus 100 ms for the timer to fire and the holder to react. A renewal that is
//! not confirmed moves nothing.
//!
//! A timer fires [`Lease::lost_token`] at the deadline whatever renewals are still in flight, and
//! [`Lease::is_lost`] compares the clock with the deadline itself, so it answers correctly even
//! when the timer task has not run yet.
//!
//! # Renewal
//! Renewal starts a third of the TTL after the last confirmed send, so a healthy client renews
//! about three times per TTL. Each attempt is bounded by the backend's request timeout and by a
//! third of the TTL; a failed or timed-out attempt is retried after a backoff that starts at
//! 50 ms and doubles up to a tenth of the TTL. An attempt whose answer says the lease is gone
//! fires the lost signal at once.
//!
//! [`Lease::suspend`] stops renewing (as if the process were paused) for fault tests; the
//! deadline then passes and the lost signal fires as for a holder that is cut off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// The longest span the clock represents. Deadlines and waits beyond it count as "never".
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The safety margin subtracted from a confirmed TTL: `min(ttl / 50 + 100 ms, ttl / 4)`.
///
/// ```
/// use std::time::Duration;
/// use coordkit::lease::margin;
/// assert_eq!(margin(Duration::from_secs(10)), Duration::from_millis(300));
/// assert_eq!(margin(Duration::from_millis(200)), Duration::from_millis(50));
/// ```
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 50 + Duration::from_millis(100)).min(ttl / 4)
}

/// The moment a lease confirmed for `ttl` by a request sent at `sent` may no longer be relied
/// on: `sent + ttl − margin(ttl)`, saturating (a TTL too large for the clock means "never").
pub fn deadline(sent: Instant, ttl: Duration) -> Instant {
    let span = ttl.saturating_sub(margin(ttl)).min(FOREVER);
    sent.checked_add(span).unwrap_or(sent + FOREVER / 2)
}

/// `now + wait`, or `None` ("unbounded") when `wait` is `None` or too large to represent.
/// Never panics, unlike `Instant::now() + wait`.
pub fn deadline_after(wait: Option<Duration>) -> Option<Instant> {
    let wait = wait?;
    if wait >= FOREVER {
        return None;
    }
    Instant::now().checked_add(wait)
}

/// Runs `fut` until `deadline`: `None` if the deadline passed first (`fut` is then dropped);
/// without a deadline, runs it to completion.
pub async fn until<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// What one renewal attempt learned from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The server renewed the lease for this TTL, counted from when the request was received
    /// (so, at the earliest, from when it was sent).
    Confirmed(Duration),
    /// The lease no longer exists (expired, revoked, session invalidated); the reason.
    Gone(String),
}

/// One renewal round trip of a backend's lease, session or lock record.
///
/// The future may be dropped at any point (the attempt timed out, or the lease was stopped);
/// an implementation must leave itself ready for the next call when that happens.
pub trait Renew: Send + 'static {
    /// Sends one renewal and reports what the server answered.
    ///
    /// # Errors
    /// Any error: the attempt counts as failed and is retried; only [`Renewal::Gone`] ends the
    /// lease early.
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>>;
}

/// A backend's own signal that a lease is gone (see [`Lease::start_watched`]): the reason, or
/// `None` when there is nothing more to watch.
pub type LossWatch = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// How a [`Lease`] renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewPolicy {
    /// Bound on one attempt (the backend's request timeout); it is further bounded by a third
    /// of the TTL.
    pub attempt_timeout: Duration,
}

struct State {
    /// Fires when the lease may be gone.
    lost: CancellationToken,
    /// Ends the renewer without firing `lost` (the lease was released or revoked on purpose).
    stop: CancellationToken,
    suspended: AtomicBool,
    /// The deadline, in nanoseconds after `base`.
    deadline_ns: AtomicU64,
    base: Instant,
    why: Mutex<Option<String>>,
}

impl State {
    fn deadline(&self) -> Instant {
        self.base + Duration::from_nanos(self.deadline_ns.load(Ordering::SeqCst))
    }

    fn set_deadline(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.base).as_nanos();
        self.deadline_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn lose(&self, why: String) {
        if self.lost.is_cancelled() {
            return;
        }
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert(why);
        }
        self.lost.cancel();
    }

    fn expired(&self) -> bool {
        if self.lost.is_cancelled() {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.lose("the lease deadline passed without a confirmed renewal".into());
            return true;
        }
        false
    }
}

/// A lease held by this client, its deadline, and its renewer.
///
/// Cloning gives another handle on the same lease. The renewer runs as a tokio task until
/// [`stop`](Self::stop), until the lease is lost, or until every handle is dropped.
///
/// # Contract
/// - [`is_lost`](Self::is_lost) is true from the deadline on (or from an earlier loss), and
///   never turns false again.
/// - [`lost_token`](Self::lost_token) is cancelled at the deadline, or at once when a
///   renewal finds the lease gone or the backend calls [`lose`](Self::lose).
/// - The deadline only moves forward, and only on a renewal that the server confirmed and
///   whose answer came before the current deadline.
#[derive(Clone)]
pub struct Lease {
    state: Arc<State>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lost", &self.state.lost.is_cancelled())
            .field("suspended", &self.state.suspended.load(Ordering::SeqCst))
            .finish()
    }
}

impl Lease {
    /// Starts the clock of a lease that the server granted (or last renewed) for `ttl` in
    /// answer to a request sent at `sent`, and spawns its renewer on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime (like `tokio::spawn`).
    pub fn start<R: Renew>(renewer: R, sent: Instant, ttl: Duration, policy: RenewPolicy) -> Lease {
        Self::start_watched(renewer, None, sent, ttl, policy)
    }

    /// As [`start`](Self::start), with `watch`: a future that resolves with the reason when the
    /// backend learns that the lease is gone before the clock says so (its lock node deleted,
    /// its session ended), or with `None` when there is nothing more to watch. It runs in the
    /// renewer's task, until the lease is lost or stopped.
    ///
    /// # Panics
    /// Outside a tokio runtime (like `tokio::spawn`).
    pub fn start_watched<R: Renew>(
        renewer: R,
        watch: Option<LossWatch>,
        sent: Instant,
        ttl: Duration,
        policy: RenewPolicy,
    ) -> Lease {
        let lease = Lease::clock(sent, ttl);
        let weak = Arc::downgrade(&lease.state);
        // One task: the renewer also keeps the deadline and the watch (see `run`).
        tokio::spawn(run(weak, renewer, watch, sent, ttl, policy));
        lease
    }

    /// A lease clock without a renewer: its deadline only moves by [`confirm`](Self::confirm).
    /// For backends that renew by other means.
    pub fn unrenewed(sent: Instant, ttl: Duration) -> Lease {
        let lease = Lease::clock(sent, ttl);
        lease.spawn_deadline_timer();
        lease
    }

    /// The clock alone, with nothing to fire it at its deadline.
    fn clock(sent: Instant, ttl: Duration) -> Lease {
        let base = sent;
        let state = Arc::new(State {
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            suspended: AtomicBool::new(false),
            deadline_ns: AtomicU64::new(0),
            base,
            why: Mutex::new(None),
        });
        state.set_deadline(deadline(sent, ttl));
        Lease { state }
    }

    /// A timer, independent of the renewer, that fires `lost` at the deadline.
    fn spawn_deadline_timer(&self) {
        let weak = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            loop {
                let (at, lost, stop) = match weak.upgrade() {
                    Some(s) => (s.deadline(), s.lost.clone(), s.stop.clone()),
                    None => return,
                };
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                match weak.upgrade() {
                    Some(s) if s.expired() => return,
                    Some(_) => {}
                    None => return,
                }
            }
        });
    }

    /// Records a renewal confirmed for `ttl` in answer to a request sent at `sent`. Returns
    /// false (and moves nothing) if the lease was already lost, which includes a deadline that
    /// passed before this call.
    pub fn confirm(&self, sent: Instant, ttl: Duration) -> bool {
        let s = &self.state;
        if s.expired() {
            return false;
        }
        let next = deadline(sent, ttl);
        if next > s.deadline() {
            s.set_deadline(next);
        }
        // A loss that raced with the update wins.
        !s.lost.is_cancelled()
    }

    /// The current deadline.
    pub fn deadline(&self) -> Instant {
        self.state.deadline()
    }

    /// Whether the lease may be gone: lost, or past its deadline.
    pub fn is_lost(&self) -> bool {
        self.state.expired()
    }

    /// The token cancelled when the lease may be gone. Lock guards take a child of it.
    pub fn lost_token(&self) -> CancellationToken {
        self.state.lost.clone()
    }

    /// Why the lease was lost, once it was.
    pub fn why(&self) -> Option<String> {
        self.state.why.lock().ok().and_then(|w| w.clone())
    }

    /// Declares the lease lost now (the backend saw its key deleted, its session expire, …).
    pub fn lose(&self, why: impl Into<String>) {
        self.state.lose(why.into());
    }

    /// Stops renewing, as if this process were paused: the lease is lost at its deadline.
    pub fn suspend(&self) {
        self.state.suspended.store(true, Ordering::SeqCst);
    }

    /// Whether renewal was suspended.
    pub fn is_suspended(&self) -> bool {
        self.state.suspended.load(Ordering::SeqCst)
    }

    /// Ends the renewer and the timer without firing the lost signal: the lease was released
    /// or revoked on purpose.
    pub fn stop(&self) {
        self.state.stop.cancel();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.state.stop.is_cancelled()
    }
}

/// Whether the lease is gone at what was its deadline (then `lost` has fired); false if the
/// deadline moved on meanwhile.
fn gone_at_deadline(weak: &std::sync::Weak<State>) -> bool {
    weak.upgrade().is_none_or(|s| s.expired())
}

/// The watch's answer; pending forever without one.
async fn watched(watch: &mut Option<LossWatch>) -> Option<String> {
    match watch {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

/// Handles the watch's answer: true if the lease is now lost (the task ends).
fn on_watch(weak: &std::sync::Weak<State>, why: Option<String>) -> bool {
    match (why, weak.upgrade()) {
        (Some(why), Some(state)) => {
            state.lose(why);
            true
        }
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// How a wait of the renewer task ended.
enum Wait<T> {
    /// The awaited future finished.
    Done(T),
    /// The lease is lost or stopped: the task ends.
    End,
    /// The deadline moved on, or the watch ended with nothing to report: look again.
    Again,
}

/// Runs `fut` unless the lease ends first: lost, stopped, its deadline `at` passed, or the
/// watch found it gone.
async fn unless_ended<T>(
    weak: &std::sync::Weak<State>,
    lost: &CancellationToken,
    stop: &CancellationToken,
    at: Instant,
    watch: &mut Option<LossWatch>,
    fut: impl Future<Output = T>,
) -> Wait<T> {
    let watch_said = tokio::select! {
        _ = lost.cancelled() => return Wait::End,
        _ = stop.cancelled() => return Wait::End,
        _ = tokio::time::sleep_until(at) => {
            return if gone_at_deadline(weak) { Wait::End } else { Wait::Again };
        }
        why = watched(watch) => why,
        r = fut => return Wait::Done(r),
    };
    *watch = None;
    if on_watch(weak, watch_said) {
        Wait::End
    } else {
        Wait::Again
    }
}

/// The renewer task. It holds only a weak reference, so dropping every [`Lease`] handle ends
/// it (and so ends the renewal of a lock whose guard was dropped without a runtime).
///
/// It also fires `lost` at the deadline, whatever it is doing: every wait, the renewal attempt
/// included, also waits for the deadline (so a lease costs one task, and a renewal that hangs
/// cannot hold the signal back).
async fn run<R: Renew>(
    weak: std::sync::Weak<State>,
    mut renewer: R,
    mut watch: Option<LossWatch>,
    sent: Instant,
    ttl: Duration,
    policy: RenewPolicy,
) {
    let mut last_sent = sent;
    let mut ttl = ttl;
    let mut backoff = Duration::from_millis(50);
    let mut next = last_sent + ttl / 3;
    loop {
        let Some(state) = weak.upgrade() else { return };
        let (lost, stop) = (state.lost.clone(), state.stop.clone());
        let suspended = state.suspended.load(Ordering::SeqCst);
        let at = state.deadline();
        drop(state);
        // Suspended: no renewal, only the deadline (or the watch) ends the wait.
        let pause = async {
            if suspended {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(next).await;
        };
        match unless_ended(&weak, &lost, &stop, at, &mut watch, pause).await {
            Wait::Done(()) => {}
            Wait::End => return,
            Wait::Again => continue,
        }
        let Some(state) = weak.upgrade() else { return };
        if state.suspended.load(Ordering::SeqCst) {
            continue;
        }
        drop(state);
        let bound = policy
            .attempt_timeout
            .min(ttl / 3)
            .max(Duration::from_millis(10));
        let attempt_sent = Instant::now();
        // An attempt cut short by the deadline or the watch is dropped: the lease is gone,
        // or its deadline moved (a confirmation from elsewhere) and the loop starts over.
        let attempt = tokio::time::timeout(bound, renewer.renew());
        let outcome = match unless_ended(&weak, &lost, &stop, at, &mut watch, attempt).await {
            Wait::Done(r) => r,
            Wait::End => return,
            Wait::Again => continue,
        };
        let Some(state) = weak.upgrade() else { return };
        match outcome {
            Ok(Ok(Renewal::Confirmed(confirmed))) => {
                if state.suspended.load(Ordering::SeqCst) {
                    // A renewal that raced with the suspension does not count: a paused
                    // process would not have seen its answer.
                    continue;
                }
                let lease = Lease {
                    state: state.clone(),
                };
                if !lease.confirm(attempt_sent, confirmed) {
                    return;
                }
                last_sent = attempt_sent;
                ttl = confirmed;
                backoff = Duration::from_millis(50);
                next = last_sent + ttl / 3;
            }
            Ok(Ok(Renewal::Gone(why))) => {
                state.lose(why);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "lease renewal failed; retrying");
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min((ttl / 10).max(Duration::from_millis(50)));
            }
            Err(_) => {
                tracing::debug!("lease renewal timed out; retrying");
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min((ttl / 10).max(Duration::from_millis(50)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};
    use std::sync::atomic::AtomicUsize;

    /// A renewer whose answers come from a script: each call takes `delay`, then answers.
    struct Scripted {
        calls: Arc<AtomicUsize>,
        delay: Duration,
        answer: Arc<Mutex<Result<Renewal>>>,
    }

    impl Renew for Scripted {
        fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            let answer = self.answer.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let a = answer.lock().unwrap();
                match &*a {
                    Ok(r) => Ok(r.clone()),
                    Err(e) => Err(Error::new(e.kind(), "test", "scripted failure")),
                }
            })
        }
    }

    fn scripted(
        delay: Duration,
        answer: Result<Renewal>,
    ) -> (Scripted, Arc<AtomicUsize>, Arc<Mutex<Result<Renewal>>>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new(answer));
        (
            Scripted {
                calls: calls.clone(),
                delay,
                answer: answer.clone(),
            },
            calls,
            answer,
        )
    }

    const POLICY: RenewPolicy = RenewPolicy {
        attempt_timeout: Duration::from_secs(5),
    };

    #[test]
    fn margin_and_deadline_formula() {
        assert_eq!(margin(Duration::from_secs(3)), Duration::from_millis(160));
        assert_eq!(
            margin(Duration::from_secs(100)),
            Duration::from_millis(2100)
        );
        assert_eq!(
            margin(Duration::from_millis(100)),
            Duration::from_millis(25)
        );
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(3)),
            now + Duration::from_millis(2840)
        );
        // Absurd TTLs and waits never overflow.
        let _ = deadline(now, Duration::MAX);
        assert_eq!(deadline_after(Some(Duration::MAX)), None);
        assert_eq!(deadline_after(None), None);
        assert!(deadline_after(Some(Duration::from_secs(1))).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_renewals_keep_the_lease() {
        let ttl = Duration::from_secs(3);
        let (r, calls, _) = scripted(Duration::from_millis(10), Ok(Renewal::Confirmed(ttl)));
        let lease = Lease::start(r, Instant::now(), ttl, POLICY);
        tokio::time::sleep(ttl * 5).await;
        assert!(!lease.is_lost(), "lost: {:?}", lease.why());
        let n = calls.load(Ordering::SeqCst);
        assert!((14..=16).contains(&n), "{n} renewals in 5 TTLs");
        lease.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_send_time_plus_ttl_minus_margin_while_a_renewal_hangs() {
        let ttl = Duration::from_secs(3);
        // Every renewal hangs longer than its bound: the black-holed connection.
        let (r, _, _) = scripted(Duration::from_secs(3600), Ok(Renewal::Confirmed(ttl)));
        let start = Instant::now();
        let lease = Lease::start(r, start, ttl, POLICY);
        let lost = lease.lost_token();
        lost.cancelled().await;
        assert_eq!(Instant::now(), start + ttl - margin(ttl));
        assert!(lease.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_send_not_the_answer() {
        let ttl = Duration::from_secs(3);
        // The answers take 900 ms: each renewal extends from its send time.
        let (r, _, answer) = scripted(Duration::from_millis(900), Ok(Renewal::Confirmed(ttl)));
        let start = Instant::now();
        let lease = Lease::start(r, start, ttl, POLICY);
        // First renewal sent at 1 s, answered at 1.9 s.
        tokio::time::sleep(Duration::from_millis(1950)).await;
        assert_eq!(
            lease.deadline(),
            start + Duration::from_secs(1) + ttl - margin(ttl)
        );
        *answer.lock().unwrap() = Err(Error::new(ErrorKind::Unavailable, "t", "down"));
        lease.lost_token().cancelled().await;
        assert_eq!(
            Instant::now(),
            start + Duration::from_secs(1) + ttl - margin(ttl)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gone_fires_at_once_and_failures_are_retried() {
        let ttl = Duration::from_secs(3);
        let (r, calls, answer) = scripted(
            Duration::from_millis(1),
            Err(Error::new(ErrorKind::Unavailable, "t", "down")),
        );
        let start = Instant::now();
        let lease = Lease::start(r, start, ttl, POLICY);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(calls.load(Ordering::SeqCst) >= 4, "failures not retried");
        assert!(!lease.is_lost());
        *answer.lock().unwrap() = Ok(Renewal::Confirmed(ttl));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(lease.deadline() > start + ttl);
        *answer.lock().unwrap() = Ok(Renewal::Gone("revoked".into()));
        let t = Instant::now();
        lease.lost_token().cancelled().await;
        assert!(t.elapsed() < ttl);
        assert_eq!(lease.why().as_deref(), Some("revoked"));
    }

    /// A watch that reports the lease gone fires `lost` at once, with its reason, even while a
    /// renewal hangs; one that ends with nothing to report leaves the renewals going.
    #[tokio::test(start_paused = true)]
    async fn the_watch_runs_beside_the_renewals() {
        let ttl = Duration::from_secs(3);
        let (r, _, _) = scripted(Duration::from_secs(3600), Ok(Renewal::Confirmed(ttl)));
        let start = Instant::now();
        let watch: LossWatch = Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Some("the lock node was deleted".to_string())
        });
        let lease = Lease::start_watched(r, Some(watch), start, ttl, POLICY);
        lease.lost_token().cancelled().await;
        assert_eq!(Instant::now(), start + Duration::from_millis(1500));
        assert_eq!(lease.why().as_deref(), Some("the lock node was deleted"));

        let (r, calls, _) = scripted(Duration::from_millis(10), Ok(Renewal::Confirmed(ttl)));
        let watch: LossWatch = Box::pin(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        });
        let lease = Lease::start_watched(r, Some(watch), Instant::now(), ttl, POLICY);
        tokio::time::sleep(ttl * 3).await;
        assert!(!lease.is_lost(), "lost: {:?}", lease.why());
        assert!(calls.load(Ordering::SeqCst) >= 8);
        lease.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn suspension_lets_the_deadline_pass() {
        let ttl = Duration::from_secs(2);
        let (r, calls, _) = scripted(Duration::from_millis(1), Ok(Renewal::Confirmed(ttl)));
        let lease = Lease::start(r, Instant::now(), ttl, POLICY);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = calls.load(Ordering::SeqCst);
        let at = lease.deadline();
        lease.suspend();
        lease.lost_token().cancelled().await;
        assert_eq!(Instant::now(), at);
        assert_eq!(calls.load(Ordering::SeqCst), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_confirmation_does_not_revive_a_lost_lease() {
        let ttl = Duration::from_secs(2);
        let start = Instant::now();
        let lease = Lease::unrenewed(start, ttl);
        tokio::time::sleep(ttl).await;
        assert!(lease.is_lost());
        assert!(!lease.confirm(Instant::now(), ttl));
        assert!(lease.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_every_handle_ends_the_renewer() {
        let ttl = Duration::from_secs(3);
        let (r, calls, _) = scripted(Duration::from_millis(1), Ok(Renewal::Confirmed(ttl)));
        let lease = Lease::start(r, Instant::now(), ttl, POLICY);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        drop(lease);
        let n = calls.load(Ordering::SeqCst);
        tokio::time::sleep(ttl * 3).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            n,
            "renewals went on after the drop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_without_firing_lost() {
        let ttl = Duration::from_secs(3);
        let (r, _, _) = scripted(Duration::from_millis(1), Ok(Renewal::Confirmed(ttl)));
        let lease = Lease::start(r, Instant::now(), ttl, POLICY);
        lease.stop();
        tokio::time::sleep(ttl * 2).await;
        assert!(!lease.lost_token().is_cancelled());
    }
}
