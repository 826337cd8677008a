//! Properties over every state and input, and the teardown scenarios of the kernel doc.

use std::collections::{HashSet, VecDeque};

use super::*;

fn kernel(major: u32, minor: u32) -> ModelParams {
    ModelParams::for_kernel(major, minor, 0)
}

/// Kernel generations and sysctl settings whose decisions differ.
fn param_variants() -> Vec<ModelParams> {
    let base = kernel(6, 12);
    vec![
        kernel(5, 15),
        kernel(6, 1),
        kernel(6, 6),
        kernel(6, 10),
        base,
        kernel(6, 15),
        kernel(6, 18),
        ModelParams {
            tcp_rfc1337: true,
            ..base
        },
        ModelParams {
            tcp_linger2_secs: -1,
            ..base
        },
        ModelParams {
            tcp_linger2_secs: 90,
            ..base
        },
        ModelParams {
            tcp_fin_timeout_secs: 90,
            ..base
        },
        ModelParams {
            tcp_fin_timeout_secs: 30,
            ..base
        },
        ModelParams {
            listener_on_port: false,
            ..base
        },
    ]
}

/// Every state the model can be handed: all TCP states with all flag combinations (including the
/// impossible ones), both minisocket substates with and without the application's socket, freed.
fn all_states() -> Vec<State> {
    let mut states = Vec::new();
    for tcp in TcpState::ALL {
        for orphan in [false, true] {
            for rcv_shutdown in [false, true] {
                for receive_queue in [
                    ReceiveQueue::Empty,
                    ReceiveQueue::Unread,
                    ReceiveQueue::OnlyReadData,
                ] {
                    for unsent in [false, true] {
                        states.push(State::Socket(Sock {
                            state: tcp,
                            orphan,
                            rcv_shutdown,
                            receive_queue,
                            unsent,
                        }));
                    }
                }
            }
        }
    }
    for substate in [TwSubstate::FinWait2, TwSubstate::TimeWait] {
        for app_holds_closed_socket in [false, true] {
            states.push(State::TimeWait(TimeWaitSock {
                substate,
                app_holds_closed_socket,
            }));
        }
    }
    states.push(State::Freed);
    states
}

fn step(p: &ModelParams, from: &State, input: Input) -> Step {
    Model::with_state(*p, from.clone()).step(input)
}

fn run(p: &ModelParams, start: State, inputs: &[Input]) -> Vec<Step> {
    Model::with_state(*p, start).run(inputs)
}

