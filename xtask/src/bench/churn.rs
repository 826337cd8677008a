//! The workload: a single-threaded loopback connection churn. Client and server ends live in the
//! same thread, all blocking: on loopback the handshake, the data and the teardown are processed
//! synchronously (softirq in the sender's syscall), so connect, accept, write, read and close
//! follow each other without waiting on anyone, in the same order every time.
//!
//! TIME_WAIT: the clean variant leaves the client end in TIME_WAIT for 60 s. The client connects
//! to [`DESTINATIONS`] listeners (127.0.0.1..=4, one port each) in turn, so every (source,
//! destination) pair sees a quarter of the rate and its ephemeral ports come round again only
//! after seconds; connect() then reuses a TIME_WAIT tuple older than `tcp_tw_reuse_delay` (1 s),
//! which `net.ipv4.tcp_tw_reuse` (Linux default 2: loopback only) allows. The number of
//! minisockets stays bounded (about 4 x 14k even ports) and under `tcp_max_tw_buckets`, and the
//! rate is steady for as long as the churn runs.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Listeners (and so destination addresses) the client goes round.
pub const DESTINATIONS: u8 = 4;
const REQUEST: &[u8] = b"GET /bench HTTP/1.0\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
/// A blocked end is a bug (loopback answers at once); fail rather than hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How each connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Request, response, client closes, server closes: FIN both ways, client in TIME_WAIT.
    Clean,
    /// The server closes with the request unread: it resets the connection
    /// (TCP_ABORT_ON_CLOSE), the client gets ECONNRESET and closes.
    RstUnread,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Clean, Variant::RstUnread];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Clean => "clean",
            Variant::RstUnread => "rst-unread",
        }
    }
}

/// When a churn run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    Elapsed(Duration),
    Connections(u64),
}

/// What one churn run did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChurnResult {
    pub connections: u64,
    pub seconds: f64,
    /// CPU time (user + system) of the churning thread: includes the kernel's TCP work done in
    /// its syscalls and the tracers' eBPF programs that run there.
    pub cpu_seconds: f64,
}

impl ChurnResult {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.seconds
    }
}

pub struct Churn {
    listeners: Vec<(TcpListener, SocketAddr)>,
}

impl Churn {
    /// Binds the listeners (127.0.0.1..=DESTINATIONS, ports chosen by the kernel).
    pub fn new() -> Result<Churn> {
        let listeners = (1..=DESTINATIONS)
            .map(|i| {
                let l = TcpListener::bind((Ipv4Addr::new(127, 0, 0, i), 0))
                    .with_context(|| format!("binding a listener on 127.0.0.{i}"))?;
                let addr = l.local_addr()?;
                Ok((l, addr))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Churn { listeners })
    }

    /// Opens and closes connections, one at a time, until `until`.
    pub fn run(&self, variant: Variant, until: Until) -> Result<ChurnResult> {
        let cpu0 = thread_cpu_seconds();
        let start = Instant::now();
        let mut n: u64 = 0;
        let mut buf = [0u8; 256];
        while match until {
            Until::Elapsed(d) => start.elapsed() < d,
            Until::Connections(max) => n < max,
        } {
            let (listener, addr) = &self.listeners[(n % self.listeners.len() as u64) as usize];
            self.one(listener, addr, variant, &mut buf)
                .with_context(|| format!("connection {n} of the {} churn", variant.name()))?;
            n += 1;
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(ChurnResult {
            connections: n,
            seconds,
            cpu_seconds: thread_cpu_seconds() - cpu0,
        })
    }

    fn one(
        &self,
        listener: &TcpListener,
        addr: &SocketAddr,
        variant: Variant,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut client = TcpStream::connect(addr).map_err(|e| {
            if e.kind() == ErrorKind::AddrNotAvailable {
                anyhow::anyhow!(
                    "connect: {e}: the ephemeral ports are all in TIME_WAIT; the churn needs \
                     net.ipv4.tcp_tw_reuse = 1 or 2 (Linux default 2)"
                )
            } else {
                anyhow::Error::new(e).context("connect")
            }
        })?;
        let (mut server, _) = listener.accept().context("accept")?;
        client.set_read_timeout(Some(IO_TIMEOUT))?;
        server.set_read_timeout(Some(IO_TIMEOUT))?;
        client.write_all(REQUEST).context("client write")?;
        match variant {
            Variant::Clean => {
                server
                    .read_exact(&mut buf[..REQUEST.len()])
                    .context("server read")?;
                server.write_all(RESPONSE).context("server write")?;
                client
                    .read_exact(&mut buf[..RESPONSE.len()])
                    .context("client read")?;
                drop(client);
                drop(server);
            }
            Variant::RstUnread => {
                // Wait until the request is in the server's receive queue (it is, on loopback,
                // but peek makes sure) so that close() finds it unread and resets.
                if server.peek(&mut buf[..1]).context("server peek")? == 0 {
                    bail!("the client closed before its request arrived");
                }
                drop(server);
                match client.read(buf) {
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                    Ok(0) => {}
                    Ok(k) => bail!("client read {k} bytes from a server that sent nothing"),
                    Err(e) => return Err(anyhow::Error::new(e).context("client read")),
                }
                drop(client);
            }
        }
        Ok(())
    }
}

/// CPU time (user + system) of the calling thread, seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both variants run without root; each connection completes its exchange and teardown
    /// (a stuck end would time out and fail the run).
    #[test]
    fn both_variants_complete_their_connections() {
        let churn = Churn::new().unwrap();
        for v in Variant::ALL {
            let r = churn.run(v, Until::Connections(50)).unwrap();
            assert_eq!(r.connections, 50, "{v:?}");
            assert!(r.cpu_seconds >= 0.0 && r.seconds > 0.0, "{v:?}: {r:?}");
        }
    }
}
