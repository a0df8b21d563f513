//! The proxy's way into a tape: a queue that never makes its producer wait.
//!
//! The proxy sits in the path of production traffic, so recording must never slow it down. A
//! request task hands its finished record to [`CaptureSink::offer`], which either queues it or,
//! when the queue is full in records or in bytes (the disk is slow or full), drops it and counts
//! it; it never blocks and never locks. A dedicated thread drains the queue into a
//! [`TapeWriter`], notes the drops in the tape as `Dropped` records, flushes frames on time
//! even when traffic stops, and survives write errors: a full disk costs records, not traffic.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::TapeError;
use super::record::{Nanos, Record};
use super::writer::{TapeWriter, WriteSummary};

/// Bounds of the capture queue.
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

/// Counters shared by the producers, the writer thread and whoever reports on them.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    queued_bytes: AtomicUsize,
    /// Drops not yet noted in the tape.
    pending_drops: AtomicU64,
    pending_drop_bytes: AtomicU64,
    /// All records dropped: queue full, or lost to failed writes.
    pub dropped: AtomicU64,
    /// Records handed to the writer.
    pub written: AtomicU64,
    /// Failed writes (each loses one frame).
    pub write_errors: AtomicU64,
    /// See [`CaptureSink::set_watermark`].
    watermark: AtomicU64,
    closing: AtomicBool,
}

/// The producer side. Cheap to clone; every clone feeds the same tape.
#[derive(Clone)]
pub struct CaptureSink {
    tx: SyncSender<(Record, usize)>,
    counters: Arc<CaptureCounters>,
    max_bytes: usize,
}

impl CaptureSink {
    /// Queues `record` for the tape, or drops and counts it when the queue is full. Never waits.
    /// Returns whether it was queued.
    pub fn offer(&self, record: Record) -> bool {
        let size = record.approx_size();
        let c = &self.counters;
        let queued = c.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if queued + size > self.max_bytes {
            c.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.count_drop(size);
            return false;
        }
        match self.tx.try_send((record, size)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                c.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.count_drop(size);
                false
            }
        }
    }

    /// Declares that every exchange starting before `ts` has been offered (the proxy knows which
    /// are still in flight). Readers then reorder with little buffering.
    pub fn set_watermark(&self, ts: Nanos) {
        self.counters.watermark.fetch_max(ts, Ordering::Relaxed);
    }

    pub fn counters(&self) -> &Arc<CaptureCounters> {
        &self.counters
    }

    fn count_drop(&self, size: usize) {
        let c = &self.counters;
        c.pending_drops.fetch_add(1, Ordering::Relaxed);
        c.pending_drop_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        c.dropped.fetch_add(1, Ordering::Relaxed);
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
    let (tx, rx) = sync_channel(limits.records);
    let counters = Arc::new(CaptureCounters::default());
    let thread_counters = counters.clone();
    let handle = std::thread::Builder::new()
        .name("tape-writer".into())
        .spawn(move || drain(writer, rx, &thread_counters))
        .expect("the OS lets us start a thread");
    (
        CaptureSink {
            tx,
            counters: counters.clone(),
            max_bytes: limits.bytes,
        },
        CaptureThread { handle, counters },
    )
}

fn drain(
    mut writer: TapeWriter,
    rx: Receiver<(Record, usize)>,
    c: &CaptureCounters,
) -> Result<WriteSummary, TapeError> {
    let epoch = writer.header().epoch_unix_ns;
    let now = || (super::now_unix_ns() - epoch).max(0) as Nanos;
    let mut failing = false;
    let tick = Duration::from_millis(50);
    loop {
        let mut result = match rx.recv_timeout(tick) {
            Ok((record, size)) => {
                c.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                c.written.fetch_add(1, Ordering::Relaxed);
                writer.write(&record)
            }
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let drops = c.pending_drops.swap(0, Ordering::Relaxed);
        if drops > 0 && result.is_ok() {
            let bytes = c.pending_drop_bytes.swap(0, Ordering::Relaxed);
            result = writer.note_dropped(drops, bytes, now());
        }
        writer.set_watermark(c.watermark.load(Ordering::Relaxed));
        if result.is_ok() {
            result = writer.tick();
        }
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
            Err(other) => return Err(other),
        }
        if c.closing.load(Ordering::Relaxed) {
            // Drain what is queued, then close.
            while let Ok((record, size)) = rx.try_recv() {
                c.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                c.written.fetch_add(1, Ordering::Relaxed);
                let _ = writer.write(&record);
            }
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
