//! The clocks: keep the plan's instants, each on a thread of its own that also runs the
//! connections it dispatches to.
//!
//! What was measured on the way here (2-core VM, nginx on loopback): handing each request from
//! a timing thread to a multi-threaded runtime cost a futex, an eventfd write and a context
//! switch per request (37k switches a second at 10k requests a second, 0.74 CPU, and the
//! wake-ups' latency showed as lag). Sleeping to every instant on a high-resolution timer instead
//! cost two system calls and a wake-up per request, and a woken thread waits behind running ones
//! for up to the scheduler's granularity: on a busy core the lag reached milliseconds by 20k/s.
//!
//! So a clock is a single-threaded runtime whose main task is the schedule. Far from the next
//! instant it sleeps on a `timerfd` (microsecond precision, in the same epoll set as the
//! connections, so the runtime serves them meanwhile); within [`POLL_WITHIN`] (300 µs) of it, it yields
//! in a loop, each turn letting the runtime poll the network without blocking and run the
//! connection tasks that are ready, and it dispatches at the instant to a connection task on the
//! same thread: no system call and no cross-thread wake-up per request. While requests are less
//! than 300 µs apart a clock keeps its core busy; that is the price of microsecond lag. (Polling
//! for 2 ms before each instant kept lag lower still on a busy core, but starved co-located
//! processes of their time slices: a test's in-process target saw 3 ms delays.)
//!
//! With `--threads N`, the plan spreads recorded connections over N clocks (pooled requests in
//! turn), each owning its connections: no lock on the dispatch path, nothing shared but atomic
//! counters and the results channel. It never waits on the network: an open model sends each
//! request at its instant whatever earlier ones are doing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, Receiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

use super::conn::{run_connection, Job, Protocol, Shared};
use super::plan::{ConnKey, ConnectionMode, Step};
use crate::tape::TapeError;

/// A live connection standing for a recorded one.
struct Slot {
    tx: UnboundedSender<Job>,
    /// The intended instant of its latest request (or its opening).
    last: u64,
}

/// Recorded connections whose close is not on the tape (synthetic tapes, a recorder killed)
/// would otherwise stay open for ever: past this many live connections, those idle for
/// [`IDLE_CLOSE`] of schedule time are closed, and past [`MAX_LIVE`] the least recently used
/// half.
const SOFT_LIVE: usize = 512;
/// Requests a clock may have dispatched and not yet done (each holds its prepared request).
const MAX_OUTSTANDING: u64 = 8_192;
const MAX_LIVE: usize = 8192;
const IDLE_CLOSE: u64 = 2_000_000_000;

pub struct Clock {
    shared: Arc<Shared>,
    mode: ConnectionMode,
    stop: CancellationToken,
    conns: HashMap<ConnKey, Slot>,
    pool: Pool,
    dispatches: u64,
}

/// Pooled mode: HTTP/1.1 connections each carry one request at a time, so a request goes to an
/// idle one, or a new one while under the cap, or (at the cap) queues behind a busy one and
/// counts as late. HTTP/2 connections multiplex: requests take them in turn.
struct Pool {
    workers: Vec<UnboundedSender<Job>>,
    idle: Vec<usize>,
    idle_tx: mpsc::Sender<usize>,
    idle_rx: mpsc::Receiver<usize>,
    cap: usize,
    next: usize,
}

impl Clock {
    pub fn new(
        shared: Arc<Shared>,
        mode: ConnectionMode,
        pool_cap: usize,
        stop: CancellationToken,
    ) -> Clock {
        let (idle_tx, idle_rx) = mpsc::channel();
        Clock {
            shared,
            mode,
            stop,
            conns: HashMap::new(),
            dispatches: 0,
            pool: Pool {
                workers: Vec::new(),
                idle: Vec::new(),
                idle_tx,
                idle_rx,
                cap: pool_cap.max(1),
                next: 0,
            },
        }
    }

