//! Data paths for TCP: outbound (captured connections to mesh services).

mod outbound;
pub mod pick;

pub use outbound::Outbound;

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds a listener on each address; a missing address family (no IPv6 in this netns) is a
/// warning, not a failure, as long as one listener is up.
pub async fn bind_all(addrs: &[SocketAddr], what: &str) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        match bind_reuse(*a) {
            Ok(l) => out.push(l),
            Err(e) => {
                tracing::warn!(addr = %a, error = %e, "{what}: cannot listen");
                last_err = Some(e);
            }
        }
    }
    match (out.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

fn bind_reuse(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}