fn state(name: &str) -> State {
    name.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// Checks that hold for any single step.
fn check_step(p: &ModelParams, s: &Step) {
    let o = &s.outcome;
    let context = format!("{} on {s} with {p}", s.from);
    assert!(!o.rule.is_empty(), "empty rule: {context}");
    if !o.applicable {
        assert_eq!(o.next, s.from, "n/a must not move: {context}");
        assert!(o.wire.is_empty() && o.counters.is_empty(), "{context}");
        assert!(
            o.state_changes.is_empty() && o.time_wait.is_none(),
            "{context}"
        );
        assert!(o.rule.starts_with("not applicable: "), "{context}");
        return;
    }
    assert!(o.decided_by.is_some(), "no deciding function: {context}");
    // The full socket never enters TIME_WAIT itself: tcp_time_wait() hands over to a minisocket.
    assert!(
        o.state_changes.iter().all(|c| c.to != TcpState::TimeWait),
        "{context}"
    );
    if s.from.tcp_state() != Some(TcpState::TimeWait) {
        assert_ne!(s.to().tcp_state(), Some(TcpState::TimeWait), "{context}");
    }
    // An orphan in CLOSE is destroyed in the same step.
    if let State::Socket(sock) = s.to()
        && sock.state == TcpState::Close
        && s.from.tcp_state() != Some(TcpState::Close)
    {
        assert!(!sock.orphan, "orphan left in CLOSE: {context}");
    }
    // Consecutive tcp_set_state() calls chain.
    for pair in o.state_changes.windows(2) {
        assert_eq!(pair[0].to, pair[1].from, "{context}");
    }
    if let Some(call) = o.time_wait {
        assert_eq!(
            o.state_changes.last().map(|c| c.to),
            Some(TcpState::Close),
            "tcp_time_wait() ends in tcp_done(): {context}"
        );
        assert_eq!(s.to().tw_substate(), Some(call.substate), "{context}");
    }
    // A reset reason only comes with a RST, and only from 6.10 on.
    if o.rst_reason.is_some() {
        assert!(s.sends_rst(), "{context}");
        assert!(p.kernel.passive_reset_reasons, "{context}");
    }
    if s.sends_rst() && p.kernel.passive_reset_reasons {
        assert!(
            o.rst_reason.is_some(),
            "RST without reason on 6.10+: {context}"
        );
    }
    if o.tw_status == Some(TwStatus::AckOow) {
        assert!(p.kernel.tw_ack_oow, "{context}");
    }
}

/// TIME_WAIT is only reached through tcp_time_wait(), or inside a minisocket from FIN_WAIT2.
fn check_time_wait_entry(s: &Step) {
    let context = format!("{s}");
    match (&s.from, s.to()) {
        (State::Socket(_), State::TimeWait(tw)) => {
            let call = s.outcome.time_wait.expect(&context);
            assert_eq!(call.substate, tw.substate, "{context}");
        }
        (State::TimeWait(from), State::TimeWait(to))
            if from.substate == TwSubstate::FinWait2 && to.substate == TwSubstate::TimeWait =>
        {
            assert_eq!(
                s.outcome.decided_by,
                Some(KernelFunction::TcpTimewaitStateProcess),
                "{context}"
            );
            assert_eq!(s.outcome.tw_status, Some(TwStatus::Ack), "{context}");
        }
        (State::TimeWait(_) | State::Freed, _) => {
            assert!(!s.time_wait_called(), "{context}");
        }
        _ => {}
    }
}

/// Ends a connection without the peer's help: the application's close() if it still holds the
/// socket, then whichever timer runs.
fn finish_without_peer(p: &ModelParams, start: &State) -> (State, Vec<Step>) {
    let mut current = start.clone();
    let mut steps = Vec::new();
    for _ in 0..8 {
        if current.is_finished() {
            break;
        }
        let next = [
            Input::Close,
            Input::FinWait2Timeout,
            Input::OrphanRetriesExhausted,
            Input::TwExpire,
        ]
        .into_iter()
        .map(|input| step(p, &current, input))
        .find(|s| s.outcome.applicable);
        match next {
            Some(s) => {
                current = s.to().clone();
                steps.push(s);
            }
            None => break,
        }
    }
    (current, steps)
}

/// Every state reachable from `starts` (over all inputs, any depth) and every step between them.
fn reachable(p: &ModelParams, starts: &[State]) -> (Vec<State>, Vec<Step>) {
    let mut seen: HashSet<State> = starts.iter().cloned().collect();
    let mut queue: VecDeque<State> = starts.iter().cloned().collect();
    let mut states = Vec::new();
    let mut steps = Vec::new();
    while let Some(current) = queue.pop_front() {
        for input in Input::all() {
            let s = step(p, &current, input);
            if seen.insert(s.to().clone()) {
                queue.push_back(s.to().clone());
            }
            steps.push(s);
        }
        states.push(current);
    }
    (states, steps)
}

fn teardown_starts() -> Vec<State> {
    vec![
        State::established(),
        State::socket(TcpState::SynSent),
        State::socket(TcpState::SynRecv),
        State::socket(TcpState::Listen),
    ]
}

fn is_close_call(input: Input) -> bool {
    matches!(
        input,
        Input::Close
            | Input::CloseUnread
            | Input::CloseReadQueued
            | Input::CloseLinger0
            | Input::CloseLinger
            | Input::CloseRepair
            | Input::ListenerCloseWithChildren
    )
}

// ---- Properties -------------------------------------------------------------------------------

#[test]
fn every_state_and_input_has_a_defined_outcome() {
    let states = all_states();
    for p in param_variants() {
        for from in &states {
            for input in Input::all() {
                let s = step(&p, from, input);
                assert_eq!(s.from, *from);
                assert_eq!(s.input, input);
                check_step(&p, &s);
            }
        }
    }
}

#[test]
fn every_reachable_state_finishes_by_close_and_timers_alone() {
    for p in param_variants() {
        let (states, _) = reachable(&p, &teardown_starts());
        assert!(
            states.len() > 20,
            "suspiciously few states: {}",
            states.len()
        );
        for start in &states {
            let (end, steps) = finish_without_peer(&p, start);
            assert!(
                end.is_finished(),
                "{start} does not finish with {p}: ends in {end} after {}",
                steps
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
    }
}

#[test]
fn random_walks_from_established_keep_every_invariant_and_finish() {
    // xorshift64*: deterministic, no external crate.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let variants = param_variants();
    let inputs: Vec<Input> = Input::all().collect();
    for _ in 0..3000 {
        let p = variants[(next() % variants.len() as u64) as usize];
        let mut model = Model::established(p);
        for _ in 0..8 {
            let input = inputs[(next() % inputs.len() as u64) as usize];
            let s = model.step(input);
            check_step(&p, &s);
            check_time_wait_entry(&s);
        }
        let (end, _) = finish_without_peer(&p, model.state());
        assert!(end.is_finished(), "{} does not finish", model.state());
    }
}

#[test]
fn one_close_never_sends_both_fin_and_rst() {
    for p in param_variants() {
        let (_, steps) = reachable(&p, &teardown_starts());
        for s in steps.iter().filter(|s| is_close_call(s.input)) {
            assert!(!(s.sends_fin() && s.sends_rst()), "{s} with {p}");
        }
    }
}

#[test]
fn memory_pressure_at_close_is_the_exception_fin_then_rst() {
    // tcp_close_state() + tcp_send_fin() run before adjudge_to_death's tcp_check_oom(), so the
    // FIN is already pushed when the RST follows.
    let s = step(&kernel(6, 12), &State::established(), Input::MemoryPressure);
    assert_eq!(s.outcome.wire, vec![Wire::FinSent, Wire::RstActive]);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpAbortOnMemory));
    assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnMemory]);
    assert_eq!(*s.to(), State::Freed);
    let changes: Vec<_> = s.outcome.state_changes.iter().map(|c| c.to).collect();
    assert_eq!(changes, vec![TcpState::FinWait1, TcpState::Close]);
    // Already in FIN_WAIT1 (FIN sent by shutdown) the pressure only resets.
    let s = step(&kernel(6, 12), &state("fin-wait1"), Input::MemoryPressure);
    assert_eq!(s.outcome.wire, vec![Wire::RstActive]);
}

#[test]
fn time_wait_is_only_reached_through_tcp_time_wait() {
    for p in param_variants() {
        let (states, steps) = reachable(&p, &teardown_starts());
        assert!(
            states
                .iter()
                .all(|s| s.tcp_state() != Some(TcpState::TimeWait))
        );
        for s in &steps {
            check_time_wait_entry(s);
        }
        assert!(
            steps
                .iter()
                .any(|s| s.to().tw_substate() == Some(TwSubstate::TimeWait) && s.time_wait_called())
        );
    }
}

#[test]
fn transition_table_has_one_row_per_state_and_input() {
    let p = kernel(6, 12);
    let rows = transition_table(p);
    let inputs = Input::all().count();
    assert_eq!(rows.len(), State::table_states().len() * inputs);
    for state in State::table_states() {
        assert_eq!(rows.iter().filter(|r| r.from == state).count(), inputs);
    }
    let text = render_table(&rows);
    for needle in [
        "ESTABLISHED",
        "TW:TIME_WAIT",
        "tcp_fin",
        "TCP_ABORT_ON_CLOSE",
        "n/a",
    ] {
        assert!(text.contains(needle), "table lacks {needle}");
    }
}

#[test]
fn table_states_print_and_parse_back() {
    for s in State::table_states() {
        assert_eq!(state(&s.to_string()), s, "{s}");
    }
}

// ---- Names, parsing, serde ----------------------------------------------------------------------

#[test]
fn inputs_table_is_in_declaration_order_and_names_parse_back() {
    for (index, info) in INPUTS.iter().enumerate() {
        assert_eq!(info.input as usize, index);
        assert_eq!(info.input.name(), info.name);
        assert_eq!(info.name.parse::<Input>(), Ok(info.input));
        for alias in info.aliases {
            assert_eq!(alias.parse::<Input>(), Ok(info.input));
        }
        // serde uses the same names.
        assert_eq!(
            serde_json::to_string(&info.input).unwrap(),
            format!("\"{}\"", info.name)
        );
    }
    assert_eq!("TW_SYN".parse::<Input>(), Ok(Input::TwSyn));
    assert!(Input::help_text().contains("orphan-retries-exhausted"));
}

