//! The proxy's path into a tape: it never waits, and what it drops is counted in the tape.

mod common;

use std::time::{Duration, Instant};

use common::*;
use loadtape::tape::capture::{self, CaptureLimits, Unfinished};
use loadtape::tape::{Nanos, Record, TapeWriter, WriterOptions};

fn writer_at(path: &std::path::Path) -> TapeWriter {
    TapeWriter::create(path, header(), WriterOptions::default()).unwrap()
}

/// A capture into `path` whose queue has room for many records but only `bytes` bytes.
fn with_byte_budget(
    path: &std::path::Path,
    bytes: usize,
) -> (capture::CaptureSink, capture::CaptureThread) {
    capture::spawn(
        writer_at(path),
        CaptureLimits {
            records: 1000,
            bytes,
        },
    )
}

fn dropped_in(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| match r {
            Record::Dropped(d) => d.records,
            _ => 0,
        })
        .sum()
}

#[test]
fn everything_offered_to_a_roomy_queue_reaches_the_tape() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let records = exchanges(2000, 11);
    for r in &records {
        assert!(sink.offer(r.clone()));
    }
    let summary = thread.finish().unwrap();
    assert_eq!(summary.records, 2000);
    assert_eq!(summary.dropped, 0);
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    assert_eq!(back, records);
}

#[test]
fn a_full_queue_drops_without_waiting_and_the_tape_counts_the_drops() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    // A queue of 8 records and 16 KiB, fed from four threads as fast as they can.
    let limits = CaptureLimits {
        records: 8,
        bytes: 16 << 10,
    };
    let (sink, thread) = capture::spawn(writer, limits);
    let records = exchanges(5000, 12);
    let accepted: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = records
            .chunks(1250)
            .map(|chunk| {
                let sink = sink.clone();
                s.spawn(move || chunk.iter().filter(|r| sink.offer((*r).clone())).count() as u64)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let counters = sink.counters().clone();
    drop(sink);
    let summary = thread.finish().unwrap();
    let dropped = counters.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        accepted + dropped,
        5000,
        "every record is either written or counted"
    );
    assert!(
        dropped > 0,
        "a queue of 8 fed by four threads must overflow"
    );
    assert_eq!(
        counters.queued_bytes(),
        0,
        "every byte queued was taken or given back"
    );

    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    let exchanges = back
        .iter()
        .filter(|r| matches!(r, Record::Exchange(_)))
        .count() as u64;
    assert_eq!(exchanges, accepted);
    assert_eq!(
        dropped_in(&back),
        dropped,
        "the tape says how many were dropped"
    );
    assert_eq!(summary.dropped, dropped);
}

/// An exchange finished by the writer: its request's target is changed there, and the thread
/// that finished it noted.
struct Retarget {
    record: Record,
    size: usize,
    finished_on: std::sync::mpsc::Sender<Option<String>>,
}

impl Unfinished for Retarget {
    fn finish(self: Box<Self>, _: Option<&(dyn std::any::Any + Send + Sync)>) -> Record {
        let name = std::thread::current().name().map(str::to_string);
        self.finished_on.send(name).unwrap();
        finished(self.record)
    }

    fn approx_size(&self) -> usize {
        self.size
    }

    fn exchange_start(&self) -> Option<Nanos> {
        match &self.record {
            Record::Exchange(e) => Some(e.timing.start),
            _ => None,
        }
    }
}

fn finished(mut record: Record) -> Record {
    if let Record::Exchange(e) = &mut record {
        e.request.target = format!("/finished{}", e.request.target);
    }
    record
}

#[test]
fn unfinished_records_are_finished_on_the_writers_thread_in_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let (tx, finished_on) = std::sync::mpsc::channel();
    let records = exchanges(500, 14);
    let mut expected = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if i % 3 == 0 {
            assert!(sink.offer(r.clone()));
            expected.push(r.clone());
        } else {
            let parts = Retarget {
                record: r.clone(),
                size: 100,
                finished_on: tx.clone(),
            };
            assert!(sink.offer_unfinished(Box::new(parts)));
            expected.push(finished(r.clone()));
        }
    }
    drop(sink);
    let summary = thread.finish().unwrap();
    assert_eq!(summary.records, 500);
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    assert_eq!(back, expected);
    drop(tx);
    let threads: Vec<_> = finished_on.iter().collect();
    assert_eq!(threads.len(), 333);
    assert!(threads.iter().all(|t| t.as_deref() == Some("tape-writer")));
}

