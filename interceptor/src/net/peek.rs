//! Looking at a connection's first bytes without taking them: whoever serves the connection
//! reads them again (the inbound side's TLS-or-not, the gateway's SNI, protocol sniffing).

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The first wait for more bytes of a flight that came in parts; it doubles up to `MAX_POLL`.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(32);

/// How a peek ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek<T> {
    Decided(T),
    /// No byte within the first wait, or the client closed before sending one.
    Nothing,
    /// The client closed after some bytes, before they decided anything.
    Closed,
    /// The bytes so far decide nothing, and the wait is over.
    TimedOut,
    /// `max` bytes decide nothing.
    Full,
}

/// Peeks at `stream` until `decide` says what its first bytes are: at most `first` for the
/// first byte, `whole` in all, `max` bytes.
///
/// Waiting for more bytes polls with a backoff (1 ms doubling to 32 ms) instead of waiting for
/// readability: the bytes already peeked keep the socket readable, and clearing that readiness
/// to wait for the next arrival could lose the wake-up of whoever reads the stream next (a
/// flight completed between the clear and our last look leaves readable bytes behind a cleared
/// flag, and the reader waits for a segment that never comes). A client sending a byte at a
/// time costs at most ~35 wake-ups a second.
pub async fn peek_until<T>(
    stream: &TcpStream,
    first: Duration,
    whole: Duration,
    max: usize,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> std::io::Result<Peek<T>> {
    let deadline = Instant::now() + whole;
    let mut buf = vec![0u8; max.min(4 * 1024)];
    let mut seen = match tokio::time::timeout(first, stream.peek(&mut buf)).await {
        Ok(r) => r?,
        Err(_) => return Ok(Peek::Nothing),
    };
    if seen == 0 {
        return Ok(Peek::Nothing);
    }
    let mut poll = FIRST_POLL;
    loop {
        if let Some(t) = decide(&buf[..seen]) {
            return Ok(Peek::Decided(t));
        }
        if seen == buf.len() {
            if buf.len() >= max {
                return Ok(Peek::Full);
            }
            buf.resize((buf.len() * 4).min(max), 0);
        } else {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Peek::TimedOut);
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
            poll = (poll * 2).min(MAX_POLL);
        }
        match peek_now(stream, &mut buf)? {
            Some(0) => return Ok(Peek::Closed),
            Some(n) => seen = n.max(seen),
            None => {}
        }
    }
}

/// One non-blocking peek: Some(bytes queued, up to `buf`'s size; 0 at EOF), None if none yet.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    // SAFETY: buf is valid for writes of its length; MSG_PEEK | MSG_DONTWAIT only reads.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}
