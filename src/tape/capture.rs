//! The proxy's way into a tape: a queue that never makes its producer wait.
//!
//! The proxy sits in the path of production traffic, so recording must never slow it down. A
//! request task hands its finished record to [`CaptureSink::offer`], which either queues it or,
//! when the queue is full in records or in bytes (the disk is slow or full), drops it and counts
//! it; it never blocks and never locks. A dedicated thread drains the queue into a
//! [`TapeWriter`], notes the drops in the tape as `Dropped` records, flushes frames on time
//! even when traffic stops, and survives write errors: a full disk costs records, not traffic.
//!
//! A producer may also hand over a record still to be finished ([`Unfinished`], through
//! [`CaptureSink::offer_unfinished`]): the parts as it read them, made a record on the writer's
//! thread. The proxy uses this for what costs most in a record and is not needed to forward:
//! redacting and classifying the heads' fields (a third of recording an exchange), which then
//! leaves the request's path for the writer's core.
//!
//! Producers that offer at the same time each take a lane of their own ([`CaptureSink::lanes`]:
//! a queue, its byte count, its exchanges in flight, with a share of the budget), and the
//! writer drains them all. A single queue and count written by every proxy thread passed their
//! cache lines from core to core on every record, which cost more than the instructions of
//! queueing it.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::TapeError;
use super::record::{Nanos, Record};
use super::writer::{TapeWriter, WriteSummary};

/// A record whose last work is done on the writer's thread, just before it is written.
pub trait Unfinished: Send {
    /// The record, finished; `with` is what its lane was made with ([`Finisher`]), if anything.
    fn finish(self: Box<Self>, with: Option<&(dyn Any + Send + Sync)>) -> Record;
    /// Finishes the record and hands it to `write`, once. What the record only borrows for
    /// its writing it takes back afterwards: the proxy's records lend the redactions of the
    /// heads they share with their connection's others, rather than a copy each, made and
    /// freed on the writer's thread for every record. By default, [`Unfinished::finish`].
    fn finish_into(
        self: Box<Self>,
        with: Option<&(dyn Any + Send + Sync)>,
        write: &mut dyn FnMut(&Record),
    ) {
        write(&self.finish(with));
    }
    /// About how many bytes it holds, counted against [`CaptureLimits::bytes`].
    fn approx_size(&self) -> usize;
    /// The start of the exchange it will be, for the frame watermark.
    fn exchange_start(&self) -> Option<Nanos>;
}

/// What a lane's producer leaves the writer's thread for finishing its [`Unfinished`] records
/// (the proxy's: its thread's redactor), given once with the lane ([`CaptureSink::lanes_with`])
/// rather than with every record: a reference count both threads write would pass its cache
/// line between their cores on every record.
pub type Finisher = Arc<dyn Any + Send + Sync>;

/// What the queue carries: a record, or one to finish.
enum Queued {
    Ready(Record),
    Unfinished(Box<dyn Unfinished>),
}

impl Queued {
    fn write_into(self, with: Option<&Finisher>, write: &mut dyn FnMut(&Record)) {
        match self {
            Queued::Ready(record) => write(&record),
            Queued::Unfinished(parts) => parts.finish_into(with.map(|w| &**w), write),
        }
    }

    fn exchange_start(&self) -> Option<Nanos> {
        match self {
            Queued::Ready(Record::Exchange(e)) => Some(e.timing.start),
            Queued::Ready(_) => None,
            Queued::Unfinished(parts) => parts.exchange_start(),
        }
    }
}

/// Bounds of the capture queue. Lanes ([`CaptureSink::lanes`]) share them out: each has its
/// share of the records and bytes, and a record that would take a lane past its byte share may
/// still take room from an overflow of `bytes` common to all (a body bigger than a share, one
/// thread busier than the others), so at most twice `bytes` wait in memory.
#[derive(Debug, Clone, Copy)]
pub struct CaptureLimits {
    pub records: usize,
    pub bytes: usize,
}

impl Default for CaptureLimits {
    fn default() -> Self {
        CaptureLimits {
            records: 65_536,
            bytes: 64 << 20,
        }
    }
}