#[test]
fn unknown_input_names_the_valid_ones() {
    let error = parse_inputs("close,frobnicate").unwrap_err();
    assert_eq!(error.given, "frobnicate");
    let message = error.to_string();
    assert!(message.contains("frobnicate"));
    for info in INPUTS {
        assert!(message.contains(info.name), "{message}");
    }
    assert_eq!(
        parse_inputs("close, ack ,fin,tw-expire"),
        Ok(vec![
            Input::Close,
            Input::AckOfFin,
            Input::Fin,
            Input::TwExpire
        ])
    );
}

#[test]
fn state_names_parse_and_unknown_ones_are_listed() {
    assert_eq!(state("FIN_WAIT1"), State::socket(TcpState::FinWait1));
    assert_eq!(state("time-wait"), State::time_wait(TwSubstate::TimeWait));
    assert_eq!(
        state("tw:fin_wait2"),
        State::time_wait(TwSubstate::FinWait2)
    );
    assert_eq!(
        state("fin-wait1+orphan+unsent"),
        State::Socket(Sock {
            unsent: true,
            ..Sock::new(TcpState::FinWait1).orphaned()
        })
    );
    let error = "bogus".parse::<State>().unwrap_err().to_string();
    assert!(error.contains("established") && error.contains("tw-time-wait"));
    assert!(error.contains("orphan"));
    assert!("freed+orphan".parse::<State>().is_err());
    let help = State::help_text();
    assert!(help.contains("tw-time-wait") && help.contains("+orphan"));
    assert!("established+app-socket".parse::<State>().is_err());
}

#[test]
fn tcp_states_use_the_kernel_values_and_names() {
    for (index, tcp) in TcpState::ALL.into_iter().enumerate() {
        let value = u8::try_from(index + 1).unwrap();
        assert_eq!(tcp.as_kernel(), value);
        assert_eq!(TcpState::from_kernel(value), Some(tcp));
        assert_eq!(tcp.kernel_name().parse::<TcpState>(), Ok(tcp));
        assert_eq!(
            serde_json::to_string(&tcp).unwrap(),
            format!("\"{}\"", tcp.kernel_name())
        );
    }
    assert_eq!(TcpState::from_kernel(0), None);
    assert_eq!(TcpState::from_kernel(13), None);
    assert_eq!(TcpState::Established.to_string(), "ESTABLISHED");
    assert_eq!(TwSubstate::TimeWait.as_kernel(), 6);
}

#[test]
fn kernel_generations_follow_the_release() {
    let g = |major, minor| KernelGeneration::from_version(major, minor, 0);
    let k61 = g(6, 1);
    assert!(!k61.passive_reset_reasons && !k61.active_reset_reasons);
    assert!(!k61.tw_isn_argument && !k61.tw_ack_oow && !k61.close_unread_fix);
    assert!(!k61.rfc1337_rst_rearms_tw_timer);
    assert!(g(6, 10).passive_reset_reasons && !g(6, 10).active_reset_reasons);
    assert!(g(6, 10).tw_isn_argument);
    assert!(g(6, 12).active_reset_reasons && !g(6, 12).tw_ack_oow);
    assert!(g(6, 15).tw_ack_oow && !g(6, 15).close_unread_fix);
    assert!(g(6, 18).close_unread_fix);
    assert!(g(5, 15).rfc1337_rst_rearms_tw_timer);
    assert_eq!(
        g(6, 10).active_reset_reason(RstReason::TcpAbortOnClose),
        Some(RstReason::NotSpecified)
    );
}

#[test]
fn kernel_versions_parse_from_uname() {
    let v = |s: &str| s.parse::<KernelVersion>();
    assert_eq!(v("6.12.3-1-amd64"), Ok(KernelVersion::new(6, 12, 3)));
    assert_eq!(v("6.18.0-rc2"), Ok(KernelVersion::new(6, 18, 0)));
    assert_eq!(v("6.1"), Ok(KernelVersion::new(6, 1, 0)));
    assert!(v("linux").is_err());
    assert!(v("6").is_err());
}

#[test]
fn steps_and_explanations_round_trip_through_json() {
    let p = kernel(6, 12);
    let explanation = explain(p, State::established(), &[Input::CloseUnread, Input::Fin]);
    let json = serde_json::to_string(&explanation).unwrap();
    assert!(
        json.contains("\"rst_reason\":\"TCP_ABORT_ON_CLOSE\""),
        "{json}"
    );
    assert!(
        json.contains("\"counters\":[\"TCPAbortOnClose\"]"),
        "{json}"
    );
    assert!(json.contains("\"decided_by\":\"__tcp_close\""), "{json}");
    let back: Explanation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, explanation);
    for row in transition_table(p) {
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(serde_json::from_str::<Step>(&json).unwrap(), row);
    }
}

#[test]
fn explanation_prints_every_step_with_its_rule() {
    let p = kernel(6, 12);
    let inputs = parse_inputs("close,ack,fin,tw-expire").unwrap();
    let text = explain(p, State::established(), &inputs).to_string();
    assert!(text.contains("start: ESTABLISHED"));
    assert!(text.contains("tcp_time_wait(FIN_WAIT2, 60000 ms)"));
    assert!(text.contains("rule: tw_timer_handler()"));
    assert!(text.ends_with("end: FREED"));
    assert_eq!(text.matches("rule: ").count(), inputs.len());
}

// ---- Scenarios ----------------------------------------------------------------------------------

#[test]
fn clean_active_close() {
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[Input::Close, Input::AckOfFin, Input::Fin, Input::TwExpire],
    );
    let [close, ack, fin, expire] = &steps[..] else {
        unreachable!()
    };
    assert_eq!(
        *close.to(),
        State::Socket(Sock::new(TcpState::FinWait1).orphaned())
    );
    assert_eq!(close.outcome.wire, vec![Wire::FinSent]);
    // Orphan FIN_WAIT2 with tcp_fin_timeout 60 s: straight into a FIN_WAIT2 minisocket.
    assert_eq!(*ack.to(), State::time_wait(TwSubstate::FinWait2));
    let call = ack.outcome.time_wait.unwrap();
    assert_eq!(
        (call.substate, call.timeo_ms),
        (TwSubstate::FinWait2, 60_000)
    );
    let changes: Vec<_> = ack.outcome.state_changes.iter().map(|c| c.to).collect();
    assert_eq!(changes, vec![TcpState::FinWait2, TcpState::Close]);
    // The peer's FIN turns the minisocket into real TIME_WAIT.
    assert_eq!(*fin.to(), State::time_wait(TwSubstate::TimeWait));
    assert_eq!(fin.outcome.tw_status, Some(TwStatus::Ack));
    assert_eq!(fin.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(*expire.to(), State::Freed);
    assert!(expire.outcome.wire.is_empty());
}