/// An exchange finished with what its lane was made with: the lane's name, put in its target.
struct Named(Record);

impl Unfinished for Named {
    fn finish(self: Box<Self>, with: Option<&(dyn std::any::Any + Send + Sync)>) -> Record {
        let name = with.and_then(|w| w.downcast_ref::<String>()).unwrap();
        let mut record = self.0;
        if let Record::Exchange(e) = &mut record {
            e.request.target = format!("/{name}{}", e.request.target);
        }
        record
    }

    fn approx_size(&self) -> usize {
        100
    }

    fn exchange_start(&self) -> Option<Nanos> {
        Some(self.0.start())
    }
}

#[test]
fn each_lanes_unfinished_records_are_finished_with_what_that_lane_was_made_with() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let names = ["left", "right"].map(String::from);
    let finishers = (names.iter())
        .map(|n| Some(std::sync::Arc::new(n.clone()) as capture::Finisher))
        .collect();
    let lanes = sink.lanes_with(finishers);
    drop(sink);
    let records = exchanges(200, 17);
    for (i, r) in records.iter().enumerate() {
        assert!(lanes[i % 2].offer_unfinished(Box::new(Named(r.clone()))));
    }
    drop(lanes);
    thread.finish().unwrap();
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    let mut targets: Vec<_> = (back.iter())
        .filter_map(|r| match r {
            Record::Exchange(e) => Some((e.id, e.request.target.clone())),
            _ => None,
        })
        .collect();
    targets.sort();
    let mut expected: Vec<_> = (records.iter().enumerate())
        .filter_map(|(i, r)| match r {
            Record::Exchange(e) => Some((e.id, format!("/{}{}", names[i % 2], e.request.target))),
            _ => None,
        })
        .collect();
    expected.sort();
    assert_eq!(targets.len(), 200);
    assert_eq!(targets, expected);
}

#[test]
fn unfinished_records_count_against_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, thread) = with_byte_budget(&dir.path().join("t.tape"), 1 << 20);
    let (tx, finished_on) = std::sync::mpsc::channel();
    // Larger than the whole budget: never queued, never finished, counted as dropped.
    for r in exchanges(20, 15) {
        let parts = Retarget {
            record: r,
            size: 2 << 20,
            finished_on: tx.clone(),
        };
        assert!(!sink.offer_unfinished(Box::new(parts)));
    }
    drop(sink);
    thread.finish().unwrap();
    drop(tx);
    assert_eq!(finished_on.iter().count(), 0);
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    assert_eq!(dropped_in(&back), 20);
}

/// A producer's finishing that fails.
struct Broken(Nanos);

impl Unfinished for Broken {
    fn finish(self: Box<Self>, _: Option<&(dyn std::any::Any + Send + Sync)>) -> Record {
        panic!("a bug in finishing a record");
    }

    fn approx_size(&self) -> usize {
        100
    }

    fn exchange_start(&self) -> Option<Nanos> {
        Some(self.0)
    }
}

#[test]
fn a_record_that_cannot_be_finished_is_counted_dropped_and_capture_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let records = exchanges(100, 16);
    for (i, r) in records.iter().enumerate() {
        assert!(sink.offer(r.clone()));
        if i % 10 == 0 {
            assert!(sink.offer_unfinished(Box::new(Broken(r.start()))));
        }
    }
    let counters = sink.counters().clone();
    drop(sink);
    let summary = thread.finish().expect("the writer thread survives");
    assert_eq!(summary.dropped, 10);
    assert_eq!(
        counters.dropped.load(std::sync::atomic::Ordering::Relaxed),
        10
    );
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    let written: Vec<_> = back
        .iter()
        .filter(|r| matches!(r, Record::Exchange(_)))
        .cloned()
        .collect();
    assert_eq!(written, records);
    assert_eq!(dropped_in(&back), 10, "the tape says how many were lost");
}