/// The in-flight tracker counts exchanges per bucket of their start instant (2^24 ns, about
/// 17 ms): the finer the buckets, the fewer records a reader holds back waiting for the
/// watermark (at 40k exchanges a second, a one-second bucket meant 80k records in memory).
const BUCKET_SHIFT: u32 = 24;
/// Buckets told apart: 8192 of them span 137 s. An exchange in flight longer than that may come
/// after the watermark passed it (the reader then flags it as late).
const IN_FLIGHT_BUCKETS: usize = 8192;
/// How far behind `now` the watermark stays when nothing is in flight: an exchange stamps its
/// start a moment before announcing itself, and must not find the watermark already past it.
const WATERMARK_MARGIN: Nanos = 100_000_000;

/// Exchanges started but not yet written, counted per bucket of their start. The writer's
/// watermark is the start of the oldest bucket with one in flight: every exchange that started
/// before it is on the tape. Atomic counters, no lock: a started exchange costs one increment;
/// the written ones are taken off in one decrement per bucket for each pass of the writer
/// over a lane (a dropped one at once).
///
/// The replay's results writer uses one too: requests are counted at dispatch by their intended
/// instant and settled once their result is written.
#[derive(Debug)]
pub struct InFlight {
    buckets: Box<[AtomicU64]>,
    /// The bucket of the last watermark given: nothing announces itself before it (the margin),
    /// so the next scan starts there rather than 8192 buckets back, hundreds of times a second.
    scanned_to: AtomicU64,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new()
    }
}

impl InFlight {
    pub fn new() -> InFlight {
        InFlight {
            buckets: (0..IN_FLIGHT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            scanned_to: AtomicU64::new(0),
        }
    }

    fn slot(&self, start: Nanos) -> &AtomicU64 {
        &self.buckets[(start >> BUCKET_SHIFT) as usize % IN_FLIGHT_BUCKETS]
    }

    /// Something that started at `start` is under way; its record will come.
    pub fn started(&self, start: Nanos) {
        self.slot(start).fetch_add(1, Ordering::AcqRel);
    }

    /// Its record is written (or will never be).
    pub fn settled(&self, start: Nanos) {
        self.settled_many(start, 1);
    }

    /// `n` records of things started in the bucket of `start` are written.
    fn settled_many(&self, start: Nanos, n: u64) {
        // Never below zero: something not announced settles to nothing.
        let _ = (self.slot(start)).fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
            Some(k.saturating_sub(n))
        });
    }

    /// The watermark at tape time `now`: the start of the oldest bucket with an exchange in
    /// flight, and never later than [`WATERMARK_MARGIN`] before `now`.
    pub fn watermark(&self, now: Nanos) -> Nanos {
        let ceiling = now.saturating_sub(WATERMARK_MARGIN);
        let now_b = now >> BUCKET_SHIFT;
        let oldest = now_b.saturating_sub(IN_FLIGHT_BUCKETS as u64 - 2);
        let from = self
            .scanned_to
            .load(Ordering::Relaxed)
            .clamp(oldest, now_b + 1);
        let mark = (from..=now_b + 1)
            .find(|b| self.buckets[*b as usize % IN_FLIGHT_BUCKETS].load(Ordering::Acquire) > 0)
            .map_or(ceiling, |b| (b << BUCKET_SHIFT).min(ceiling));
        self.scanned_to
            .fetch_max(mark >> BUCKET_SHIFT, Ordering::Relaxed);
        mark
    }
}

/// Counters shared by the producers, the writer thread and whoever reports on them.
#[derive(Debug)]
pub struct CaptureCounters {
    /// Drops not yet noted in the tape.
    pending_drops: AtomicU64,
    pending_drop_bytes: AtomicU64,
    /// All records dropped: queue full, or lost to failed writes.
    pub dropped: AtomicU64,
    /// Records handed to the writer.
    pub written: AtomicU64,
    /// Failed writes (each loses one frame).
    pub write_errors: AtomicU64,
    /// Bytes the writer has written to tape files, and the files it closed for new ones: as
    /// of its last pass.
    pub tape_bytes: AtomicU64,
    pub rotations: AtomicU64,
    closing: AtomicBool,
    /// Bytes queued beyond their lanes' shares, at most `limits.bytes`.
    overflow: AtomicUsize,
    /// Whether lanes track the exchanges in flight (the writer then sets the watermark).
    tracking: bool,
    limits: CaptureLimits,
    lanes: Mutex<Lanes>,
}

