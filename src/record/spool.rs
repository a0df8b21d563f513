//! `--bodies full`: whole bodies on the tape, as content-addressed blobs, without holding them
//! in memory or waiting on the disk.
//!
//! A tapped body hands each chunk (a refcounted `Bytes`, no copy) to the spool thread through a
//! queue that never blocks; the thread appends it to a file in a spool directory. Bytes spooled
//! and not yet on the tape count against a global budget; a body that would exceed it, or
//! `--max-body`, or that meets a full queue, is given up: its exchange keeps length and sha256
//! only. When an exchange with spooled bodies is complete it goes to the tape through the spool
//! thread too, after its blobs, so a blob always precedes the first exchange that refers to it
//! (the tape writer keeps each blob once per directory).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::tape::capture::CaptureSink;
use crate::tape::{Blob, Exchange, Record, Stored};

enum Message {
    Chunk(u64, Bytes),
    End(u64),
    Abort(u64),
    /// An exchange whose bodies with these ids were spooled (request, response), and the lane
    /// its records take to the tape: the one its exchange was announced on, so that its blobs
    /// stay ahead of it and it settles where it started.
    Exchange(Box<Exchange>, [Option<u64>; 2], CaptureSink),
    Stop,
}

/// The producer side: shared by all taps.
pub struct Spool {
    tx: SyncSender<Message>,
    /// Bytes handed to the spool and not yet turned into blobs.
    held: Arc<AtomicU64>,
    budget: u64,
    max_body: u64,
    next_id: AtomicU64,
}

/// One body on its way into the spool.
pub struct SpoolBody {
    spool: Arc<Spool>,
    id: u64,
    len: u64,
    alive: bool,
}

impl Spool {
    /// Starts the spool thread, spooling into `dir` and handing blobs and exchanges to the
    /// sink each exchange comes with.
    pub fn start(
        dir: PathBuf,
        budget: u64,
        max_body: u64,
    ) -> std::io::Result<(Arc<Spool>, SpoolThread)> {
        std::fs::create_dir_all(&dir)?;
        let (tx, rx) = sync_channel(16_384);
        let held = Arc::new(AtomicU64::new(0));
        let spool = Arc::new(Spool {
            tx: tx.clone(),
            held: held.clone(),
            budget,
            max_body,
            next_id: AtomicU64::new(1),
        });
        let handle = std::thread::Builder::new()
            .name("body-spool".into())
            .spawn(move || run(dir, rx, held))?;
        Ok((spool, SpoolThread { tx, handle }))
    }

    /// A new body to spool.
    pub fn body(self: &Arc<Self>) -> SpoolBody {
        SpoolBody {
            spool: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            len: 0,
            alive: true,
        }
    }

    /// Hands a finished exchange over; it reaches the tape through `sink` after its spooled
    /// bodies' blobs. Returns it back when the spool cannot take it (its queue is full).
    pub fn exchange(
        &self,
        exchange: Exchange,
        bodies: [Option<u64>; 2],
        sink: &CaptureSink,
    ) -> Result<(), Box<Exchange>> {
        match self
            .tx
            .try_send(Message::Exchange(Box::new(exchange), bodies, sink.clone()))
        {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(Message::Exchange(e, ..)))
            | Err(std::sync::mpsc::TrySendError::Disconnected(Message::Exchange(e, ..))) => Err(e),
            Err(_) => unreachable!("the message sent is an exchange"),
        }
    }
}

impl SpoolBody {
    /// Spools a chunk, or gives the body up when it grows past the limits.
    pub fn push(&mut self, data: &Bytes) {
        if !self.alive {
            return;
        }
        let n = data.len() as u64;
        let s = &self.spool;
        let held = s.held.fetch_add(n, Ordering::Relaxed) + n;
        self.len += n;
        if self.len > s.max_body
            || held > s.budget
            || s.tx
                .try_send(Message::Chunk(self.id, data.clone()))
                .is_err()
        {
            s.held.fetch_sub(n, Ordering::Relaxed);
            self.give_up();
        }
    }

