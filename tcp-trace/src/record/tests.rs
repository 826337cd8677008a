use std::io;

use tcp_trace_common::{EVENT_SIZE, hook};

use super::*;
use crate::{
    attach::Mechanism,
    decode::tests::{facts, v4_event},
};

fn header() -> RecordHeader {
    let hooks = vec![
        HookStatus {
            hook: "tcp_close".into(),
            mechanism: Some(Mechanism::Fentry),
            failures: vec![],
            skipped: None,
        },
        HookStatus {
            hook: "tcp_timewait_state_process:return".into(),
            mechanism: Some(Mechanism::Kretprobe),
            failures: vec![(Mechanism::Fexit, "trampolines disabled".into())],
            skipped: None,
        },
    ];
    let mut h = RecordHeader::new(
        "6.12.0-test".into(),
        Backend::Auto,
        hooks,
        facts(),
        Filters {
            pids: vec![42],
            ports: vec![80, 443],
        },
    );
    h.sysctls
        .insert("net.ipv4.tcp_fin_timeout".into(), "60".into());
    // Fixed, so that two calls compare equal.
    h.recorded_at_unix_ns = 1_750_000_000_000_000_000;
    h.realtime_minus_monotonic_ns = 1_749_000_000_000_000_000;
    h
}

/// What a reader gets back: `facts.config` is not recorded.
fn as_read(h: &RecordHeader) -> RecordHeader {
    let mut h = h.clone();
    h.facts.config = Default::default();
    h
}

fn events() -> Vec<Event> {
    let mut a = v4_event(hook::TCP_CLOSE, 40000, 80);
    a.ts_ns = 1_000;
    let mut b = v4_event(hook::INET_SOCK_SET_STATE, 40000, 80);
    b.ts_ns = 2_000;
    b.old_state = 1;
    b.new_state = 4;
    let mut c = v4_event(hook::TCP_DESTROY_SOCK, 40000, 80);
    c.ts_ns = 3_000;
    vec![a, b, c]
}

/// Header, 2 events, a lost marker, 1 event, trailer.
fn small_recording() -> (Vec<u8>, Vec<Record>) {
    let evs = events();
    let mut w = RecordWriter::new(Vec::new(), &header()).unwrap();
    w.event(&evs[0]).unwrap();
    w.event(&evs[1]).unwrap();
    w.lost(2_500, 7).unwrap();
    w.event(&evs[2]).unwrap();
    assert_eq!(w.events_written(), 3);
    let bytes = w.finish().unwrap();
    let records = vec![
        Record::Event(evs[0]),
        Record::Event(evs[1]),
        Record::Lost {
            ts_ns: 2_500,
            total: 7,
        },
        Record::Event(evs[2]),
        Record::End { events: 3, lost: 7 },
    ];
    (bytes, records)
}

/// Offset of the first record.
fn body_start(bytes: &[u8]) -> usize {
    16 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize
}

