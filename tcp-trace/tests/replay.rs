//! `tcp-trace replay` end to end, without root: recordings written with the library's writer,
//! replayed by the real binary; exit codes and output checked.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use serde_json::Value;
use tcp_trace::{
    attach::Backend,
    kernel::btf::KernelFacts,
    record::{Filters, RecordHeader, RecordWriter},
};
use tcp_trace_common::{AF_INET, Event, flag, hook, state};

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

fn facts() -> KernelFacts {
    KernelFacts::new(
        Default::default(),
        BTreeMap::from([(9, "TCP_ABORT_ON_CLOSE".to_string())]),
        BTreeMap::from([(0, "SUCCESS".into()), (1, "RST".into()), (2, "ACK".into())]),
        BTreeMap::new(),
        BTreeMap::new(),
    )
}

fn header() -> RecordHeader {
    let hooks = [
        "sock:inet_sock_set_state",
        "tcp:tcp_send_reset",
        "tcp:tcp_receive_reset",
        "tcp:tcp_destroy_sock",
    ]
    .iter()
    .map(|h| tcp_trace::attach::HookStatus {
        hook: h.to_string(),
        mechanism: Some(tcp_trace::attach::Mechanism::TpBtf),
        failures: vec![],
        skipped: None,
    })
    .collect();
    let mut h = RecordHeader::new(
        "6.18.0-test".into(),
        Backend::Auto,
        hooks,
        facts(),
        Filters::default(),
    );
    h.sysctls.insert("kernel.version".into(), "6.18.0".into());
    h
}

fn event(ts: u64, h: u8, old: u8, new: u8) -> Event {
    let mut e = Event::zeroed();
    e.ts_ns = ts;
    e.hook = h;
    e.family = AF_INET;
    e.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
    e.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    e.sport = 8080;
    e.dport = 40000;
    e.sk = 0xffff_8880_0000_1000;
    e.netns = 4026531840;
    e.old_state = old;
    e.new_state = new;
    e.flags = flag::OWNER_KNOWN;
    e.owner_tgid = 42;
    e.owner_comm[..6].copy_from_slice(b"server");
    e
}

/// A server closing with unread data: CLOSE, an active RST with `reason`, destroy.
fn unread_close(reason: u32) -> Vec<Event> {
    let mut rst = event(2_000, hook::TCP_SEND_RESET, state::CLOSE, 0);
    rst.flags |= flag::HAS_REASON;
    rst.reason = reason;
    vec![
        event(
            1_000,
            hook::INET_SOCK_SET_STATE,
            state::ESTABLISHED,
            state::CLOSE,
        ),
        rst,
        event(3_000, hook::TCP_DESTROY_SOCK, state::CLOSE, 0),
    ]
}

fn write(name: &str, events: &[Event], finish: bool) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tcp-trace-test-{}-{name}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let mut w = RecordWriter::new(file, &header()).unwrap();
    for e in events {
        w.event(e).unwrap();
    }
    if finish {
        w.finish().unwrap();
    } else {
        w.flush().unwrap();
    }
    path
}

fn replay(path: &PathBuf) -> (i32, Vec<Value>, String) {
    let out = Command::new(BIN)
        .args(["--json", "replay"])
        .arg(path)
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        out.status.code().unwrap(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_recording_replays_to_the_same_events_and_verdicts() {
    let path = write("ok", &unread_close(9), true);
    let (code, lines, stderr) = replay(&path);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines[0]["type"], "start");
    let events: Vec<_> = lines.iter().filter(|l| l["type"] == "event").collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[1]["rst_reason"], "TCP_ABORT_ON_CLOSE");
    assert_eq!(events[1]["owner"]["pid"], 42);
    let flow = lines
        .iter()
        .find(|l| l["type"] == "flow")
        .expect("a flow report");
    assert_eq!(flow["verdict"]["verdict"], "conforms", "{flow}");
    assert_eq!(flow["inputs"][0], "close-unread");
    std::fs::remove_file(path).ok();
}

#[test]
fn a_divergence_sets_the_exit_status() {
    // A bare ACK at rcv_nxt reaching TIME_WAIT, answered (per this recording) with TCP_TW_RST:
    // the model says SUCCESS (the timer is re-armed, nothing is sent).
    let mut seg = event(1_000, hook::TW_STATE_PROCESS, state::TIME_WAIT, 0);
    seg.flags |= flag::TW_SOCK;
    seg.tcp_flags = 0x10;
    seg.seq = 5000;
    seg.rcv_nxt = 5000;
    let mut ret = event(
        2_000,
        hook::TW_STATE_PROCESS_RET,
        state::TIME_WAIT,
        state::TIME_WAIT,
    );
    ret.flags |= flag::TW_SOCK | flag::HAS_RET;
    ret.ret = 1;
    let events = vec![seg, ret];
    let path = write("diverge", &events, true);
    let (code, lines, _) = replay(&path);
    let flow = lines
        .iter()
        .find(|l| l["type"] == "flow")
        .expect("a flow report");
    assert_eq!(flow["verdict"]["verdict"], "diverges", "{flow}");
    assert_eq!(
        code,
        i32::from(tcp_trace::exit::DIVERGED),
        "a divergence is not an error"
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn a_recording_cut_short_is_replayed_and_flagged() {
    let path = write("cut", &unread_close(9), false);
    let (code, lines, stderr) = replay(&path);
    assert_eq!(code, i32::from(tcp_trace::exit::CUT_SHORT), "{stderr}");
    assert!(stderr.contains("cut short"), "{stderr}");
    assert_eq!(lines.iter().filter(|l| l["type"] == "event").count(), 3);
    std::fs::remove_file(path).ok();
}

#[test]
fn not_a_recording_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("tcp-trace-test-{}-garbage", std::process::id()));
    std::fs::write(&path, b"hello, world: not a recording").unwrap();
    let (code, _, stderr) = replay(&path);
    assert_eq!(code, i32::from(tcp_trace::exit::ERROR));
    assert!(stderr.contains("not a tcp-trace recording"), "{stderr}");
    let missing = Command::new(BIN)
        .args(["replay", "/nonexistent/x.tt"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open /nonexistent/x.tt"));
    std::fs::remove_file(path).ok();
}

/// A kernel's own events (Debian 5.10 under qemu, kprobe backend, validate's
/// close-memory-pressure): the peer's ACK arrived after the reset child was gone, and the
/// listener on its port answered with a RST. The model says so (it once called it a
/// divergence, which failed that scenario now and then).
#[test]
fn a_listener_answering_for_a_connection_gone_conforms() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kernel/5.10-kprobe-close-memory-pressure.tt");
    let (code, lines, stderr) = replay(&path);
    assert_eq!(code, 0, "{stderr}");
    let flows: Vec<&Value> = lines.iter().filter(|l| l["type"] == "flow").collect();
    assert_eq!(flows.len(), 5, "{flows:#?}");
    for f in &flows {
        assert_eq!(f["verdict"]["verdict"], "conforms", "{f}");
    }
    let listener = flows
        .iter()
        .find(|f| f["observed"] == "LISTEN → CLOSE; RST reply")
        .expect("the listener's flow, with its reply");
    assert_eq!(
        listener["inputs"],
        serde_json::json!(["data-after-close", "close"]),
        "{listener}"
    );
}