/// What a lane carries: a record, or one to finish; its size; whether its bytes were taken
/// from the overflow rather than the lane's share.
struct Parcel {
    queued: Queued,
    size: usize,
    overflow: bool,
}

/// The writer's end of a lane's queue.
type LaneEnd = Receiver<Parcel>;

/// Every lane, and those the writer has yet to take up.
#[derive(Debug, Default)]
struct Lanes {
    all: Vec<Arc<Lane>>,
    new: Vec<(LaneEnd, Arc<Lane>)>,
}

/// One way into the writer: a queue, the bytes waiting in it, the exchanges its producer has in
/// flight. A proxy thread has a lane of its own ([`CaptureSink::lanes`]): offering a record
/// then writes to nothing another proxy thread writes to, where one queue and one count for
/// all had the threads pass their cache lines back and forth on every record.
#[derive(Debug)]
struct Lane {
    queued_bytes: AtomicUsize,
    /// This lane's share of the byte budget.
    max_bytes: usize,
    in_flight: Option<InFlight>,
    finisher: Option<Finisher>,
}

impl Lane {
    fn new(max_bytes: usize, tracking: bool, finisher: Option<Finisher>) -> Lane {
        Lane {
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            in_flight: tracking.then(InFlight::new),
            finisher,
        }
    }

    /// An exchange announced as started on this lane was written or dropped.
    fn exchange_settled(&self, start: Nanos) {
        if let Some(f) = &self.in_flight {
            f.settled(start);
        }
    }
}

/// What the writer took off a lane in one pass, given back to the lane's counts at the pass's
/// end (and every [`TAKING_MOST`] records of a long one) rather than record by record: the
/// producer writes those counts too, and each write from the other side passed their cache
/// line between the two cores. Given back late,
/// a lane's queue looks fuller for a moment (a record may be dropped a moment early in an
/// overload) and its exchanges are in flight a moment longer (the watermark, set after the
/// pass, waits no longer for it).
#[derive(Default)]
struct Taking {
    /// Records taken since the last give-back.
    records: usize,
    bytes: usize,
    overflow: usize,
    /// Exchanges written, of starts in one bucket: (a start in it, how many).
    settled: Option<(Nanos, u64)>,
}

/// The most records [`Taking`] holds before giving back: a pass that drains a busy lane to the
/// end (the last, as the capture closes) must not make that lane look full meanwhile.
const TAKING_MOST: usize = 256;

impl Taking {
    fn dequeued(&mut self, size: usize, overflow: bool) {
        self.records += 1;
        if overflow {
            self.overflow += size;
        } else {
            self.bytes += size;
        }
    }

    fn settled(&mut self, lane: &Lane, start: Nanos) {
        match &mut self.settled {
            Some((s, n)) if *s >> BUCKET_SHIFT == start >> BUCKET_SHIFT => *n += 1,
            run => Taking::settle(lane, run.replace((start, 1))),
        }
    }

    /// Gives it all back.
    fn give_back(self, lane: &Lane, c: &CaptureCounters) {
        if self.bytes > 0 {
            c.dequeued(lane, self.bytes, false);
        }
        if self.overflow > 0 {
            c.dequeued(lane, self.overflow, true);
        }
        Taking::settle(lane, self.settled);
    }

    /// Takes a run of exchanges written off the lane's in flight.
    fn settle(lane: &Lane, run: Option<(Nanos, u64)>) {
        if let (Some((start, n)), Some(f)) = (run, &lane.in_flight) {
            f.settled_many(start, n);
        }
    }
}

