//! Resolving host names for the data paths (DNS services' endpoints, istiod's STRICT_DNS
//! clusters) ourselves, through the same upstream nameservers `dns::Server` forwards to, with
//! answers kept for their TTL: never through our own capture, never through a resolver
//! configuration the daemon's mount namespace happens to have.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use super::upstream::Upstream;

/// Answers are kept at least this long (a TTL of 0 would mean a query per connection) and at
/// most this long (a changed record is seen within it).
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);
/// Names remembered before the cache starts over.
const MAX_NAMES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a DNS name")]
    Name(String),
    #[error("resolving {name}: {source}")]
    Upstream {
        name: String,
        source: super::upstream::Error,
    },
    #[error("{0} has no address")]
    NoAddress(String),
}

pub struct Resolver {
    upstream: Upstream,
    cache: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

fn query(name: &Name, ty: RecordType, id: u16) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), ty));
    m.to_vec().ok()
}

impl Resolver {
    pub fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses of `host` (IPv4 first), from the cache while its TTL lasts.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, Error> {
        let key = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some((ips, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if Instant::now() < *until {
                return Ok(ips.clone());
            }
        }
        let name = Name::from_ascii(format!("{key}.")).map_err(|_| Error::Name(key.clone()))?;
        let mut ips = Vec::new();
        let mut ttl = MAX_TTL;
        for (ty, id) in [
            (RecordType::A, rand::random()),
            (RecordType::AAAA, rand::random()),
        ] {
            let Some(q) = query(&name, ty, id) else {
                continue;
            };
            let bytes = self
                .upstream
                .exchange(&q, false, 4096)
                .await
                .map_err(|source| Error::Upstream {
                    name: key.clone(),
                    source,
                })?;
            let Ok(resp) = Message::from_vec(&bytes) else {
                continue;
            };
            for r in resp.answers() {
                match r.data() {
                    RData::A(a) => ips.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
                    _ => continue,
                }
                ttl = ttl.min(Duration::from_secs(u64::from(r.ttl())));
            }
        }
        if ips.is_empty() {
            return Err(Error::NoAddress(key));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_NAMES {
            cache.clear();
        }
        cache.insert(key, (ips.clone(), Instant::now() + ttl.max(MIN_TTL)));
        Ok(ips)
    }
}
