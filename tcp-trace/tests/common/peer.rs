//! The test peers: `tcp-trace peer serve|connect`, one end of a connection per process, with a
//! known teardown. Each says what it did on stdout (`listening PORT`, `connected PORT`, `done`).

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
};

use super::BIN;

/// A running `tcp-trace peer ...`.
pub struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Peer {
    /// `tcp-trace peer ARGS`, its stdout piped, to spawn (in a namespace, a cgroup, ...).
    pub fn command(args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("peer").args(args).stdout(Stdio::piped());
        cmd
    }

    /// A peer spawned from [`Peer::command`].
    pub fn from_child(mut child: Child) -> Peer {
        let out = BufReader::new(child.stdout.take().expect("the peer's stdout is piped"));
        Peer { child, out }
    }

    /// `tcp-trace peer ARGS`, here.
    pub fn spawn(args: &[&str]) -> Peer {
        Peer::from_child(Peer::command(args).spawn().expect("spawn tcp-trace peer"))
    }

    /// The next line it printed (empty once it ended).
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("read the peer's output");
        s.trim().to_string()
    }

    /// The port of its next line, which must be `WORD PORT` (`listening`, `connected`).
    pub fn port(&mut self, word: &str) -> u16 {
        let line = self.line();
        line.strip_prefix(word)
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("the peer said {line:?}, not `{word} PORT`"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until it exits, successfully.
    pub fn wait(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tcp-trace peer exited with {status}");
    }

    /// Its last line, once it exited successfully.
    pub fn finish(mut self) -> String {
        let last = self.line();
        self.wait();
        last
    }
}

/// One connection through the peers, as it went.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    pub server_pid: u32,
    pub client_pid: u32,
    pub server_port: u16,
    pub client_port: u16,
}

/// A `tcp-trace peer serve` that listens, waiting for its one client.
pub struct Listening {
    server: Peer,
    pub port: u16,
}

impl Listening {
    /// A server on `listen` that will end its connection as `teardown` says, spawned by `spawn`
    /// (in a namespace, a cgroup, ...), once it listens.
    pub fn serve_with(
        listen: &str,
        teardown: &str,
        spawn: impl FnOnce(Command, Side) -> Child,
    ) -> Listening {
        let cmd = Peer::command(&["serve", "--listen", listen, "--teardown", teardown]);
        let mut server = Peer::from_child(spawn(cmd, Side::Server));
        let port = server.port("listening");
        Listening { server, port }
    }

    /// [`Listening::serve_with`], a child of this process.
    pub fn serve(listen: &str, teardown: &str) -> Listening {
        Listening::serve_with(listen, teardown, spawn_here)
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Its client, connecting to `to`, spawned by `spawn`; returns once both exited,
    /// successfully.
    pub fn connect_with(self, to: &str, spawn: impl FnOnce(Command, Side) -> Child) -> Connection {
        let mut client =
            Peer::from_child(spawn(Peer::command(&["connect", "--to", to]), Side::Client));
        let client_port = client.port("connected");
        let (server_pid, client_pid) = (self.server.pid(), client.pid());
        assert_eq!(self.server.finish(), "done", "the server's last line");
        let client_said = client.finish();
        assert!(
            client_said.starts_with("done"),
            "the client said {client_said:?}"
        );
        Connection {
            server_pid,
            client_pid,
            server_port: self.port,
            client_port,
        }
    }

    /// [`Listening::connect_with`], a child of this process.
    pub fn connect(self, to: &str) -> Connection {
        self.connect_with(to, spawn_here)
    }
}

fn spawn_here(mut cmd: Command, _: Side) -> Child {
    cmd.spawn().expect("spawn tcp-trace peer")
}

impl Connection {
    /// A server on `listen` that ends the connection as `teardown` says and a client of `to`,
    /// each in its own process spawned by `spawn` (in a namespace, a cgroup, ...); returns once
    /// both exited, successfully.
    pub fn run_with(
        listen: &str,
        to: &str,
        teardown: &str,
        mut spawn: impl FnMut(Command, Side) -> Child,
    ) -> Connection {
        Listening::serve_with(listen, teardown, &mut spawn).connect_with(to, &mut spawn)
    }

    /// [`Connection::run_with`], both processes children of this one.
    pub fn run(listen: &str, to: &str, teardown: &str) -> Connection {
        Connection::run_with(listen, to, teardown, spawn_here)
    }

    /// [`Connection::run`] on IPv4 loopback, `port`.
    pub fn on_loopback(port: u16, teardown: &str) -> Connection {
        let addr = format!("127.0.0.1:{port}");
        Connection::run(&addr, &addr, teardown)
    }

    /// Its sockets as (local port, remote port): the listener (remote 0), the server's end, the
    /// client's end.
    pub fn sockets(&self) -> [(u16, u16); 3] {
        [
            (self.server_port, 0),
            (self.server_port, self.client_port),
            (self.client_port, self.server_port),
        ]
    }

    /// The server's sockets: the listener and its end of the connection.
    pub fn server_sockets(&self) -> [(u16, u16); 2] {
        [(self.server_port, 0), (self.server_port, self.client_port)]
    }
}

/// Which end [`Connection::run_with`] spawns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// A test that fails half-way leaves no peer blocked in accept() behind it.
impl Drop for Peer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
