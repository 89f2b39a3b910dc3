//! Relaying between two TCP sockets without the bytes entering userspace: splice(2) through a
//! pipe, for paths that never look at the payload (the gateway relays the client's TLS as is).
//! Half-close and backpressure as in `relay`: a side that stops reading stops us reading from
//! the other (the pipe fills), and EOF is passed on as shutdown(write).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: plain descriptors, no offsets; the kernel checks the rest.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction until `src` reaches EOF; then `dst` is shut for writing. Returns the bytes
/// moved.
async fn one_way(src: &TcpStream, dst: &TcpStream) -> std::io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown on a descriptor `dst` owns.
            unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Relays until both directions are done. Returns (bytes a->b, bytes b->a).
pub async fn splice_relay(a: &TcpStream, b: &TcpStream) -> std::io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A client, the relay in the middle, an echo-less server that answers with what it read
    /// reversed after the client half-closes: bytes, order and half-close all go through.
    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = back.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
            got.len()
        });
        let relay = tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let s = TcpStream::connect(back_addr).await.unwrap();
            splice_relay(&c, &s).await.unwrap()
        });
        let mut client = TcpStream::connect(front_addr).await.unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back_again = Vec::new();
        client.read_to_end(&mut back_again).await.unwrap();
        let mut expected = payload.clone();
        expected.reverse();
        assert_eq!(back_again, expected);
        assert_eq!(server.await.unwrap(), payload.len());
        assert_eq!(
            relay.await.unwrap(),
            (payload.len() as u64, payload.len() as u64)
        );
    }
}
