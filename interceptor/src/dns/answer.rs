//! Answers from the mesh name table, by Istio's DNS proxy rules (SPEC section 4;
//! I: pkg/dns/client/dns.go).

use std::net::IpAddr;

use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use rand::seq::SliceRandom;

use crate::mesh::NameTable;

pub const TTL: u32 = 30;

/// The plain case answered without building a `Message`: one A or AAAA question for a name the
/// table holds exactly, no EDNS or other records, an answer that fits 512 bytes. The answer is
/// written into `out` (cleared first; the caller reuses it) and `key` is scratch for the lookup
/// key, so a table hit allocates nothing. Returns false, with `out` unspecified, for anything
/// else: `from_table` on a full parse decides those (search-domain CNAMEs, EDNS, truncation,
/// malformed packets).
pub fn fast(packet: &[u8], names: &NameTable, key: &mut String, out: &mut Vec<u8>) -> bool {
    fast_inner(packet, names, key, out).unwrap_or(false)
}

fn fast_inner(
    packet: &[u8],
    names: &NameTable,
    key: &mut String,
    out: &mut Vec<u8>,
) -> Option<bool> {
    let mut dec = BinDecoder::new(packet);
    let req = Header::read(&mut dec).ok()?;
    if req.message_type() != MessageType::Query
        || req.op_code() != OpCode::Query
        || req.query_count() != 1
        || req.answer_count() != 0
        || req.name_server_count() != 0
        || req.additional_count() != 0
    {
        return Some(false);
    }
    let q = Query::read(&mut dec).ok()?;
    let question_end = dec.index();
    if !dec.is_empty() || q.query_class() != DNSClass::IN {
        return Some(false);
    }
    let family = q.query_type();
    if family != RecordType::A && family != RecordType::AAAA {
        return Some(false);
    }
    // The lookup key: lower case, no trailing dot, letters/digits/hyphen/underscore only (any
    // other byte takes the full path, which escapes it as the table's keys are).
    key.clear();
    let mut wire_len = 1;
    for label in q.name().iter() {
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Some(false);
        }
        if !key.is_empty() {
            key.push('.');
        }
        key.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        wire_len += label.len() + 1;
    }
    // The question is echoed byte for byte, so it must hold no compression pointer.
    if question_end != Header::len() + wire_len + 4 {
        return Some(false);
    }
    let Some(entry) = names.lookup(key) else {
        return Some(false);
    };
    let count = match family {
        RecordType::A => entry.v4.len(),
        _ => entry.v6.len(),
    };
    let mut h = Header::response_from_request(&req);
    h.set_authoritative(true)
        .set_recursion_available(true)
        .set_response_code(ResponseCode::NoError)
        .set_query_count(1)
        .set_answer_count(u16::try_from(count).ok()?);
    out.clear();
    let mut enc = BinEncoder::new(out);
    h.emit(&mut enc).ok()?;
    enc.emit_vec(&packet[Header::len()..question_end]).ok()?;
    // Shuffled as `from_table` does: clients that take the first address spread over all.
    let start = if count > 1 {
        rand::random_range(0..count)
    } else {
        0
    };
    for i in 0..count {
        let i = (start + i) % count;
        // Each owner name points back at the question's (offset 12).
        enc.emit_u16(0xC000 | Header::len() as u16).ok()?;
        enc.emit_u16(family.into()).ok()?;
        enc.emit_u16(DNSClass::IN.into()).ok()?;
        enc.emit_u32(TTL).ok()?;
        match family {
            RecordType::A => {
                enc.emit_u16(4).ok()?;
                A(*entry.v4.get(i)?).emit(&mut enc).ok()?;
            }
            _ => {
                enc.emit_u16(16).ok()?;
                AAAA(*entry.v6.get(i)?).emit(&mut enc).ok()?;
            }
        }
    }
    Some(out.len() <= 512)
}

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

    /// The fast path's bytes decode to what the full path answers; whatever it cannot answer
    /// as the full path would, it leaves to it.
    #[test]
    fn fast_path_answers_as_the_full_path() {
        let n = names();
        let (mut key, mut out) = (String::new(), Vec::new());
        for (name, t) in [
            ("product.default.svc.cluster.local.", RecordType::A),
            ("Product.Default.", RecordType::A),
            ("product.", RecordType::AAAA),
        ] {
            let q = query(name, t);
            assert!(fast(&q.to_vec().unwrap(), &n, &mut key, &mut out), "{name}");
            let fast = Message::from_vec(&out).unwrap();
            let full = from_table(&q, &n, None).unwrap();
            let full = Message::from_vec(&encode(full, 512).unwrap()).unwrap();
            assert_eq!(fast.header(), full.header(), "{name}");
            assert_eq!(fast.queries(), full.queries(), "{name}");
            let data = |m: &Message| -> Vec<(String, RData)> {
                m.answers()
                    .iter()
                    .map(|r| (r.name().to_lowercase().to_ascii(), r.data().clone()))
                    .collect()
            };
            assert_eq!(data(&fast), data(&full), "{name}");
            assert!(fast.answers().iter().all(|r| r.ttl() == TTL));
        }
        let mut edns = query("product.", RecordType::A);
        edns.set_edns(hickory_proto::op::Edns::new());
        for q in [
            query("example.org.", RecordType::A),
            query("product.", RecordType::MX),
            query("product.corp.internal.", RecordType::A),
            edns,
        ] {
            assert!(!fast(&q.to_vec().unwrap(), &n, &mut key, &mut out));
        }
        for junk in [
            &[][..],
            &[0u8; 12][..],
            &[1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1][..],
        ] {
            assert!(!fast(junk, &n, &mut key, &mut out));
        }
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