    /// The body ended whole: its id, when it was spooled whole.
    pub fn finish(mut self) -> Option<u64> {
        if self.alive && self.spool.tx.try_send(Message::End(self.id)).is_ok() {
            self.alive = false;
            return Some(self.id);
        }
        self.give_up();
        None
    }

    fn give_up(&mut self) {
        if self.alive {
            self.alive = false;
            // If even this cannot be queued, the spool thread sweeps the orphan at its next end.
            let _ = self.spool.tx.try_send(Message::Abort(self.id));
        }
    }
}

impl Drop for SpoolBody {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// The spool thread; [`SpoolThread::finish`] lets it hand over what it holds and stop.
pub struct SpoolThread {
    tx: SyncSender<Message>,
    handle: JoinHandle<()>,
}

impl SpoolThread {
    pub fn finish(self) {
        let _ = self.tx.send(Message::Stop);
        let _ = self.handle.join();
    }
}

struct Spooled {
    file: Option<File>,
    path: PathBuf,
    len: u64,
    ended: bool,
}

fn run(dir: PathBuf, rx: Receiver<Message>, held: Arc<AtomicU64>) {
    let mut bodies: HashMap<u64, Spooled> = HashMap::new();
    let forget = |bodies: &mut HashMap<u64, Spooled>, id: u64| {
        if let Some(b) = bodies.remove(&id) {
            held.fetch_sub(b.len, Ordering::Relaxed);
            let _ = std::fs::remove_file(&b.path);
        }
    };
    while let Ok(message) = rx.recv() {
        match message {
            Message::Chunk(id, data) => {
                let body = bodies.entry(id).or_insert_with(|| {
                    let path = dir.join(format!("{id}.body"));
                    Spooled {
                        file: File::create(&path).ok(),
                        path,
                        len: 0,
                        ended: false,
                    }
                });
                body.len += data.len() as u64;
                if let Some(f) = body.file.as_mut() {
                    if f.write_all(&data).is_err() {
                        // Disk full: this body will not be stored whole.
                        body.file = None;
                    }
                }
            }
            Message::End(id) => {
                if let Some(b) = bodies.get_mut(&id) {
                    b.ended = true;
                }
            }
            Message::Abort(id) => forget(&mut bodies, id),
            Message::Exchange(mut exchange, ids, sink) => {
                // A blob carries its exchange's start, so that readers, which order by start,
                // still meet it first.
                let at = exchange.timing.start;
                let sides = [
                    Some(&mut exchange.request.body),
                    exchange.response.as_mut().ok().map(|r| &mut r.body),
                ];
                for (side, id) in sides.into_iter().zip(ids) {
                    let (Some(body), Some(id)) = (side, id) else {
                        continue;
                    };
                    let spooled = bodies.remove(&id);
                    let data = spooled.as_ref().and_then(|s| {
                        let whole = s.ended && s.file.is_some() && s.len == body.len;
                        whole.then(|| std::fs::read(&s.path).ok()).flatten()
                    });
                    if let Some(s) = &spooled {
                        held.fetch_sub(s.len, Ordering::Relaxed);
                        let _ = std::fs::remove_file(&s.path);
                    }
                    // Full only when the blob is on its way to the tape; the prefix otherwise.
                    if let (Some(data), Some(sha256)) = (data, body.sha256) {
                        let blob = Record::Blob(Box::new(Blob { at, sha256, data }));
                        if sink.offer(blob) {
                            body.stored = Stored::Full(sha256);
                        }
                    }
                }
                sink.offer(Record::Exchange(exchange));
            }
            Message::Stop => break,
        }
    }
    for id in bodies.keys().copied().collect::<Vec<_>>() {
        forget(&mut bodies, id);
    }
    let _ = std::fs::remove_dir(&dir);
}
