//! The request deadline for the sending of a response body to the client.
//!
//! `StreamedBody` cuts a body at the deadline when the *upstream* is slow, because
//! then hyper keeps polling it. When the *client* is slow (it stops reading, or an
//! HTTP/2 client withholds WINDOW_UPDATE), hyper stops polling the body: its socket
//! or stream window is full, so nothing of the body runs and its timer cannot end
//! anything. The deadline therefore fires from the task around it instead: the
//! client connection's task (HTTP/1, `server`) or the task hyper spawns per HTTP/2
//! stream (`StreamExecutor`). That task publishes a `Slot` as a task-local; a
//! streamed body writes its deadline there when first polled and clears it when
//! dropped; the task's `Watch` keeps a timer for it and reports it overdue, and the
//! task then drops the connection (HTTP/1) or the stream (HTTP/2: hyper resets it).
//! Dropping the body drops its upstream connection unreleased (it was not read to
//! its end), so the backend's writer is let go too. The watch marks the deadline it
//! found passed in the slot, and the body, as it is dropped, warns about its cut
//! itself (`Registered::cut_at_deadline`): the body knows its request's id and
//! backend, the task around it does not.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static SLOT: Arc<Slot>;
}

/// The deadline of the response body being sent by one task, if any.
#[derive(Debug)]
pub struct Slot {
    base: Instant,
    /// Milliseconds after `base`, plus one; 0: no body with a deadline in flight.
    deadline: AtomicU64,
    /// The body in flight is waiting for its upstream (it has nothing to send), not
    /// for the client to take what it has: who a passed deadline blames.
    upstream_waiting: AtomicBool,
    /// The `deadline` value the watch found passed (0: none): the body registered
    /// with it is being cut.
    passed: AtomicU64,
}

impl Slot {
    fn encode(&self, deadline: Instant) -> u64 {
        let ms = deadline.saturating_duration_since(self.base).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
    }

    fn set(&self, deadline: Instant) -> u64 {
        let v = self.encode(deadline);
        self.deadline.store(v, Ordering::Relaxed);
        self.upstream_waiting.store(false, Ordering::Relaxed);
        v
    }

