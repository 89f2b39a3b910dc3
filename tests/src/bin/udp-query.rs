//! Test DNS client on an unconnected UDP socket (sendto/recvfrom), the path glibc-less resolvers
//! take: `udp-query SERVER:PORT NAME [A|AAAA]`. Prints the reply's source address, its rcode and
//! answers, so a test can check that capture restored the source.
//! `udp-query --raw HEX SERVER:PORT` sends the given bytes as they are (malformed queries).

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