#[test]
fn active_close_after_shutdown_keeps_a_full_fin_wait2_until_the_fin() {
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[
            Input::ShutdownWr,
            Input::AckOfFin,
            Input::Fin,
            Input::Close,
            Input::TwExpire,
        ],
    );
    assert_eq!(steps[0].outcome.wire, vec![Wire::FinSent]);
    assert_eq!(*steps[1].to(), State::socket(TcpState::FinWait2));
    assert!(steps[1].outcome.timer.is_none() && steps[1].outcome.time_wait.is_none());
    let fin = &steps[2];
    let call = fin.outcome.time_wait.unwrap();
    assert_eq!(
        (call.substate, call.timeo_ms, call.timer_ms),
        (TwSubstate::TimeWait, 0, 60_000)
    );
    assert_eq!(fin.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(
        *fin.to(),
        State::TimeWait(TimeWaitSock {
            substate: TwSubstate::TimeWait,
            app_holds_closed_socket: true
        })
    );
    // close() destroys the application's CLOSE socket without a packet; the minisocket stays.
    assert_eq!(*steps[3].to(), State::time_wait(TwSubstate::TimeWait));
    assert!(steps[3].outcome.wire.is_empty());
    assert_eq!(*steps[4].to(), State::Freed);
}

#[test]
fn passive_close() {
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[Input::Fin, Input::Close, Input::AckOfFin],
    );
    assert_eq!(steps[0].to().tcp_state(), Some(TcpState::CloseWait));
    assert_eq!(steps[0].outcome.wire, vec![Wire::AckDelayed]);
    assert_eq!(steps[0].outcome.decided_by, Some(KernelFunction::TcpFin));
    assert_eq!(steps[1].to().tcp_state(), Some(TcpState::LastAck));
    assert_eq!(steps[1].outcome.wire, vec![Wire::FinSent]);
    assert_eq!(
        steps[2].outcome.state_changes,
        vec![StateChange {
            from: TcpState::LastAck,
            to: TcpState::Close
        }]
    );
    assert_eq!(*steps[2].to(), State::Freed);
}

#[test]
fn simultaneous_close() {
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[Input::Close, Input::Fin, Input::AckOfFin, Input::TwExpire],
    );
    assert_eq!(steps[1].to().tcp_state(), Some(TcpState::Closing));
    assert_eq!(steps[1].outcome.wire, vec![Wire::AckImmediate]);
    let call = steps[2].outcome.time_wait.unwrap();
    assert_eq!((call.substate, call.timeo_ms), (TwSubstate::TimeWait, 0));
    assert_eq!(*steps[2].to(), State::time_wait(TwSubstate::TimeWait));
    assert_eq!(*steps[3].to(), State::Freed);
}

#[test]
fn fin_that_acks_our_fin_goes_straight_to_time_wait() {
    let p = kernel(6, 12);
    let s = step(&p, &state("fin-wait1+orphan"), Input::FinAck);
    let changes: Vec<_> = s.outcome.state_changes.iter().map(|c| c.to).collect();
    assert_eq!(changes, vec![TcpState::FinWait2, TcpState::Close]);
    assert_eq!(s.outcome.time_wait.unwrap().substate, TwSubstate::TimeWait);
    assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(*s.to(), State::time_wait(TwSubstate::TimeWait));
}

#[test]
fn close_with_unread_data_resets() {
    for (p, reason) in [
        (kernel(6, 1), None),
        (kernel(6, 6), None),
        (kernel(6, 10), Some(RstReason::NotSpecified)),
        (kernel(6, 12), Some(RstReason::TcpAbortOnClose)),
        (kernel(6, 18), Some(RstReason::TcpAbortOnClose)),
    ] {
        for start in ["established", "close-wait"] {
            let s = step(&p, &state(start), Input::CloseUnread);
            assert_eq!(s.outcome.wire, vec![Wire::RstActive], "{start}");
            assert_eq!(s.outcome.rst_reason, reason, "{start} on {p}");
            assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnClose]);
            assert_eq!(s.outcome.decided_by, Some(KernelFunction::TcpClose));
            assert_eq!(s.outcome.state_changes.last().unwrap().to, TcpState::Close);
            assert_eq!(*s.to(), State::Freed);
        }
    }
    // The model remembers data that arrived and was not read...
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[Input::DataAfterClose, Input::Close],
    );
    assert_eq!(steps[1].outcome.wire, vec![Wire::RstActive]);
    // ...and forgets it once read.
    let steps = run(
        &p,
        State::established(),
        &[Input::DataAfterClose, Input::Read, Input::Close],
    );
    assert_eq!(steps[2].outcome.wire, vec![Wire::FinSent]);
    // After a RST the socket is CLOSE: close() destroys it silently, unread data or not.
    let steps = run(
        &p,
        State::established(),
        &[Input::RstExact, Input::CloseUnread],
    );
    assert!(steps[1].outcome.wire.is_empty());
    assert_eq!(*steps[1].to(), State::Freed);
}

#[test]
fn already_read_skbs_reset_only_before_the_618_fix() {
    let before = step(
        &kernel(6, 12),
        &State::established(),
        Input::CloseReadQueued,
    );
    assert_eq!(before.outcome.wire, vec![Wire::RstActive]);
    assert_eq!(
        before.outcome.counters,
        vec![TcpExtCounter::TcpAbortOnClose]
    );
    let fixed = step(
        &kernel(6, 18),
        &State::established(),
        Input::CloseReadQueued,
    );
    assert_eq!(fixed.outcome.wire, vec![Wire::FinSent]);
    assert!(fixed.outcome.counters.is_empty());
    // The fix is a parameter: a stable kernel with the backport sets it explicitly.
    let mut backported = kernel(6, 12);
    backported.kernel.close_unread_fix = true;
    let s = step(&backported, &State::established(), Input::CloseReadQueued);
    assert_eq!(s.outcome.wire, vec![Wire::FinSent]);
}

