//! Blame down to the line: a C server (built here with frame pointers and debug info) closes a
//! connection with unread data from `finish()`; `tcp-trace resets --stacks` must report the
//! cause, the unread bytes, the server's pid and `finish` at close_unread_peer.c:12.
//!
//! Needs root (BPF) and gcc: #[ignore]d unless run with --include-ignored, and then it fails
//! when either is missing.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
};

use common::{Tracer, free_port};

mod common;

fn build_peer() -> Option<PathBuf> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/close_unread_peer.c");
    let out = std::env::temp_dir().join(format!("tcp-trace-peer-{}", std::process::id()));
    let status = Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .ok()?;
    status.success().then_some(out)
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn reset_on_unread_data_is_blamed_on_the_line_that_closed() {
    if !common::bpf_allowed() {
        return;
    }
    let Some(peer) = build_peer() else {
        common::skip("gcc could not build the test peer");
        return;
    };
    let port = free_port();
    let tracer = Tracer::start(&["resets", "--stacks", "--port", &port.to_string()]);

    let mut server = Command::new(&peer)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "listening");
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(tcp_trace::peer::REQUEST).unwrap();
    let server_pid = server.id();
    assert!(server.wait().unwrap().success());
    drop(client);

    let out = tracer.stop();
    let sent: Vec<_> = out
        .of_type("reset")
        .into_iter()
        .filter(|l| l["direction"] == "sent")
        .collect();
    assert_eq!(sent.len(), 1, "one sent reset reported: {:#?}", out.lines);
    let reset = sent[0];
    assert_eq!(reset["cause"], "close-unread", "{reset}");
    assert_eq!(reset["owner"]["pid"], server_pid, "{reset}");
    assert_eq!(
        reset["unread_bytes"].as_u64(),
        Some(tcp_trace::peer::REQUEST.len() as u64),
        "{reset}"
    );
    let site = reset["close_site"].as_str().unwrap_or_default();
    assert!(
        site.starts_with("finish (") && site.ends_with("close_unread_peer.c:12)"),
        "close() blamed on {site:?}: {reset}"
    );
    std::fs::remove_file(peer).ok();
}