    /// Runs on the clock's own single-threaded runtime: keeps the steps' instants until the
    /// plan ends or the run is stopped, then lets in-flight requests finish within `drain`.
    /// Returns the plan's error, if reading the tape failed.
    pub async fn run(
        mut self,
        mut steps: Receiver<Vec<Result<Step, TapeError>>>,
        drain: Duration,
    ) -> Result<(), TapeError> {
        // Linux rounds sleeps (and epoll timeouts) up by the timer slack, 50 µs by default:
        // ask for none.
        // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let timer = PreciseTimer::new();
        let mut result = Ok(());
        'plan: while let Some(batch) = steps.recv().await {
            for step in batch {
                let step = match step {
                    Ok(s) => s,
                    Err(e) => {
                        result = Err(e);
                        break 'plan;
                    }
                };
                // Everything before this step is dispatched (see `Shared::progress`).
                self.shared.progress.store(step.at(), Ordering::Release);
                let deadline = self.shared.t0 + Duration::from_nanos(step.at());
                if !self.wait_until(timer.as_ref().ok(), deadline).await {
                    break 'plan;
                }
                if matches!(step, Step::Send(_)) && !self.room_for_one_more().await {
                    break 'plan;
                }
                self.step(step);
            }
        }
        // Stop taking steps (the plan thread sees the channel close), close every connection
        // once its queue is done, and let what is in flight finish.
        drop(steps);
        self.shared.progress.store(u64::MAX, Ordering::Release);
        self.conns.clear();
        self.pool.workers.clear();
        let drain_until = Instant::now() + drain;
        while self.shared.outstanding.load(Ordering::Acquire) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        result
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Open { conn, version, at } => {
                let protocol = self.shared.target.protocol_for(version);
                let tx = self.spawn(protocol, true, None);
                self.conns.insert(conn, Slot { tx, last: at });
            }
            Step::Close { conn, .. } => {
                // Its task sends what it has queued, then closes.
                self.conns.remove(&conn);
            }
            Step::Send(planned) => {
                let live = &self.shared.live;
                live.clock.fetch_max(planned.at, Ordering::Relaxed);
                let protocol = self.shared.target.protocol_for(planned.version);
                let conn = planned.conn;
                let at = planned.at;
                let job = Job {
                    planned,
                    dispatched: self.shared.t0.elapsed().as_nanos() as u64,
                };
                live.dispatched.fetch_add(1, Ordering::Relaxed);
                self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
                self.shared.unwritten.started(at);
                match self.mode {
                    ConnectionMode::Preserve => {
                        match self.conns.get_mut(&conn) {
                            Some(slot) => {
                                slot.last = at;
                                let _ = slot.tx.send(job);
                            }
                            None => {
                                let tx = self.spawn(protocol, false, None);
                                let _ = tx.send(job);
                                self.conns.insert(conn, Slot { tx, last: at });
                            }
                        }
                        self.dispatches += 1;
                        if self.dispatches % 256 == 0 && self.conns.len() > SOFT_LIVE {
                            self.retire(at);
                        }
                    }
                    ConnectionMode::Pooled => self.pooled(protocol, job),
                }
            }
        }
    }

    /// Waits while [`MAX_OUTSTANDING`] requests are dispatched and not done: a target slower
    /// than the schedule (or too few connections) must not grow queues without bound. The wait
    /// shows as dispatch lag, and the run is marked invalid: the schedule was not kept. False
    /// when the run was stopped meanwhile.
    async fn room_for_one_more(&self) -> bool {
        while self.shared.outstanding.load(Ordering::Acquire) >= MAX_OUTSTANDING {
            if self.stop.is_cancelled() {
                return false;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        true
    }

    fn retire(&mut self, now: u64) {
        self.conns
            .retain(|_, slot| slot.last.saturating_add(IDLE_CLOSE) > now);
        if self.conns.len() > MAX_LIVE {
            let mut lasts: Vec<u64> = self.conns.values().map(|s| s.last).collect();
            let half = lasts.len() / 2;
            let (_, median, _) = lasts.select_nth_unstable(half);
            let median = *median;
            self.conns.retain(|_, slot| slot.last > median);
        }
    }

    fn pooled(&mut self, protocol: Protocol, job: Job) {
        let pool = &mut self.pool;
        while let Ok(i) = pool.idle_rx.try_recv() {
            pool.idle.push(i);
        }
        let i = if protocol == Protocol::Http1 && !pool.idle.is_empty() {
            pool.idle.pop().expect("not empty")
        } else if pool.workers.len() < pool.cap {
            let i = pool.workers.len();
            let on_idle: Option<Box<dyn Fn() + Send + Sync>> = if protocol == Protocol::Http1 {
                let idle_tx = pool.idle_tx.clone();
                Some(Box::new(move || {
                    let _ = idle_tx.send(i);
                }))
            } else {
                None
            };
            let tx = self.spawn(protocol, false, on_idle);
            self.pool.workers.push(tx);
            i
        } else {
            pool.next = (pool.next + 1) % pool.workers.len();
            pool.next
        };
        let _ = self.pool.workers[i].send(job);
    }

    fn spawn(
        &self,
        protocol: Protocol,
        open_now: bool,
        on_idle: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> UnboundedSender<Job> {
        let (tx, rx) = unbounded_channel();
        tokio::spawn(run_connection(
            self.shared.clone(),
            rx,
            protocol,
            open_now,
            on_idle,
        ));
        tx
    }

    /// Waits for `deadline`; false when the run was stopped meanwhile. Far from it, the thread
    /// sleeps on the precise timer (the runtime serves the connections meanwhile) until
    /// [`POLL_WITHIN`] before it; then it polls, each turn letting the runtime poll the network
    /// without blocking and run what is ready.
    async fn wait_until(&self, timer: Option<&PreciseTimer>, deadline: Instant) -> bool {
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            if deadline - now <= POLL_WITHIN {
                tokio::task::yield_now().await;
                continue;
            }
            let wake = deadline - POLL_WITHIN / 2;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                r = async {
                    match timer {
                        Some(t) => t.sleep_until(wake).await,
                        None => {
                            // tokio's timer fires up to a millisecond late.
                            tokio::time::sleep_until((deadline - TOKIO_TIMER_SLACK).into()).await;
                            Ok(())
                        }
                    }
                } => {
                    if let Err(e) = r {
                        tracing::debug!("the precise timer failed: {e}");
                        tokio::time::sleep_until((deadline - TOKIO_TIMER_SLACK).into()).await;
                    }
                }
            }
        }
    }
}

