//! Test DNS client on an unconnected UDP socket (sendto/recvfrom), the path glibc-less resolvers
//! take: `udp-query SERVER:PORT NAME [A|AAAA]`. Prints the reply's source address, its rcode and
//! answers, so a test can check that capture restored the source.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