#[test]
fn linger_zero_resets_through_tcp_disconnect() {
    for (p, reason) in [
        (kernel(6, 1), None),
        (kernel(6, 12), Some(RstReason::TcpState)),
    ] {
        let s = step(&p, &State::established(), Input::CloseLinger0);
        assert_eq!(s.outcome.wire, vec![Wire::RstActive]);
        assert_eq!(s.outcome.rst_reason, reason);
        assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnData]);
        assert_eq!(s.outcome.decided_by, Some(KernelFunction::TcpDisconnect));
        assert_eq!(s.outcome.error, Some(Errno::Econnreset));
        assert_eq!(*s.to(), State::Freed);
    }
    let p = kernel(6, 12);
    // SYN_SENT: only sk_err; TCPAbortOnData is counted by __tcp_close() all the same.
    let s = step(&p, &state("syn-sent"), Input::CloseLinger0);
    assert!(s.outcome.wire.is_empty());
    assert_eq!(s.outcome.error, Some(Errno::Econnreset));
    assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnData]);
    // LAST_ACK with its FIN still behind unsent data.
    let s = step(&p, &state("last-ack+unsent"), Input::CloseLinger0);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpDisconnectWithData));
    // LAST_ACK with its FIN out: nothing to say.
    let s = step(&p, &state("last-ack"), Input::CloseLinger0);
    assert!(s.outcome.wire.is_empty());
}

#[test]
fn positive_linger_blocks_only_while_our_fin_is_outstanding() {
    let p = kernel(6, 12);
    let s = step(&p, &State::established(), Input::CloseLinger);
    assert!(s.outcome.blocks_caller);
    assert_eq!(s.outcome.wire, vec![Wire::FinSent]);
    let s = step(&p, &state("syn-sent"), Input::CloseLinger);
    assert!(!s.outcome.blocks_caller);
}

#[test]
fn orphan_fin_wait2_timeout() {
    // tcp_fin_timeout 90 s: 30 s on the keepalive timer as a full socket, then a minisocket.
    let p = ModelParams {
        tcp_fin_timeout_secs: 90,
        ..kernel(6, 12)
    };
    let steps = run(
        &p,
        State::established(),
        &[
            Input::Close,
            Input::AckOfFin,
            Input::FinWait2Timeout,
            Input::TwExpire,
        ],
    );
    assert_eq!(
        *steps[1].to(),
        State::Socket(Sock::new(TcpState::FinWait2).orphaned())
    );
    assert_eq!(
        steps[1].outcome.timer,
        Some(TimerArmed::FinWait2Keepalive { ms: 30_000 })
    );
    assert!(steps[1].outcome.time_wait.is_none());
    let timeout = &steps[2];
    assert_eq!(
        timeout.outcome.decided_by,
        Some(KernelFunction::TcpKeepaliveTimer)
    );
    let call = timeout.outcome.time_wait.unwrap();
    assert_eq!(
        (call.substate, call.timeo_ms),
        (TwSubstate::FinWait2, 30_000)
    );
    assert_eq!(*timeout.to(), State::time_wait(TwSubstate::FinWait2));
    assert_eq!(*steps[3].to(), State::Freed);

    // Default 60 s: the FIN_WAIT2 minisocket's own timer is the timeout, and it is silent.
    let p = kernel(6, 12);
    let s = step(
        &p,
        &State::time_wait(TwSubstate::FinWait2),
        Input::FinWait2Timeout,
    );
    assert_eq!(*s.to(), State::Freed);
    assert!(s.outcome.wire.is_empty());

    // No time left (or TCP_LINGER2 < 0) when the keepalive timer fires: RST TCP_STATE.
    let p = ModelParams {
        tcp_linger2_secs: -1,
        ..kernel(6, 12)
    };
    let s = step(&p, &state("fin-wait2+orphan"), Input::FinWait2Timeout);
    assert_eq!(s.outcome.wire, vec![Wire::RstActive]);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpState));
    assert_eq!(*s.to(), State::Freed);

    // A socket the application holds has no FIN_WAIT2 timer at all.
    let s = step(&kernel(6, 12), &state("fin-wait2"), Input::FinWait2Timeout);
    assert!(!s.outcome.applicable);
}

#[test]
fn data_acking_the_fin_of_an_orphan_resets_it() {
    for p in [kernel(6, 12), kernel(5, 15)] {
        let s = step(&p, &state("fin-wait1+orphan"), Input::DataAckingFin);
        assert_eq!(s.outcome.wire, vec![Wire::RstReply]);
        let reason = p.kernel.reply_reset_reason(RstReason::TcpAbortOnData);
        assert_eq!(s.outcome.rst_reason, reason);
        assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnData]);
        let states: Vec<_> = s.outcome.state_changes.iter().map(|c| c.to).collect();
        assert_eq!(states, [TcpState::FinWait2, TcpState::Close]);
        assert_eq!(*s.to(), State::Freed);
    }
    let p = kernel(6, 12);
    // Not an orphan, or no FIN of ours outstanding: other inputs explain it.
    for start in ["fin-wait1", "fin-wait2+orphan", "established"] {
        assert!(
            !step(&p, &state(start), Input::DataAckingFin)
                .outcome
                .applicable,
            "{start}"
        );
    }
}

#[test]
fn negative_linger2_aborts_fin_wait2() {
    let p = ModelParams {
        tcp_linger2_secs: -1,
        ..kernel(6, 12)
    };
    // Orphan FIN_WAIT1 whose FIN is ACKed: reply RST, TCPAbortOnData.
    let s = step(&p, &state("fin-wait1+orphan"), Input::AckOfFin);
    assert_eq!(s.outcome.wire, vec![Wire::RstReply]);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpAbortOnData));
    assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnData]);
    assert_eq!(*s.to(), State::Freed);
    // close() in FIN_WAIT2: active RST, TCPAbortOnLinger.
    let s = step(&p, &state("fin-wait2"), Input::Close);
    assert_eq!(s.outcome.wire, vec![Wire::RstActive]);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpAbortOnLinger));
    assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnLinger]);
    assert_eq!(*s.to(), State::Freed);
}

#[test]
fn orphan_retries_exhausted() {
    let p = kernel(6, 12);
    for start in ["fin-wait1+orphan", "closing+orphan", "last-ack+orphan"] {
        let s = step(&p, &state(start), Input::OrphanRetriesExhausted);
        assert!(s.outcome.wire.is_empty(), "{start}");
        assert_eq!(s.outcome.error, Some(Errno::Etimedout));
        assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnTimeout]);
        assert_eq!(*s.to(), State::Freed);
    }
    assert!(
        !step(&p, &state("fin-wait1"), Input::OrphanRetriesExhausted)
            .outcome
            .applicable
    );
}

