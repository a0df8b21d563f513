//! Bodies that stream through while being measured.
//!
//! A [`TapBody`] wraps a body on its way through the proxy and hands every frame on unchanged,
//! the moment it arrives; on the side it counts the bytes, keeps the first ones, and hashes them
//! (sha256) once they outgrow what is kept. When the body ends, fails, or is dropped half-way (a
//! client gone mid-upload), it reports a [`BodySummary`] once to whoever waits for it. Memory
//! stays bounded by the prefix kept, whatever the body's size.
//!
//! A body kept whole is not hashed as it passes: most of the bodies a registry's clients send
//! and get are small JSON kept whole, and hashing each on the proxy thread was a tenth of what
//! capture cost. Its digest is the stored bytes' (`sha256` stays `None`), which the tape's
//! reader derives (`crate::tape::codec`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

use super::spool::{Spool, SpoolBody};

/// What passed through a body.
#[derive(Debug, Clone, Default)]
pub struct BodySummary {
    pub len: u64,
    /// sha256 of the bytes that passed; `None` when none did, or when all that passed is in
    /// `prefix` (the digest is the prefix's; see the module docs).
    pub sha256: Option<[u8; 32]>,
    /// The first bytes, up to the keep limit.
    pub prefix: Vec<u8>,
    /// The body ended normally (not cut short).
    pub complete: bool,
    /// Spooled whole ([`super::spool`]) under this id.
    pub spooled: Option<u64>,
}

/// Who is told when a tapped body ends.
pub trait TapDone: Send + Sync + 'static {
    fn body_done(&self, summary: BodySummary);
    /// An empty buffer for the body's kept prefix, handed back full in
    /// [`BodySummary::prefix`]: the capture gives the buffer of an earlier record, its
    /// capacity kept, rather than a new one made on this thread and freed on the tape
    /// writer's (`record::exchange`). None by default: one is made as the body comes.
    fn prefix_buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }
}

/// A body passed through unchanged while [`BodySummary`] is computed. See the module docs.
pub struct TapBody<B: Body, D: TapDone> {
    inner: B,
    tap: Option<Tap<D>>,
}

struct Tap<D> {
    len: u64,
    /// Started when the body outgrows `keep`; boxed, as most bodies never need it and a tapped
    /// body is moved whole through the proxy's futures.
    hasher: Option<Box<Sha256>>,
    prefix: Vec<u8>,
    keep: usize,
    /// With `--bodies full`: where the body goes once it outgrows the prefix.
    spool: Option<Arc<Spool>>,
    spooling: Option<SpoolBody>,
    done: D,
}

impl<D: TapDone> Tap<D> {
    fn finish(mut self, complete: bool) {
        let sha256 = self.hasher.take().map(|h| h.finalize().into());
        let spooled = match self.spooling.take() {
            Some(body) if complete => body.finish(),
            _ => None,
        };
        let summary = BodySummary {
            len: self.len,
            sha256,
            prefix: std::mem::take(&mut self.prefix),
            complete,
            spooled,
        };
        self.done.body_done(summary);
    }
}

impl<B: Body, D: TapDone> TapBody<B, D> {
    /// Taps `inner`, keeping its first `keep` bytes, and tells `done` when it ends.
    pub fn new(inner: B, keep: usize, done: D) -> TapBody<B, D> {
        TapBody::spooling(inner, keep, None, done)
    }

    /// The body tapped.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Like [`TapBody::new`], spooling the whole body into `spool` once it outgrows `keep`.
    pub fn spooling(
        inner: B,
        keep: usize,
        spool: Option<Arc<Spool>>,
        mut done: D,
    ) -> TapBody<B, D> {
        let mut prefix = done.prefix_buffer();
        prefix.clear();
        TapBody {
            inner,
            tap: Some(Tap {
                len: 0,
                hasher: None,
                prefix,
                keep,
                spool,
                spooling: None,
                done,
            }),
        }
    }
}

impl<B, D> Body for TapBody<B, D>
where
    B: Body<Data = Bytes> + Unpin,
    D: TapDone + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tap)) = (frame.data_ref(), self.tap.as_mut()) {
                    tap.len += data.len() as u64;
                    if let Some(hasher) = tap.hasher.as_mut() {
                        hasher.update(data);
                    } else if tap.len > tap.keep as u64 {
                        // Outgrown: what passed before is all in the prefix.
                        let mut hasher = Box::new(Sha256::new());
                        hasher.update(&tap.prefix);
                        hasher.update(data);
                        tap.hasher = Some(hasher);
                    }
                    let room = tap.keep.saturating_sub(tap.prefix.len());
                    let took = room.min(data.len());
                    if took > 0 {
                        tap.prefix.extend_from_slice(&data[..took]);
                    }
                    if let Some(spooling) = tap.spooling.as_mut() {
                        spooling.push(data);
                    } else if tap.len > tap.keep as u64 {
                        if let Some(spool) = &tap.spool {
                            // The body outgrew the prefix: from now on it is spooled whole.
                            let mut body = spool.body();
                            body.push(&Bytes::copy_from_slice(&tap.prefix));
                            body.push(&data.slice(took..));
                            tap.spooling = Some(body);
                        }
                    }
                }
                // A body of known length is complete with its last byte: hyper need not poll
                // it again.
                if self.inner.is_end_stream() {
                    if let Some(tap) = self.tap.take() {
                        tap.finish(true);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(tap) = self.tap.take() {
                    tap.finish(false);
                }
            }
            Poll::Ready(None) => {
                if let Some(tap) = self.tap.take() {
                    tap.finish(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, D: TapDone> Drop for TapBody<B, D> {
    fn drop(&mut self) {
        // Dropped before its end was seen: complete if nothing was left to read (an empty body
        // hyper never polled), cut short otherwise (the peer went away mid-body).
        if let Some(tap) = self.tap.take() {
            tap.finish(self.inner.is_end_stream());
        }
    }
}
