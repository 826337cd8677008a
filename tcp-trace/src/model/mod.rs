//! The reference model: the Linux kernel's TCP teardown state machine as pure data-in,
//! decisions-out Rust, for kernels 6.1, 6.6, 6.12 and 6.18.
//!
//! The facts are those of `shared/docs/kernel-teardown.md`; every rule cites the kernel function
//! it mirrors, and items the doc marks (unverified) are marked so here too. A connection is a
//! [`State`]: a full socket ([`Sock`]: TCP state plus orphan/queue flags), a TIME_WAIT minisocket
//! ([`TimeWaitSock`]), or freed. An [`Input`] (an application call, a peer segment, a timer) moves
//! it, and each [`Step`] records what a tracer should see: tcp_set_state() calls, packets, reset
//! reason, tcp_tw_status, TcpExt counters, errors, tcp_time_wait() calls.
//!
//! Layout: `state`, `input`, `params`, `outcome` hold the data types; the decisions live in
//! `application` (close, shutdown, read, write), `receive` (segments at a full socket),
//! `timewait` (segments and the timer at a minisocket) and `timers` (full-socket timers), one
//! function per kernel function. [`Model::step`] only routes an input to the right one. `table`
//! and `explain` render results.
//!
//! Not modelled: PAWS rejection, rate limits actually biting (every rate-limited ACK is assumed
//! sent), tcp_retries2 for sockets the application still holds, TCP_TW_RECYCLE/tw_reuse, and the
//! tcp_max_tw_buckets overflow (TCPTimeWaitOverflow).

mod application;
mod effects;
mod explain;
mod input;
mod outcome;
mod params;
mod receive;
mod state;
mod table;
mod timers;
mod timewait;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

// Public: what the `model` subcommand (src/main.rs) and the integration tests use.
pub use explain::{Explanation, explain};
pub use input::{Input, ParseInputError, parse_inputs};
pub use outcome::{RstReason, Step};
pub use params::{KernelGeneration, KernelVersion, ModelParams, ParseKernelVersionError};
pub use state::{ParseStateError, Sock, State, TimeWaitSock};
pub use table::{TableRow, render_table, transition_table};

pub(crate) use outcome::{KernelFunction, Outcome, TcpExtCounter, TwStatus, Wire};
pub(crate) use params::{DetectedKernel, TCP_TIMEWAIT_LEN_MS};
pub(crate) use state::{TcpState, TwSubstate};
// What only the tests use besides.
#[cfg(test)]
pub(crate) use input::INPUTS;
#[cfg(test)]
pub(crate) use outcome::{Errno, StateChange, TimerArmed};
#[cfg(test)]
pub(crate) use state::ReceiveQueue;

use input::{Action, TwSegment};

/// One connection's teardown, step by step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Model {
    params: ModelParams,
    state: State,
}

impl Model {
    /// A model of an ESTABLISHED connection held by the application.
    #[cfg(test)]
    pub(crate) fn established(params: ModelParams) -> Model {
        Model::with_state(params, State::established())
    }

    /// A model starting anywhere.
    pub(crate) fn with_state(params: ModelParams, state: State) -> Model {
        Model { params, state }
    }

    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// Applies one input: moves to the next state and returns what happened. Never panics; an
    /// input that cannot occur here leaves the state alone and says why.
    pub(crate) fn step(&mut self, input: Input) -> Step {
        let outcome = decide(&self.state, input, &self.params);
        let from = std::mem::replace(&mut self.state, outcome.next.clone());
        Step {
            input,
            from,
            outcome,
        }
    }

    /// Applies inputs in order.
    pub(crate) fn run(&mut self, inputs: &[Input]) -> Vec<Step> {
        inputs.iter().map(|&input| self.step(input)).collect()
    }
}

/// Routes an input to the rule that decides it, by where the connection lives.
fn decide(state: &State, input: Input, p: &ModelParams) -> Outcome {
    match state {
        State::Socket(sock) => socket_input(sock, input, p),
        State::TimeWait(tw) => time_wait_input(tw, input, p),
        State::Freed => freed_input(input, p),
    }
}

