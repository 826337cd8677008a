//! The tracer under test: the real binary, its stdout's JSON lines collected by a thread as they
//! come, so a test waits on what it printed (never on time), and stopped by a signal once it has
//! printed everything the test did: a marker connection made after the test's work, or, for a
//! tracer whose filters keep the marker out, the test's own last sockets.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    os::fd::OwnedFd,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcp_trace::validate::netns::Netns;

use super::{
    BIN,
    net::{is_socket_end, marker_connection, port_of, refused_connection, refusing_port},
};

/// How long to wait for something the tracer must print before calling it a hang.
pub const HANG: Duration = Duration::from_secs(120);

/// What the tracer prints on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// `--json` lines, the first the start line.
    Json,
    /// Nothing (`--quiet`, `--output FILE`): what it prints anyway is kept for the test to see.
    Nothing,
}

/// How the tracer shows it has read everything before its stop. Its port is held from the
/// tracer's start to its stop, so no other connection of the test can take it.
enum Marker {
    /// A clean connection to this listener (its port traced too): both ends printed, as events
    /// or flows.
    Connection {
        listener: TcpListener,
        flows_only: bool,
    },
    /// A refused connection to this port (`tcp-trace resets` prints resets only): the reset
    /// sent and the one received, printed.
    Refused { port: u16, _held: OwnedFd },
    /// None can show it: why.
    Unavailable(&'static str),
}

impl Marker {
    fn port(&self) -> Option<u16> {
        match self {
            Marker::Connection { listener, .. } => Some(listener.local_addr().unwrap().port()),
            Marker::Refused { port, .. } => Some(*port),
            Marker::Unavailable(_) => None,
        }
    }
}

#[derive(Default)]
struct State {
    /// Each stdout line, parsed (with [`Stdout::Json`]).
    lines: Vec<Value>,
    /// The `type` of every line so far.
    types: BTreeSet<String>,
    /// Each stdout line as printed (with [`Stdout::Nothing`]).
    raw: Vec<String>,
    /// A stdout line that is not JSON: the run is broken.
    bad: Option<String>,
    stdout_closed: bool,
    /// stderr said the tracer traces.
    tracing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
}

/// A running `tcp-trace` (the live trace or `resets`).
pub struct Tracer {
    child: Child,
    shared: Arc<Shared>,
    readers: Vec<thread::JoinHandle<()>>,
    marker: Marker,
    /// The start line (`{"type":"start"}`), with [`Stdout::Json`]; null otherwise.
    pub start: Value,
}

impl Tracer {
    /// `tcp-trace ARGS --json` (ARGS may begin with a subcommand), attached and tracing.
    pub fn start(args: &[&str]) -> Tracer {
        Tracer::spawn(args, Stdout::Json, None)
    }

    /// [`Tracer::start`], spawned inside `ns` (its own network namespace is that one).
    pub fn start_in(ns: &Netns, args: &[&str]) -> Tracer {
        Tracer::spawn(args, Stdout::Json, Some(ns))
    }

    /// `tcp-trace ARGS` (with `--json` for [`Stdout::Json`]; a `--duration` long enough unless
    /// ARGS has one), spawned here or in `ns`, once its stderr says it traces (and with JSON,
    /// once it printed its start line). With a `--port` filter, the marker's port is traced too.
    pub fn spawn(args: &[&str], stdout: Stdout, ns: Option<&Netns>) -> Tracer {
        let has = |flag: &str| args.iter().any(|a| a == &flag);
        let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if stdout == Stdout::Json {
            full.push("--json".into());
        }
        if !has("--duration") {
            full.extend(["--duration".into(), "10m".into()]);
        }
        let marker = if stdout == Stdout::Nothing {
            Marker::Unavailable("it prints nothing on stdout")
        } else if has("--pid") || has("--cgroup") || has("--netns") {
            Marker::Unavailable("its --pid, --cgroup or --netns keeps this process's marker out")
        } else {
            let marker = if args.first() == Some(&"resets") {
                let (held, port) = refusing_port();
                Marker::Refused { port, _held: held }
            } else {
                Marker::Connection {
                    listener: TcpListener::bind("127.0.0.1:0").expect("the marker's listener"),
                    flows_only: args.windows(2).any(|w| w == ["--view", "flows"]),
                }
            };
            if has("--port") {
                full.extend(["--port".into(), marker.port().unwrap().to_string()]);
            }
            marker
        };
        let mut cmd = Command::new(BIN);
        cmd.args(&full)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match ns {
            Some(ns) => ns
                .run(move || Ok(cmd.spawn()?))
                .expect("spawn tcp-trace in the namespace"),
            None => cmd.spawn().expect("spawn tcp-trace"),
        };
        let shared = Arc::new(Shared::default());
        let stdout_reader = {
            let (shared, out) = (shared.clone(), child.stdout.take().unwrap());
            thread::spawn(move || read_stdout(out, stdout, &shared))
        };
        let stderr_reader = {
            let (shared, err) = (shared.clone(), child.stderr.take().unwrap());
            thread::spawn(move || {
                // Echoed for the test's log (shown when it fails).
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("  tracer | {line}");
                    if line.contains("tracing; Ctrl-C to stop") {
                        shared.update(|s| s.tracing = true);
                    }
                }
            })
        };
        let mut tracer = Tracer {
            child,
            shared,
            readers: vec![stdout_reader, stderr_reader],
            marker,
            start: Value::Null,
        };
        tracer.wait_until("that it traces (stderr: `tracing; Ctrl-C to stop`)", |s| {
            s.tracing
        });
        if stdout == Stdout::Json {
            tracer.wait_for("the start line", |v| v["type"] == "start");
            tracer.start = tracer.lines()[0].clone();
            assert_eq!(tracer.start["type"], "start", "the first line");
        }
        tracer
    }