fn raw_record(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![tag];
    r.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// A file with the given version, raw header bytes and body.
fn file_with(version: u32, header_json: &[u8], body: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    f.extend_from_slice(header_json);
    f.extend_from_slice(body);
    f
}

fn good_header_json() -> Vec<u8> {
    serde_json::to_vec(&header()).unwrap()
}

/// Everything the iterator yields, split into the Ok records and the final error.
fn read_stream(bytes: &[u8]) -> Result<(Vec<Record>, Option<RecordError>), RecordError> {
    let (_, reader) = RecordReader::open(bytes)?;
    let mut ok = Vec::new();
    for r in reader {
        match r {
            Ok(rec) => ok.push(rec),
            Err(e) => return Ok((ok, Some(e))),
        }
    }
    Ok((ok, None))
}

#[test]
fn round_trip() {
    let (bytes, records) = small_recording();
    assert_eq!(&bytes[..8], b"TCPTRACE");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    let (h, got) = read_all(&bytes).unwrap();
    assert_eq!(h, as_read(&header()));
    assert_eq!(h.event_size as usize, EVENT_SIZE);
    assert_eq!(h.sysctl("net.ipv4.tcp_fin_timeout"), Some("60"));
    assert_eq!(h.facts.rst_reason(9).to_string(), "TCP_ABORT_ON_CLOSE");
    assert_eq!(got, records);
    // 3 events + lost + trailer, each with a 3-byte record header.
    assert_eq!(
        bytes.len(),
        body_start(&bytes) + 3 * (3 + EVENT_SIZE) + 2 * (3 + 16)
    );

    let (_, mut reader) = RecordReader::open(bytes.as_slice()).unwrap();
    assert_eq!(reader.offset() as usize, body_start(&bytes));
    assert!(!reader.finished());
    assert_eq!(reader.by_ref().count(), records.len());
    assert!(reader.finished());
    assert_eq!(reader.offset() as usize, bytes.len());
    assert_eq!((reader.records_read(), reader.events_read()), (5, 3));
    assert!(reader.next().is_none());
}

#[test]
fn empty_recording_round_trips() {
    let bytes = RecordWriter::new(Vec::new(), &header())
        .unwrap()
        .finish()
        .unwrap();
    let (_, got) = read_all(&bytes).unwrap();
    assert_eq!(got, vec![Record::End { events: 0, lost: 0 }]);
}

#[test]
fn header_helpers() {
    let mut h = header();
    h.realtime_minus_monotonic_ns = 1_000;
    assert_eq!(h.wall_clock_ns(5), 1_005);
    h.realtime_minus_monotonic_ns = -10;
    assert_eq!(h.wall_clock_ns(5), 0);
    let now = RecordHeader::new(
        "x".into(),
        Backend::Kprobe,
        vec![],
        facts(),
        Filters::default(),
    );
    assert!(now.recorded_at_unix_ns > 1_700_000_000_000_000_000);
    // Realtime is decades ahead of monotonic (time since boot).
    assert!(now.realtime_minus_monotonic_ns > 1_000_000_000_000_000_000);
    assert_eq!(now.tool_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(now.event_size as usize, EVENT_SIZE);
}

#[test]
fn truncation_at_every_offset_is_an_error_naming_an_offset() {
    let (bytes, records) = small_recording();
    let body = body_start(&bytes);
    for cut in 0..bytes.len() {
        let part = &bytes[..cut];
        let strict = read_all(part).unwrap_err();
        let msg = strict.to_string();
        let at = strict
            .offset()
            .unwrap_or_else(|| panic!("cut at {cut}: no offset in {msg}"));
        assert!(at <= cut as u64, "cut at {cut}: offset {at} past the end");
        assert!(
            msg.starts_with(&format!("byte {at}: ")),
            "cut at {cut}: {msg}"
        );
        if cut == 0 {
            assert!(matches!(strict, RecordError::Empty), "{msg}");
            continue;
        }
        assert!(strict.is_cut_short(), "cut at {cut}: {msg}");
        assert!(msg.contains("cut short"), "cut at {cut}: {msg}");
        if cut < body {
            assert!(RecordReader::open(part).is_err(), "cut at {cut}");
            continue;
        }
        // The records before the cut are all returned, then the error.
        let (ok, err) = read_stream(part).unwrap();
        let err = err.unwrap();
        assert!(err.is_cut_short(), "cut at {cut}: {err}");
        assert_eq!(ok.as_slice(), &records[..ok.len()], "cut at {cut}");
        assert_eq!(err.complete_records(), Some(ok.len() as u64));
        assert!(ok.len() < records.len());
        assert_eq!(err.to_string(), msg);
    }
}

#[test]
fn truncation_message_says_what_was_expected() {
    let (bytes, _) = small_recording();
    let body = body_start(&bytes);
    let err = read_all(&bytes[..body + 3 + 12]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "byte {}: file ends inside an event record (expected 200 bytes, found 12): the \
             recording was cut short after 0 complete records",
            body + 3
        )
    );
    let err = read_all(&bytes[..5]).unwrap_err().to_string();
    assert!(
        err.starts_with("byte 0: file ends inside the magic number"),
        "{err}"
    );
    let err = read_all(&bytes[..100]).unwrap_err().to_string();
    assert!(
        err.starts_with("byte 16: file ends inside the JSON header"),
        "{err}"
    );
}

#[test]
fn missing_trailer_is_unfinished_and_keeps_the_records() {
    let (bytes, records) = small_recording();
    let cut = &bytes[..bytes.len() - (3 + 16)];
    let (ok, err) = read_stream(cut).unwrap();
    assert_eq!(ok.as_slice(), &records[..4]);
    let err = err.unwrap();
    assert!(matches!(err, RecordError::Unfinished { .. }), "{err}");
    assert!(err.is_cut_short());
    assert_eq!(err.offset(), Some(cut.len() as u64));
    assert_eq!(err.complete_records(), Some(4));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "byte {}: the recording was not finished",
            cut.len()
        )),
        "{msg}"
    );
    assert!(msg.contains("4 complete records (3 events)"), "{msg}");
}

