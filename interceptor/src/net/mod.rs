//! Sockets, as every data path and the admin endpoint use them: listening, accepting, and
//! moving bytes between two streams. No policy: what to accept and where to send it is decided
//! by `route` and the data paths in `proxy`.

pub mod drain;
mod limit;
mod peek;
mod relay;
pub mod sniff;
mod splice;
pub mod udp;

pub use limit::{reset, Limit, Limits, Permit};
pub use peek::{peek_until, Peek};

pub use relay::{buffered, relay, relay_until, Buffered, End, Relayed, BUFFER, TLS_READ_AHEAD};
pub use splice::splice_relay;

use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Whether a stop waits for an accept loop's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tasks {
    Drained,
    Detached,
}

/// Accepts forever, one task per connection, each holding a permit of `limit` (if any) for its
/// lifetime; at the cap a connection is reset at once. A failing accept (EMFILE and the like)
/// backs off instead of spinning. Never returns: a loop that ends has panicked, and the
/// supervisor that owns its task sees it. Connections that relay someone's bytes are
/// `Drained` (a stop waits for them to close cleanly); the admin endpoint's and DNS's are not.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    limit: Option<std::sync::Arc<Limit>>,
    tasks: Tasks,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // A hand-over: the next process accepts what comes from then on (relaying listeners only;
    // DNS and admin answer up to the end). One wait for the whole loop, not one per accept.
    let handed_over = drain::accepting_stopped();
    tokio::pin!(handed_over);
    let relays = matches!(tasks, Tasks::Drained);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut handed_over, if relays => {
                std::future::pending::<()>().await;
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                crate::fault::on_accept(what);
                let permit = match &limit {
                    Some(l) => match l.try_take() {
                        Some(p) => Some(p),
                        None => {
                            reset(stream);
                            continue;
                        }
                    },
                    None => None,
                };
                let work = handle(stream, peer);
                let work = async move {
                    work.await;
                    drop(permit);
                };
                match tasks {
                    Tasks::Drained => drain::spawn(work),
                    Tasks::Detached => {
                        tokio::spawn(work);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one, as Go and Envoy do: every
/// connection costs two, and the soft default (often 1024) would cap a proxy at a few hundred
/// where the unit (LimitNOFILE) or the admin allowed far more. Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is valid for getrlimit's write and setrlimit's read.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The loopback addresses (v4 and v6) of a port.
pub fn loopback(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}

/// The wildcard addresses (v4 and v6) of a port.
pub fn any(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

/// Binds a listener on each address; a missing address family (no IPv6 in this netns) is a
/// warning, not a failure, as long as one listener is up.
pub fn bind_all(addrs: &[SocketAddr], what: &str) -> std::io::Result<Vec<TcpListener>> {
    collect(addrs, what, bind_tcp)
}

/// UDP sockets for each address, `per_addr` of them with SO_REUSEPORT so receiving spreads
/// across cores; the same rule for a missing family as `bind_all`.
pub fn bind_all_udp(
    addrs: &[SocketAddr],
    per_addr: usize,
    what: &str,
) -> std::io::Result<Vec<UdpSocket>> {
    let groups = collect(addrs, what, |a| bind_udp(a, per_addr))?;
    Ok(groups.into_iter().flatten().collect())
}

fn collect<T>(
    addrs: &[SocketAddr],
    what: &str,
    bind: impl Fn(SocketAddr) -> std::io::Result<T>,
) -> std::io::Result<Vec<T>> {
    bind_each(addrs, what, |_, a| bind(a))
}

/// `bind` (with the address's index) on each address; a failure is a warning as long as one
/// address is served (no IPv6 in this netns).
pub fn bind_each<T>(
    addrs: &[SocketAddr],
    what: &str,
    mut bind: impl FnMut(usize, SocketAddr) -> std::io::Result<T>,
) -> std::io::Result<Vec<T>> {
    let mut out = Vec::new();
    let mut last_err = None;
    for (i, a) in addrs.iter().enumerate() {
        match bind(i, *a) {
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

fn socket(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let protocol = if ty == socket2::Type::STREAM {
        socket2::Protocol::TCP
    } else {
        socket2::Protocol::UDP
    };
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        // [::] must not also take IPv4: that is the IPv4 socket's job.
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket(addr, socket2::Type::STREAM)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// `count` UDP sockets on `addr` with SO_REUSEPORT.
pub fn bind_udp(addr: SocketAddr, count: usize) -> std::io::Result<Vec<UdpSocket>> {
    (0..count.max(1)).map(|_| bind_udp_one(addr)).collect()
}

/// One UDP socket of `addr`'s SO_REUSEPORT group.
pub fn bind_udp_one(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket(addr, socket2::Type::DGRAM)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    deep_receive_queue(&s);
    UdpSocket::from_std(s.into())
}

/// Queries that arrive while no process reads (a restart, with the socket kept in systemd's
/// store) wait in the receive queue: the default (net.core.rmem_default, 208 KiB, about 200
/// queries at their truesize) would drop some of a busy VM's second of restart.
/// SO_RCVBUFFORCE passes rmem_max with CAP_NET_ADMIN; without it the default stays.
fn deep_receive_queue(s: &socket2::Socket) {
    const BYTES: libc::c_int = 4 << 20;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&BYTES as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "DNS receive queue stays at the default");
    }
}

/// A listening TCP socket another process made (systemd passed it on), if it is one and is
/// bound to `want`.
pub fn adopt_tcp(fd: std::os::fd::OwnedFd, want: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = adopted(fd, want, socket2::Type::STREAM)?;
    if !sock.is_listener()? {
        return Err(std::io::Error::other("not listening"));
    }
    TcpListener::from_std(sock.into())
}

/// A UDP socket another process made, if it is bound to `want`.
pub fn adopt_udp(fd: std::os::fd::OwnedFd, want: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(adopted(fd, want, socket2::Type::DGRAM)?.into())
}

fn adopted(
    fd: std::os::fd::OwnedFd,
    want: SocketAddr,
    ty: socket2::Type,
) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::from(fd);
    let local = sock.local_addr()?.as_socket();
    if sock.r#type()? != ty || local != Some(want) {
        return Err(std::io::Error::other(format!(
            "a {:?} socket bound to {local:?}, not {want}",
            sock.r#type()?
        )));
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A TCP connection to `addr` with Nagle off, bounded by `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Like `connect`, to a host name resolved by the system resolver now (a DNS endpoint).
pub async fn connect_host(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