    /// The hooks its start line says are attached (registry names: `tcp_close`).
    pub fn attached(&self) -> Vec<String> {
        self.start["hooks"]
            .as_array()
            .expect("the start line lists the hooks")
            .iter()
            .filter(|h| !h["mechanism"].is_null())
            .map(|h| h["hook"].as_str().expect("a hook's name").to_string())
            .collect()
    }

    /// What it printed so far.
    pub fn lines(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().lines.clone()
    }

    /// Whether it printed a line of type `t` (`lost`).
    pub fn printed_type(&self, t: &str) -> bool {
        self.shared.state.lock().unwrap().types.contains(t)
    }

    /// Waits until `done` holds for what it printed so far, or fails: after [`HANG`], when the
    /// tracer has ended, or when it printed a line that is not JSON.
    fn wait_until(&self, what: &str, done: impl Fn(&State) -> bool) {
        let started = Instant::now();
        let mut state = self.shared.state.lock().unwrap();
        loop {
            if let Some(bad) = &state.bad {
                panic!("tcp-trace printed a line that is not JSON: {bad}");
            }
            if done(&state) {
                return;
            }
            let waited = started.elapsed();
            if state.stdout_closed || waited >= HANG {
                let why = if state.stdout_closed {
                    "it ended"
                } else {
                    "hung?"
                };
                fail_with_head(&state, &format!("tcp-trace did not print {what} ({why})"));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, HANG - waited)
                .unwrap()
                .0;
        }
    }

    /// Waits until its lines so far satisfy `done` (e.g. a count of flows).
    pub fn wait_until_lines(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        self.wait_until(what, |s| done(&s.lines));
    }

    /// Waits until it printed a line that `want` accepts.
    pub fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) {
        self.wait_until_lines(what, |lines| lines.iter().any(&want));
    }

    /// Whether it printed, within `patience`, a line that `want` accepts.
    pub fn printed(&self, patience: Duration, want: impl Fn(&Value) -> bool) -> bool {
        let started = Instant::now();
        let mut state = self.shared.state.lock().unwrap();
        let mut seen = 0;
        loop {
            if state.lines[seen..].iter().any(&want) {
                return true;
            }
            seen = state.lines.len();
            let waited = started.elapsed();
            if waited >= patience || state.stdout_closed {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, patience - waited)
                .unwrap()
                .0;
        }
    }

    /// Whether it printed, within `patience`, the end of each socket (local port, remote port).
    pub fn printed_sockets(&self, patience: Duration, sockets: &[(u16, u16)]) -> bool {
        sockets
            .iter()
            .all(|&(l, r)| self.printed(patience, |v| is_socket_end(v, l, r)))
    }

    /// Waits until it printed the end of each socket (local port, remote port; remote 0: a
    /// listener).
    pub fn wait_for_sockets(&self, sockets: &[(u16, u16)]) {
        for &(local, remote) in sockets {
            self.wait_for(&format!("the end of the socket {local} > {remote}"), |v| {
                is_socket_end(v, local, remote)
            });
        }
    }

    /// Makes the marker connection after the test's work and waits until the tracer printed it:
    /// then it has read everything the kernel wrote before.
    fn wait_for_marker(&self) {
        match &self.marker {
            Marker::Connection {
                listener,
                flows_only,
            } => {
                let port = listener.local_addr().unwrap().port();
                let client = marker_connection(listener);
                let ends = [(client, port), (port, client)];
                if *flows_only {
                    for (local, remote) in ends {
                        self.wait_for(&format!("the marker's flow {local} > {remote}"), |v| {
                            v["type"] == "flow"
                                && port_of(&v["key"]["local"]) == Some(local)
                                && port_of(&v["key"]["remote"]) == Some(remote)
                        });
                    }
                } else {
                    self.wait_for_sockets(&ends);
                }
            }
            Marker::Refused { port, .. } => {
                let port = *port;
                refused_connection(port);
                self.wait_for("the marker's reset sent", |v| {
                    v["type"] == "reset"
                        && v["direction"] == "sent"
                        && port_of(&v["local"]) == Some(port)
                });
                self.wait_for("the marker's reset received", |v| {
                    v["type"] == "reset"
                        && v["direction"] == "received"
                        && port_of(&v["peer"]) == Some(port)
                });
            }
            Marker::Unavailable(why) => panic!(
                "this tracer cannot be stopped after a marker ({why}): wait for the test's \
                 last sockets (Tracer::stop_after_sockets, Tracer::stop_once)"
            ),
        }
    }

    /// Stops it as Ctrl-C does, after the marker (see [`Tracer::wait_for_marker`]).
    pub fn stop(self) -> Stopped {
        self.stop_with(libc::SIGINT)
    }

    /// Stops it with `signal` after the marker.
    pub fn stop_with(self, signal: i32) -> Stopped {
        self.wait_for_marker();
        self.end(signal)
    }

    /// Stops it as Ctrl-C does once it printed the end of each of `sockets` (local port, remote
    /// port), the last the test made: for a tracer whose filters keep the marker out.
    pub fn stop_after_sockets(self, sockets: &[(u16, u16)]) -> Stopped {
        self.wait_for_sockets(sockets);
        self.end(libc::SIGINT)
    }

    /// Stops it as Ctrl-C does once its lines satisfy `done`: the last thing the test made has
    /// been printed.
    pub fn stop_once(self, what: &str, done: impl Fn(&[Value]) -> bool) -> Stopped {
        self.wait_until_lines(what, done);
        self.end(libc::SIGINT)
    }

    /// Stops it with `signal` without waiting on its output: only for a test that already
    /// knows it has seen everything by other means (a metrics scrape, the file it writes).
    pub fn stop_now(self, signal: i32) -> Stopped {
        self.end(signal)
    }

    /// Sends it `signal` (SIGHUP: reopen the output file), and goes on.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn end(mut self, signal: i32) -> Stopped {
        self.signal(signal);
        let status = self.child.wait().expect("wait for tcp-trace");
        for reader in std::mem::take(&mut self.readers) {
            reader.join().expect("reading the tracer's output");
        }
        let state = std::mem::take(&mut *self.shared.state.lock().unwrap());
        if let Some(bad) = state.bad {
            panic!("tcp-trace printed a line that is not JSON: {bad}");
        }
        let marker_port = self.marker.port();
        let (marker, lines) = state
            .lines
            .into_iter()
            .partition(|v| marker_port.is_some_and(|p| mentions_port(v, p)));
        Stopped {
            code: status.code(),
            lines,
            marker,
            stdout: state.raw,
        }
    }
}