#[test]
fn a_held_socket_times_out_silently_and_stays_until_close() {
    let p = kernel(6, 12);
    for start in [
        "established",
        "syn-sent",
        "close-wait",
        "fin-wait1",
        "fin-wait2",
        "last-ack",
    ] {
        let s = step(&p, &state(start), Input::ConnectionTimeout);
        assert!(s.outcome.applicable, "{start}");
        assert!(s.outcome.wire.is_empty(), "{start}: no RST");
        assert_eq!(s.outcome.error, Some(Errno::Etimedout));
        assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnTimeout]);
        let State::Socket(sock) = s.to() else {
            panic!("{start}: the application still holds the socket");
        };
        assert_eq!(sock.state, TcpState::Close);
        // Its close() then frees it, sending nothing.
        let closed = step(&p, s.to(), Input::Close);
        assert!(closed.outcome.wire.is_empty());
        assert_eq!(*closed.to(), State::Freed);
    }
    // An orphan takes tcp_orphan_retries' path; a listener has nothing to time out.
    for start in ["fin-wait1+orphan", "listen"] {
        assert!(
            !step(&p, &state(start), Input::ConnectionTimeout)
                .outcome
                .applicable,
            "{start}"
        );
    }
    assert_eq!(
        "user-timeout".parse::<Input>().unwrap(),
        Input::ConnectionTimeout
    );
}

#[test]
fn syn_into_time_wait() {
    for (p, listener) in [
        (kernel(6, 12), true),
        (
            ModelParams {
                listener_on_port: false,
                ..kernel(6, 12)
            },
            false,
        ),
    ] {
        let s = step(&p, &State::time_wait(TwSubstate::TimeWait), Input::TwSyn);
        assert_eq!(s.outcome.tw_status, Some(TwStatus::Syn));
        if listener {
            assert_eq!(*s.to(), State::Freed);
            assert!(s.outcome.wire.is_empty());
        } else {
            assert_eq!(*s.to(), State::time_wait(TwSubstate::TimeWait));
            assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
        }
    }
    // In substate FIN_WAIT2 a SYN is answered with a RST and the minisocket dies.
    let s = step(
        &kernel(6, 12),
        &State::time_wait(TwSubstate::FinWait2),
        Input::TwSyn,
    );
    assert_eq!(s.outcome.tw_status, Some(TwStatus::Rst));
    assert_eq!(s.outcome.wire, vec![Wire::RstReply]);
    assert_eq!(s.outcome.rst_reason, Some(RstReason::TcpTimewaitSocket));
    assert_eq!(*s.to(), State::Freed);
}

#[test]
fn rst_into_time_wait_depends_on_tcp_rfc1337() {
    let tw = State::time_wait(TwSubstate::TimeWait);
    let killed = step(&kernel(6, 12), &tw, Input::TwRst);
    assert_eq!(killed.outcome.tw_status, Some(TwStatus::Success));
    assert_eq!(*killed.to(), State::Freed);
    assert!(killed.outcome.wire.is_empty());

    let rfc1337 = ModelParams {
        tcp_rfc1337: true,
        ..kernel(6, 12)
    };
    let ignored = step(&rfc1337, &tw, Input::TwRst);
    assert_eq!(ignored.outcome.tw_status, Some(TwStatus::Success));
    assert_eq!(*ignored.to(), tw);
    assert!(ignored.outcome.timer.is_none(), "6.x does not re-arm");
    let old = ModelParams {
        tcp_rfc1337: true,
        ..kernel(5, 15)
    };
    assert!(step(&old, &tw, Input::TwRst).outcome.timer.is_some());

    // In substate FIN_WAIT2 any in-window RST kills, whatever tcp_rfc1337 says.
    let s = step(
        &rfc1337,
        &State::time_wait(TwSubstate::FinWait2),
        Input::TwRst,
    );
    assert_eq!(*s.to(), State::Freed);
    // A bare ACK re-arms TIME_WAIT silently.
    let s = step(&kernel(6, 12), &tw, Input::TwAck);
    assert_eq!(s.outcome.timer, Some(TimerArmed::TimeWait { ms: 60_000 }));
    assert!(s.outcome.wire.is_empty());
}

#[test]
fn retransmitted_fin_into_time_wait_is_re_acked() {
    let tw = State::time_wait(TwSubstate::TimeWait);
    for (p, status) in [
        (kernel(6, 12), TwStatus::Ack),
        (kernel(6, 18), TwStatus::AckOow),
    ] {
        for input in [Input::TwFinRetransmit, Input::Fin] {
            let s = step(&p, &tw, input);
            assert_eq!(s.outcome.tw_status, Some(status), "{input}");
            assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
            assert_eq!(s.outcome.timer, Some(TimerArmed::TimeWait { ms: 60_000 }));
            assert_eq!(*s.to(), tw);
        }
    }
}

#[test]
fn data_after_close_resets() {
    for (p, reason) in [
        (kernel(6, 1), None),
        (kernel(6, 12), Some(RstReason::TcpAbortOnData)),
    ] {
        let steps = run(
            &p,
            State::established(),
            &[Input::Close, Input::DataAfterClose],
        );
        let s = &steps[1];
        assert_eq!(s.outcome.wire, vec![Wire::RstReply]);
        assert_eq!(s.outcome.rst_reason, reason);
        assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnData]);
        assert_eq!(*s.to(), State::Freed);
    }
    // Half-closed but still held: the data is queued for the application.
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[Input::ShutdownWr, Input::DataAfterClose],
    );
    assert!(steps[1].outcome.wire == vec![Wire::AckDelayed]);
    assert_eq!(
        *steps[1].to(),
        State::Socket(Sock {
            receive_queue: ReceiveQueue::Unread,
            ..Sock::new(TcpState::FinWait1)
        })
    );
    // In a FIN_WAIT2 minisocket new data is TCP_TW_RST.
    let s = step(&p, &State::time_wait(TwSubstate::FinWait2), Input::TwData);
    assert_eq!(s.outcome.tw_status, Some(TwStatus::Rst));
    assert_eq!(*s.to(), State::Freed);
}