    /// Forget `v` unless a later body replaced it meanwhile.
    fn clear(&self, v: u64) {
        let _ = self
            .deadline
            .compare_exchange(v, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A body's entry in its task's slot (see `register`); cleared on drop.
pub struct Registered {
    slot: Arc<Slot>,
    value: u64,
}

impl Registered {
    /// Say whether the body is waiting for its upstream's next bytes (true) or has
    /// just handed some on (false). A plain store, on each poll of the body.
    pub fn waiting_for_upstream(&self, waiting: bool) {
        self.slot.upstream_waiting.store(waiting, Ordering::Relaxed);
    }

    /// If the task's watch found this body's deadline passed (the task is dropping
    /// the connection or stream with the body): whether the upstream was the slow
    /// side (the body had nothing to send) rather than the client.
    pub fn cut_at_deadline(&self) -> Option<bool> {
        (self.slot.passed.load(Ordering::Relaxed) == self.value)
            .then(|| self.slot.upstream_waiting.load(Ordering::Relaxed))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.slot.clear(self.value);
    }
}

/// Publish `deadline` as the one of the body the calling task is sending. None when
/// the task publishes no slot (a body read by anything but a client connection:
/// aggregation, tests).
pub fn register(deadline: Instant) -> Option<Registered> {
    SLOT.try_with(|slot| Registered {
        value: slot.set(deadline),
        slot: slot.clone(),
    })
    .ok()
}

/// Run `fut` with `slot` (a `Watch`'s) published to the bodies it polls.
pub fn scope<F: Future>(
    slot: Arc<Slot>,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<Slot>, F> {
    SLOT.scope(slot, fut)
}

/// The task side: a slot to publish and the timer that watches it.
pub struct Watch {
    slot: Arc<Slot>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The slot value `timer` last registered the task's waker for: until it fires,
    /// polling it again would only register the same waker again (several times per
    /// request on a connection's task).
    armed: u64,
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            slot: Arc::new(Slot {
                base: Instant::now(),
                deadline: AtomicU64::new(0),
                upstream_waiting: AtomicBool::new(false),
                passed: AtomicU64::new(0),
            }),
            timer: None,
            armed: 0,
        }
    }

    /// The slot to publish (`scope`) to the bodies this watch is for.
    pub fn slot(&self) -> Arc<Slot> {
        self.slot.clone()
    }

    /// Whether the deadline of the body in flight has passed; if not, `cx` is woken
    /// when it does. Poll after the task's connection or stream: a body registers
    /// itself while they are polled. Once passed, the body is marked cut (it warns
    /// as it is dropped): the caller must then drop it.
    ///
    /// As the upstream connection's timer (`conns`), the timer stays armed for an
    /// earlier body's deadline and is moved on when that one fires, instead of being
    /// registered in and removed from the timer wheel per response.
    pub fn poll_overdue(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let v = self.slot.deadline.load(Ordering::Relaxed);
        if v == 0 {
            return Poll::Pending;
        }
        if v == self.armed && self.timer.as_ref().is_some_and(|t| !t.is_elapsed()) {
            return Poll::Pending;
        }
        let at = self.slot.base + std::time::Duration::from_millis(v - 1);
        let timer = match self.timer.as_mut() {
            Some(t) => {
                if t.deadline() > at {
                    // A shorter timeout than the previous body's (another pool's).
                    t.as_mut().reset(at);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => {
                    self.armed = v;
                    return Poll::Pending;
                }
                Poll::Ready(()) if timer.deadline() >= at => {
                    self.slot.passed.store(v, Ordering::Relaxed);
                    return Poll::Ready(());
                }
                // An earlier body's deadline: arm for this one (and register `cx`).
                Poll::Ready(()) => timer.as_mut().reset(at),
            }
        }
    }

    /// Completes when the deadline of the body in flight passes.
    pub async fn overdue(&mut self) {
        std::future::poll_fn(|cx| self.poll_overdue(cx)).await;
    }
}

/// The executor hyper spawns each HTTP/2 stream with: the stream's task publishes its
/// own slot, and is dropped at the deadline of the body it sends (hyper then resets
/// the stream; the connection and its other streams go on; the body warns).
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut watch = Watch::new();
        let fut = scope(watch.slot(), fut);
        tokio::spawn(async move {
            let mut fut = std::pin::pin!(fut);
            std::future::poll_fn(|cx| {
                if fut.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                if watch.poll_overdue(cx).is_ready() {
                    return Poll::Ready(());
                }
                Poll::Pending
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_registered_deadline_is_watched_until_its_body_drops() {
        let mut watch = Watch::new();
        assert!(
            register(Instant::now()).is_none(),
            "no slot outside a scope"
        );
        let at = Instant::now() + Duration::from_millis(50);
        let reg = scope(watch.slot(), async { register(at) })
            .await
            .expect("in scope");
        tokio::time::timeout(Duration::from_secs(2), watch.overdue())
            .await
            .expect("overdue at the deadline");
        assert!(Instant::now() >= at);
        drop(reg);
        let quiet = tokio::time::timeout(Duration::from_millis(100), watch.overdue()).await;
        assert!(quiet.is_err(), "a dropped body is no longer watched");
    }

    #[tokio::test]
    async fn a_passed_deadline_blames_the_side_that_was_waited_for() {
        let mut watch = Watch::new();
        let reg = scope(watch.slot(), async { register(Instant::now()) })
            .await
            .expect("in scope");
        assert_eq!(reg.cut_at_deadline(), None, "not cut before the watch found it passed");
        watch.overdue().await;
        assert_eq!(reg.cut_at_deadline(), Some(false), "a new body waits for nobody yet: the client");
        reg.waiting_for_upstream(true);
        assert_eq!(reg.cut_at_deadline(), Some(true), "the upstream");
        // A later body starts afresh, and is not the one cut.
        let next = scope(watch.slot(), async {
            register(Instant::now() + Duration::from_secs(60))
        })
        .await
        .expect("in scope");
        assert_eq!(next.cut_at_deadline(), None);
        next.waiting_for_upstream(true);
        assert_eq!(next.cut_at_deadline(), None, "its deadline has not passed");
    }

    #[tokio::test]
    async fn a_later_body_replaces_the_earlier_deadline() {
        let mut watch = Watch::new();
        let soon = Instant::now() + Duration::from_millis(30);
        let later = Instant::now() + Duration::from_millis(300);
        let first = scope(watch.slot(), async { register(soon) })
            .await
            .expect("in scope");
        // The timer is armed for the first deadline...
        let armed = tokio::time::timeout(Duration::from_millis(1), watch.overdue()).await;
        assert!(armed.is_err(), "not yet");
        let _second = scope(watch.slot(), async { register(later) })
            .await
            .expect("in scope");
        // The first one's drop must not clear the second's entry.
        drop(first);
        // ...and when it fires, that is no timeout for the second.
        let early = tokio::time::timeout(Duration::from_millis(150), watch.overdue()).await;
        assert!(early.is_err(), "not at the replaced deadline");
        tokio::time::timeout(Duration::from_secs(2), watch.overdue())
            .await
            .expect("overdue at the later deadline");
    }
}