fn socket_input(sock: &Sock, input: Input, p: &ModelParams) -> Outcome {
    let here = State::Socket(sock.clone());
    if matches!(sock.state, TcpState::TimeWait | TcpState::NewSynRecv) {
        return Outcome::not_applicable(
            &here,
            format!(
                "a full socket is never in {} (TIME_WAIT lives in a minisocket, NEW_SYN_RECV in a \
                 request socket)",
                sock.state
            ),
        );
    }
    let application_call = matches!(
        input.action(),
        Action::Close(_) | Action::Disconnect | Action::Shutdown(_) | Action::Read | Action::Write
    );
    if application_call && sock.orphan {
        return Outcome::not_applicable(
            &here,
            "the application already closed this socket (SOCK_DEAD)",
        );
    }
    match input.action() {
        Action::Close(call) if call.listener_children && sock.state != TcpState::Listen => {
            Outcome::not_applicable(&here, format!("not a listener ({})", sock.state))
        }
        Action::Close(call) => application::tcp_close(sock, call, p),
        Action::Disconnect => application::inet_disconnect(sock, p),
        Action::Shutdown(how) => application::inet_shutdown(sock, how, p),
        Action::Read => application::tcp_recvmsg(sock, p),
        Action::Write => application::tcp_sendmsg(sock, p),
        Action::Segment(segment) if sock.state == TcpState::Close => {
            receive::tcp_v4_rcv_no_socket(&here, segment.is_rst(), p)
        }
        Action::Segment(segment) => match segment {
            input::Segment::Fin => receive::tcp_fin(sock, p),
            input::Segment::FinAck => receive::tcp_fin_ack(sock, p),
            input::Segment::AckOfFin => receive::tcp_rcv_state_process_ack_of_fin(sock, p, false),
            input::Segment::AckOfData => receive::tcp_ack_of_data(sock, p),
            input::Segment::Data => receive::tcp_rcv_state_process_data(sock, p),
            input::Segment::Rst(seq) => receive::tcp_validate_incoming_rst(sock, seq, p),
            input::Segment::FinNoAck => receive::tcp_rcv_state_process_no_ack(sock, p),
            input::Segment::DataAckingFin => {
                receive::tcp_rcv_state_process_data_acking_fin(sock, p)
            }
            input::Segment::DataOutOfWindow => {
                receive::tcp_validate_incoming_out_of_window(sock, p)
            }
        },
        Action::TimeWaitSegment(_) | Action::TwExpire => Outcome::not_applicable(
            &here,
            format!(
                "no TIME_WAIT minisocket: the connection is a full socket in {} (use the \
                 segment inputs fin, rst-exact, ...)",
                sock.state
            ),
        ),
        Action::ChildLostRace => receive::tcp_v4_syn_recv_sock_lost_race(sock, p),
        Action::FinWait2Timeout => timers::tcp_keepalive_timer(sock, p),
        Action::OrphanRetriesExhausted => timers::tcp_write_timeout(sock, p),
        Action::OrphanOutOfResources => timers::tcp_out_of_resources(sock, p),
        Action::ConnectionTimeout => timers::tcp_write_err(sock, p),
    }
}

fn time_wait_input(tw: &TimeWaitSock, input: Input, p: &ModelParams) -> Outcome {
    let here = State::TimeWait(tw.clone());
    match input.action() {
        Action::Close(_)
        | Action::Disconnect
        | Action::Shutdown(_)
        | Action::Read
        | Action::Write
            if tw.app_holds_closed_socket =>
        {
            // The call reaches the application's full socket, which tcp_time_wait() left in
            // CLOSE; the minisocket does not notice.
            let on_app_socket = socket_input(&Sock::closed_by_tcp_done(), input, p);
            let app_socket_left = matches!(on_app_socket.next, State::Socket(_));
            Outcome {
                next: State::TimeWait(TimeWaitSock {
                    substate: tw.substate,
                    app_holds_closed_socket: app_socket_left,
                }),
                rule: format!(
                    "{} (the application's CLOSE socket; the minisocket lives on)",
                    on_app_socket.rule
                ),
                ..on_app_socket
            }
        }
        Action::Close(_)
        | Action::Disconnect
        | Action::Shutdown(_)
        | Action::Read
        | Action::Write => Outcome::not_applicable(
            &here,
            "the application already closed this connection; only a minisocket is left",
        ),
        Action::Segment(segment) => {
            timewait::tcp_v4_rcv_time_wait(tw, segment.at_time_wait(tw.substate), p)
        }
        Action::TimeWaitSegment(segment) => timewait::tcp_v4_rcv_time_wait(tw, segment, p),
        Action::TwExpire => timewait::tw_timer_handler(tw),
        Action::FinWait2Timeout if tw.substate == TwSubstate::FinWait2 => {
            timewait::tw_timer_handler(tw)
        }
        Action::FinWait2Timeout => Outcome::not_applicable(
            &here,
            "the minisocket is already in TIME_WAIT (see tw-expire)",
        ),
        Action::OrphanRetriesExhausted
        | Action::OrphanOutOfResources
        | Action::ConnectionTimeout => Outcome::not_applicable(
            &here,
            "a minisocket retransmits nothing; only its own timer runs",
        ),
        Action::ChildLostRace => Outcome::not_applicable(&here, "not a listener's new child"),
    }
}

fn freed_input(input: Input, p: &ModelParams) -> Outcome {
    match input.action() {
        Action::Segment(segment) => {
            receive::tcp_v4_rcv_no_socket(&State::Freed, segment.is_rst(), p)
        }
        Action::TimeWaitSegment(TwSegment::Syn) if p.listener_on_port => Outcome::new(
            State::Freed,
            KernelFunction::TcpV4Rcv,
            "tcp_v4_rcv(): no socket owns the 4-tuple; the listener on the port takes the SYN \
             (a new connection, not this one)",
        ),
        Action::TimeWaitSegment(segment) => {
            receive::tcp_v4_rcv_no_socket(&State::Freed, segment.is_rst(), p)
        }
        Action::Close(_)
        | Action::Disconnect
        | Action::Shutdown(_)
        | Action::Read
        | Action::Write
        | Action::FinWait2Timeout
        | Action::ChildLostRace
        | Action::TwExpire
        | Action::OrphanRetriesExhausted
        | Action::OrphanOutOfResources
        | Action::ConnectionTimeout => {
            Outcome::not_applicable(&State::Freed, "the socket is freed; nothing is left")
        }
    }
}