#[test]
fn a_listener_answers_a_segment_of_a_connection_gone_with_a_reset() {
    // Seen in the VM matrix (5.10, kprobe; close-memory-pressure): the peer's ACK arrived after
    // the reset child was destroyed, and the listener on its port replied RST.
    for (p, reason) in [
        (kernel(6, 12), Some(RstReason::TcpFlags)),
        (kernel(5, 10), None),
    ] {
        let s = step(&p, &state("listen"), Input::DataAfterClose);
        assert!(s.outcome.applicable);
        assert_eq!(s.outcome.wire, vec![Wire::RstReply]);
        assert_eq!(s.outcome.rst_reason, reason);
        assert!(s.outcome.state_changes.is_empty());
        assert_eq!(*s.to(), state("listen"));
    }
}

#[test]
fn listener_close_with_children() {
    let p = kernel(6, 12);
    let s = step(&p, &state("listen"), Input::ListenerCloseWithChildren);
    assert_eq!(s.outcome.wire, vec![Wire::RstToChildren]);
    assert_eq!(
        s.outcome.decided_by,
        Some(KernelFunction::InetCskListenStop)
    );
    assert_eq!(
        s.outcome.state_changes,
        vec![StateChange {
            from: TcpState::Listen,
            to: TcpState::Close
        }]
    );
    assert!(s.outcome.counters.is_empty());
    assert_eq!(*s.to(), State::Freed);
    let s = step(&p, &state("listen"), Input::Close);
    assert!(s.outcome.wire.is_empty());
    assert_eq!(*s.to(), State::Freed);
    assert!(
        !step(&p, &State::established(), Input::ListenerCloseWithChildren)
            .outcome
            .applicable
    );
}

#[test]
fn rst_into_a_full_socket() {
    let p = kernel(6, 12);
    let s = step(&p, &State::established(), Input::RstExact);
    assert_eq!(s.outcome.error, Some(Errno::Econnreset));
    assert!(s.outcome.wire.is_empty());
    assert_eq!(s.to().tcp_state(), Some(TcpState::Close));
    let s = step(&p, &state("close-wait"), Input::RstExact);
    assert_eq!(s.outcome.error, Some(Errno::Epipe));
    let s = step(&p, &State::established(), Input::RstInWindow);
    assert_eq!(s.outcome.wire, vec![Wire::ChallengeAck]);
    assert_eq!(*s.to(), State::established());
    let s = step(&p, &State::established(), Input::RstOutOfWindow);
    assert!(s.outcome.wire.is_empty());
    let s = step(&p, &state("fin-wait1+orphan"), Input::RstExact);
    assert_eq!(*s.to(), State::Freed);
}

#[test]
fn shutdown_rules() {
    let p = kernel(6, 12);
    let s = step(&p, &state("syn-sent"), Input::ShutdownWr);
    assert_eq!(s.to().tcp_state(), Some(TcpState::Close));
    assert!(s.outcome.wire.is_empty());
    assert_eq!(s.outcome.error, Some(Errno::Econnreset));
    let s = step(&p, &state("close-wait"), Input::ShutdownWr);
    assert_eq!(s.to().tcp_state(), Some(TcpState::LastAck));
    assert_eq!(s.outcome.wire, vec![Wire::FinSent]);
    let s = step(&p, &State::established(), Input::ShutdownRd);
    assert!(s.outcome.wire.is_empty() && s.outcome.state_changes.is_empty());
    let s = step(&p, &State::established(), Input::ShutdownRdwr);
    assert_eq!(s.to().tcp_state(), Some(TcpState::FinWait1));
}

#[test]
fn fin_is_queued_behind_unsent_data_until_the_window_opens() {
    let p = kernel(6, 12);
    let steps = run(
        &p,
        State::established(),
        &[
            Input::Write,
            Input::Close,
            Input::AckOfFin,
            Input::AckOfData,
            Input::AckOfFin,
        ],
    );
    assert_eq!(steps[1].outcome.wire, vec![Wire::FinQueued]);
    assert!(
        !steps[2].outcome.applicable,
        "the peer cannot ACK a FIN not sent"
    );
    assert_eq!(steps[3].outcome.wire, vec![Wire::FinSent]);
    assert_eq!(*steps[4].to(), State::time_wait(TwSubstate::FinWait2));
}

#[test]
fn fin_without_ack_is_discarded_before_anything_looks_at_it() {
    let p = kernel(6, 12);
    for start in [
        "established",
        "fin-wait1",
        "fin-wait1+orphan",
        "fin-wait2",
        "close-wait",
        "closing",
        "last-ack",
    ] {
        let s = step(&p, &state(start), Input::FinWithoutAck);
        assert!(s.outcome.applicable, "{start}");
        assert_eq!(*s.to(), state(start), "{start}: no state change");
        assert!(s.outcome.wire.is_empty(), "{start}: nothing sent");
        assert!(s.outcome.state_changes.is_empty() && s.outcome.counters.is_empty());
        assert_eq!(
            s.outcome.decided_by,
            Some(KernelFunction::TcpRcvStateProcess)
        );
    }
    // Then the proper FIN+ACK still completes the close (FIN_WAIT1 -> TIME_WAIT).
    let steps = run(
        &p,
        state("fin-wait1+orphan"),
        &[Input::FinWithoutAck, Input::FinAck],
    );
    assert_eq!(
        steps[1].to().tw_substate(),
        Some(TwSubstate::TimeWait),
        "{}",
        steps[1]
    );
    // At a minisocket: FIN_WAIT2 ignores it; TIME_WAIT answers out of window, without re-arming.
    let s = step(
        &p,
        &State::time_wait(TwSubstate::FinWait2),
        Input::FinWithoutAck,
    );
    assert_eq!(s.outcome.tw_status, Some(TwStatus::Success));
    assert!(s.outcome.wire.is_empty());
    let s = step(
        &p,
        &State::time_wait(TwSubstate::TimeWait),
        Input::FinWithoutAck,
    );
    assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(s.outcome.timer, None);
}

#[test]
fn old_duplicate_at_time_wait_is_acked_and_the_minisocket_lives_on() {
    let tw = State::time_wait(TwSubstate::TimeWait);
    for (p, status) in [
        (kernel(6, 1), TwStatus::Ack),
        (kernel(6, 12), TwStatus::Ack),
        (kernel(6, 18), TwStatus::AckOow),
    ] {
        let s = step(&p, &tw, Input::TwOldDuplicate);
        assert_eq!(s.outcome.tw_status, Some(status));
        assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
        assert_eq!(s.outcome.timer, Some(TimerArmed::TimeWait { ms: 60_000 }));
        assert_eq!(*s.to(), tw);
        // An old RST (not at rcv_nxt) is dropped silently; a bare ACK then finds it alive.
        let steps = run(
            &p,
            tw.clone(),
            &[Input::TwOldDuplicate, Input::RstOutOfWindow, Input::TwAck],
        );
        assert!(steps[1].outcome.wire.is_empty() && steps[2].outcome.wire.is_empty());
        assert_eq!(steps[1].outcome.tw_status, Some(TwStatus::Success));
        assert_eq!(*steps[2].to(), tw);
    }
    // In substate FIN_WAIT2 it is outside the window: ACKed, timer untouched.
    let s = step(
        &kernel(6, 12),
        &State::time_wait(TwSubstate::FinWait2),
        Input::TwOldDuplicate,
    );
    assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(s.outcome.timer, None);
}

