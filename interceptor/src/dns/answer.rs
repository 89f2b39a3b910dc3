//! Answers from the mesh name table, by Istio's DNS proxy rules (SPEC section 4;
//! I: pkg/dns/client/dns.go).

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use crate::mesh::NameTable;

pub const TTL: u32 = 30;

/// The table's answer to `query`, or None when the query must go upstream.
pub fn from_table(
    query: &Message,
    names: &NameTable,
    search_domain: Option<&str>,
) -> Option<Message> {
    let q = query.queries().first()?;
    if query.queries().len() != 1 || q.query_class() != DNSClass::IN {
        return None;
    }
    let family = match q.query_type() {
        RecordType::A => RecordType::A,
        RecordType::AAAA => RecordType::AAAA,
        _ => return None,
    };
    let asked = q.name().to_lowercase();
    let text = asked.to_ascii();
    let text = text.trim_end_matches('.');

    let mut answers = Vec::new();
    let entry = match names.lookup(text) {
        Some(e) => e,
        None => {
            // `h.<first search domain>`: the client's resolver appended its search domain to a
            // mesh name; answer CNAME -> h with h's records, as Istio does.
            let short = text.strip_suffix(search_domain?)?.strip_suffix('.')?;
            let e = names.lookup(short)?;
            let target = Name::from_ascii(format!("{short}.")).ok()?;
            answers.push(Record::from_rdata(
                asked.clone(),
                TTL,
                RData::CNAME(CNAME(target)),
            ));
            e
        }
    };
    let owner = match answers.first() {
        Some(r) => match r.data() {
            RData::CNAME(c) => c.0.clone(),
            _ => asked.clone(),
        },
        None => asked.clone(),
    };
    let mut addrs: Vec<IpAddr> = match family {
        RecordType::A => entry.v4.iter().map(|a| IpAddr::V4(*a)).collect(),
        _ => entry.v6.iter().map(|a| IpAddr::V6(*a)).collect(),
    };
    addrs.shuffle(&mut rand::rng());
    for ip in addrs {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        answers.push(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    // Known name, no record of this family: NOERROR with no answer (never NXDOMAIN, which would
    // make the client give up on the other family too).
    let mut resp = response_to(query, ResponseCode::NoError);
    resp.set_authoritative(true);
    resp.add_answers(answers);
    Some(resp)
}

/// An empty response to `query` with its id, opcode, RD and question.
pub fn response_to(query: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::error_msg(query.id(), query.op_code(), code);
    resp.set_message_type(MessageType::Response)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true);
    resp.add_queries(query.queries().to_vec());
    if let Some(edns) = query.extensions() {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(edns.max_payload().max(512));
        resp.set_edns(e);
    }
    resp
}

/// FORMERR for a packet whose header parsed but whose body did not.
pub fn formerr(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        // Too short for a header, or a response: nothing to answer.
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    Message::error_msg(id, op, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Encodes `resp` for a client that accepts `max` bytes, dropping answers and setting TC when it
/// does not fit.
pub fn encode(mut resp: Message, max: usize) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= max {
        return Some(bytes);
    }
    resp.set_truncated(true);
    let mut answers = resp.take_answers();
    while !answers.is_empty() {
        answers.pop();
        resp.insert_answers(answers.clone());
        let bytes = resp.to_vec().ok()?;
        if bytes.len() <= max {
            return Some(bytes);
        }
        resp.take_answers();
    }
    resp.take_additionals();
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Host;
    use hickory_proto::op::Query;

    fn names() -> NameTable {
        let host = Host::new("product.default.svc.cluster.local");
        let vips: Vec<std::net::IpAddr> = vec!["240.240.0.5".parse().unwrap()];
        NameTable::build([(&host, vips.as_slice())], "default", "cluster.local")
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    #[test]
    fn a_nodata_and_forward() {
        let n = names();
        let r = from_table(&query("Product.", RecordType::A), &n, None).unwrap();
        assert!(r.authoritative());
        assert_eq!(r.answers()[0].ttl(), TTL);
        assert_eq!(r.id(), 7);
        let r = from_table(&query("product.default.", RecordType::AAAA), &n, None).unwrap();
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        assert!(from_table(&query("product.", RecordType::MX), &n, None).is_none());
        assert!(from_table(&query("example.org.", RecordType::A), &n, None).is_none());
    }

    #[test]
    fn search_domain_cname() {
        let n = names();
        let r = from_table(
            &query("product.corp.internal.", RecordType::A),
            &n,
            Some("corp.internal"),
        )
        .unwrap();
        assert_eq!(r.answers().len(), 2);
        assert!(matches!(r.answers()[0].data(), RData::CNAME(c) if c.0.to_ascii() == "product."));
        assert_eq!(r.answers()[1].name().to_ascii(), "product.");
    }

    #[test]
    fn formerr_and_truncation() {
        assert!(formerr(&[1, 2, 3]).is_none());
        let f = Message::from_vec(&formerr(&[0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]).unwrap())
            .unwrap();
        assert_eq!((f.id(), f.response_code()), (9, ResponseCode::FormErr));
        let mut big = response_to(&query("x.", RecordType::A), ResponseCode::NoError);
        for i in 0..100u8 {
            big.add_answer(Record::from_rdata(
                Name::from_ascii("x.").unwrap(),
                30,
                RData::A(A::new(10, 0, 0, i)),
            ));
        }
        let bytes = encode(big, 512).unwrap();
        assert!(bytes.len() <= 512);
        let m = Message::from_vec(&bytes).unwrap();
        assert!(m.truncated() && !m.answers().is_empty() && m.answers().len() < 100);
    }
}
