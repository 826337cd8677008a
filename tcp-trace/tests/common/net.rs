//! Ports and addresses as the tests see them: ports chosen by the kernel, ports read back from
//! the tracer's JSON, the marker connection that shows a tracer has read everything before it,
//! an HTTP GET for the metrics endpoints.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use serde_json::Value;

/// A port nothing listens on now, chosen by the kernel from the ephemeral range (so tests and
/// benchmarks running at the same time rarely pick the same one; it is free only until
/// someone binds it).
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1:0")
}

/// `N` distinct [`free_port`]s (each held while the next is chosen).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("a bound port").port())
}

/// [`free_port`] on IPv6 loopback.
pub fn free_port_v6() -> u16 {
    free_port_on("[::1]:0")
}

fn free_port_on(addr: &str) -> u16 {
    TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("a free port on {addr}: {e}"))
}

/// The port of an address as the JSON shows it (`127.0.0.1:80`, `[::1]:80`).
pub fn port_of(addr: &Value) -> Option<u16> {
    addr.as_str()?.rsplit(':').next()?.parse().ok()
}

/// The pid of a JSON line's owner (`"owner": {"pid": N}`).
pub fn owner_pid(v: &Value) -> Option<u32> {
    v["owner"]["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}

/// Whether `v` is the end (`tcp_destroy_sock`) of the socket from `local` to `remote` (remote 0:
/// a listener).
pub fn is_socket_end(v: &Value, local: u16, remote: u16) -> bool {
    v["type"] == "event"
        && v["hook"] == "tcp_destroy_sock"
        && port_of(&v["local"]) == Some(local)
        && port_of(&v["remote"]) == Some(remote)
}

/// A clean connection to `listener` from this process, closed by the server first; returns its
/// client port. Made after a test's work, its end, printed, shows the tracer has read
/// everything the kernel wrote before it.
pub fn marker_connection(listener: &TcpListener) -> u16 {
    let addr = listener.local_addr().expect("the marker's listener");
    let mut client = TcpStream::connect(addr).expect("the marker connection");
    let client_port = client.local_addr().unwrap().port();
    let (server, _) = listener.accept().unwrap();
    drop(server);
    // EOF: the server's FIN arrived; then the client closes too.
    let _ = client.read(&mut [0u8; 1]);
    drop(client);
    client_port
}

/// A loopback port bound but not listening, held while the returned socket lives: nothing else
/// gets it, and a connection to it is refused (the SYN is answered with a RST).
pub fn refusing_port() -> (OwnedFd, u16) {
    // SAFETY: plain socket calls on a socket this function owns from its creation.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = (&raw mut sin).cast::<libc::sockaddr>();
        assert_eq!(
            libc::bind(fd.as_raw_fd(), sa, len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::getsockname(fd.as_raw_fd(), sa, &mut len), 0);
        (fd, u16::from_be(sin.sin_port))
    }
}

/// A connection to `port` of [`refusing_port`]: the kernel answers the SYN with a RST (a reset
/// sent from no socket, and one received). The marker of `tcp-trace resets`, which prints
/// resets only.
pub fn refused_connection(port: u16) {
    let refused = TcpStream::connect(("127.0.0.1", port));
    assert!(
        refused.is_err(),
        "the marker's connection to {port} was accepted"
    );
}

/// One plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