#[test]
fn orphan_timer_out_of_resources_resets() {
    for (p, reason) in [
        (kernel(6, 1), None),
        (kernel(6, 10), Some(RstReason::NotSpecified)),
        (kernel(6, 12), Some(RstReason::TcpAbortOnMemory)),
    ] {
        for start in ["fin-wait1+orphan", "closing+orphan", "last-ack+orphan"] {
            let s = step(&p, &state(start), Input::OrphanOutOfResources);
            assert_eq!(s.outcome.wire, vec![Wire::RstActive], "{start}");
            assert_eq!(s.outcome.rst_reason, reason, "{start}");
            assert_eq!(s.outcome.counters, vec![TcpExtCounter::TcpAbortOnMemory]);
            assert_eq!(
                s.outcome.decided_by,
                Some(KernelFunction::TcpOutOfResources)
            );
            assert_eq!(*s.to(), State::Freed);
        }
    }
    let p = kernel(6, 12);
    for start in ["fin-wait1", "established", "fin-wait2+orphan"] {
        assert!(
            !step(&p, &state(start), Input::OrphanOutOfResources)
                .outcome
                .applicable,
            "{start}"
        );
    }
    // close() then the timer: FIN first, then the RST (two steps, unlike memory-pressure).
    let steps = run(
        &p,
        State::established(),
        &[Input::Close, Input::OrphanOutOfResources],
    );
    assert_eq!(steps[0].outcome.wire, vec![Wire::FinSent]);
    assert_eq!(steps[1].outcome.wire, vec![Wire::RstActive]);
}

#[test]
fn data_beyond_the_window_gets_a_dupack_even_at_an_orphan() {
    let p = kernel(6, 12);
    // In-window data resets an orphan; the same bytes beyond the window are only acked again.
    let reset = step(&p, &state("fin-wait1+orphan"), Input::DataAckingFin);
    assert!(reset.outcome.wire.iter().any(|w| w.is_rst()));
    for start in [
        "established",
        "fin-wait1+orphan",
        "fin-wait2+orphan",
        "close-wait",
    ] {
        let s = step(&p, &state(start), Input::DataOutOfWindow);
        assert_eq!(s.outcome.wire, vec![Wire::AckImmediate], "{start}");
        assert_eq!(*s.to(), state(start), "{start}");
        assert!(s.outcome.counters.is_empty(), "{start}");
    }
    // A minisocket answers it like an old duplicate: an out-of-window ACK.
    let s = step(&p, &state("tw-fin-wait2"), Input::DataOutOfWindow);
    assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
    assert_eq!(*s.to(), state("tw-fin-wait2"));
    // Nothing to be outside of before the connection is synchronized.
    let s = step(&p, &state("syn-sent"), Input::DataOutOfWindow);
    assert!(!s.outcome.applicable);
}

#[test]
fn connect_af_unspec_disconnects_and_the_application_keeps_the_socket() {
    let p = kernel(6, 12);
    for (from, rst) in [
        ("established", Some(RstReason::TcpState)),
        ("close-wait", Some(RstReason::TcpState)),
        ("fin-wait2", Some(RstReason::TcpState)),
        ("syn-sent", None),
        ("last-ack", None),
    ] {
        let s = step(&p, &state(from), Input::Disconnect);
        assert_eq!(
            s.outcome.decided_by,
            Some(KernelFunction::TcpDisconnect),
            "{from}"
        );
        assert_eq!(s.outcome.rst_reason, rst, "{from}");
        assert_eq!(
            s.outcome.wire.contains(&Wire::RstActive),
            rst.is_some(),
            "{from}"
        );
        // Not __tcp_close(): no TcpExt abort counter, and the socket is not destroyed.
        assert!(
            s.outcome.counters.is_empty(),
            "{from}: {:?}",
            s.outcome.counters
        );
        match s.to() {
            State::Socket(sock) => {
                assert_eq!(sock.state, TcpState::Close, "{from}");
                assert!(!sock.orphan, "{from}");
            }
            other => panic!("{from}: {other}"),
        }
        // ... which the application closes later, without a word on the wire.
        let after = Model::with_state(p, s.to().clone()).step(Input::Close);
        assert!(after.outcome.wire.is_empty(), "{from}");
        assert_eq!(*after.to(), State::Freed, "{from}");
    }
    let orphan = step(&p, &state("fin-wait1+orphan"), Input::Disconnect);
    assert!(!orphan.outcome.applicable, "{}", orphan.outcome.rule);
}

#[test]
fn an_old_syn_at_time_wait_is_acked_not_a_new_incarnation() {
    for p in [kernel(6, 1), kernel(6, 18)] {
        let s = step(&p, &state("tw-time-wait"), Input::TwSynOld);
        assert_eq!(s.outcome.wire, vec![Wire::AckImmediate]);
        assert_eq!(s.outcome.tw_status, Some(p.kernel.tw_oow_ack_status()));
        // No ACK flag: the timer is not re-armed (unlike an old duplicate's).
        assert_eq!(s.outcome.timer, None);
        assert!(matches!(s.to(), State::TimeWait(_)));
        let new = step(&p, &state("tw-time-wait"), Input::TwSyn);
        assert_ne!(new.outcome.tw_status, s.outcome.tw_status);
    }
}

#[test]
fn only_a_new_child_can_lose_its_handshake_to_a_twin() {
    let p = kernel(6, 1);
    let s = step(&p, &state("syn-recv"), Input::ChildLostRace);
    assert!(s.outcome.applicable);
    assert!(s.outcome.wire.is_empty());
    assert!(s.outcome.counters.is_empty());
    assert_eq!(*s.to(), State::Freed);
    assert_eq!(s.outcome.decided_by, Some(KernelFunction::TcpV4SynRecvSock));
    assert!(
        !step(&p, &State::established(), Input::ChildLostRace)
            .outcome
            .applicable
    );
}
