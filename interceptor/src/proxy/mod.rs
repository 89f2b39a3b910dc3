//! Data paths for TCP: outbound (captured connections to mesh services), inbound (mTLS for
//! this VM's own services) and the east-west gateway (SNI routing between networks).

mod gateway;
mod inbound;
mod outbound;
pub mod pick;
mod relay;
mod splice;

pub use gateway::{route as gateway_route, Gateway, Refusal};
pub use inbound::{AllowList, Inbound};
pub use outbound::{expected_identities, Outbound};
pub use relay::relay;
pub use splice::splice_relay;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Accepts forever, one task per connection. A failing accept (EMFILE and the like) backs off
/// instead of spinning.
pub async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

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
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        // [::] must not also take IPv4: that is the IPv4 listener's job.
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}
