//! Test traffic with known teardowns: `tcp-trace peer serve|connect` (hidden from --help). Each
//! end runs in its own process so that owner attribution is tested across processes, the way a
//! real client and server are.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread::sleep,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// How the closing side ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Teardown {
    /// Read the request, answer, close: FIN, no RST.
    Clean,
    /// Close with the request still unread: the kernel sends RST (TCP_ABORT_ON_CLOSE).
    Unread,
    /// SO_LINGER {on, 0} then close: RST through tcp_disconnect.
    Linger0,
    /// Wait for the peer's FIN, then close (passive close: CLOSE_WAIT -> LAST_ACK).
    Passive,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum PeerCommand {
    /// Accept one connection and end it the given way. Prints `listening <port>` when ready and
    /// `done` when the socket is closed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum)]
        teardown: Teardown,
    },
    /// Connect, send a request, read until EOF or reset, close.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        /// Close right after sending, without reading (for the server's passive close).
        #[arg(long)]
        close_first: bool,
    },
}

fn set_linger_zero(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("setsockopt(SO_LINGER): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `n` bytes are queued for reading, without reading them.
fn wait_readable(stream: &TcpStream, n: usize) -> Result<()> {
    let mut buf = vec![0u8; n];
    for _ in 0..500 {
        match stream.peek(&mut buf) {
            Ok(got) if got >= n => return Ok(()),
            Ok(_) => sleep(Duration::from_millis(2)),
            Err(e) => return Err(e).context("peek"),
        }
    }
    bail!("the request did not arrive within 1 s")
}

pub const REQUEST: &[u8] = b"GET /teardown\n";
pub(crate) const RESPONSE: &[u8] = b"200 bye\n";

pub(crate) fn serve(listen: SocketAddr, teardown: Teardown) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut stream, _) = listener.accept().context("accept")?;
    drop(listener);
    match teardown {
        Teardown::Clean => {
            let mut req = vec![0u8; REQUEST.len()];
            stream.read_exact(&mut req).context("read request")?;
            stream.write_all(RESPONSE)?;
        }
        Teardown::Unread => wait_readable(&stream, REQUEST.len())?,
        Teardown::Linger0 => {
            let mut req = vec![0u8; REQUEST.len()];
            stream.read_exact(&mut req).context("read request")?;
            set_linger_zero(&stream)?;
        }
        Teardown::Passive => {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).context("read to EOF")?;
            stream.write_all(RESPONSE).ok();
        }
    }
    drop(stream);
    println!("done");
    std::io::stdout().flush()?;
    // Stay a moment: a tracer symbolizing this close()'s call stack needs the process alive.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

pub(crate) fn connect(to: SocketAddr, close_first: bool) -> Result<()> {
    let mut stream = TcpStream::connect(to).with_context(|| format!("connect {to}"))?;
    println!("connected {}", stream.local_addr()?.port());
    std::io::stdout().flush()?;
    stream.write_all(REQUEST)?;
    if close_first {
        stream.shutdown(Shutdown::Write).ok();
        sleep(Duration::from_millis(100));
        drop(stream);
        println!("done");
        return Ok(());
    }
    let mut buf = Vec::new();
    // EOF (clean close) or ECONNRESET (RST): either way the server is gone.
    let outcome = match stream.read_to_end(&mut buf) {
        Ok(_) => "eof".to_string(),
        Err(e) => format!("error {}", e.kind()),
    };
    drop(stream);
    println!("done {outcome}");
    Ok(())
}

pub fn run(cmd: PeerCommand) -> Result<u8> {
    match cmd {
        PeerCommand::Serve { listen, teardown } => serve(listen, teardown)?,
        PeerCommand::Connect { to, close_first } => connect(to, close_first)?,
    }
    Ok(0)
}