impl Drop for Tracer {
    /// A test that failed before stopping its tracer does not leave it running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_stdout(out: impl Read, stdout: Stdout, shared: &Shared) {
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        shared.update(|s| match stdout {
            Stdout::Nothing => s.raw.push(line),
            Stdout::Json => match serde_json::from_str::<Value>(&line) {
                Ok(v) => {
                    if let Some(t) = v["type"].as_str() {
                        s.types.insert(t.to_string());
                    }
                    s.lines.push(v);
                }
                Err(e) => s.bad = Some(format!("{e}: {line}")),
            },
        });
    }
    shared.update(|s| s.stdout_closed = true);
}

fn fail_with_head(state: &MutexGuard<'_, State>, what: &str) -> ! {
    let head: Vec<String> = state.lines.iter().take(40).map(Value::to_string).collect();
    panic!(
        "{what}; it printed {} lines, first:\n{}",
        state.lines.len(),
        head.join("\n")
    );
}

/// Whether a line is about a socket with `port` at one end (events, resets, flows).
fn mentions_port(v: &Value, port: u16) -> bool {
    [
        &v["local"],
        &v["remote"],
        &v["peer"],
        &v["key"]["local"],
        &v["key"]["remote"],
    ]
    .into_iter()
    .any(|a| port_of(a) == Some(port))
}

/// What a stopped tracer printed.
pub struct Stopped {
    /// Its exit status (None: killed by a signal).
    pub code: Option<i32>,
    /// Every JSON line but the marker's, in order (the start line first).
    pub lines: Vec<Value>,
    /// The marker's lines.
    pub marker: Vec<Value>,
    /// With [`Stdout::Nothing`]: what it printed on stdout all the same.
    pub stdout: Vec<String>,
}

impl Stopped {
    /// The lines of type `t` (`event`, `flow`, `reset`), the marker's left out.
    pub fn of_type(&self, t: &str) -> Vec<&Value> {
        self.lines.iter().filter(|l| l["type"] == t).collect()
    }

    pub fn events(&self) -> Vec<&Value> {
        self.of_type("event")
    }

    pub fn flows(&self) -> Vec<&Value> {
        self.of_type("flow")
    }

    /// The one line of type `t` (`summary`, `reset_summary`).
    pub fn one(&self, t: &str) -> &Value {
        let found = self.of_type(t);
        assert_eq!(found.len(), 1, "one {t} line: {found:#?}");
        found[0]
    }

    /// The summary line at exit.
    pub fn summary(&self) -> &Value {
        self.one("summary")
    }

    /// How many events it printed, the marker's too (what the summary counts).
    pub fn events_printed(&self) -> usize {
        self.events().len() + self.marker.iter().filter(|l| l["type"] == "event").count()
    }
}
