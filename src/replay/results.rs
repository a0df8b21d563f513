//! The results thread: every replayed request's record goes into the results tape and into the
//! live statistics, on one thread, so that connection tasks never share a lock or a histogram.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;

/// How long the results thread sleeps when nothing is queued.
const NAP: Duration = Duration::from_millis(5);

use super::conn::Live;
use crate::tape::capture::InFlight;
use crate::tape::{Record, Replayed, TapeError, TapeWriter, WriteSummary};

/// What the results thread hands back at the end.
pub struct Collected {
    /// The replay's figures and its recording's, for the closing summary and verdict.
    pub summary: crate::report::Summary,
    pub tape: Option<WriteSummary>,
    /// A write error: the results tape stopped there (the replay itself went on).
    pub error: Option<TapeError>,
}

/// `unwritten` counts dispatched requests by intended instant; each is settled once its result is
/// in the writer's frame, and frames carry the watermark it gives at `clock()` (schedule time),
/// so that readers of results tapes hold back only the requests still in flight.
pub fn spawn(
    mut rx: UnboundedReceiver<Replayed>,
    mut writer: Option<TapeWriter>,
    live: Arc<Live>,
    unwritten: Arc<InFlight>,
    clock: impl Fn() -> u64 + Send + 'static,
    mut builder: crate::report::dataset::ResultsBuilder,
) -> std::thread::JoinHandle<Collected> {
    std::thread::Builder::new()
        .name("loadtape-results".into())
        .spawn(move || {
            super::clock::set_thread_nice(super::clock::BACKGROUND_NICE);
            let mut error = None;
            let mut recent = Histogram::<u64>::new(3).expect("valid precision");
            let mut window = Instant::now();
            // The thread naps and drains what queued, rather than being woken per record: at
            // thousands of requests a second, a wake-up each is a context switch each.
            loop {
                let r = match rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => {
                        std::thread::sleep(NAP);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                };
                builder.add(&r);
                recent
                    .record(r.latency() / 1000)
                    .expect("auto-resizing histograms take any u64");
                if window.elapsed() >= Duration::from_secs(1) {
                    live.recent_p99_us
                        .store(recent.value_at_quantile(0.99), Ordering::Relaxed);
                    recent.reset();
                    window = Instant::now();
                }
                let intended = r.intended;
                if let Some(w) = writer.as_mut() {
                    w.set_watermark(unwritten.watermark(clock()));
                    let written = w
                        .write(&Record::Replayed(Box::new(r)))
                        .and_then(|_| w.tick());
                    if let Err(e) = written {
                        error = Some(e);
                        writer = None;
                    }
                }
                unwritten.settled(intended);
            }
            let tape = match writer.map(|w| w.finish()) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    error.get_or_insert(e);
                    None
                }
                None => None,
            };
            Collected {
                summary: builder.finish_summary(),
                tape,
                error,
            }
        })
        .expect("a thread can be started")
}
