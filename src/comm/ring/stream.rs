//! The ring's transports. Between ranks in the same network namespace (the peer's address is a
//! loopback address) the ring uses a Unix-domain socket in Linux's abstract namespace, which
//! moves bytes about twice as fast as TCP over loopback (no TCP/IP stack, no checksums or
//! segmentation; see BENCHMARKS.md). Anything else, and every other OS, uses TCP. Both carry
//! the same authenticated handshake and wire format.

use std::io::{self, Read, Write};
#[cfg(target_os = "linux")]
use std::net::IpAddr;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
#[cfg(target_os = "linux")]
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// Which transports a ring may use (`cluster.ring_transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A local (Unix-domain) socket to peers in the same network namespace, TCP otherwise.
    #[default]
    Auto,
    /// TCP only.
    Tcp,
}

impl Transport {
    /// The name in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Transport::Auto, Transport::Tcp]
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown ring transport {s:?}: expected auto or tcp"))
    }
}

/// A connection to a neighbour.
pub enum Stream {
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Local(UnixStream),
}

macro_rules! each {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Tcp($x) => $e,
            #[cfg(target_os = "linux")]
            Stream::Local($x) => $e,
        }
    };
}

impl Stream {
    /// "tcp" or "local" (Unix-domain socket).
    pub fn kind(&self) -> &'static str {
        match self {
            Stream::Tcp(_) => "tcp",
            #[cfg(target_os = "linux")]
            Stream::Local(_) => "local",
        }
    }
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        each!(self, s => s.set_read_timeout(d))
    }
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        each!(self, s => s.set_write_timeout(d))
    }
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        each!(self, s => s.set_nonblocking(on))
    }
    /// Sends small messages at once (TCP; local sockets never delay).
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            #[cfg(target_os = "linux")]
            Stream::Local(_) => Ok(()),
        }
    }
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        each!(self, s => s.shutdown(how))
    }
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            #[cfg(target_os = "linux")]
            Stream::Local(s) => Stream::Local(s.try_clone()?),
        })
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(*self, s => (&*s).read(buf))
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        each!(*self, s => (&*s).write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The abstract-namespace name of the local companion of the ring listener that peers reach
/// at `addr` (a loopback address). It carries the whole address: only the process that holds
/// that TCP address (or the wildcard covering it) binds the name.
#[cfg(target_os = "linux")]
pub(super) fn local_name(addr: SocketAddr) -> String {
    format!("tandem-ring/{addr}")
}

/// The loopback address at which peers reach a ring listener bound to `bound`, if any: the
/// address itself, or for a wildcard bind the loopback address of its family.
#[cfg(target_os = "linux")]
fn loopback_face(bound: SocketAddr) -> Option<SocketAddr> {
    let ip = bound.ip();
    if ip.is_loopback() {
        return Some(bound);
    }
    if !ip.is_unspecified() {
        return None;
    }
    let lo: IpAddr = match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    Some(SocketAddr::new(lo, bound.port()))
}

/// Where a rank accepts its ring connection: the TCP listener whose address the coordinator
/// hands out, plus (on Linux, when that address is reachable over loopback) a Unix-domain
/// companion that local peers prefer. Keep one for the worker's lifetime (clones share it), so
/// the companion exists before any peer learns the address.
pub struct RingListener {
    tcp: TcpListener,
    #[cfg(target_os = "linux")]
    local: Option<UnixListener>,
}

impl RingListener {
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<RingListener> {
        Ok(RingListener::from(TcpListener::bind(addr)?))
    }

    /// The TCP listener's address (the one the coordinator hands out).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether local peers can reach this listener through its Unix-domain companion.
    pub fn has_local(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.local.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    pub(crate) fn try_clone(&self) -> io::Result<RingListener> {
        Ok(RingListener {
            tcp: self.tcp.try_clone()?,
            #[cfg(target_os = "linux")]
            local: self.local.as_ref().map(|l| l.try_clone()).transpose()?,
        })
    }

    pub(super) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        #[cfg(target_os = "linux")]
        if let Some(l) = &self.local {
            l.set_nonblocking(on)?;
        }
        Ok(())
    }

    /// One non-blocking accept on either listener: the stream and a description of the peer.
    pub(super) fn accept(&self) -> io::Result<(Stream, String)> {
        #[cfg(target_os = "linux")]
        if let Some(l) = &self.local {
            match l.accept() {
                Ok((s, _)) => {
                    check_same_user(&s)?;
                    return Ok((Stream::Local(s), "a local socket".into()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let (s, addr) = self.tcp.accept()?;
        Ok((Stream::Tcp(s), addr.to_string()))
    }
}

/// Binds the Unix-domain companion when the address is reachable over loopback. A name that
/// is taken (only by a process squatting it: the TCP address is ours) leaves this listener
/// TCP-only; a peer reaching the squatter is refused or times out there (see `dial`) and
/// retries over TCP.
impl From<TcpListener> for RingListener {
    fn from(tcp: TcpListener) -> RingListener {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let local = tcp.local_addr().ok().and_then(|a| {
                let face = loopback_face(a)?;
                let name = std::os::unix::net::SocketAddr::from_abstract_name(local_name(face));
                match name.and_then(|n| UnixListener::bind_addr(&n)) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(%a, "no local-socket companion for the ring listener (local peers will use TCP): {e}");
                        None
                    }
                }
            });
            RingListener { tcp, local }
        }
        #[cfg(not(target_os = "linux"))]
        RingListener { tcp }
    }
}

/// Opens a local connection to the ring listener at `addr`, when `addr` is a loopback address
/// and its listener has a companion. `None`: not applicable, or nothing listens there.
pub(super) fn connect_local(addr: SocketAddr) -> Option<Stream> {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        if !addr.ip().is_loopback() {
            return None;
        }
        let name = std::os::unix::net::SocketAddr::from_abstract_name(local_name(addr));
        let s = name.and_then(|n| UnixStream::connect_addr(&n)).ok()?;
        if let Err(e) = check_same_user(&s) {
            tracing::warn!(%addr, "not using the local socket of the ring peer: {e}; using TCP");
            return None;
        }
        Some(Stream::Local(s))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = addr;
        None
    }
}

/// The uid of the process at the other end of a local socket (`SO_PEERCRED`: for a dialled
/// socket, the listener's; for an accepted one, the dialler's).
#[cfg(target_os = "linux")]
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Abstract socket names carry no permissions: any local user could bind a ring peer's name
/// first or dial it. Only a process of our own user may be at the other end.
#[cfg(target_os = "linux")]
fn check_same_user(s: &UnixStream) -> io::Result<()> {
    // SAFETY: getuid has no preconditions and cannot fail.
    same_user(peer_uid(s)?, unsafe { libc::getuid() })
}

#[cfg(target_os = "linux")]
fn same_user(theirs: u32, ours: u32) -> io::Result<()> {
    if theirs == ours {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("the local socket's other end runs as uid {theirs}, not as this worker's ({ours})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn local_peers_must_run_as_the_same_user() {
        let (a, b) = UnixStream::pair().unwrap();
        // SAFETY: as in `check_same_user`.
        let ours = unsafe { libc::getuid() };
        assert_eq!(peer_uid(&a).unwrap(), ours);
        check_same_user(&b).unwrap();
        let e = same_user(ours + 1, ours).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains(&format!("uid {}", ours + 1)), "{e}");
    }

    #[test]
    fn transport_parses() {
        assert_eq!("auto".parse::<Transport>(), Ok(Transport::Auto));
        assert_eq!("tcp".parse::<Transport>(), Ok(Transport::Tcp));
        assert!("udp"
            .parse::<Transport>()
            .unwrap_err()
            .contains("auto or tcp"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_listener_has_a_local_companion_and_others_do_not() {
        let l = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(l.has_local());
        let addr = l.local_addr().unwrap();
        let s = connect_local(addr).expect("local connect");
        assert_eq!(s.kind(), "local");
        // The same port on a non-loopback address is never dialled locally.
        assert!(connect_local(SocketAddr::new([10, 0, 0, 1].into(), addr.port())).is_none());
        // The name carries the address: another loopback address on the same port has its own.
        let other = SocketAddr::new([127, 0, 0, 2].into(), addr.port());
        if let Ok(tcp2) = TcpListener::bind(other) {
            let l2 = RingListener::from(tcp2);
            assert!(l2.has_local());
            assert!(connect_local(other).is_some());
        }
        drop(l);
        assert!(
            connect_local(addr).is_none(),
            "the name goes with the listener"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn wildcard_listener_is_reached_at_localhost_and_a_squatted_name_leaves_tcp() {
        use std::os::linux::net::SocketAddrExt;
        let l = RingListener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(connect_local(SocketAddr::new([127, 0, 0, 1].into(), port)).is_some());
        // Someone else holds the name of our address: we stay TCP-only rather than fail.
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let name = local_name(tcp.local_addr().unwrap());
        let squat = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        let _squatter = UnixListener::bind_addr(&squat).unwrap();
        assert!(!RingListener::from(tcp).has_local());
    }
}