impl CaptureCounters {
    /// Bytes of records waiting for the writer (about: [`Record::approx_size`]). Near the
    /// queue's byte budget the writer is falling behind, and records are about to be dropped.
    pub fn queued_bytes(&self) -> usize {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        (lanes.all.iter())
            .map(|l| l.queued_bytes.load(Ordering::Relaxed))
            .sum::<usize>()
            + self.overflow.load(Ordering::Relaxed)
    }

    /// Gives back the bytes of a record leaving `lane`'s queue.
    fn dequeued(&self, lane: &Lane, size: usize, overflow: bool) {
        if overflow {
            self.overflow.fetch_sub(size, Ordering::Relaxed);
        } else {
            lane.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        }
    }

    /// A record of `size` bytes from `lane` (the exchange started at `start`, if one) will not
    /// reach the tape: counted, and noted in the tape by the writer's next `Dropped` record.
    fn count_drop(&self, lane: &Lane, start: Option<Nanos>, size: usize) {
        if let Some(start) = start {
            lane.exchange_settled(start);
        }
        self.pending_drops.fetch_add(1, Ordering::Relaxed);
        self.pending_drop_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A new lane of `records` and `bytes`, for the writer to take up; its producer's end.
    fn add_lane(
        &self,
        records: usize,
        bytes: usize,
        finisher: Option<Finisher>,
    ) -> (SyncSender<Parcel>, Arc<Lane>) {
        let (tx, rx) = sync_channel(records.max(1));
        let lane = Arc::new(Lane::new(bytes, self.tracking, finisher));
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.all.push(lane.clone());
        lanes.new.push((rx, lane.clone()));
        (tx, lane)
    }
}

/// The producer side. Cheap to clone; every clone feeds the same tape, through the same lane.
#[derive(Clone)]
pub struct CaptureSink {
    tx: SyncSender<Parcel>,
    lane: Arc<Lane>,
    counters: Arc<CaptureCounters>,
}

impl CaptureSink {
    /// `n` sinks into the same tape, each through a lane of its own with an `n`-th of the
    /// queue's budget, for producers that offer records at the same time (the proxy's threads).
    pub fn lanes(&self, n: usize) -> Vec<CaptureSink> {
        self.lanes_with(vec![None; n.max(1)])
    }

    /// [`CaptureSink::lanes`], one for each of `finishers`, the writer's thread finishing each
    /// lane's [`Unfinished`] records with its own.
    pub fn lanes_with(&self, finishers: Vec<Option<Finisher>>) -> Vec<CaptureSink> {
        let n = finishers.len().max(1);
        let limits = self.counters.limits;
        (finishers.into_iter())
            .map(|finisher| {
                let (tx, lane) =
                    (self.counters).add_lane(limits.records / n, limits.bytes / n, finisher);
                CaptureSink {
                    tx,
                    lane,
                    counters: self.counters.clone(),
                }
            })
            .collect()
    }

    /// Queues `record` for the tape, or drops and counts it when the queue is full. Never waits.
    /// Returns whether it was queued.
    pub fn offer(&self, record: Record) -> bool {
        let size = record.approx_size();
        self.queue(Queued::Ready(record), size)
    }

    /// [`CaptureSink::offer`] for a record the writer's thread finishes.
    pub fn offer_unfinished(&self, parts: Box<dyn Unfinished>) -> bool {
        let size = parts.approx_size();
        self.queue(Queued::Unfinished(parts), size)
    }

    fn queue(&self, queued: Queued, size: usize) -> bool {
        let (lane, c) = (&self.lane, &self.counters);
        let before = lane.queued_bytes.fetch_add(size, Ordering::Relaxed);
        let overflow = before + size > lane.max_bytes;
        if overflow {
            // Past this lane's share: from the room common to all lanes, if any is left.
            lane.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            if c.overflow.fetch_add(size, Ordering::Relaxed) + size > c.limits.bytes {
                c.overflow.fetch_sub(size, Ordering::Relaxed);
                c.count_drop(lane, queued.exchange_start(), size);
                return false;
            }
        }
        let parcel = Parcel {
            queued,
            size,
            overflow,
        };
        match self.tx.try_send(parcel) {
            Ok(()) => true,
            Err(TrySendError::Full(parcel)) | Err(TrySendError::Disconnected(parcel)) => {
                c.dequeued(lane, size, overflow);
                c.count_drop(lane, parcel.queued.exchange_start(), size);
                false
            }
        }
    }

