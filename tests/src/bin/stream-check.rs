//! Stream test tool, server and client. Prints one JSON line per client run.
//!
//! - `stream-check serve ADDR...`: per connection, the first byte says what to do: `e` echoes
//!   every byte back; `s` reads to EOF and answers `<bytes> <sha256 hex>\n`.
//! - `stream-check sequential ADDR N`: N echo connections one after the other.
//! - `stream-check concurrent ADDR N`: N echo connections open at once; each echoes; the first
//!   is then reset (RST) and the others must still echo.
//! - `stream-check bulk ADDR BYTES`: BYTES of pseudo-random data to a sink; the sink's count
//!   and sha256 must match ours.
//! - `stream-check hold ADDR N [silent]`: N connections opened one after the other and held
//!   until the process is ended. Each echoes one byte, or counts as refused (reset, EOF or no
//!   answer within 3 s); `silent` sends nothing (for servers that are not stream-check).
//!   Prints `{"echoed": E, "refused": R, "still": S}` once all are open, S being how many of
//!   the echoed still echo after the refusals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("sequential") => sequential(&args[1], args[2].parse()?),
        Some("concurrent") => concurrent(&args[1], args[2].parse()?),
        Some("bulk") => bulk(&args[1], args[2].parse()?),
        Some("hold") => hold(
            &args[1],
            args[2].parse()?,
            args.get(3).is_some_and(|a| a == "silent"),
        ),
        _ => anyhow::bail!(
            "usage: stream-check serve ADDR... | sequential|concurrent ADDR N | bulk ADDR BYTES"
        ),
    }
}

fn serve(addrs: &[String]) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
        handles.push(std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = handle(s);
                });
            }
        }));
    }
    println!("stream-check listening");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn handle(mut s: TcpStream) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    let mut buf = vec![0u8; 256 * 1024];
    match mode[0] {
        b'e' => loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        },
        _ => {
            let mut h = Sha256::new();
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
            writeln!(s, "{total} {:x}", h.finalize())
        }
    }
}

fn hold(addr: &str, n: usize, silent: bool) -> anyhow::Result<()> {
    let (mut held, mut echoing, mut echoed, mut refused) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..n {
        let mut s = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        if !silent {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut b = [0u8; 1];
            let ok = s.write_all(b"ex").is_ok() && s.read_exact(&mut b).is_ok() && b[0] == b'x';
            if ok {
                echoed += 1;
                echoing.push(s);
                continue;
            }
            refused += 1;
        }
        held.push(s);
    }
    // Work in progress went on while the later ones were refused: each still echoes.
    let still = echoing
        .iter_mut()
        .map(|s| {
            let mut b = [0u8; 1];
            s.write_all(b"y").is_ok() && s.read_exact(&mut b).is_ok() && b[0] == b'y'
        })
        .filter(|ok| *ok)
        .count();
    println!(
        "{}",
        serde_json::json!({"echoed": echoed, "refused": refused, "still": still})
    );
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// One line out and back on an echo connection.
fn echo(s: &mut TcpStream, i: usize) -> bool {
    let msg = format!("hello {i}\n");
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).is_ok() && back == msg.as_bytes()
}

fn open_echo(addr: &str) -> anyhow::Result<TcpStream> {
    let mut s = connect(addr)?;
    s.write_all(b"e")?;
    Ok(s)
}

fn sequential(addr: &str, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..n {
        let mut s = open_echo(addr)?;
        if echo(&mut s, i) {
            ok += 1;
        }
    }
    println!(
        "{{\"connections\": {n}, \"echoed\": {ok}, \"secs\": {:.3}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn concurrent(addr: &str, n: usize) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(open_echo(addr)?);
    }
    let mut before = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        before += usize::from(echo(s, i));
    }
    // A reset of one stream: SO_LINGER 0, then close.
    let first = conns.remove(0);
    reset(&first)?;
    drop(first);
    // Nothing on this side can observe the proxies taking the reset, so it is given a moment
    // to cross both before the siblings are checked; a sibling cut by it fails either way.
    std::thread::sleep(Duration::from_millis(200));
    let mut after = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        after += usize::from(echo(s, i + 1));
    }
    for s in &conns {
        let _ = s.shutdown(Shutdown::Both);
    }
    println!("{{\"opened\": {n}, \"echoed_before\": {before}, \"echoed_after_reset\": {after}}}");
    Ok(())
}

fn reset(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn bulk(addr: &str, bytes: u64) -> anyhow::Result<()> {
    let mut s = connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.write_all(b"s")?;
    let started = Instant::now();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64: cheap bytes that no layer can compress or guess.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        h.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // A blocking read on a socket in a sockmap can fail with EAGAIN long before its timeout:
    // the kernel's tcp_bpf_recvmsg returns -EAGAIN when a wake-up brings no data, and the
    // ACK of our own FIN (FIN_WAIT1 -> FIN_WAIT2) is such a wake-up. Counted, then read again,
    // so the caller can report it; over plain TCP it stays 0.
    let mut line = String::new();
    let mut spurious_eagain = 0u32;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut reader = BufReader::new(&s);
    loop {
        match reader.read_line(&mut line) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                spurious_eagain += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ours = format!("{bytes} {:x}", h.finalize());
    println!(
        "{{\"bytes\": {bytes}, \"match\": {}, \"sink\": {:?}, \"ours\": {ours:?}, \"secs\": {secs:.3}, \"mib_per_s\": {:.1}, \"spurious_eagain\": {spurious_eagain}}}",
        line.trim() == ours,
        line.trim(),
        bytes as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}