#[test]
fn not_a_recording() {
    let err = read_all(b"\x7fELF\x02\x01\x01\x00rest").unwrap_err();
    assert!(matches!(err, RecordError::NotARecording { .. }));
    assert!(!err.is_cut_short());
    assert_eq!(
        err.to_string(),
        "not a tcp-trace recording: the file starts with \"\\x7fELF\\x02\\x01\\x01\\x00\" \
         instead of TCPTRACE"
    );
    // Shorter than the magic and not a prefix of it: not ours, rather than cut short.
    let err = read_all(b"{}").unwrap_err();
    assert!(matches!(err, RecordError::NotARecording { .. }), "{err}");
    let err = read_all(b"").unwrap_err();
    assert!(matches!(err, RecordError::Empty), "{err}");
}

#[test]
fn newer_and_bogus_versions() {
    let (mut bytes, _) = small_recording();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let err = read_all(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "recording format version 7 is newer than this tcp-trace understands (2): upgrade \
         tcp-trace"
    );
    assert_eq!(err.offset(), Some(8));
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    let err = read_all(&bytes).unwrap_err().to_string();
    assert!(err.contains("version 0 does not exist"), "{err}");
}

#[test]
fn header_length_over_the_cap() {
    let (mut bytes, _) = small_recording();
    bytes[12..16].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
    let err = read_all(&bytes).unwrap_err();
    assert!(matches!(
        err,
        RecordError::HeaderTooLarge { offset: 12, .. }
    ));
    assert!(
        err.to_string()
            .starts_with("byte 12: header length 16777217"),
        "{err}"
    );
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        RecordError::HeaderTooLarge { .. }
    ));
    // At the cap, a short file is cut short, without reserving the claimed length.
    bytes[12..16].copy_from_slice(&MAX_HEADER_LEN.to_le_bytes());
    let err = read_all(&bytes).unwrap_err();
    assert!(
        matches!(err, RecordError::Truncated { offset: 16, .. }),
        "{err}"
    );
}