/// Within this of an instant the clock polls instead of sleeping.
const POLL_WITHIN: Duration = Duration::from_micros(300);
/// Without a timerfd, tokio's timer (which fires up to a millisecond late) aims this early.
const TOKIO_TIMER_SLACK: Duration = Duration::from_micros(1500);

/// Scheduling priority (nice) of the results thread, which does bulk work that can wait. (A
/// clock preferred over the plan thread starved it on a busy core: both keep normal priority.)
pub const BACKGROUND_NICE: i32 = 10;

/// Sets the calling thread's nice value; false when not permitted.
pub fn set_thread_nice(value: i32) -> bool {
    // SAFETY: gettid and setpriority take plain integers and touch only this thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, value) == 0
    }
}

/// A `timerfd` in the runtime's epoll set: sleeps to the microsecond without a thread of its
/// own.
struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl PreciseTimer {
    fn new() -> std::io::Result<PreciseTimer> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create returns a new descriptor we own, or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the descriptor is owned by the AsyncFd and closed only when it is dropped
        // (and deregistered).
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(PreciseTimer { fd })
    }

    async fn sleep_until(&self, deadline: Instant) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let left = deadline - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                },
            };
            let raw = self.fd.get_ref().as_raw_fd();
            // SAFETY: raw is our open timerfd; spec is a valid itimerspec.
            if unsafe { libc::timerfd_settime(raw, 0, &spec, std::ptr::null_mut()) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut guard = self.fd.readable().await?;
            // The next timerfd_settime resets the expiry count (and with it the descriptor's
            // readiness): forgetting tokio's readiness is enough, no read needed.
            guard.clear_ready();
        }
    }
}
