//! Test DNS client on an unconnected UDP socket (sendto/recvfrom), the path glibc-less resolvers
//! take: `udp-query SERVER:PORT NAME [A|AAAA]`. Prints the reply's source address, its rcode and
//! answers, so a test can check that capture restored the source.
//! `udp-query --raw HEX SERVER:PORT` sends the given bytes as they are (malformed queries).
//! `udp-query --flood SERVER:PORT COUNT [WINDOW]` sends COUNT queries for random names as fast
//! as it can (with WINDOW, at most that many unanswered at once: a client that waits, so the
//! queries reach the server instead of a full buffer), then listens 2 s more; prints
//! `{"sent", "servfail", "other", "unanswered"}`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, hex, server] = args.as_slice() {
        if flag == "--raw" {
            return raw(hex, server.parse()?);
        }
        if flag == "--flood" {
            return flood(hex.parse()?, server.parse()?, None);
        }
    }
    if let [flag, server, count, window] = args.as_slice() {
        if flag == "--flood" {
            return flood(server.parse()?, count.parse()?, Some(window.parse()?));
        }
    }
    let (server, name) = match args.as_slice() {
        [s, n, ..] => (s.parse::<SocketAddr>()?, Name::from_ascii(n)?),
        _ => anyhow::bail!("usage: udp-query SERVER:PORT NAME [A|AAAA]"),
    };
    let rtype = if args.get(2).map(String::as_str) == Some("AAAA") {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    let mut msg = Message::new();
    msg.set_id(0x4242).set_recursion_desired(true);
    msg.add_query(Query::query(name, rtype));
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    sock.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    let (n, from) = sock.recv_from(&mut buf)?;
    let reply = Message::from_vec(&buf[..n])?;
    let answers: Vec<String> = reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "from={from} id={} rcode={} answers={}",
        reply.id(),
        reply.response_code(),
        answers.join(",")
    );
    Ok(())
}

fn raw(hex: &str, server: SocketAddr) -> anyhow::Result<()> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("0"), 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    sock.send_to(&bytes, server)?;
    let mut buf = [0u8; 4096];
    let (n, from) = sock.recv_from(&mut buf)?;
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let rcode = buf.get(3).map(|b| b & 0x0f).unwrap_or(255);
    println!("from={from} id={id} rcode={rcode} len={n}");
    Ok(())
}

fn flood(server: SocketAddr, count: u16, window: Option<usize>) -> anyhow::Result<()> {
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Answers are read as they come, so neither side's receive buffer overflows.
    let reader = {
        let sock = sock.try_clone()?;
        let answered = answered.clone();
        std::thread::spawn(move || {
            let mut replies = vec![0u8; usize::from(count)];
            let mut buf = [0u8; 4096];
            let mut quiet_since = std::time::Instant::now();
            while quiet_since.elapsed() < Duration::from_secs(2) {
                let Ok((n, _)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                quiet_since = std::time::Instant::now();
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(m) = Message::from_vec(&buf[..n]) {
                    if let Some(r) = replies.get_mut(usize::from(m.id())) {
                        *r = if m.response_code() == hickory_proto::op::ResponseCode::ServFail {
                            1
                        } else {
                            2
                        };
                    }
                }
            }
            replies
        })
    };
    let seed = std::process::id();
    for id in 0..count {
        let mut msg = Message::new();
        msg.set_id(id).set_recursion_desired(true);
        let name = format!("r{seed}x{id}.random.example.");
        msg.add_query(Query::query(Name::from_ascii(&name)?, RecordType::A));
        if let Some(w) = window {
            // A lost answer must not stall the flood: wait 100 ms at most.
            let since = std::time::Instant::now();
            while usize::from(id)
                .saturating_sub(answered.load(std::sync::atomic::Ordering::Relaxed))
                >= w
                && since.elapsed() < Duration::from_millis(100)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        sock.send_to(&msg.to_vec()?, server)?;
        // About 25 000 a second, in bursts of 50.
        if id % 50 == 49 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let replies = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let n = |v: u8| replies.iter().filter(|&&r| r == v).count();
    println!(
        "{{\"sent\": {count}, \"servfail\": {}, \"other\": {}, \"unanswered\": {}}}",
        n(1),
        n(2),
        n(0)
    );
    Ok(())
}
