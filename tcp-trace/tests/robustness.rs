//! The tracer under conditions a production host produces: SIGTERM instead of Ctrl-C, two
//! tracers at once, a traced process that exits mid-trace, IPv6 and IPv4-mapped IPv6 flows.
//!
//! These need root (BPF): #[ignore]d unless run with --include-ignored, and then they fail if
//! they cannot run.

use common::{
    Connection, Listening, Stopped, Tracer, bpf_allowed, free_port, free_port_v6, port_of,
};
use serde_json::Value;

mod common;

/// Every flow a clean close made conforms (an `incomplete` one would hide a missed event), and
/// there are as many as `want` says.
fn assert_all_conform(out: &Stopped, want: usize) {
    let flows = out.flows();
    assert_eq!(flows.len(), want, "{flows:#?}");
    for f in &flows {
        assert_eq!(f["verdict"]["verdict"], "conforms", "{f}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn sigterm_detaches_and_prints_the_summary() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port();
    let tracer = Tracer::start(&["--port", &port.to_string()]);
    Connection::on_loopback(port, "clean");
    let out = tracer.stop_with(libc::SIGTERM);
    assert_eq!(out.code, Some(0));
    let s = out.summary();
    assert_eq!(s["events"].as_u64().unwrap() as usize, out.events_printed());
    assert!(!out.events().is_empty());
    // The listener and both ends.
    assert_all_conform(&out, 3);
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn two_tracers_at_once_both_see_everything() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port();
    let a = Tracer::start(&["--port", &port.to_string()]);
    let b = Tracer::start(&["--port", &port.to_string(), "--view", "events"]);
    Connection::on_loopback(port, "unread");
    // Each sees its own marker only (the other's port is not among its filters).
    let (la, lb) = (a.stop(), b.stop());
    assert_eq!((la.code, lb.code), (Some(0), Some(0)));
    assert_all_conform(&la, 3);
    assert!(lb.flows().is_empty(), "--view events printed flows");
    // Each tracer's programs read the clock themselves: compare what happened, not when.
    let key = |e: &&Value| {
        format!(
            "{} {} {} {} {}",
            e["hook"], e["local"], e["remote"], e["state"], e["new_state"]
        )
    };
    let mut ea: Vec<String> = la.events().iter().map(key).collect();
    let mut eb: Vec<String> = lb.events().iter().map(key).collect();
    ea.sort();
    eb.sort();
    assert!(!ea.is_empty());
    assert_eq!(ea, eb, "the two tracers saw different events");
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn a_traced_process_that_exits_mid_trace_is_fine() {
    if !bpf_allowed() {
        return;
    }
    // The server exists when the tracer starts, and exits while it runs.
    let server = Listening::serve("127.0.0.1:0", "clean");
    let port = server.port;
    let listen = format!("127.0.0.1:{port}");
    let pid = server.pid();
    let tracer = Tracer::start(&["--pid", &pid.to_string()]);
    let c = server.connect(&listen);
    // --pid keeps the marker out: the server's end of the connection and its listener (closed
    // as it exits) are the last the tracer prints.
    let out = tracer.stop_after_sockets(&c.server_sockets());
    assert_eq!(out.code, Some(0));
    let evs = out.events();
    assert!(!evs.is_empty(), "nothing traced for the exited process");
    for e in &evs {
        assert_eq!(e["owner"]["pid"], pid, "{e}");
    }
    // The server's end and its listener conform; the listener, older than the tracer, is
    // judged from the state it was first seen in, and says so.
    let flows = out.flows();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    for f in &flows {
        assert_eq!(f["verdict"]["verdict"], "conforms", "{f}");
        let listener = port_of(&f["key"]["remote"]) == Some(0);
        let began_before = f["notes"].as_array().is_some_and(|n| {
            n.iter().any(|n| {
                n.as_str()
                    .is_some_and(|n| n.starts_with("began before tracing"))
            })
        });
        assert_eq!(
            began_before, listener,
            "only the listener began before tracing: {f}"
        );
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn ipv6_and_ipv4_mapped_flows_are_traced_and_judged() {
    if !bpf_allowed() {
        return;
    }
    // IPv6 on both ends.
    let port = free_port_v6();
    let tracer = Tracer::start(&["--port", &port.to_string()]);
    let v6 = format!("[::1]:{port}");
    Connection::run(&v6, &v6, "clean");
    // A dual-stack listener accepting an IPv4 client: its socket is AF_INET6 with
    // IPv4-mapped addresses.
    let port4 = free_port();
    let tracer4 = Tracer::start(&["--port", &port4.to_string()]);
    Connection::run(
        &format!("[::]:{port4}"),
        &format!("127.0.0.1:{port4}"),
        "clean",
    );

    let out = tracer.stop();
    assert_eq!(out.code, Some(0));
    assert!(out.events().iter().any(|e| e["family"] == "ipv6"
        && e["local"] == format!("[::1]:{port}")
        && e["new_state"] == "FIN_WAIT1"));
    // Clean closes: the listener and both ends conform (an "incomplete" one would hide a
    // missed event).
    assert_all_conform(&out, 3);

    let out = tracer4.stop();
    assert_eq!(out.code, Some(0));
    let mapped = format!("[::ffff:127.0.0.1]:{port4}");
    let all = out.events();
    let server_side: Vec<&&Value> = all.iter().filter(|e| e["local"] == mapped).collect();
    assert!(
        server_side.iter().any(|e| e["family"] == "ipv6"),
        "no event for the mapped server socket: {:#?}",
        out.lines
    );
    assert_all_conform(&out, 3);
    let flows = out.flows();
    let server_flow = flows
        .iter()
        .find(|f| f["key"]["local"] == mapped)
        .unwrap_or_else(|| panic!("no flow for {mapped}: {flows:#?}"));
    assert!(
        server_flow["peer_key"].is_object(),
        "the mapped server flow is not linked to its IPv4 client: {server_flow}"
    );
    assert_eq!(
        server_flow["verdict"]["verdict"], "conforms",
        "{server_flow}"
    );
}