/// A producer whose record is written, then fails as it takes back what it lent.
struct BrokenAfter(Record);

impl Unfinished for BrokenAfter {
    fn finish(self: Box<Self>, _: Option<&(dyn std::any::Any + Send + Sync)>) -> Record {
        self.0
    }

    fn finish_into(
        self: Box<Self>,
        _: Option<&(dyn std::any::Any + Send + Sync)>,
        write: &mut dyn FnMut(&Record),
    ) {
        write(&self.0);
        panic!("a bug in taking back what the record lent");
    }

    fn approx_size(&self) -> usize {
        100
    }

    fn exchange_start(&self) -> Option<Nanos> {
        Some(self.0.start())
    }
}

#[test]
fn a_record_that_fails_once_written_is_on_the_tape_once_and_not_counted_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_at(&dir.path().join("t.tape"));
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let records = exchanges(50, 17);
    for (i, r) in records.iter().enumerate() {
        if i % 5 == 0 {
            assert!(sink.offer_unfinished(Box::new(BrokenAfter(r.clone()))));
        } else {
            assert!(sink.offer(r.clone()));
        }
    }
    let counters = sink.counters().clone();
    drop(sink);
    let summary = thread.finish().expect("the writer thread survives");
    assert_eq!(summary.dropped, 0);
    assert_eq!(
        counters.dropped.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    assert_eq!(back, records);
}

#[test]
fn a_byte_budget_bounds_the_queue_too() {
    let dir = tempfile::tempdir().unwrap();
    // Room for many records but not for one record's bytes: everything is dropped.
    let (sink, thread) = with_byte_budget(&dir.path().join("t.tape"), 10);
    for r in exchanges(100, 13) {
        assert!(!sink.offer(r));
    }
    drop(sink);
    thread.finish().unwrap();
    let (back, _) = read_one(&dir.path().join("t.tape")).unwrap();
    assert_eq!(
        back.iter()
            .filter(|r| matches!(r, Record::Exchange(_)))
            .count(),
        0
    );
    assert_eq!(dropped_in(&back), 100);
}

#[test]
fn a_tape_being_written_can_be_read_up_to_its_last_flushed_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.tape");
    let options = WriterOptions {
        flush_interval: Duration::from_millis(20),
        ..WriterOptions::default()
    };
    let writer = TapeWriter::create(&path, header(), options).unwrap();
    let (sink, thread) = capture::spawn(writer, CaptureLimits::default());
    let records = exchanges(50, 14);
    for r in &records {
        sink.offer(r.clone());
    }
    // Traffic stops; the writer must still flush on its own, within its interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    let back = loop {
        let (back, stats) = read_one(&path).unwrap();
        if back.len() == records.len() {
            assert!(!stats.files[0].closed, "the tape is still open");
            break back;
        }
        assert!(
            Instant::now() < deadline,
            "the idle writer never flushed ({} read)",
            back.len()
        );
        std::thread::yield_now();
    };
    assert_eq!(back, records);
    thread.finish().unwrap();
    let (_, stats) = read_one(&path).unwrap();
    assert!(stats.files[0].closed);
}