#[test]
fn bad_json_header() {
    let err = read_all(&file_with(FORMAT_VERSION, b"{not json", b"")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("byte 16: header is not valid JSON: "),
        "{msg}"
    );
    assert!(std::error::Error::source(&err).is_some());

    let err = read_all(&file_with(
        FORMAT_VERSION,
        br#"{"tool_version": "0.1.0"}"#,
        b"",
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("byte 16: header does not describe a tcp-trace recording: missing field"),
        "{msg}"
    );
}

#[test]
fn a_hook_the_registry_lacks_is_refused() {
    let mut h = header();
    h.hooks[0].hook = "tcp_bogus".into();
    let json = serde_json::to_vec(&h).unwrap();
    let err = read_all(&file_with(FORMAT_VERSION, &json, b"")).unwrap_err();
    assert!(matches!(err, RecordError::UnknownHook { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("byte 16") && msg.contains("`tcp_bogus`"),
        "{msg}"
    );
}

#[test]
fn additive_header_fields_are_compatible() {
    let mut v: serde_json::Value = serde_json::from_slice(&good_header_json()).unwrap();
    v["a_field_from_the_future"] = serde_json::json!({"x": 1});
    v.as_object_mut().unwrap().remove("sysctls");
    v.as_object_mut().unwrap().remove("filters");
    let json = serde_json::to_vec(&v).unwrap();
    let body = raw_record(TAG_END, &pair(0, 0));
    let (h, records) = read_all(&file_with(FORMAT_VERSION, &json, &body)).unwrap();
    assert!(h.sysctls.is_empty());
    assert_eq!(h.filters, Filters::default());
    assert!(h.netns.is_empty() && h.live_flows.is_empty());
    assert_eq!(records, vec![Record::End { events: 0, lost: 0 }]);
}

#[test]
fn per_netns_settings_and_live_verdicts_round_trip() {
    let mut h = header();
    h.netns.insert(
        4026532386,
        NetnsSettings {
            sysctls: BTreeMap::from([("net.ipv4.tcp_fin_timeout".into(), "7".into())]),
            tcp_linger2_secs: Some(-1),
            listener_on_port: None,
        },
    );
    let flow = serde_json::json!({
        "key": {"netns": 4026532386u32, "local": "10.0.0.1:8080", "remote": "10.0.0.2:40000"},
        "inputs": ["close", "ack-of-fin"],
        "verdict": {"verdict": "conforms", "checked": ["a", "b"], "unchecked": ["c"]},
    });
    let judged = JudgedFlow::from_flow_json(&flow).unwrap();
    assert_eq!((judged.checked, judged.unchecked), (2, 1));
    assert_eq!(judged.inputs, ["close", "ack-of-fin"]);
    h.live_flows.push(judged);
    let mut buf = Vec::new();
    RecordWriter::new(&mut buf, &h).unwrap().finish().unwrap();
    let (read, _) = read_all(&buf).unwrap();
    assert_eq!(read, as_read(&h));
    // The namespace's inode is a JSON object key, so a string.
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains(r#""netns":{"4026532386":"#), "{text}");
    // Not a flow: no key.
    assert_eq!(
        JudgedFlow::from_flow_json(&serde_json::json!({"type": "lost"})),
        None
    );
}

#[test]
fn event_size_mismatch() {
    let mut h = header();
    h.event_size = 184;
    let json = serde_json::to_vec(&h).unwrap();
    let err = read_all(&file_with(FORMAT_VERSION, &json, b"")).unwrap_err();
    assert!(matches!(
        err,
        RecordError::EventSizeMismatch {
            recorded: 184,
            expected: EVENT_SIZE,
            ..
        }
    ));
    // A format 1 file must say 192.
    let err = read_all(&file_with(1, &json, b"")).unwrap_err();
    assert!(matches!(
        err,
        RecordError::EventSizeMismatch {
            recorded: 184,
            expected: 192,
            ..
        }
    ));
    assert!(RecordWriter::new(Vec::new(), &h).is_err());
}

#[test]
fn unknown_tag() {
    let json = good_header_json();
    let body = raw_record(b'Q', &[0; 16]);
    let err = read_all(&file_with(FORMAT_VERSION, &json, &body)).unwrap_err();
    let at = 16 + json.len();
    assert_eq!(
        err.to_string(),
        format!(
            "byte {at}: record tag 0x51 is not E, L or Z (file corrupt or not a tcp-trace \
             recording)"
        )
    );
    assert!(!err.is_cut_short());
}

#[test]
fn wrong_length_for_known_tags() {
    let json = good_header_json();
    let at = 16 + json.len();
    let ev = v4_event(hook::TCP_CLOSE, 1, 2);
    let mut body = raw_record(TAG_EVENT, event_bytes(&ev));
    body[1..3].copy_from_slice(&100u16.to_le_bytes());
    let err = read_all(&file_with(FORMAT_VERSION, &json, &body)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("byte {at}: event record (tag E) has length 100, expected 200 (file corrupt)")
    );
    for tag in [TAG_LOST, TAG_END] {
        let body = raw_record(tag, &[0; 8]);
        let err = read_all(&file_with(FORMAT_VERSION, &json, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                RecordError::BadLength {
                    len: 8,
                    expected: 16,
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn event_with_unknown_hook() {
    let json = good_header_json();
    let good = v4_event(hook::TCP_CLOSE, 1, 2);
    let mut bad = good;
    bad.hook = 200;
    let mut body = raw_record(TAG_EVENT, event_bytes(&good));
    let at = 16 + json.len() + body.len();
    body.extend(raw_record(TAG_EVENT, event_bytes(&bad)));
    let (ok, err) = read_stream(&file_with(FORMAT_VERSION, &json, &body)).unwrap();
    assert_eq!(ok, vec![Record::Event(good)]);
    let err = err.unwrap();
    assert!(matches!(err, RecordError::BadEvent { .. }));
    assert_eq!(err.offset(), Some(at as u64));
    let msg = err.to_string();
    assert!(msg.contains("unknown hook number 200"), "{msg}");
    assert!(!err.is_cut_short());

    // The writer refuses to write what the reader would reject.
    let mut w = RecordWriter::new(Vec::new(), &header()).unwrap();
    assert!(w.event(&bad).is_err());
    assert_eq!(w.events_written(), 0);
}

#[test]
fn records_after_the_trailer() {
    let (mut bytes, records) = small_recording();
    let end = bytes.len();
    bytes.extend(raw_record(
        TAG_EVENT,
        event_bytes(&v4_event(hook::TCP_FIN, 1, 2)),
    ));
    let (ok, err) = read_stream(&bytes).unwrap();
    assert_eq!(ok.as_slice(), &records[..4]);
    let err = err.unwrap();
    assert!(
        matches!(err, RecordError::DataAfterEnd { byte: b'E', .. }),
        "{err}"
    );
    assert_eq!(err.offset(), Some(end as u64));
    assert!(!err.is_cut_short());

    // Even a single stray byte.
    let (mut bytes, _) = small_recording();
    bytes.push(0);
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        RecordError::DataAfterEnd { .. }
    ));
}

#[test]
fn trailer_must_match_the_records() {
    let (mut bytes, _) = small_recording();
    let n = bytes.len();
    bytes[n - 16..n - 8].copy_from_slice(&4u64.to_le_bytes());
    let err = read_all(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "byte {}: the end-of-trace record counts 4 events but the file holds 3 (file \
             corrupt)",
            n - 19
        )
    );
    let (mut bytes, _) = small_recording();
    bytes[n - 8..].copy_from_slice(&0u64.to_le_bytes());
    let err = read_all(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            RecordError::TrailerMismatch {
                what: "lost events",
                trailer: 0,
                counted: 7,
                ..
            }
        ),
        "{err}"
    );
}

/// A reader that hands out `ok` bytes, a few at a time, then fails.
struct Flaky<'a> {
    data: &'a [u8],
    ok: usize,
}

impl Read for Flaky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.ok).min(self.data.len()).min(7);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn io_errors_name_the_offset_and_small_reads_work() {
    let (bytes, records) = small_recording();
    let (_, r) = RecordReader::open(Flaky {
        data: &bytes,
        ok: usize::MAX,
    })
    .unwrap();
    assert_eq!(r.collect::<Result<Vec<_>, _>>().unwrap(), records);

    let fail_at = body_start(&bytes) + 50;
    let (_, r) = RecordReader::open(Flaky {
        data: &bytes,
        ok: fail_at,
    })
    .unwrap();
    let err = r.last().unwrap().unwrap_err();
    assert!(matches!(err, RecordError::Io { .. }), "{err}");
    assert_eq!(err.offset(), Some(fail_at as u64));
    assert!(err.to_string().contains("disk on fire"));
}

/// Random corruption of a valid recording: errors or records, never a panic.
#[test]
fn mutated_recordings_never_panic() {
    let (bytes, _) = small_recording();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rand() % 4 {
            let i = (rand() as usize) % b.len();
            b[i] = rand() as u8;
        }
        if rand() % 4 == 0 {
            b.truncate((rand() as usize) % b.len());
        }
        if let Err(e) = read_all(&b) {
            let _ = (e.to_string(), e.offset(), e.is_cut_short());
        }
    }
}

/// The Event layout table in docs/record-format.md matches the ABI.
#[test]
fn documented_event_layout_matches_the_abi() {
    use std::mem::offset_of;
    let doc = include_str!("../../../docs/record-format.md");
    let section = doc
        .split("### The event payload")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let actual = |name: &str| -> usize {
        match name {
            "ts_ns" => offset_of!(Event, ts_ns),
            "sk" => offset_of!(Event, sk),
            "skb" => offset_of!(Event, skb),
            "timeout" => offset_of!(Event, timeout),
            "linger_jiffies" => offset_of!(Event, linger_jiffies),
            "cpu" => offset_of!(Event, cpu),
            "tgid" => offset_of!(Event, tgid),
            "tid" => offset_of!(Event, tid),
            "owner_tgid" => offset_of!(Event, owner_tgid),
            "netns" => offset_of!(Event, netns),
            "reason" => offset_of!(Event, reason),
            "unread" => offset_of!(Event, unread),
            "unsent" => offset_of!(Event, unsent),
            "unacked" => offset_of!(Event, unacked),
            "seq" => offset_of!(Event, seq),
            "ack_seq" => offset_of!(Event, ack_seq),
            "seg_len" => offset_of!(Event, seg_len),
            "rcv_nxt" => offset_of!(Event, rcv_nxt),
            "ret" => offset_of!(Event, ret),
            "flags" => offset_of!(Event, flags),
            "sport" => offset_of!(Event, sport),
            "dport" => offset_of!(Event, dport),
            "family" => offset_of!(Event, family),
            "hook" => offset_of!(Event, hook),
            "old_state" => offset_of!(Event, old_state),
            "new_state" => offset_of!(Event, new_state),
            "tcp_flags" => offset_of!(Event, tcp_flags),
            "saddr" => offset_of!(Event, saddr),
            "daddr" => offset_of!(Event, daddr),
            "comm" => offset_of!(Event, comm),
            "owner_comm" => offset_of!(Event, owner_comm),
            "user_stack" => offset_of!(Event, user_stack),
            "_reserved" => offset_of!(Event, _reserved),
            "close_ret" => offset_of!(Event, close_ret),
            "owner_cgroup" => offset_of!(Event, owner_cgroup),
            other => panic!("documented field {other} is not in Event"),
        }
    };
    let mut seen = 0;
    for line in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        for triple in cells.get(1..).unwrap_or_default().chunks(3) {
            let [off, _, name] = triple else { continue };
            let (Ok(off), Some(name)) = (off.parse::<usize>(), name.split('`').nth(1)) else {
                continue;
            };
            assert_eq!(off, actual(name), "documented offset of {name}");
            seen += 1;
        }
    }
    assert_eq!(seen, 35, "every Event field is documented");
}

/// Recordings of format 1 (192-byte events, before `owner_cgroup`) still read: the field is 0.
#[test]
fn format_1_recordings_still_read() {
    let mut h = header();
    h.event_size = tcp_trace_common::EVENT_SIZE_V1 as u32;
    let json = serde_json::to_vec(&h).unwrap();
    let mut body = Vec::new();
    let mut evs = events();
    for e in &mut evs {
        e.owner_cgroup = 0;
        let bytes = crate::decode::event_bytes(e);
        body.push(TAG_EVENT);
        body.extend_from_slice(&(tcp_trace_common::EVENT_SIZE_V1 as u16).to_le_bytes());
        body.extend_from_slice(&bytes[..tcp_trace_common::EVENT_SIZE_V1]);
    }
    body.push(TAG_END);
    body.extend_from_slice(&16u16.to_le_bytes());
    body.extend_from_slice(&pair(evs.len() as u64, 0));
    let (_, got) = read_all(&file_with(1, &json, &body)).unwrap();
    let got: Vec<Event> = got
        .into_iter()
        .filter_map(|r| match r {
            Record::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(got, evs);
    // And a real one: the fuzz corpus was recorded in format 1.
    let real = include_bytes!("../../../fuzz/corpus/record/clean-close.tt");
    assert_eq!(u32::from_le_bytes(real[8..12].try_into().unwrap()), 1);
    let (_, recs) = read_all(real).unwrap();
    assert!(recs.iter().any(|r| matches!(r, Record::Event(_))));
}
