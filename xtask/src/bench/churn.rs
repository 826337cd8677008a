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
        Churn::on(0)
    }

    /// The listeners of churn thread `thread`: 127.0.0.(thread x DESTINATIONS + 1) and the next
    /// DESTINATIONS - 1 addresses, so that two threads share no (source, destination) pair and
    /// each has the whole ephemeral port range per pair, as a lone thread has.
    pub fn on(thread: u8) -> Result<Churn> {
        let first = thread * DESTINATIONS + 1;
        let listeners = (first..first + DESTINATIONS)
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

/// `churns.len()` churn threads at once, thread `i` on `churns[i]`'s listeners and pinned to CPU
/// `i` (modulo the CPUs there are): producers of events on as many CPUs, each one connection at a
/// time as the single-threaded churn. Connections and CPU time are summed, seconds are the
/// longest thread's.
pub fn run_parallel(churns: &[Churn], variant: Variant, until: Until) -> Result<ChurnResult> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let barrier = std::sync::Barrier::new(churns.len());
    let results: Vec<Result<ChurnResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = churns
            .iter()
            .enumerate()
            .map(|(i, churn)| {
                let barrier = &barrier;
                s.spawn(move || {
                    pin_to_cpu(i % cpus);
                    barrier.wait();
                    churn.run(variant, until)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a churn thread panicked"))
            })
            .collect()
    });
    let mut total = ChurnResult {
        connections: 0,
        seconds: 0.0,
        cpu_seconds: 0.0,
    };
    for r in results {
        total = total.plus(&r?);
    }
    Ok(total)
}

impl ChurnResult {
    /// Two threads' results as one: their connections and CPU added, the longer duration.
    pub fn plus(&self, other: &ChurnResult) -> ChurnResult {
        ChurnResult {
            connections: self.connections + other.connections,
            seconds: self.seconds.max(other.seconds),
            cpu_seconds: self.cpu_seconds + other.cpu_seconds,
        }
    }
}

/// Pins the calling thread to `cpu` (best effort: the run is still valid unpinned, only noisier).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
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

    #[test]
    fn two_threads_churn_on_their_own_listeners() {
        let churns = [Churn::on(2).unwrap(), Churn::on(3).unwrap()];
        let addrs: Vec<_> = churns
            .iter()
            .flat_map(|c| c.listeners.iter().map(|(_, a)| a.ip()))
            .collect();
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 2 * DESTINATIONS as usize, "{addrs:?}");
        let r = run_parallel(&churns, Variant::Clean, Until::Connections(30)).unwrap();
        assert_eq!(r.connections, 60);
    }

    #[test]
    fn results_add_up() {
        let a = ChurnResult {
            connections: 10,
            seconds: 2.0,
            cpu_seconds: 1.5,
        };
        let b = ChurnResult {
            connections: 30,
            seconds: 2.5,
            cpu_seconds: 2.0,
        };
        let s = a.plus(&b);
        assert_eq!(
            s,
            ChurnResult {
                connections: 40,
                seconds: 2.5,
                cpu_seconds: 3.5
            }
        );
        assert_eq!(s.rate(), 16.0);
    }
}