/// Producers with lanes of their own (the proxy's threads) feed one tape: every record is
/// written once, and no frame's watermark passes an exchange still in flight on any lane.
#[test]
fn lanes_of_their_own_feed_one_tape_and_the_watermark_waits_for_every_lane() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let options = WriterOptions {
        frame_bytes: 2048,
        ..WriterOptions::default()
    };
    let writer = TapeWriter::create(&path, header(), options).unwrap();
    // Tape time well past every record's start.
    let start: Nanos = 10_000_000_000_000;
    let clock = Arc::new(AtomicU64::new(start));
    let tape_clock = clock.clone();
    let (root, thread) = capture::spawn_tracking(
        writer,
        CaptureLimits::default(),
        Arc::new(move || tape_clock.load(Ordering::Relaxed)),
    );
    let lanes = root.lanes(2);
    // The second lane has an exchange in flight (10 s of it) while the first offers records.
    let held = start;
    lanes[1].exchange_started(held);
    clock.store(start + 10_000_000_000, Ordering::Relaxed);
    let records = exchanges(1000, 13);
    for r in &records[..500] {
        assert!(lanes[0].offer(r.clone()));
    }
    let counters = root.counters().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.written.load(Ordering::Relaxed) < 500 {
        assert!(Instant::now() < deadline, "the writer took the records");
        std::thread::yield_now();
    }
    // The writer has set a watermark since: the frames it wrote meanwhile stop at the held one.
    let written = loop {
        let bytes = std::fs::read(&path).unwrap();
        let marks = frame_watermarks(&bytes);
        if marks.iter().any(|&m| m > 0) {
            break marks;
        }
        assert!(
            Instant::now() < deadline,
            "frames with a watermark reach the file"
        );
        std::thread::yield_now();
    };
    assert!(
        written.iter().all(|&m| m <= held),
        "{written:?} passed {held}"
    );
    // It settles: the watermark moves on.
    lanes[1].exchange_abandoned(held);
    for (i, r) in records[500..].iter().enumerate() {
        assert!(lanes[i % 2].offer(r.clone()));
    }
    drop(lanes);
    drop(root);
    let summary = thread.finish().unwrap();
    assert_eq!((summary.records, summary.dropped), (1000, 0));
    let bytes = std::fs::read(&path).unwrap();
    assert!(*frame_watermarks(&bytes).last().unwrap() > held);
    let (back, _) = read_one(&path).unwrap();
    let mut ids: Vec<u64> = back
        .iter()
        .map(|r| match r {
            Record::Exchange(e) => e.id,
            other => panic!("{other:?}"),
        })
        .collect();
    ids.sort();
    let mut offered: Vec<u64> = records
        .iter()
        .map(|r| match r {
            Record::Exchange(e) => e.id,
            _ => unreachable!(),
        })
        .collect();
    offered.sort();
    assert_eq!(ids, offered, "every record written once");
}

/// A lane's share of the byte budget does not cap a record's size: one bigger than the share
/// takes room from the overflow common to all lanes, and gives it back once written. One bigger
/// than the whole budget is dropped.
#[test]
fn a_record_bigger_than_its_lanes_share_still_fits_the_queue() {
    use loadtape::tape::{Body, Stored};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let (root, thread) = with_byte_budget(&path, 64 << 10);
    let lanes = root.lanes(4);
    let with_body = |record: &Record, len: usize| {
        let mut record = record.clone();
        let Record::Exchange(e) = &mut record else {
            unreachable!()
        };
        e.response.as_mut().unwrap().body = Body {
            len: len as u64,
            sha256: None,
            stored: Stored::Prefix(vec![7; len]),
            complete: true,
        };
        record
    };
    let records = exchanges(2, 14);
    // A quarter of 64 KiB is 16 KiB: 40 KiB is past the share, within the budget.
    let big = with_body(&records[0], 40 << 10);
    assert!(lanes[0].offer(big.clone()));
    let too_big = with_body(&records[1], 100 << 10);
    assert!(!lanes[1].offer(too_big));
    let counters = root.counters().clone();
    drop((lanes, root));
    let summary = thread.finish().unwrap();
    assert_eq!(
        (summary.records, summary.dropped),
        (2, 1),
        "the exchange and a Dropped note"
    );
    assert_eq!(counters.queued_bytes(), 0, "the overflow was given back");
    let (back, _) = read_one(&path).unwrap();
    let (Record::Exchange(read), Record::Exchange(offered)) = (&back[0], &big) else {
        panic!("the exchange comes first");
    };
    assert_eq!(read.id, offered.id);
    let kept = &read.response.as_ref().unwrap().body.stored;
    assert!(
        *kept == Stored::Prefix(vec![7; 40 << 10]),
        "its body is kept whole"
    );
    assert_eq!(dropped_in(&back), 1);
}
