//! Response bodies that do something as they pass: count their request when done, give their
//! connection back at their end, keep a breaker's slot while they last. hyper's `Body` is
//! delegated here once; each duty is a `Watch`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// What a body's passage tells a duty.
pub trait Watch: Send + Sync + Unpin + 'static {
    /// A frame went by (data or trailers).
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
    /// The body was read to its end (or dropped there: hyper may stop at a known length).
    fn ended(&mut self) {}
    /// The body failed.
    fn failed(&mut self) {}
}

/// `inner`, with `watch` told what passes.
pub struct Watched<B: Body, W: Watch> {
    inner: B,
    watch: W,
}

impl<B: Body, W: Watch> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Self {
        Watched { inner, watch }
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
    W: Watch,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.watch.ended(),
            Poll::Ready(Some(Ok(frame))) => {
                this.watch.frame(frame);
                if this.inner.is_end_stream() {
                    this.watch.ended();
                }
            }
            Poll::Ready(Some(Err(_))) => this.watch.failed(),
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

impl<B: Body, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.watch.ended();
        }
    }
}