    /// An exchange starting at `start` is under way; its record will be offered, or it must be
    /// given up with [`CaptureSink::exchange_abandoned`]. Lets the writer set the watermark.
    pub fn exchange_started(&self, start: Nanos) {
        if let Some(f) = &self.lane.in_flight {
            f.started(start);
        }
    }

    /// An exchange announced with [`CaptureSink::exchange_started`] will have no record.
    pub fn exchange_abandoned(&self, start: Nanos) {
        self.lane.exchange_settled(start);
    }

    pub fn counters(&self) -> &Arc<CaptureCounters> {
        &self.counters
    }
}

/// The writer thread. [`CaptureThread::finish`] drains the queue and closes the tape.
pub struct CaptureThread {
    handle: JoinHandle<Result<WriteSummary, TapeError>>,
    counters: Arc<CaptureCounters>,
}

impl CaptureThread {
    /// Stops taking records, writes what is queued, closes the tape.
    pub fn finish(self) -> Result<WriteSummary, TapeError> {
        self.counters.closing.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_else(|_| {
            Err(TapeError::Io {
                action: "finish",
                path: Default::default(),
                source: std::io::Error::other("the capture thread panicked"),
            })
        })
    }
}

/// Starts the writer thread for `writer` behind a queue bounded by `limits`.
pub fn spawn(writer: TapeWriter, limits: CaptureLimits) -> (CaptureSink, CaptureThread) {
    spawn_with(writer, limits, None)
}

/// Like [`spawn`], for a producer that announces exchanges as they start
/// ([`CaptureSink::exchange_started`]): the writer then keeps the frame watermark itself, with
/// `clock` telling it the tape time (ns since the tape epoch) the producer stamps exchanges with.
pub fn spawn_tracking(
    writer: TapeWriter,
    limits: CaptureLimits,
    clock: Arc<dyn Fn() -> Nanos + Send + Sync>,
) -> (CaptureSink, CaptureThread) {
    spawn_with(writer, limits, Some(clock))
}

fn spawn_with(
    writer: TapeWriter,
    limits: CaptureLimits,
    clock: Option<Arc<dyn Fn() -> Nanos + Send + Sync>>,
) -> (CaptureSink, CaptureThread) {
    let counters = Arc::new(CaptureCounters {
        pending_drops: AtomicU64::new(0),
        pending_drop_bytes: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        written: AtomicU64::new(0),
        write_errors: AtomicU64::new(0),
        tape_bytes: AtomicU64::new(0),
        rotations: AtomicU64::new(0),
        closing: AtomicBool::new(false),
        overflow: AtomicUsize::new(0),
        tracking: clock.is_some(),
        limits,
        lanes: Mutex::new(Lanes::default()),
    });
    let (tx, lane) = counters.add_lane(limits.records, limits.bytes, None);
    let thread_counters = counters.clone();
    let handle = std::thread::Builder::new()
        .name("tape-writer".into())
        .spawn(move || drain(writer, &thread_counters, clock))
        .expect("the OS lets us start a thread");
    (
        CaptureSink {
            tx,
            lane,
            counters: counters.clone(),
        },
        CaptureThread { handle, counters },
    )
}

/// Hands the record `queued` (of `size` bytes, from `lane`) is or becomes to `write`. A
/// producer's `finish` that panics before its record is written costs that record (counted as
/// dropped), not the writer thread and with it the rest of the capture; one that panics after
/// (giving back what it lent) costs nothing but the log line. A panic in `write` itself, the
/// writer's own, is not the producer's: it goes on up, as it would without the producer.
fn write_finished(
    queued: Queued,
    size: usize,
    lane: &Lane,
    c: &CaptureCounters,
    write: &mut dyn FnMut(&Record),
) {
    let start = queued.exchange_start();
    let (mut written, mut writing) = (false, false);
    let finish = || {
        queued.write_into(lane.finisher.as_ref(), &mut |record| {
            writing = true;
            write(record);
            (writing, written) = (false, true);
        })
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(finish)) {
        Ok(()) => {}
        Err(panic) if writing => std::panic::resume_unwind(panic),
        Err(_) if written => {
            tracing::error!("a capture record panicked once written (a bug): capture goes on");
        }
        Err(_) => {
            tracing::error!(
                "a capture record could not be finished (a bug): dropped, capture goes on"
            );
            c.count_drop(lane, start, size);
        }
    }
}

/// The lanes the writer drains: a lane whose producers are all gone has no receiver left.
type Taken = Vec<(Option<LaneEnd>, Arc<Lane>)>;

/// Takes up to `most` records off the lanes into `writer`, starting with lane `first` (in
/// turn, so that a writer falling behind does not leave the same lanes to fill and drop): how
/// many it took, and the first write error.
fn take(
    lanes: &mut Taken,
    first: usize,
    most: usize,
    writer: &mut TapeWriter,
    c: &CaptureCounters,
) -> (usize, Result<(), TapeError>) {
    let mut taken = 0;
    let n = lanes.len();
    for i in 0..n {
        let (rx, lane) = &mut lanes[(first + i) % n];
        let Some(queue) = rx else { continue };
        let mut taking = Taking::default();
        let mut result = Ok(());
        while taken < most && result.is_ok() {
            match queue.try_recv() {
                Ok(Parcel {
                    queued,
                    size,
                    overflow,
                }) => {
                    taken += 1;
                    taking.dequeued(size, overflow);
                    write_finished(queued, size, lane, c, &mut |record| {
                        c.written.fetch_add(1, Ordering::Relaxed);
                        result = writer.write(record);
                        // Settled only once in the writer's frame: the watermark never passes
                        // a record still in the queue.
                        if let Record::Exchange(e) = record {
                            taking.settled(lane, e.timing.start);
                        }
                    });
                    if taking.records >= TAKING_MOST {
                        std::mem::take(&mut taking).give_back(lane, c);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    *rx = None;
                    break;
                }
            }
        }
        taking.give_back(lane, c);
        if result.is_err() {
            return (taken, result);
        }
    }
    (taken, Ok(()))
}

fn drain(
    mut writer: TapeWriter,
    c: &CaptureCounters,
    clock: Option<Arc<dyn Fn() -> Nanos + Send + Sync>>,
) -> Result<WriteSummary, TapeError> {
    let epoch = writer.header().epoch_unix_ns;
    let now = || (super::now_unix_ns() - epoch).max(0) as Nanos;
    let mut failing = false;
    let mut lanes: Taken = Vec::new();
    // The lanes added since the last look; whether every producer is gone.
    let take_up = |lanes: &mut Taken| {
        let mut all = c.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.extend(all.new.drain(..).map(|(rx, lane)| (Some(rx), lane)));
        lanes.iter().all(|(rx, _)| rx.is_none())
    };
    // The writer wakes on its own every few milliseconds and takes what has queued, rather
    // than being woken per record: a producer's `offer` then never has to wake a thread (a
    // system call), and the writer costs a few hundred wake-ups a second at any rate. It naps
    // whenever it has emptied the lanes, not only when they were empty: going round again at
    // once, under steady traffic, took the records one or two at a time as they came, each
    // turn's own work (the lanes, the clock, the watermark) then costing more than a record's,
    // and every record's memory taken from the producer's core the moment it was written.
    let nap = Duration::from_millis(5);
    const TURN_MOST: usize = 4096;
    let mut turn = 0;
    take_up(&mut lanes);
    loop {
        turn += 1;
        let (taken, mut result) = take(&mut lanes, turn, TURN_MOST, &mut writer, c);
        // Every lane emptied and closed, and none added since: no producer is left.
        if take_up(&mut lanes) {
            break;
        }
        if taken < TURN_MOST && !c.closing.load(Ordering::Relaxed) {
            std::thread::sleep(nap);
        }
        let drops = c.pending_drops.swap(0, Ordering::Relaxed);
        if drops > 0 && result.is_ok() {
            let bytes = c.pending_drop_bytes.swap(0, Ordering::Relaxed);
            result = writer.note_dropped(drops, bytes, now());
        }
        if let Some(clock) = &clock {
            // The time first, then the lanes: a lane added after this look has nothing in
            // flight that started before `now`.
            let now = clock();
            take_up(&mut lanes);
            let marks = lanes.iter().filter_map(|(_, l)| l.in_flight.as_ref());
            if let Some(mark) = marks.map(|f| f.watermark(now)).min() {
                writer.set_watermark(mark);
            }
        }
        if result.is_ok() {
            result = writer.tick();
        }
        let written = writer.summary();
        c.tape_bytes.store(written.bytes, Ordering::Relaxed);
        c.rotations.store(written.rotations, Ordering::Relaxed);
        match result {
            Ok(()) if failing => {
                tracing::info!("tape writes succeed again");
                failing = false;
            }
            Ok(()) => {}
            Err(TapeError::Write {
                records_lost,
                source,
                path,
            }) => {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
                c.dropped.fetch_add(records_lost, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(
                        "cannot write tape {}: {source}; dropping capture records ({records_lost} so far) while traffic goes on",
                        path.display()
                    );
                }
                failing = true;
            }
            Err(other) => {
                // Rotation or closing failed (a full disk): traffic goes on, the writer retries
                // at its next frame.
                c.write_errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::warn!("{other}; capture records may be dropped while this lasts");
                }
                failing = true;
            }
        }
        if c.closing.load(Ordering::Relaxed) {
            // Drain what is queued, then close.
            take_up(&mut lanes);
            while let (1.., _) = take(&mut lanes, 0, usize::MAX, &mut writer, c) {}
            break;
        }
    }
    let drops = c.pending_drops.swap(0, Ordering::Relaxed);
    if drops > 0 {
        let bytes = c.pending_drop_bytes.swap(0, Ordering::Relaxed);
        let _ = writer.note_dropped(drops, bytes, now());
    }
    let (summary, error) = writer.finish_best_effort();
    if let Some(e) = error {
        c.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{e}; the tape reads up to its last whole frame");
    }
    c.dropped.store(
        summary.dropped.max(c.dropped.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Nanos = 1 << BUCKET_SHIFT;

    #[test]
    fn the_watermark_stops_at_the_oldest_exchange_in_flight_and_never_goes_back() {
        let f = InFlight::new();
        let now = 1000 * B;
        assert_eq!(f.watermark(now), now - WATERMARK_MARGIN);
        // Started within the margin: the watermark holds at its bucket.
        let s = now - WATERMARK_MARGIN / 2;
        f.started(s);
        assert_eq!(f.watermark(now), now - WATERMARK_MARGIN);
        let later = now + 50 * B;
        assert_eq!(f.watermark(later), (s >> BUCKET_SHIFT) << BUCKET_SHIFT);
        // A second one in the same bucket, then the first settles: still held.
        f.started(s + 1);
        f.settled(s);
        assert_eq!(f.watermark(later), (s >> BUCKET_SHIFT) << BUCKET_SHIFT);
        f.settled(s + 1);
        assert_eq!(f.watermark(later), later - WATERMARK_MARGIN);
        // Long after (beyond the buckets told apart), still the ceiling; an exchange started
        // then is found.
        let much_later = later + (IN_FLIGHT_BUCKETS as Nanos + 10) * B;
        assert_eq!(f.watermark(much_later), much_later - WATERMARK_MARGIN);
        f.started(much_later - WATERMARK_MARGIN / 2);
        assert_eq!(
            f.watermark(much_later + WATERMARK_MARGIN),
            ((much_later - WATERMARK_MARGIN / 2) >> BUCKET_SHIFT) << BUCKET_SHIFT
        );
    }
}
