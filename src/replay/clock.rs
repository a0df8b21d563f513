//! The clock: keeps the plan's instants, on a thread of its own.
//!
//! tokio's timer wheel has millisecond resolution, and a task woken by it runs when its worker
//! gets to it: at thousands of requests a second that is most of a millisecond of lag. The clock
//! is a plain thread instead: it sleeps until just before an instant (the kernel's high-resolution
//! sleep wakes within tens of microseconds), spins the rest of the way, and hands the step to
//! its connection's task over a channel, which wakes that task at once. It never waits on the
//! network: an open model sends each request at its instant whatever earlier ones are doing.
//!
//! The clock also owns the map from recorded connections to live ones (preserve mode) or the
//! pool (pooled mode). Only this thread touches them: no lock on the dispatch path.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_util::sync::CancellationToken;

use super::conn::{run_connection, Job, Protocol, Shared};
use super::plan::{ConnKey, ConnectionMode, Step};
use crate::tape::TapeError;

/// How long before an instant the clock stops sleeping and spins. With the thread's timer slack
/// at its minimum, a sleep ends within a few microseconds of its deadline; the spin covers the
/// rest without burning a core the target and the connections need.
const SPIN: Duration = Duration::from_micros(20);
/// The longest single sleep, so that a stop is noticed promptly.
const MAX_NAP: Duration = Duration::from_millis(20);

pub struct Clock {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    mode: ConnectionMode,
    stop: CancellationToken,
    conns: HashMap<ConnKey, Slot>,
    pool: Pool,
    dispatches: u64,
}

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
const MAX_LIVE: usize = 8192;
const IDLE_CLOSE: u64 = 2_000_000_000;

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
        runtime: tokio::runtime::Handle,
        mode: ConnectionMode,
        pool_cap: usize,
        stop: CancellationToken,
    ) -> Clock {
        let (idle_tx, idle_rx) = mpsc::channel();
        Clock {
            shared,
            runtime,
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

    /// Keeps the steps' instants until the plan ends or the run is stopped; returns the plan's
    /// error, if reading the tape failed.
    pub fn run(
        &mut self,
        steps: impl Iterator<Item = Result<Step, TapeError>>,
    ) -> Result<(), TapeError> {
        // Linux rounds sleeps up by the timer slack (50 µs by default): ask for none.
        // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        for step in steps {
            let step = step?;
            let deadline = self.shared.t0 + Duration::from_nanos(step.at());
            if !self.wait_until(deadline) {
                break;
            }
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
                    self.shared.live.clock.store(planned.at, Ordering::Relaxed);
                    let protocol = self.shared.target.protocol_for(planned.version);
                    let conn = planned.conn;
                    let job = Job {
                        planned,
                        dispatched: self.shared.t0.elapsed().as_nanos() as u64,
                    };
                    self.shared.live.dispatched.fetch_add(1, Ordering::Relaxed);
                    match self.mode {
                        ConnectionMode::Preserve => {
                            let at = job.planned.at;
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
        Ok(())
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

    /// Closes every connection once its queue is done.
    pub fn close_all(&mut self) {
        self.conns.clear();
        self.pool.workers.clear();
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
        self.runtime.spawn(run_connection(
            self.shared.clone(),
            rx,
            protocol,
            open_now,
            on_idle,
        ));
        tx
    }

    /// Sleeps, then spins, until `deadline`; false when the run was stopped meanwhile.
    fn wait_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            let left = deadline - now;
            if left > SPIN {
                std::thread::sleep((left - SPIN).min(MAX_NAP));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}
