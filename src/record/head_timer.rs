//! The clock behind the client's header read timeout: coarse, per thread, and cheap.
//!
//! hyper arms the header read timeout for every request head it waits for (on a keep-alive
//! connection, the wait for the next request starts as the last response ends), so the
//! timer is armed and dropped once per request. tokio's timers each take an allocation of
//! their own and a registration and a removal in the runtime's timer wheel, under its lock:
//! a tenth of what hyper's HTTP/1 machinery cost the proxy per request. This deadline needs
//! no precision (30 s by default; cutting a slow client off a second late changes nothing), so
//! here a waiting head is a slot in a list of its thread, and one sweeper task per proxy
//! thread wakes the expired ones every tick.
//!
//! Connections never leave the thread that serves them (`listen`), so a slot is registered,
//! updated and freed on one thread; a sleep polled on a thread with no sweeper would never
//! wake, which is why only the proxy threads, which run [`sweep`], use [`HeadTimer`].

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// hyper's [`hyper::rt::Timer`] for the header read timeout. See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadTimer;

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline,
            slot: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(mut s) => s.deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// Takes a head's wait off its thread's list until it is polled again: a connection busy with
/// a request is not woken by the sweeper once the wait's old deadline passes.
pub fn release(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) {
    if let Some(mut s) = sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
        s.release();
    }
}

/// How often a thread's sweeper looks for expired heads: an eighth of the timeout, between
/// 10 ms and a second.
pub fn tick(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Wakes this thread's expired heads every `tick`, for as long as the thread's runtime runs.
pub async fn sweep(tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = Instant::now();
        WAITING.with(|w| {
            for (deadline, waker) in w.borrow().slots.iter().flatten() {
                if *deadline <= now {
                    // Polled, the sleep finds its deadline passed and frees its slot.
                    waker.wake_by_ref();
                }
            }
        });
    }
}

/// One request head waited for.
struct HeadSleep {
    deadline: Instant,
    /// (the registering thread's list, the slot in it)
    slot: Option<(u64, usize)>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            self.release();
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let slot = self.slot;
        self.slot = WAITING.with(|w| {
            let mut w = w.borrow_mut();
            match slot {
                Some((list, k)) if list == w.id => {
                    if let Some((d, waker)) = w.slots[k].as_mut() {
                        *d = deadline;
                        if !waker.will_wake(cx.waker()) {
                            *waker = cx.waker().clone();
                        }
                    }
                    Some((list, k))
                }
                _ => Some((w.id, w.insert(deadline, cx.waker().clone()))),
            }
        });
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl HeadSleep {
    fn release(&mut self) {
        if let Some((list, k)) = self.slot.take() {
            // `try_with`: a sleep dropped while its thread winds down finds no list to leave.
            let _ = WAITING.try_with(|w| {
                let mut w = w.borrow_mut();
                if w.id == list {
                    w.slots[k] = None;
                    w.free.push(k);
                }
            });
        }
    }
}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        self.release();
    }
}

/// The heads a thread waits for: slots reused through a free list, so a busy connection's
/// head after head takes and gives back the same slot without allocating.
struct Waiting {
    /// Tells this thread's list from another's (a slot number alone would not).
    id: u64,
    slots: Vec<Option<(Instant, Waker)>>,
    free: Vec<usize>,
}

impl Waiting {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.slots[k] = Some((deadline, waker));
                k
            }
            None => {
                self.slots.push(Some((deadline, waker)));
                self.slots.len() - 1
            }
        }
    }
}

static LISTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static WAITING: RefCell<Waiting> = RefCell::new(Waiting {
        id: LISTS.fetch_add(1, Ordering::Relaxed),
        slots: Vec::new(),
        free: Vec::new(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(flavor = "current_thread")]
    async fn a_head_wait_ends_after_its_deadline_not_before_and_frees_its_slot() {
        let sweeper = tokio::spawn(sweep(Duration::from_millis(10)));
        let started = Instant::now();
        let mut sleep = HeadTimer.sleep(Duration::from_millis(60));
        // Pushed later before it expires, as hyper does for the next head.
        HeadTimer.reset(&mut sleep, Instant::now() + Duration::from_millis(120));
        tokio::time::timeout(Duration::from_secs(10), sleep.as_mut())
            .await
            .expect("the sweeper wakes an expired head");
        assert!(started.elapsed() >= Duration::from_millis(120));
        // Expired and dropped: its slot is free for the next head.
        drop(sleep);
        let held = WAITING.with(|w| w.borrow().slots.iter().flatten().count());
        assert_eq!(held, 0);
        // Waits dropped before their deadline leave no slot behind either.
        for _ in 0..3 {
            let mut s = HeadTimer.sleep(Duration::from_secs(60));
            let polled = futures_poll_once(s.as_mut()).await;
            assert!(polled.is_pending());
        }
        let held = WAITING.with(|w| w.borrow().slots.iter().flatten().count());
        assert_eq!(held, 0);
        // Released while its connection is busy with a request: off the list until polled.
        let mut s = HeadTimer.sleep(Duration::from_secs(60));
        assert!(futures_poll_once(s.as_mut()).await.is_pending());
        let held = || WAITING.with(|w| w.borrow().slots.iter().flatten().count());
        assert_eq!(held(), 1);
        release(&mut s);
        assert_eq!(held(), 0);
        assert!(futures_poll_once(s.as_mut()).await.is_pending());
        assert_eq!(held(), 1);
        sweeper.abort();
    }

    async fn futures_poll_once(mut f: Pin<&mut dyn hyper::rt::Sleep>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }
}
